"""A resume continues the same run or is refused (issue 26, findings 1-3 and 9): the workdir's
config.json and sources.json are the run's record; a changed loss, learning rate, model or batch
size is refused in one line naming the keys before anything is written, and an explicit
`train.resume_changed` continues with the change recorded in config_history.jsonl; the data cursor
counts rows, so a batch-size change neither replays nor skips a pair; data without a preference
(all ties, or chosen == rejected) is refused; a checkpoint that cannot be written is one line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import losses_of, make_config

from apo_jax import data, train
from apo_jax.data.reader import DataError
from apo_jax.data.tfrecords import read_records, write_shards
from apo_jax.train.config import ConfigError


def _files(workdir: pathlib.Path) -> dict[str, bytes]:
    """Every file of the workdir but the checkpoints, by path: what a refused resume must not touch."""
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, records):
    """A finished 3-step APO-zero run at batch 8 (its checkpoint is the resume point), copied per test."""
    root = tmp_path_factory.mktemp("resume")
    train.run(make_config(root / "run", records, train__steps=3))
    return root / "run"


@pytest.fixture
def workdir(three_steps, tmp_path):
    shutil.copytree(three_steps, tmp_path / "run")
    return tmp_path / "run"


def test_a_changed_loss_and_learning_rate_are_refused_naming_both_and_nothing_is_written(workdir, records):
    before = _files(workdir)
    cfg = make_config(workdir, records, train__steps=6, loss__name="sigmoid", optimizer__lr=0.5)
    with pytest.raises(ConfigError) as e:
        train.run(cfg)
    said = str(e.value)
    assert "\n" not in said
    assert 'loss.name: "apo_zero" -> "sigmoid"' in said and "optimizer.lr: 0.001 -> 0.5" in said
    assert "train.steps" not in said  # the run's length may change
    assert _files(workdir) == before  # config.json byte-identical, no metrics appended


def test_a_refused_resume_keeps_the_record_of_the_run(workdir, records):
    """Finding 3: a resume refused for an architecture change used to leave config.json holding the
    refused config while the error said to restore the old one."""
    before = (workdir / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"lora\.rank: 0 -> 4"):
        train.run(make_config(workdir, records, train__steps=6, lora__rank=4))
    assert (workdir / "config.json").read_bytes() == before


def test_other_weights_under_the_same_model_path_are_refused(tmp_path):
    """Finding 1's model half: model.path names a folder; the record keeps a fingerprint of its
    weights, so another model of the same shape copied over it is seen."""
    from apo_jax.train import record

    folder = tmp_path / "model"
    folder.mkdir()
    weights = np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes()
    (folder / "model.safetensors").write_bytes(weights)
    cfg = make_config(tmp_path / "run", tmp_path / "data", model__path=str(folder), model__preset="")
    first = record.sources(cfg, {}, rows=32)
    (folder / "model.safetensors").write_bytes(weights[:-4] + b"\0\0\0\0")  # one weight differs
    second = record.sources(cfg, {}, rows=32)
    assert first["model.path"] != second["model.path"] and first["data.train"] == second["data.train"]
    (tmp_path / "run").mkdir()
    record.check(cfg, tmp_path / "run", False, first).write(0)
    with pytest.raises(ConfigError, match=r"model\.path \(its contents\)"):
        record.check(cfg, tmp_path / "run", True, second)
    record.check(cfg, tmp_path / "run", True, first)  # the same weights resume


def test_resume_changed_continues_records_the_change_and_reads_the_next_rows(workdir, records):
    """Findings 1 and 2: with the explicit override the run continues with the new loss, learning
    rate and batch size; config.json still says how the run started, the history says what changed
    at which step, and the cursor continues at the row after the last one read (3 × 8 = 24), where
    the old cursor (epoch, batch index) re-read rows 12-23 at batch 4."""
    before = (workdir / "config.json").read_bytes()
    cfg = make_config(
        workdir,
        records,
        train__steps=6,
        train__batch_size=4,
        train__resume_changed=True,
        loss__name="sigmoid",
        optimizer__lr=0.5,
    )
    cfg.train.checkpoint_every = 1
    train.run(cfg)
    assert (workdir / "config.json").read_bytes() == before
    (line,) = [json.loads(x) for x in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert line["step"] == 3 and line["config"]["loss"]["name"] == "sigmoid"
    assert line["changed"]["optimizer.lr"] == {"old": 0.001, "new": 0.5}
    assert line["changed"]["train.batch_size"] == {"old": 8, "new": 4}
    assert len(losses_of(workdir)) == 6
    # cursor after step s: rows 24 + 4·(s - 3) of 32 per epoch, the epoch's last full batch at row 28
    for step, (epoch, row) in {4: (0, 28), 5: (1, 0), 6: (1, 4)}.items():
        saved = json.loads((workdir / "checkpoints" / str(step) / "reader" / "metadata").read_text())
        assert saved == {"epoch": epoch, "row": row}, step
    # a third start with the changed config is the same run now: no second history line
    train.run(
        make_config(
            workdir, records, train__steps=6, train__batch_size=4, loss__name="sigmoid", optimizer__lr=0.5
        )
    )
    assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 1


def test_a_finished_run_started_again_reports_its_last_logged_metrics(workdir, records):
    """Found: an online round killed after its training, before it was booked, recorded its
    final_loss as null: the rerun had no step left, and the loop reported no metrics."""
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "loss" in r][-1]
    out = train.run(make_config(workdir, records, train__steps=3))
    assert out["step"] == 3 and out["metrics"] == last and last["step"] == 3


def test_a_resumed_reader_reads_the_rows_after_the_last_one_read_at_any_batch_size():
    # record i answers with the one token i + 5, so a batch's third column names its records
    rows = [
        {"prompt_ids": np.arange(2), "chosen_ids": [i + 5], "rejected_ids": [1], "source_index": i}
        for i in range(24)
    ]
    kw = {"seed": 3, "length": 8, "process_index": 0, "process_count": 1}
    perm = np.random.default_rng([3, 0]).permutation(24)  # epoch 0's order, written out
    eight = data.PreferenceReader(rows, global_batch_size=8, **kw)
    four = data.PreferenceReader(rows, global_batch_size=4, **kw)
    four.resume(2, eight.state_dict() | vars(eight.cursor(2)))  # two batches of 8 read: rows 0-15
    batches = four.batches_from(2)
    np.testing.assert_array_equal(next(batches)["chosen_input_ids"][:, 2] - 5, perm[16:20])
    np.testing.assert_array_equal(next(batches)["chosen_input_ids"][:, 2] - 5, perm[20:24])
    epoch1 = np.random.default_rng([3, 1]).permutation(24)
    np.testing.assert_array_equal(next(batches)["chosen_input_ids"][:, 2] - 5, epoch1[0:4])


def _rewritten(src, dst, edit):
    rec, meta = read_records(src)
    for r in rec:
        edit(r)
    meta = dict(meta, shards=write_shards(rec, dst, 1))
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def test_data_with_no_preference_is_refused(tmp_path, records, capfd):
    """Finding 9: every row a tie trained APO-zero to the no-tie loss with no warning."""
    ties = _rewritten(records, tmp_path / "ties", lambda r: r.update(is_tie=1))
    with pytest.raises(DataError, match=r"every one of its 32 pairs is a tie .* loss 'apo_zero'"):
        train.run(make_config(tmp_path / "a", ties))
    same = _rewritten(records, tmp_path / "same", lambda r: r.update(rejected_ids=r["chosen_ids"]))
    with pytest.raises(DataError, match=r"every one of its 32 pairs chosen and rejected are the same"):
        train.run(make_config(tmp_path / "b", same))
    assert [p for p in (tmp_path / "a").rglob("*")] == [] == [p for p in (tmp_path / "b").rglob("*")]


def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path, records):
    """Found: the right line came after 324 lines of orbax's background-thread tracebacks."""
    disk = tmp_path / "disk"
    disk.mkdir()
    # 1.2 MB: the run's record and metrics fit, the tiny model's checkpoint (1.8 MB) does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        overrides = tmp_path / "o.json"
        overrides.write_text(
            json.dumps(
                {
                    "workdir": str(disk / "w"),
                    "data.train": str(records),
                    "train.steps": 2,
                    "train.batch_size": 8,
                    "mesh.data": 1,
                    "train.trackers": ["jsonl"],
                }
            )
        )
        root = pathlib.Path(__file__).resolve().parents[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.run",
                f"--config={root}/tests/configs/tiny_train.py:{overrides}",
            ],
            cwd=root,
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["umount", str(disk)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {disk / 'w' / 'checkpoints'}: the checkpoint of step 2 could not be written (no space "
        "left on the device); no complete checkpoint exists"
    ]

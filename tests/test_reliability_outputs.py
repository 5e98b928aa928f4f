"""Outputs under faults, and a new user's first run: a full disk during export, a symlinked output,
a kill in the middle of a swap, the umask, a dying worker of the local launcher, the default
TensorBoard tracker, progress in a log file."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from apo_jax import models, outputs
from apo_jax.cli import UserError
from apo_jax.models import lora

TOOL = "apo_jax.tests"


@contextlib.contextmanager
def _small_disk(path: pathlib.Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_output(folder: pathlib.Path, text: str) -> None:
    """An output of TOOL: one data file and the manifest naming it."""
    (folder / "data.txt").write_text(text)
    (folder / outputs.MANIFEST).write_text(json.dumps(outputs.manifest(TOOL, ["data.txt"])))


@pytest.fixture(scope="module")
def tiny():
    model = models.Llama(models.preset("tiny"))
    return model, models.init_params(model, 0)


# --- export ---------------------------------------------------------------------------------------


def test_export_onto_a_full_disk_is_one_line_naming_hf_and_keeps_the_previous_export(tmp_path, tiny):
    from apo_jax.train import loop

    model, params = tiny  # its model.safetensors is 0.5 MB
    with _small_disk(tmp_path / "disk", "64k") as disk:
        (disk / "hf").mkdir()
        (disk / "hf" / "config.json").write_text('{"previous": "export"}')
        before = _tree(disk)
        cfg = ml_collections.ConfigDict({"model": {"path": ""}})
        with pytest.raises(UserError) as e:
            loop.export(cfg, model, params, disk)
        assert str(disk / "hf") in str(e.value) and "No space left on device" in str(e.value)
        assert "\n" not in str(e.value)
        assert _tree(disk) == before and sorted(p.name for p in disk.iterdir()) == ["hf"]


def test_lora_export_onto_a_full_disk_names_adapter_and_writes_nothing(tmp_path, tiny):
    from apo_jax.train import loop

    model = models.Llama(models.preset("tiny", lora=models.LoraConfig(rank=2, alpha=4.0)))
    params = lora.add_adapters(model, tiny[1], seed=1)  # adapter_model.safetensors: about 20 kB
    with _small_disk(tmp_path / "disk", "4k") as disk:
        cfg = ml_collections.ConfigDict({"model": {"path": ""}})
        with pytest.raises(UserError, match=re.escape(str(disk / "adapter")) + ": could not write it"):
            loop.export(cfg, model, params, disk)
        assert list(disk.iterdir()) == []


# --- where an output goes -------------------------------------------------------------------------


def test_a_symlinked_output_replaces_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "store" / "records"
    target.mkdir(parents=True)
    _write_output(target, "old")
    link = tmp_path / "records"
    link.symlink_to(target)
    with outputs.replacing(link, TOOL) as tmp:
        _write_output(tmp, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "data.txt").read_text() == "new"


def test_output_folders_get_the_users_umask(tmp_path):
    from safetensors.numpy import save_file

    old = os.umask(0o027)
    try:
        with outputs.replacing(tmp_path / "out", TOOL) as tmp:
            _write_output(tmp, "x")
            save_file({"w": np.zeros(3, np.float32)}, str(tmp / "model.safetensors"))  # made 0600
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def _killed_swap(out: pathlib.Path, at: str) -> None:
    """Replaces the output `out` ("old") with "new" in a forked process that is SIGKILLed when the
    swap calls `at` (os.replace: between its two renames; shutil.rmtree: as it removes the old one)."""
    pid = os.fork()
    if pid == 0:
        try:
            module = os if at == "os.replace" else shutil
            setattr(module, at.split(".")[1], lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
            with outputs.replacing(out, TOOL) as tmp:
                _write_output(tmp, "new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# the forked child runs only file operations (no JAX), so JAX's threads cannot deadlock it
_FORK = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _hidden(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@_FORK
def test_a_swap_killed_between_its_renames_has_the_old_output_put_back(tmp_path):
    out = tmp_path / "records"
    out.mkdir()
    _write_output(out, "old")
    _killed_swap(out, "os.replace")
    assert not out.exists()  # the kill's moment: the old output aside, the new one not in place
    outputs.check_output(out, TOOL)  # what the next run does first
    assert (out / "data.txt").read_text() == "old" and _hidden(tmp_path) == []


@_FORK
@pytest.mark.parametrize("at", ["os.replace", "shutil.rmtree"])
def test_the_run_after_a_killed_swap_leaves_no_hidden_folder(tmp_path, at):
    out = tmp_path / "records"
    out.mkdir()
    _write_output(out, "old")
    _killed_swap(out, at)
    assert _hidden(tmp_path)  # the leftovers of the kill
    with outputs.replacing(out, TOOL) as tmp:
        _write_output(tmp, "newer")
    assert (out / "data.txt").read_text() == "newer" and _hidden(tmp_path) == []


# --- the local launcher ---------------------------------------------------------------------------

WORKER = """
import pathlib, sys, time
i = int(next(a for a in sys.argv if a.startswith("--process_id=")).split("=")[1])
pathlib.Path(sys.argv[1], f"pid{i}").write_text(str(__import__("os").getpid()))
sys.exit(3) if i == 1 else time.sleep(20)
"""


def test_the_local_launcher_stops_the_survivors_when_a_worker_dies(tmp_path, monkeypatch):
    from experiments import launch

    monkeypatch.setattr(launch, "RUN", ("python", "-c", WORKER))  # workers that need no JAX
    started = time.monotonic()
    assert launch.main(["local", "--processes", "2", "--", str(tmp_path), "--config=x"]) == 3
    assert time.monotonic() - started < 10
    survivor = int((tmp_path / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


# --- a new user's first run -----------------------------------------------------------------------


def test_the_default_trackers_write_tensorboard_scalars(tmp_path):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    from apo_jax.train import config as config_lib
    from apo_jax.train.trackers import Trackers

    cfg = config_lib.default_config()
    assert "tensorboard" in cfg.train.trackers
    writer = Trackers(tmp_path, 0, cfg)
    writer.write(1, {"loss": 0.5})
    writer.write(2, {"loss": 0.25})
    writer.close()
    events = []
    for file in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(file)):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                value = float(tf.make_ndarray(v.tensor))
                events.append((v.tag, event.step, value, v.metadata.plugin_data.plugin_name))
    assert events == [("loss", 1, 0.5, "scalars"), ("loss", 2, 0.25, "scalars")]


def test_training_progress_in_a_log_is_a_few_lines_not_one_per_update(capsys):
    from apo_jax.train import loop

    t = ml_collections.ConfigDict({"progress": True, "steps": 500})
    bar = loop._progress(t, 0)  # stderr is captured: not a terminal
    for step in range(1, 501):  # as the loop's step log drives it
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{1 / step:.4f}", tok_s="100")
    bar.close()
    lines = [x for x in re.split(r"[\r\n]+", capsys.readouterr().err) if x.strip()]
    assert len(lines) <= 3 and "500/500" in lines[-1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

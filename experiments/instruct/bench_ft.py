"""Full fine-tuning of SmolLM2-135M-Instruct against the grid's LoRA, measured once on the same pairs:
`python -m experiments.instruct.bench_ft --records DIR --model DIR [--steps 4]`.

Each setting trains `--steps` steps of the grid's `clair_apo_zero:smollm2` config (8 pairs a step,
rows padded to each batch's longest pair, float32, AdamW) through `apo_jax.train.run` in its own
process, on the records a grid cell wrote (`<workdir>/clair_apo_zero_seed0/records_train`) and M's
converted folder (`<workdir>/smollm2_cache/m`). It prints, per setting, the median step time after the
first (compiled) step, the real tokens per second and the process's peak resident memory:

- `lora8`: the grid's setting, LoRA r = 16 on the top 8 of 30 layers, the base as reference;
- `lora30`: LoRA r = 16 on every layer;
- `full`: every weight trained, a frozen copy of M as the reference.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile

from apo_jax import cli

SETTINGS = {
    "lora8": {},
    "lora30": {"lora.layers": 0},
    "full": {"lora.rank": 0, "lora.layers": 0, "reference.mode": "frozen"},
}


def one(setting: str, records: str, model: str, steps: int, workdir: str) -> None:
    """Runs in the child process: trains and exits."""
    from apo_jax import train
    from experiments.configs import grid
    from experiments.mini.model import overridden

    config = overridden(
        grid.get_config("clair_apo_zero:smollm2"),
        {
            "model.path": model,
            "model.preset": "",
            "data.train": records,
            "data.eval": "",
            "train.steps": steps,
            "train.checkpoint_every": 0,
            "train.export_hf": False,
            "train.progress": False,
            "workdir": workdir,
            "optimizer.lr": 1e-3,
        }
        | SETTINGS[setting],
    )
    train.run(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    (pathlib.Path(workdir) / "peak_rss_gib.json").write_text(json.dumps(peak))


def measure(setting: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "experiments.instruct.bench_ft", "--one", setting]
        cmd += ["--records", args.records, "--model", args.model, "--steps", str(args.steps)]
        if rc := subprocess.run([*cmd, "--workdir", tmp]).returncode:  # the child said why, in one line
            raise cli.UserError(f"{setting}: its training process exited {rc}")
        rows = [json.loads(x) for x in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        peak = json.loads((pathlib.Path(tmp) / "peak_rss_gib.json").read_text())
    timed = [r for r in rows if "step_time" in r and r["step"] > 1]
    return {
        "setting": setting,
        "first_step_s": next(r["step_time"] for r in rows if "step_time" in r),
        "step_s": statistics.median(r["step_time"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
        "peak_rss_gib": peak,
        "loss_last": rows[-1].get("loss"),
    }


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.instruct.bench_ft")
    p.add_argument("--records", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--one", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        one(args.one, args.records, args.model, args.steps, args.workdir)
        return 0
    for setting in args.settings.split(","):
        print(json.dumps(measure(setting, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The miniature's learning rate, chosen on validation problems: `python -m experiments.select
[--variant mini] [--lrs 3e-6,1e-5,3e-5,1e-4] [--workdir workdirs/select] [--output FILE]`.

Trains every cell of the paper's grid (four ways of building pairs × APO-zero, APO-down, DPO) at each
learning rate (β fixed at the paper's 0.1, the grid's steps and batch), at experiment seed 0, and
scores each on the validation problems (`experiment.eval_set=validation`: disjoint from M's SFT
problems, the training problems and the test problems, by construction and asserted at run time),
never on the test set. It writes `experiments/configs/selected_lr.json` (committed; the grid reads it):
the validation accuracy of every (objective, rate, dataset), each objective's best rate (the mean
greedy validation accuracy over the four datasets; ties go to the smaller rate) and the best single
rate shared by the three objectives. A run already finished is not run again.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from apo_jax import cli
from experiments.configs import grid
from experiments.mini.model import code_version
from experiments.run import compilation_cache
from experiments.sweep import run_cell

LRS = (3e-6, 1e-5, 3e-5, 1e-4)
VALIDATION_PROBLEMS = {"mini": 256, "tiny": 16}


def choose(table: dict[str, dict[str, dict[str, float]]]) -> tuple[dict[str, float], float]:
    """({objective: its best rate}, the best shared rate) from {objective: {rate: {data: greedy}}}:
    the highest mean over the datasets; a tie goes to the smaller rate."""

    def mean(rows):
        return statistics.fmean(v for row in rows for v in row.values())

    rates = sorted({float(r) for t in table.values() for r in t})
    best = {loss: max(rates, key=lambda r, t=t: (mean([t[repr(r)]]), -r)) for loss, t in table.items()}
    shared = max(rates, key=lambda r: (mean([t[repr(r)] for t in table.values()]), -r))
    return best, shared


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.select")
    p.add_argument("--variant", default="mini", choices=["mini", "tiny"])
    p.add_argument("--workdir", default="workdirs/select")
    p.add_argument("--losses", default=",".join(grid.PAPER_LOSSES))
    p.add_argument("--data", default=",".join(grid.DATA))
    p.add_argument("--lrs", default=",".join(repr(x) for x in LRS))
    p.add_argument("--output", default=str(grid.SELECTED), help="the table the grid reads")
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir)
    compilation_cache(root / "cell")
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise cli.UserError(f"--lrs {args.lrs!r}: numbers separated by commas, e.g. 1e-5,3e-5") from None
    table: dict[str, dict[str, dict[str, float]]] = {}
    sampled: dict[str, dict[str, dict[str, float]]] = {}
    for loss in args.losses.split(","):
        for lr in lrs:
            for data in args.data.split(","):
                config = grid.get_config(f"{data}_{loss}:{args.variant}", selected=False)
                config.optimizer.lr = lr
                config.experiment.eval_set = "validation"
                config.experiment.eval_prompts = VALIDATION_PROBLEMS[args.variant]
                config.workdir = str(root / f"{data}_{loss}_lr{lr:g}")
                config.train.progress = False
                done = pathlib.Path(config.workdir) / "results.json"
                if not run_cell(config, done, f"{data} × {loss} at lr {lr:g}", prog="select"):
                    continue  # e.g. no pairs of this kind: left out of the means
                acc = json.loads(done.read_text())["accuracy"]["after"]
                table.setdefault(loss, {}).setdefault(repr(lr), {})[data] = acc["greedy"]
                sampled.setdefault(loss, {}).setdefault(repr(lr), {})[data] = acc["sampled"]
    best, shared = choose(table)
    out = {
        "chosen_by": (
            f"greedy accuracy on {VALIDATION_PROBLEMS[args.variant]} validation problems (disjoint from "
            "the SFT, training and test problems), mean over the datasets; experiment seed 0; "
            f"`python -m experiments.select --variant {args.variant}`"
        ),
        "code": code_version(),
        "variant": args.variant,
        "per_objective": best,
        "shared": shared,
        "validation_greedy": table,
        "validation_sampled": sampled,
    }
    pathlib.Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"{'objective':10s} " + " ".join(f"{lr:>8g}" for lr in lrs) + "   best"]
    for loss, t in table.items():
        means = [statistics.fmean(t[repr(lr)].values()) for lr in lrs]
        lines.append(f"{loss:10s} " + " ".join(f"{m:8.3f}" for m in means) + f"   {best[loss]:g}")
    lines.append(f"shared rate: {shared:g}; written to {args.output}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

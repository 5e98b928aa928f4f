"""The miniature's grid over seeds: `python -m experiments.sweep [--variant mini] [--seeds 0,1,2]
[--workdir workdirs/sweep]`.

Runs every cell `<data>_<loss>` (four ways of building pairs × APO-zero, APO-down, DPO) once per seed
of the preference stage (`train.seed`: the order of the pairs; M, its answers and the pairs are the
same for every seed), sharing the cached tokenizer, M, M's answers and the positive control. Then it
writes `comparison.md`: M and the positive control, each cell's contrastiveness and mean ± standard
error over seeds of greedy and sampled accuracy, held-out margin and reward accuracy, and the paper's
three claims marked held or not held with their numbers; `grid.png` (held-out log-likelihood of the
chosen and rejected answers over training, mean ± standard error over seeds, per cell) and
`accuracy.png` (every cell's accuracy with error bars beside M and the positive control).
A run already finished (its results.json exists) is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys

import numpy as np

from apo_jax import cli
from apo_jax.outputs import WorkdirLock
from experiments.configs import grid
from experiments.mini.pipeline import run as run_mini
from experiments.run import compilation_cache


def run_dir(root: pathlib.Path, name: str, seed: int) -> pathlib.Path:
    return root / f"{name}_seed{seed}"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """{cell: per-cell means and standard errors over its seeds}."""
    out = {}
    for name, runs in results.items():
        r0 = runs[0]
        c = r0["contrastiveness"][r0["data"]]
        row = {"data": r0["data"], "loss": r0["loss"], "seeds": [r["seed"] for r in runs]}
        row |= {"pairs": c["pairs"], "jaccard": c["jaccard_mean"], "levenshtein": c["levenshtein_mean"]}
        for m in ("greedy", "sampled"):
            row[m] = mean_se([r["accuracy"]["after"][m] for r in runs])
        for key in (
            "eval/rewards/chosen",
            "eval/rewards/rejected",
            "eval/rewards/margins",
            "eval/rewards/accuracies",
        ):
            row[key] = mean_se([r["final_eval"][key] for r in runs if key in r["final_eval"]])
        out[name] = row
    return out


def _fmt(ms: tuple[float, float], digits: int = 3, sign: bool = False) -> str:
    m, se = ms
    return f"{m:{'+' if sign else ''}.{digits}f} ± {se:.{digits}f}"


def claims(cells: dict[str, dict]) -> list[str]:
    """The APO paper's three claims, each marked held or not held on these numbers (greedy accuracy;
    "more than two standard errors" uses the standard error of the difference of two means)."""
    lines = []
    datas = [d for d in grid.DATA if any(c["data"] == d for c in cells.values())]
    stats = {d: next(c for c in cells.values() if c["data"] == d) for d in datas}
    if "clair" in stats and len(stats) > 1:
        j = max(stats, key=lambda d: stats[d]["jaccard"])
        lv = min(stats, key=lambda d: stats[d]["levenshtein"])
        held = j == "clair" and lv == "clair"
        lines.append(
            f"1. **CLAIR's pairs are the most contrastive** (Table 1): **{'held' if held else 'not held'}**. "
            "Jaccard "
            + ", ".join(f"{d} {stats[d]['jaccard']:.3f}" for d in datas)
            + "; Levenshtein "
            + ", ".join(f"{d} {stats[d]['levenshtein']:.1f}" for d in datas)
            + "."
        )

    def diff(a, b, m="greedy"):
        (ma, sa), (mb, sb) = cells[a][m], cells[b][m]
        return ma - mb, math.hypot(sa, sb)

    apo = [c for c in ("clair_apo_zero", "clair_apo_down") if c in cells]
    if apo and "clair_dpo" in cells:
        best = max(apo, key=lambda c: cells[c]["greedy"][0])
        d, se = diff(best, "clair_dpo")
        held = d > -2 * se
        lines.append(
            f"2. **APO is at least as good as DPO on CLAIR pairs**: **{'held' if held else 'not held'}** "
            f"(not worse by more than two standard errors). Greedy accuracy {best} "
            f"{_fmt(cells[best]['greedy'])} vs clair_dpo {_fmt(cells['clair_dpo']['greedy'])}: "
            f"difference {d:+.3f} ± {se:.3f}."
        )
    if "clair_apo_zero" in cells and len(cells) > 1:
        ranked = sorted(cells, key=lambda c: cells[c]["greedy"][0], reverse=True)
        top = ranked[0]
        runner = ranked[1] if top == "clair_apo_zero" else top
        d, se = diff("clair_apo_zero", runner)
        held = top == "clair_apo_zero"
        lines.append(
            f"3. **CLAIR × APO-zero is the best cell**: **{'held' if held else 'not held'}**. clair_apo_zero "
            f"{_fmt(cells['clair_apo_zero']['greedy'])} greedy; the {'next' if held else 'best'} cell "
            f"{runner} "
            f"{_fmt(cells[runner]['greedy'])}: difference {d:+.3f} ± {se:.3f} "
            f"({'more' if abs(d) > 2 * se else 'not more'} than two standard errors)."
        )
    return lines


def table(cells: dict[str, dict], reference: dict) -> str:
    """The comparison table: M and the positive control first, then every cell."""
    before, control = reference["before"], reference["control"]

    def point(a, m):
        return f"{a[m]:.3f} ± {a[f'{m}_se']:.3f}"

    lines = [
        "| cell | pairs | Jaccard | Levenshtein | greedy accuracy | sampled accuracy | held-out reward "
        "chosen / rejected | margin | reward accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| M (before) | | | | {point(before, 'greedy')} | {point(before, 'sampled')} | | | |",
        f"| positive control (SFT on the CLAIR revisions) | | | | {point(control, 'greedy')} | "
        f"{point(control, 'sampled')} | | | |",
    ]
    for name, c in cells.items():
        lines.append(
            f"| {name} | {c['pairs']} | {c['jaccard']:.3f} | {c['levenshtein']:.1f} | {_fmt(c['greedy'])} | "
            f"{_fmt(c['sampled'])} | {c['eval/rewards/chosen'][0]:+.3f} / "
            f"{c['eval/rewards/rejected'][0]:+.3f} | "
            f"{_fmt(c['eval/rewards/margins'], sign=True)} | {c['eval/rewards/accuracies'][0]:.3f} |"
        )
    return "\n".join(lines)


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep")
    p.add_argument("--variant", default="mini", choices=["mini", "tiny"])
    p.add_argument("--workdir", default="workdirs/sweep")
    p.add_argument("--losses", default=",".join(grid.PAPER_LOSSES))
    p.add_argument("--data", default=",".join(grid.DATA), help="ways of building pairs (default: all four)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the preference stage (train.seed)")
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir)
    compilation_cache(root / "cell")  # <workdir>/jax_cache
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise cli.UserError(f"--seeds {args.seeds!r}: integers separated by commas, e.g. 0,1,2") from None
    results: dict[str, list[dict]] = {}
    for data in args.data.split(","):
        for loss in args.losses.split(","):
            name = f"{data}_{loss}"
            for seed in seeds:
                config = grid.get_config(f"{name}:{args.variant}")
                config.workdir = str(run_dir(root, name, seed))
                config.train.seed = seed
                config.train.progress = False
                done = pathlib.Path(config.workdir) / "results.json"
                if not done.exists():
                    print(f"[sweep] {name}, seed {seed}", flush=True)
                    try:
                        with WorkdirLock(config.workdir):  # a cell run by another sweep is refused
                            run_mini(config)
                    except ValueError as e:  # e.g. no pairs of this kind: report, go on
                        print(f"[sweep] {name}: {e}", flush=True)
                        continue
                results.setdefault(name, []).append(json.loads(done.read_text()))
    if not results:
        print("[sweep] no cell finished", file=sys.stderr)
        return 1
    cells = summarize(results)
    reference = next(iter(results.values()))[0]["accuracy"]
    n_seeds = ", ".join(str(s) for s in seeds)
    text = [
        f"Mean ± standard error over the seeds of the preference stage ({n_seeds}); M's and the positive "
        "control's ± is the standard error over the held-out problems.\n",
        table(cells, reference),
        "",
        *claims(cells),
    ]
    (root / "comparison.md").write_text("\n".join(text) + "\n")
    _grid_plot(root, results)
    _accuracy_plot(root, cells, reference)
    print("\n".join(text))
    return 0


def _curves(runs: list[dict], root: pathlib.Path, name: str, key: str):
    """(steps, mean, standard error) of one eval metric over the seeds of a cell."""
    series = []
    for r in runs:
        path = run_dir(root, name, r["seed"]) / "metrics.jsonl"
        ev = [json.loads(x) for x in path.read_text().splitlines() if key in x] if path.exists() else []
        series.append({e["step"]: e[key] for e in ev if key in e})
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[t] for t in steps] for s in series])
    se = values.std(axis=0, ddof=1) / np.sqrt(len(series)) if len(series) > 1 else np.zeros(len(steps))
    return steps, values.mean(axis=0), se


def _grid_plot(root: pathlib.Path, results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(runs[0]["loss"] for runs in results.values()))
    datas = [d for d in grid.DATA + grid.MINI_DATA if any(r[0]["data"] == d for r in results.values())]
    fig, axes = plt.subplots(
        len(datas), len(losses), figsize=(4 * len(losses), 3 * len(datas)), squeeze=False
    )
    for i, data in enumerate(datas):
        for j, loss in enumerate(losses):
            ax, name = axes[i][j], f"{data}_{loss}"
            ax.set_title(f"{data} × {loss}", fontsize=9)
            if name not in results:
                continue
            for side, color in (("chosen", "tab:blue"), ("rejected", "tab:red")):
                steps, mean, se = _curves(results[name], root, name, f"eval/logps/{side}")
                ax.plot(steps, mean, color=color, label=side)
                ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.25)
    axes[0][0].legend(fontsize=8)
    fig.supylabel("held-out log-likelihood (mean ± s.e. over seeds)")
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(root / "grid.png", dpi=100)
    plt.close(fig)


def _accuracy_plot(root: pathlib.Path, cells: dict[str, dict], reference: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(names) + 4), 4), sharey=True)
    for ax, m in zip(axes, ("greedy", "sampled"), strict=True):
        ax.bar(
            x,
            [cells[n][m][0] for n in names],
            yerr=[cells[n][m][1] for n in names],
            capsize=3,
            color=["tab:green" if n.startswith("clair_") else "tab:gray" for n in names],
        )
        for key, style, label in (("before", "--", "M"), ("control", ":", "positive control")):
            ax.axhline(reference[key][m], color="black", linestyle=style, label=label)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{m} accuracy (mean ± s.e. over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "accuracy.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

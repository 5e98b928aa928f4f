"""The miniature's grid over seeds: `python -m experiments.sweep [--variant mini] [--seeds 0,1,2]
[--workdir workdirs/sweep] [--lr-choice per_objective|shared]`.

Runs every cell `<data>_<loss>` (four ways of building pairs × APO-zero, APO-down, DPO) once per seed.
A seed is the whole pipeline's (`experiment.seed` and `train.seed`): the tokenizer, M's initialisation
and SFT data, the training problems, M's sampled answers and so the pairs, the stand-in models, the
order of the pairs and the evaluation sampling; the scored problems are the same for every seed, so
cells are compared paired by seed and problem (apo_jax.eval.stats). Each cell trains at its objective's
learning rate chosen on validation problems (experiments/select.py), or the shared one. Then it writes
`comparison.md`: M and the positive control, each cell's contrastiveness, epochs, accuracy (mean over
seeds, 95% t interval over seeds), accuracy by step count and held-out reward metrics, and the paper's
three claims marked from paired 95% intervals; `grid.png` (held-out log-likelihood of the chosen and
rejected answers over training, mean ± standard error over seeds, per cell) and `accuracy.png`.
`--epochs N` trains every cell for N passes over its own pairs (equal data rather than equal steps);
its runs and files carry the tag `_epochsN` beside the others, sharing M and its answers.
A run already finished (its results.json exists) is not run again; one written by another code version
(`experiments.mini.model.code_version`) stops the sweep: a table never mixes code versions.
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
from apo_jax.eval import stats
from apo_jax.outputs import WorkdirLock
from experiments.configs import grid
from experiments.mini import task
from experiments.mini.model import Stopped, code_version, problem_sets
from experiments.mini.pipeline import run as run_mini
from experiments.run import compilation_cache

METRICS = ("greedy", "sampled")


def run_dir(root: pathlib.Path, name: str, seed: int, tag: str = "") -> pathlib.Path:
    return root / f"{name}_seed{seed}{tag}"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def scores(run: dict, who: str, metric: str) -> np.ndarray:
    """One model's per-problem scores in one run: the greedy answer's 0/1, or its samples' mean."""
    acc = run["accuracy"][who]
    if metric == "greedy":
        return np.array([int(c) for c in acc["greedy_correct"]], dtype=np.float64)
    return np.array([statistics.fmean(int(c) for c in s) for s in acc["sampled_correct"]])


def table_of(runs: list[dict], who: str, metric: str) -> np.ndarray:
    """[seeds, problems] scores of one model over a cell's runs (sorted by seed)."""
    return np.stack([scores(r, who, metric) for r in runs])


def check_pairable(results: dict[str, list[dict]]) -> None:
    """Every run scored on the same problems by the same code, and every cell over the same seeds."""
    runs = [r for rs in results.values() for r in rs]
    for field, what in (("code", "code versions"), ("problems", "problem sets")):
        found = {r.get(field) for r in runs}
        if len(found) > 1:
            raise cli.UserError(
                f"the runs mix {what} ({sorted(map(str, found))}): rerun them in one --workdir"
            )
    seeds = {name: [r["seed"] for r in rs] for name, rs in results.items()}
    if len({tuple(s) for s in seeds.values()}) > 1:
        raise cli.UserError(f"the cells ran different seeds: {seeds}")


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """{cell: its contrastiveness and epochs (mean over seeds), its accuracy (mean and 95% t interval
    over seeds; by step count), the held-out reward metrics (mean ± standard error over seeds)}."""
    out = {}
    for name, runs in results.items():
        r0 = runs[0]
        contrast = [r["contrastiveness"][r["data"]] for r in runs]
        row = {"data": r0["data"], "loss": r0["loss"], "seeds": [r["seed"] for r in runs]}
        row |= {
            "pairs": statistics.fmean(c["pairs"] for c in contrast),
            "jaccard": statistics.fmean(c["jaccard_mean"] for c in contrast),
            "levenshtein": statistics.fmean(c["levenshtein_mean"] for c in contrast),
            "epochs": statistics.fmean(r["epochs"] for r in runs),
            "lr": r0["lr"],
        }
        for m in METRICS:
            row[m] = stats.t_interval(table_of(runs, "after", m).mean(axis=1))
            for steps in (2, 3):
                row[f"{m}_{steps}"] = statistics.fmean(
                    r["accuracy"]["after"][f"{m}_{steps}_steps"] for r in runs
                )
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


def _interval(t: tuple[float, float, float]) -> str:
    """'0.742 [0.713, 0.771]': a mean and its 95% t interval over seeds (the mean alone for one seed)."""
    mean, low, high = t
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _contrast_claim(results: dict[str, list[dict]]) -> str | None:
    """Claim 1 at every seed: CLAIR's pairs have the highest Jaccard and the lowest Levenshtein."""
    runs = next(iter(results.values()))  # every run holds every dataset's contrastiveness for its seed
    datas = [d for d in grid.DATA if all(r["contrastiveness"].get(d) for r in runs)]
    if "clair" not in datas or len(datas) < 2:
        return None
    held_at = sum(
        max(datas, key=lambda d, r=r: r["contrastiveness"][d]["jaccard_mean"]) == "clair"
        and min(datas, key=lambda d, r=r: r["contrastiveness"][d]["levenshtein_mean"]) == "clair"
        for r in runs
    )
    held = held_at == len(runs)

    def mean(d, k):
        return statistics.fmean(r["contrastiveness"][d][k] for r in runs)

    return (
        f"1. **CLAIR's pairs are the most contrastive** (Table 1): **{'held' if held else 'not held'}** "
        f"(highest Jaccard and lowest Levenshtein at {held_at} of {len(runs)} seeds). Mean Jaccard "
        + ", ".join(f"{d} {mean(d, 'jaccard_mean'):.3f}" for d in datas)
        + "; Levenshtein "
        + ", ".join(f"{d} {mean(d, 'levenshtein_mean'):.1f}" for d in datas)
        + "."
    )


def compare(results: dict[str, list[dict]], a: str, b: str, metric: str = "greedy") -> dict:
    """Cell a − cell b, paired by seed and problem (apo_jax.eval.stats.paired)."""
    return stats.paired(table_of(results[a], "after", metric), table_of(results[b], "after", metric))


def claims(results: dict[str, list[dict]], margin: float = stats.MARGIN, metrics=METRICS) -> list[str]:
    """The APO paper's three claims, each marked from paired 95% intervals (greedy accuracy; the other
    `metrics` beside it): "A beats B" only when the t interval over seeds and the bootstrap over seeds
    and problems both exclude 0; "at least as good" when both lower ends are above −margin."""
    lines = [line] if (line := _contrast_claim(results)) else []
    if "clair_apo_zero" in results and "clair_dpo" in results:
        by = {m: compare(results, "clair_apo_zero", "clair_dpo", m) for m in metrics}
        g = by["greedy"]
        held = stats.at_least_as_good(g, margin)
        lines.append(
            "2. **APO-zero is at least as good as DPO on CLAIR pairs**: "
            f"**{'held' if held else 'not held'}** "
            f"(non-inferiority margin {margin}: both intervals' lower ends above −{margin}). "
            "clair_apo_zero − clair_dpo, "
            + "; ".join(f"{m}: {stats.describe(r)}" for m, r in by.items())
            + f". Verdict on greedy accuracy: {_verdict_words(g, 'clair_apo_zero', 'clair_dpo')}."
        )
    others = [c for c in results if c != "clair_apo_zero"]
    if "clair_apo_zero" in results and others:
        comparisons = {c: compare(results, "clair_apo_zero", c) for c in others}
        verdicts = {c: stats.verdict(r) for c, r in comparisons.items()}
        beaten_by = [c for c, v in verdicts.items() if v == "B beats A"]
        tied = [c for c, v in verdicts.items() if v == "no difference shown"]
        mark = "not held" if beaten_by else ("held" if not tied else "not shown")
        closest = min(others, key=lambda c: comparisons[c]["diff"])  # the strongest other cell
        lines.append(
            f"3. **CLAIR × APO-zero is the best cell**: **{mark}**"
            + (f" ({', '.join(beaten_by)} beat{'s' if len(beaten_by) == 1 else ''} it)" if beaten_by else "")
            + (f" (no difference shown against {', '.join(tied)})" if tied and not beaten_by else "")
            + f". Against the closest cell, clair_apo_zero − {closest}, greedy: "
            f"{stats.describe(comparisons[closest])}."
        )
    return lines


def _verdict_words(result: dict, a: str, b: str) -> str:
    v = stats.verdict(result)
    return {"A beats B": f"{a} beats {b}", "B beats A": f"{b} beats {a}"}.get(v, "no difference shown")


def table(results: dict[str, list[dict]], cells: dict[str, dict]) -> str:
    """The comparison table: M and the positive control first, then every cell; accuracy is the mean
    over seeds with its 95% t interval over seeds, and the gain over M paired by seed and problem."""
    runs = next(iter(results.values()))
    lines = [
        "| cell | lr | pairs | epochs | Jaccard | Levenshtein | greedy accuracy | sampled accuracy | "
        "greedy gain over M (95%, paired) | greedy 2-step / 3-step | held-out reward chosen / rejected | "
        "margin | reward accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, who in (
        ("M (before)", "before"),
        ("positive control (SFT on the CLAIR revisions)", "control"),
    ):
        acc = [_interval(stats.t_interval(table_of(runs, who, m).mean(axis=1))) for m in METRICS]
        by = [statistics.fmean(r["accuracy"][who][f"greedy_{k}_steps"] for r in runs) for k in (2, 3)]
        lines.append(f"| {label} | | | | | | {acc[0]} | {acc[1]} | | {by[0]:.3f} / {by[1]:.3f} | | | |")
    for name, c in cells.items():
        gain = stats.paired(
            table_of(results[name], "after", "greedy"), table_of(results[name], "before", "greedy")
        )
        low, high = gain["t"] if len(results[name]) > 1 else gain["bootstrap"]
        lines.append(
            f"| {name} | {c['lr']:g} | {c['pairs']:.0f} | {c['epochs']:.2f} | {c['jaccard']:.3f} | "
            f"{c['levenshtein']:.1f} | {_interval(c['greedy'])} | {_interval(c['sampled'])} | "
            f"{gain['diff']:+.3f} [{low:+.3f}, {high:+.3f}] | {c['greedy_2']:.3f} / {c['greedy_3']:.3f} | "
            f"{c['eval/rewards/chosen'][0]:+.3f} / {c['eval/rewards/rejected'][0]:+.3f} | "
            f"{_fmt(c['eval/rewards/margins'], sign=True)} | {c['eval/rewards/accuracies'][0]:.3f} |"
        )
    return "\n".join(lines)


def testbed(runs: list[dict], problems: list[dict]) -> str:
    """What the testbed's M gets right, over the seeds: with and without a carry in the problem (the
    teacher's habit is to forget carries), and how the positive control moves it."""
    carry = np.array([task.carries(p) > 0 for p in problems])

    def acc(who, mask):
        return table_of(runs, who, "greedy")[:, mask].mean()

    return (
        f"{carry.mean():.0%} of the scored problems have a carry. M answers {acc('before', ~carry):.3f} of "
        f"the problems without one right (greedy, mean over seeds) and {acc('before', carry):.3f} of those "
        f"with one; the positive control {acc('control', ~carry):.3f} and {acc('control', carry):.3f}.\n"
    )


def run_cell(config, done: pathlib.Path, label: str, prog: str = "sweep") -> bool:
    """Run one miniature run unless finished (its results.json `done` exists, by this code version);
    False when it cannot run (e.g. no pairs of its kind). Shared by the sweep and experiments.select."""
    if done.exists():
        found = json.loads(done.read_text()).get("code")
        if found != code_version():
            raise cli.UserError(
                f"{done} was written by code version {found}, this is {code_version()}: a table never "
                "mixes code versions; use a new --workdir (or remove that folder yourself)"
            )
        return True
    print(f"[{prog}] {label}", flush=True)
    try:
        with WorkdirLock(config.workdir):  # a run started by another process is refused
            run_mini(config)
    except ValueError as e:  # e.g. no pairs of this kind: report, go on
        print(f"[{prog}] {label}: {e}", flush=True)
        return False
    except Stopped as e:  # preempted (SIGTERM): the sweep stops; the same command resumes it
        print(f"[{prog}] stopped: {e}", flush=True)
        raise SystemExit(0) from None
    return True


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep")
    p.add_argument("--variant", default="mini", choices=["mini", "tiny"])
    p.add_argument("--workdir", default="workdirs/sweep")
    p.add_argument("--losses", default=",".join(grid.PAPER_LOSSES))
    p.add_argument("--data", default=",".join(grid.DATA), help="ways of building pairs (default: all four)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the whole pipeline (experiment.seed)")
    p.add_argument(
        "--lr-choice",
        default="per_objective",
        choices=["per_objective", "shared"],
        help="each objective's learning rate chosen on validation problems, or the one shared rate",
    )
    p.add_argument(
        "--epochs",
        type=float,
        default=0.0,
        help="train each cell for this many passes over its pairs (equal data) instead of train.steps",
    )
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir)
    tag = f"_epochs{args.epochs:g}" if args.epochs else ""  # equal-data runs beside the equal-step ones
    compilation_cache(root / "cell")  # <workdir>/jax_cache
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise cli.UserError(f"--seeds {args.seeds!r}: integers separated by commas, e.g. 0,1,2") from None
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed by seed: each seed's M, answers and control are made once, then reused
        for data in args.data.split(","):
            for loss in args.losses.split(","):
                name = f"{data}_{loss}"
                config = grid.get_config(f"{name}:{args.variant}")
                config.optimizer.lr = grid.selected_lr(loss, args.lr_choice)
                config.workdir = str(run_dir(root, name, seed, tag))
                config.experiment.seed = config.train.seed = seed
                config.experiment.epochs = args.epochs
                config.train.progress = False
                done = pathlib.Path(config.workdir) / "results.json"
                if run_cell(config, done, f"{name}, seed {seed}"):
                    results.setdefault(name, []).append(
                        json.loads(done.read_text()) | {"_dir": str(done.parent)}
                    )
    results = {k: v for k, v in results.items() if len(v) == len(seeds)}  # cells with every seed
    if not results:
        print("[sweep] no cell finished at every seed", file=sys.stderr)
        return 1
    check_pairable(results)
    cells = summarize(results)
    mini = grid.get_config(f"{next(iter(results))}:{args.variant}").experiment
    _, problems = problem_sets(mini)
    n_seeds = ", ".join(str(s) for s in seeds)
    runs = next(iter(results.values()))
    text = [
        f"Seeds {n_seeds} (each the whole pipeline's); {runs[0]['eval_set']} problems: "
        f"{len(runs[0]['accuracy']['before']['greedy_correct'])}, the same at every seed; code version "
        f"{runs[0]['code']}; learning rates: {args.lr_choice} (experiments/configs/selected_lr.json).\n",
        "Accuracy: mean over seeds [95% t interval over seeds, seeds − 1 degrees of freedom]. The gain over "
        "M: the cell's accuracy minus M's at the same seed on the same problems, 95% t interval over seeds. "
        "Held-out reward metrics: mean ± standard error over seeds. Epochs: steps × batch / pairs.\n",
        testbed(next(iter(results.values())), problems),
        table(results, cells),
        "",
        *claims(results),
    ]
    (root / f"comparison{tag}.md").write_text("\n".join(text) + "\n")
    (root / f"comparison{tag}.json").write_text(
        json.dumps({name: [_compact(r) for r in rs] for name, rs in results.items()}) + "\n"
    )
    _grid_plot(root / f"grid{tag}.png", results)
    _accuracy_plot(root / f"accuracy{tag}.png", cells, results)
    print("\n".join(text))
    return 0


def _compact(run: dict) -> dict:
    """What the claims are computed from, for a committed record of a sweep (docs/miniature/)."""
    keep = (
        "data",
        "loss",
        "seed",
        "code",
        "problems",
        "lr",
        "steps",
        "epochs",
        "contrastiveness",
        "final_eval",
    )
    return {k: run[k] for k in keep} | {"accuracy": run["accuracy"]}


def _curves(runs: list[dict], key: str):
    """(steps, mean, standard error) of one eval metric over the seeds of a cell."""
    series = []
    for r in runs:
        path = pathlib.Path(r["_dir"]) / "metrics.jsonl"
        ev = [json.loads(x) for x in path.read_text().splitlines() if key in x] if path.exists() else []
        series.append({e["step"]: e[key] for e in ev if key in e})
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[t] for t in steps] for s in series])
    se = values.std(axis=0, ddof=1) / np.sqrt(len(series)) if len(series) > 1 else np.zeros(len(steps))
    return steps, values.mean(axis=0), se


def _grid_plot(out: pathlib.Path, results: dict[str, list[dict]]) -> None:
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
                steps, mean, se = _curves(results[name], f"eval/logps/{side}")
                ax.plot(steps, mean, color=color, label=side)
                ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.25)
    axes[0][0].legend(fontsize=8)
    fig.supylabel("held-out log-likelihood (mean ± s.e. over seeds)")
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _accuracy_plot(out: pathlib.Path, cells: dict[str, dict], results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    x = np.arange(len(names))
    runs = next(iter(results.values()))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(names) + 4), 4), sharey=True)
    for ax, m in zip(axes, METRICS, strict=True):
        means = [cells[n][m][0] for n in names]
        half = [np.nan_to_num(np.array(cells[n][m][1:]) - cells[n][m][0]) for n in names]
        low, high = [-h[0] for h in half], [h[1] for h in half]
        ax.bar(
            x,
            means,
            yerr=[low, high],
            capsize=3,
            color=["tab:green" if n.startswith("clair_") else "tab:gray" for n in names],
        )
        for who, style, label in (("before", "--", "M"), ("control", ":", "positive control")):
            ax.axhline(table_of(runs, who, m).mean(), color="black", linestyle=style, label=label)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{m} accuracy (mean, 95% t interval over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

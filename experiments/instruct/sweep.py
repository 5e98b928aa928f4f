"""The real-model grid: `python -m experiments.instruct.sweep [--select] [--seeds 0,1,2]
[--workdir workdirs/smollm2_sweep] [--data ...] [--losses ...] [--lrs ...]`.

`--select` first: trains CLAIR × each objective at every rate of `--lrs` (seed 0), scores them on
the validation prompts (their own topics, disjoint from the training and test topics; asserted at
run time), never the test set, and writes experiments/instruct/selected_lr.json (committed): each
objective's validation strict accuracy per rate, and the best rate (ties to the smaller).

Then the grid: every `<data>_<loss>` cell on SmolLM2-135M-Instruct (CLAIR, on-policy judge and
Stronger Preferred × APO-zero, APO-down and DPO) once per seed, each at its objective's selected rate.
A seed is the whole pipeline's: the training prompts' constraint parameters and order, M's sampled
answers (so the pairs), the adapters' initialisation and the order of the pairs; the scored test
prompts are the same at every seed, so cells are compared paired by seed and prompt. It writes
`comparison.md` (and .json): M, the positive control and every cell with accuracy (mean over seeds,
95% t interval over seeds), the gain over M (paired), general ability (NLL of reference answers to
the plain questions, KL to M), and the paper's three claims marked from paired 95% intervals.
A run already finished is not run again; one from another code version stops the sweep.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from apo_jax import cli
from apo_jax.eval import stats
from apo_jax.outputs import WorkdirLock
from experiments.configs import grid
from experiments.instruct import pipeline, runs
from experiments.mini.model import Stopped
from experiments.run import compilation_cache
from experiments.sweep import _interval, check_pairable, claims, table_of

SELECTED = pathlib.Path(__file__).with_name("selected_lr.json")
LRS = (1e-4, 3e-4, 1e-3, 3e-3)  # 3e-3 added when 1e-3, the top of the first three, won on validation
VARIANTS = ("smollm2", "smollm2_tiny")


def run_cell(config, prog: str) -> dict | None:
    """One cell unless finished by this code version (its results.json); None if it built no pairs."""
    done = pathlib.Path(config.workdir) / "results.json"
    if done.exists():
        found = json.loads(done.read_text())
        if found.get("code") != pipeline.code_version():
            raise cli.UserError(
                f"{done} was written by code version {found.get('code')}, this is "
                f"{pipeline.code_version()}: a table never mixes code versions; use a new --workdir"
            )
        return found
    print(f"[{prog}] {pathlib.Path(config.workdir).name}", flush=True)
    try:
        with WorkdirLock(config.workdir):
            return pipeline.run(config)
    except pipeline.NoPairs as e:  # reported, left out
        print(f"[{prog}] {pathlib.Path(config.workdir).name}: {e}", flush=True)
        return None
    except Stopped as e:  # preempted (SIGTERM): the sweep stops; the same command resumes it
        print(f"[{prog}] stopped: {e}", flush=True)
        raise SystemExit(0) from None


def _config(name: str, variant: str, workdir: pathlib.Path, seed: int, lr: float):
    config = grid.get_config(f"{name}:{variant}")
    config.optimizer.lr = lr
    config.experiment.seed = config.train.seed = seed
    config.workdir = str(workdir)
    config.train.progress = False
    return config


def select(args, root: pathlib.Path, lrs: list[float]) -> dict:
    table: dict[str, dict[str, float]] = {}
    for loss in args.losses.split(","):
        for lr in lrs:
            config = _config(f"clair_{loss}", args.variant, root / f"select_clair_{loss}_lr{lr:g}", 0, lr)
            config.experiment.eval_set = "validation"
            config.experiment.eval_per_pair = 2  # 6 topics × 12 kinds × 2: as many prompts as the test set
            if (result := run_cell(config, "select")) is not None:
                table.setdefault(loss, {})[repr(lr)] = result["accuracy"]["after"]["greedy"]
    best = {
        loss: max(sorted(map(float, t)), key=lambda r, t=t: (t[repr(r)], -r)) for loss, t in table.items()
    }
    out = {
        "chosen_by": "strict accuracy of CLAIR × the objective on the validation prompts (topics disjoint "
        "from training and test), experiment seed 0; `python -m experiments.instruct.sweep --select`",
        "code": pipeline.code_version(),
        "variant": args.variant,
        "per_objective": best,
        "validation_strict_accuracy": table,
    }
    if args.variant == "smollm2":  # the CI cut's choice is not the grid's
        SELECTED.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


def _ability(runs: list[dict], who: str, key: str) -> str:
    return _interval(stats.t_interval([r["accuracy"][who][key] for r in runs]))


def table(results: dict[str, list[dict]]) -> str:
    runs = next(iter(results.values()))
    lines = [
        "| cell | lr | pairs | epochs | Jaccard | Levenshtein | strict accuracy | gain over M (95%, paired) "
        "| NLL / token | KL to M / token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, who in (
        ("M (before)", "before"),
        ("positive control (SFT on the CLAIR revisions)", "control"),
    ):
        acc = _interval(stats.t_interval(table_of(runs, who, "greedy").mean(axis=1)))
        lines.append(
            f"| {label} | | | | | | {acc} | | {_ability(runs, who, 'nll_per_token')} | "
            f"{_ability(runs, who, 'kl_to_m_per_token')} |"
        )
    for name, rs in results.items():
        c = {  # each seed's pairs are its own: the mean over seeds
            k: statistics.fmean(r["contrastiveness"][r["data"]][k] for r in rs)
            for k in ("jaccard_mean", "levenshtein_mean")
        }
        gain = stats.paired(table_of(rs, "after", "greedy"), table_of(rs, "before", "greedy"))
        low, high = gain["t"] if len(rs) > 1 else gain["bootstrap"]
        acc = _interval(stats.t_interval(table_of(rs, "after", "greedy").mean(axis=1)))
        lines.append(
            f"| {name} | {rs[0]['lr']:g} | {statistics.fmean(r['pairs'] for r in rs):.0f} | "
            f"{statistics.fmean(r['epochs'] for r in rs):.2f} | {c['jaccard_mean']:.3f} | "
            f"{c['levenshtein_mean']:.1f} | {acc} | {gain['diff']:+.3f} [{low:+.3f}, {high:+.3f}] | "
            f"{_ability(rs, 'after', 'nll_per_token')} | {_ability(rs, 'after', 'kl_to_m_per_token')} |"
        )
    return "\n".join(lines)


def _rate(chosen: dict, loss: str) -> float:
    if loss not in chosen["per_objective"]:
        raise cli.UserError(f"{SELECTED}: no rate for {loss!r}; choose one with --select --losses {loss}")
    return chosen["per_objective"][loss]


def kept(code: str, names: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """The finished runs kept in experiments/instruct/runs/<code>/ (`experiments.instruct.runs save`)
    for these cells and seeds: a cell missing at any seed is left out, as in a sweep."""
    folder = runs.RUNS / code
    if not folder.is_dir():
        have = sorted(p.name for p in runs.RUNS.iterdir()) if runs.RUNS.is_dir() else []
        raise cli.UserError(f"--from-runs {code}: no folder {folder} (kept code versions: {have})")
    results: dict[str, list[dict]] = {}
    for name in names:
        found = [folder / f"{name}_seed{seed}.json" for seed in seeds]
        if all(f.exists() for f in found):
            results[name] = [json.loads(f.read_text()) for f in found]
    return results


def report(results: dict[str, list[dict]], seeds: list[int], chosen: dict) -> list[str]:
    """comparison.md's lines: what was run and how to read it, the table, the claims."""
    first = next(iter(results.values()))[0]
    return [
        f"SmolLM2-135M-Instruct, LoRA. Seeds {','.join(map(str, seeds))} (each the whole pipeline's); "
        f"{first['scored']} {first['eval_set']} prompts, the same at every seed; code version "
        f"{first['code']}; learning rates chosen on validation prompts ({SELECTED.name}).\n",
        "Strict accuracy (IFEval's prompt level, greedy): mean over seeds [95% t interval over seeds, "
        "seeds − 1 degrees of freedom]. The gain over M: the cell's accuracy minus M's on the same "
        "prompts, paired by seed, 95% t interval over seeds (a bootstrap over prompts at one seed). "
        "NLL and KL: mean [95% t interval over seeds].\n",
        *(
            f"Not selected on validation: {loss}, {why}.\n"
            for loss, why in chosen.get("not_selected", {}).items()
            if any(r[0]["loss"] == loss for r in results.values())
        ),
        table(results),
        "",
        *claims(results, metrics=("greedy",)),
    ]


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.instruct.sweep")
    p.add_argument("--variant", default="smollm2", choices=VARIANTS)
    p.add_argument("--workdir", default="workdirs/smollm2_sweep")
    p.add_argument("--select", action="store_true", help="choose the learning rates on validation first")
    p.add_argument("--lrs", default=",".join(repr(x) for x in LRS))
    p.add_argument("--losses", default=",".join(grid.PAPER_LOSSES))
    p.add_argument("--data", default=",".join(grid.SMOLLM2_DATA))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--from-runs",
        metavar="CODE",
        help="train nothing: the comparison from the runs kept in experiments/instruct/runs/CODE/",
    )
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir)
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise cli.UserError("--lrs and --seeds: numbers separated by commas") from None
    if not args.select and not SELECTED.exists():
        raise cli.UserError(f"{SELECTED} is missing: run with --select to choose the learning rates")
    cells = {f"{d}_{loss}": loss for d in args.data.split(",") for loss in args.losses.split(",")}
    if args.from_runs:
        chosen = json.loads(SELECTED.read_text())
        results = kept(args.from_runs, list(cells), seeds)
    else:
        compilation_cache(root / "cell")
        chosen = select(args, root, lrs) if args.select else json.loads(SELECTED.read_text())
        results = {}
        for seed in seeds:
            for name, loss in cells.items():
                lr = _rate(chosen, loss)
                result = run_cell(_config(name, args.variant, root / f"{name}_seed{seed}", seed, lr), "sweep")
                if result is not None:
                    results.setdefault(name, []).append(result)
        results = {k: v for k, v in results.items() if len(v) == len(seeds)}
    if not results:
        print("[sweep] no cell finished at every seed", file=sys.stderr)
        return 1
    check_pairable(results)
    text = report(results, seeds, chosen)
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.md").write_text("\n".join(text) + "\n")
    keep = ("data", "loss", "seed", "code", "problems", "lr", "steps", "epochs", "pairs", "contrastiveness")
    compact = {
        n: [{k: r[k] for k in keep} | {"accuracy": r["accuracy"]} for r in rs] for n, rs in results.items()
    }
    (root / "comparison.json").write_text(json.dumps(compact) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

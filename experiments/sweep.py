"""The whole grid of the miniature: `python -m experiments.sweep [--variant mini] [--workdir workdirs/sweep]`.

Runs every cell `<data>_<loss>` (four ways of building pairs × APO-zero, APO-down, DPO), sharing
the cached task, tokenizer, M and M's answers, then writes `comparison.md` (contrastiveness, greedy
and sampled accuracy before and after, held-out rewards, margin and reward accuracy) and `grid.png`
(Figure 4 per cell: held-out chosen and rejected log-likelihood over training).
A cell already finished (its results.json exists) is not run again.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments.configs import grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep")
    p.add_argument("--variant", default="mini", choices=["mini", "tiny"])
    p.add_argument("--workdir", default="workdirs/sweep")
    p.add_argument("--losses", default=",".join(grid.PAPER_LOSSES))
    p.add_argument("--data", default=",".join(grid.DATA), help="ways of building pairs (default: all four)")
    args = p.parse_args(argv)
    from experiments.mini.pipeline import run as run_mini
    from experiments.run import compilation_cache

    root = pathlib.Path(args.workdir)
    compilation_cache(root / "cell")  # <workdir>/jax_cache
    results = {}
    for data in args.data.split(","):
        for loss in args.losses.split(","):
            name = f"{data}_{loss}"
            config = grid.get_config(f"{name}:{args.variant}")
            config.workdir = str(root / name)
            config.train.progress = False
            done = pathlib.Path(config.workdir) / "results.json"
            if not done.exists():
                print(f"[sweep] {name}", flush=True)
                try:
                    run_mini(config)
                except ValueError as e:  # e.g. no pairs of this kind: report, go on
                    print(f"[sweep] {name}: {e}", flush=True)
                    continue
            results[name] = json.loads(done.read_text())
    lines = [
        "| cell | pairs | Jaccard | Levenshtein | greedy accuracy before → after | sampled accuracy "
        "before → after | held-out reward chosen / rejected | margin | reward accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ev, c = r["final_eval"], r["contrastiveness"][r["data"]]
        nan = float("nan")
        lines.append(
            f"| {name} | {c['pairs']} | {c['jaccard_mean']:.3f} | {c['levenshtein_mean']:.1f} | "
            f"{r['accuracy_before']:.3f} → {r['accuracy_after']:.3f} | "
            f"{r.get('sampled_accuracy_before', nan):.3f} → {r.get('sampled_accuracy_after', nan):.3f} | "
            f"{ev.get('eval/rewards/chosen', nan):+.3f} / {ev.get('eval/rewards/rejected', nan):+.3f} | "
            f"{ev.get('eval/rewards/margins', nan):+.3f} | {ev.get('eval/rewards/accuracies', nan):.3f} |"
        )
    (root / "comparison.md").write_text("\n".join(lines) + "\n")
    _grid_plot(root, results)
    print("\n".join(lines))
    return 0


def _grid_plot(root: pathlib.Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in results.values()})
    datas = [d for d in grid.DATA + grid.MINI_DATA if any(r["data"] == d for r in results.values())]
    size = (4 * len(losses), 3 * len(datas))
    fig, axes = plt.subplots(len(datas), len(losses), figsize=size, squeeze=False)
    for i, data in enumerate(datas):
        for j, loss in enumerate(losses):
            ax = axes[i][j]
            path = root / f"{data}_{loss}" / "metrics.jsonl"
            ax.set_title(f"{data} × {loss}", fontsize=9)
            if not path.exists():
                continue
            ev = [json.loads(x) for x in path.read_text().splitlines() if "eval/logps/chosen" in x]
            steps = [r["step"] for r in ev]
            ax.plot(steps, [r["eval/logps/chosen"] for r in ev], color="tab:blue", label="chosen")
            ax.plot(steps, [r["eval/logps/rejected"] for r in ev], color="tab:red", label="rejected")
    axes[0][0].legend(fontsize=8)
    fig.supylabel("held-out log-likelihood")
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(root / "grid.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

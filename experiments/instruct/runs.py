"""The real-model grid's finished runs, kept in the repository so the grid resumes across machines:

    python -m experiments.instruct.runs save workdirs/smollm2_sweep      # finished runs -> runs/<code>/
    python -m experiments.instruct.runs restore workdirs/smollm2_sweep   # runs/<code>/ -> the workdir

The grid takes longer than one machine lives here (about 3.5 hours on 2 CPU cores). Each finished
run's results.json (3.6 KB: accuracies, per-prompt pass strings, contrastiveness) is all the
comparison needs, so `save` copies it to `experiments/instruct/runs/<code version>/<run>.json` and
`restore` puts it back as `<workdir>/<run>/results.json`, where `experiments.instruct.sweep` finds it
and does not run that cell again. The sweep refuses results of another code version, so restore into
a checkout of the code that made them (the README names the commit).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

RUNS = pathlib.Path(__file__).with_name("runs")


def save(workdir: pathlib.Path) -> list[pathlib.Path]:
    saved = []
    for found in sorted(workdir.glob("*/results.json")):
        code = json.loads(found.read_text()).get("code", "unknown")
        out = RUNS / code / f"{found.parent.name}.json"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, out)
            saved.append(out)
    return saved


def restore(workdir: pathlib.Path, code: str | None = None) -> list[pathlib.Path]:
    restored = []
    for kept in sorted(RUNS.glob(f"{code or '*'}/*.json")):
        out = workdir / kept.stem / "results.json"
        if not out.exists():  # never over a run the workdir holds
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, out)
            restored.append(out)
    return restored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.instruct.runs")
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("workdir", type=pathlib.Path)
    p.add_argument("--code", help="restore: only this code version's runs")
    args = p.parse_args(argv)
    done = save(args.workdir) if args.action == "save" else restore(args.workdir, args.code)
    print("\n".join(map(str, done)) or "nothing to copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

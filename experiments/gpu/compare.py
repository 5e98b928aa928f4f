"""Do two benchmark runs (e.g. the smoke run on the GPU and on the CPU) give the same step numbers?

    python -m experiments.gpu.compare bench_smoke_gpu.json bench_smoke_cpu.json [--rtol 1e-3]

Compares, per apo_jax step row (reference mode, layout), the step-0 log-probs of the chosen and
rejected answers and the losses before and after one update; exits 1 on a mismatch. The tolerance
is loose by default: GPU matmuls may run in TF32 and reduce in another order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

KEYS = ("step0_logps_chosen", "step0_logps_rejected", "step0_loss", "step1_loss")


def rows(path):
    report = json.load(open(path))
    return {
        (r["reference"], r["layout"]): r
        for r in report["results"]
        if r["part"] == "step" and r.get("impl") == "apo_jax" and "error" not in r
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu.compare")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-3)
    args = p.parse_args(argv)
    a, b = rows(args.a), rows(args.b)
    problems = []
    for key in sorted(set(a) & set(b)):
        for k in KEYS:
            x, y = a[key].get(k), b[key].get(k)
            ok = x is not None and y is not None and math.isclose(x, y, rel_tol=args.rtol, abs_tol=1e-5)
            print(f"{key[0]:>12} {key[1]:>14} {k:>22}: {x!r:>22} {y!r:>22} {'ok' if ok else 'MISMATCH'}")
            problems += [] if ok else [(key, k)]
    if not set(a) & set(b):
        problems.append("no step rows in common")
    print("match" if not problems else f"{len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

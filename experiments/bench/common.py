"""Shared pieces of the benchmark: shapes (model presets), synthetic CLAIR-length pairs, timing and memory."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from apo_jax import cli, models
from apo_jax.models.flops import peak_flops as peak
from apo_jax.train.config import default_config

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
    policies = {"dtype": dtype, "param_dtype": "float32", "remat_policy": remat, "attention_impl": attention}
    if name in models.PRESETS:
        return models.preset(name, **policies)
    raise cli.UserError(f"unknown shape {name!r}: use one of {', '.join(models.PRESETS)}")


def peak_flops() -> float:
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


def timed(fn, steps: int, warmup: int, sync) -> dict:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        sync(fn())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "steps": steps}


def block_until_ready(x):
    return jax.block_until_ready(x)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> int | None:
    """Compiled temporary + argument + output bytes (CPU has no peak counter)."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # some backends have no analysis
        return None


def bench_optimizer(lr: float):
    """The trainer's default AdamW (apo_jax.train.config.default_config) at `lr`, linear decay, no
    warm-up: the apo_jax step and TRL's DPOConfig both read it."""
    opt = default_config().optimizer
    opt.lr, opt.warmup_steps, opt.schedule = lr, 0, "linear"
    return opt

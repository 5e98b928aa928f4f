"""The apo_jax preference step, timed: compile, step time, tokens/s, memory, FLOP/s and MFU."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from apo_jax import models, sharding
from apo_jax.data import layouts
from apo_jax.models.flops import flops_per_token
from apo_jax.train.config import default_config
from apo_jax.train.setup import setup
from apo_jax.train.step import StepConfig, make_train_step, sequence_sums
from experiments.bench.common import (
    bench_optimizer,
    block_until_ready,
    compiled_memory,
    device_peak_bytes,
    peak_flops,
    timed,
)


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
        cfg = default_config()  # the run this step belongs to, built by train.setup as train.run builds it
        cfg.optimizer = bench_optimizer(lr)
        cfg.loss.name, cfg.loss.beta, cfg.reference.mode = loss, beta, reference
        cfg.lora.rank = config.lora.rank if config.lora else 0  # LoRA: the base is the reference
        cfg.data.layout, cfg.train.steps = layout, steps
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1  # one device, as TRL's side
        run = setup(cfg, model=models.Llama(config), params=params, data=False)
        self.model, reference = run.model, run.reference
        self.state = jax.jit(run.init_fn())(params, None)
        step_cfg = dataclasses.replace(run.step_cfg, with_entropy=False)  # TRL logs no entropy
        self.step = jax.jit(
            sharding.on_mesh(make_train_step(self.model, run.loss, run.tx, run.lr, step_cfg), run.mesh),
            donate_argnums=0,
        )
        self.reference, self.layout = reference, layout

    def compile(self, batch) -> tuple[float, int | None]:
        t0 = time.perf_counter()
        compiled = self.step.lower(self.state, batch).compile()
        return time.perf_counter() - t0, compiled_memory(compiled)

    def __call__(self, batch):
        self.state, metrics = self.step(self.state, batch)
        return metrics


_REFERENCE_CACHE: dict = {}


def reference_logps(config, params, records, length: int) -> np.ndarray:
    """Per-pair (chosen, rejected) reference log-probs, as apo_jax.train.reference precomputes them."""
    key = (id(params), id(records), length)
    if key not in _REFERENCE_CACHE:
        model = models.Llama(config)
        out = jax.jit(lambda p, b: sequence_sums(model, p, b, StepConfig(layout="padded")))(
            params, layouts.padded(records, length)
        )
        _REFERENCE_CACHE[key] = np.stack([np.asarray(out.policy.chosen), np.asarray(out.policy.rejected)], 1)
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
    length = length or args.length
    if reference == "precomputed":
        records = with_reference(records, reference_logps(config, params, records, args.length))
    batch = layouts.build(layout, records, length, rows=rows)
    step = JaxStep(
        config,
        copy_params(params),
        reference=reference,
        layout=layout,
        lr=args.lr,
        steps=args.steps + args.warmup + 1,
    )
    compile_s, memory = step.compile(batch)
    first = {k: float(v) for k, v in step(batch).items()}
    second = {k: float(v) for k, v in step(batch).items()}
    timing = timed(lambda: step(batch)["loss"], args.steps, max(0, args.warmup - 2), block_until_ready)
    tokens = real_tokens(records)
    passes = 2 if config.lora else 3  # forward, backward (LoRA: no weight gradients of the base)
    flops = tokens * flops_per_token(config, args.length) * (passes + (reference == "frozen"))
    row = {
        "part": "step",
        "impl": "apo_jax",
        "reference": reference,
        "layout": layout,
        "lora": config.lora is not None,
        "row_length": length,
        "rows": int(batch["input_ids"].shape[0]) if "input_ids" in batch else 2 * len(records),
        "compile_s": compile_s,
        **timing,
        "real_tokens": tokens,
        "tokens_per_s": tokens / timing["median_s"],
        "flops_per_s": flops / timing["median_s"],
        "memory_bytes": device_peak_bytes() or memory,
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


def copy_params(params):
    return jax.tree.map(lambda x: x.copy(), params)

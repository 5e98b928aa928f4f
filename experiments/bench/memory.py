"""Per-device memory of the paper's train step, as the compiler plans it: no weights are made.

    python -m experiments.bench.memory                       # 8B and 1B; the paper variant, 8 GPUs
    python -m experiments.bench.memory --shape 8b --setting paper --devices 8

The step of `--config` (default `clair_apo_zero:paper`) is compiled from abstract shapes
(`jax.ShapeDtypeStruct`s placed by the rules table) on a mesh of `--devices` simulated CPU devices,
exactly as `train.run` builds it: the same optimizer, precision, remat policy, gradient
accumulation (one `lax.scan`), reference mode and shardings. XLA's memory analysis of the compiled
executable then gives, per device, the arguments (the train state and the batch), the outputs,
what the donated state lets the outputs reuse, and the temporaries (activations, gradients, the
optimizer update). CPU's analysis is a proxy for TPU's and GPU's: their compilers schedule and fuse
differently, so check on the real chip (`--platform gpu`) before renting it for hours.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
from flax import linen as nn

from apo_jax import cli, models, sharding
from apo_jax.cli import UserError
from apo_jax.data import layouts
from apo_jax.train import config as config_lib
from apo_jax.train.loop import step_config
from apo_jax.train.state import initial_state, make_optimizer, trainable
from apo_jax.train.step import make_train_step
from experiments.configs import grid

SETTINGS = {
    # the paper variant as configured: float32 master weights, AdamW's first moment in bfloat16,
    # full remat, 8 micro-batches (a v5e-8's 16 GiB per chip)
    "paper": {},
    # README, "The paper's setup": 8 GPUs of 80 GB
    "8gpu": {"optimizer.mu_dtype": "float32", "model.remat_policy": "dots_no_batch", "train.grad_accum": 2},
    # LoRA r = 16 on every projection, the paper variant otherwise: the frozen base in bfloat16, the
    # adapters and their AdamW moments in float32, no reference copy (the base is the reference)
    "lora16": {"lora.rank": 16, "model.param_dtype": "bfloat16", "optimizer.mu_dtype": "float32"},
    "lora16_f32": {"lora.rank": 16, "optimizer.mu_dtype": "float32"},  # the base in float32
}
GIB = 1024**3


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="clair_apo_zero:paper", help="a grid cell's paper variant")
    p.add_argument(
        "--shape",
        default="8b,1b",
        help="model presets, comma-separated (8b, 1b, qwen2.5-7b, qwen3-8b, mistral-7b, ...)",
    )
    p.add_argument("--setting", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the mesh is the config's)")
    p.add_argument("--length", type=int, default=1024, help="row length T (the paper's 512 + 512)")
    p.add_argument("--grad-accum", type=int, default=None, help="override train.grad_accum")
    p.add_argument("--platform", default="cpu", help="cpu (simulated devices) or the machine's gpu/tpu")
    return p.parse_args(argv)


def step_memory(config, shape: str, length: int) -> dict:
    """The compiled train step's per-device memory (bytes) and its compile time, for `config` with
    the model preset `shape`, on a mesh of all devices."""
    m, lo = config.model, config.lora
    adapters = {}
    if lo.rank:
        adapters = {
            "lora_rank": lo.rank,
            "lora_alpha": lo.alpha,
            "lora_targets": config_lib.lora_targets(config),
        }
    model = models.Llama(
        models.preset(
            shape, dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, **adapters
        )
    )
    mesh = sharding.make_mesh(**dict(config.mesh))
    boxed = models.abstract_params(model)
    placed = sharding.param_shardings(boxed, mesh)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), placed
    )
    loss = config_lib.build_loss(config)
    reference = config.reference.mode if loss.uses_reference else "none"
    tx, lr = make_optimizer(config.optimizer, config.train.steps)
    init = jax.jit(
        lambda p: initial_state(model, tx, p, reference, seed=0, mesh=mesh, loss_state=loss.init_state())
    )
    state_shardings = init.lower(params).compile().output_shardings
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init, params),
        state_shardings,
    )
    # the batch as the reader lays it out (one padded pair, its keys and dtypes), G rows of T
    pair = {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8]}
    if reference == "precomputed":
        pair |= {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.train.batch_size, *v.shape[1:]), v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim)
        )
        for k, v in layouts.padded([pair], length).items()
    }
    step = sharding.on_mesh(make_train_step(model, loss, tx, lr, step_config(config, reference)), mesh)
    started = time.perf_counter()
    compiled = (
        jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=0).lower(state, batch).compile()
    )
    seconds = time.perf_counter() - started
    a = compiled.memory_analysis()
    args, out, alias, temp = (
        int(x)
        for x in (
            a.argument_size_in_bytes,
            a.output_size_in_bytes,
            a.alias_size_in_bytes,
            a.temp_size_in_bytes,
        )
    )
    return {
        "arguments": args,
        "outputs": out,
        "aliased": alias,
        "temporaries": temp,
        "total": args + out - alias + temp,
        "compile_s": seconds,
        "devices": mesh.devices.size,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "trained": sum(x.size for x in jax.tree.leaves(trainable(params))),
    }


def table(rows: list[dict]) -> str:
    columns = ("shape", "setting", "devices", "trained", "A", "remat", "mu", "arguments")
    head = "| " + " | ".join((*columns, "outputs − donated", "temporaries", "**total**", "compile")) + " |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        trained = f"{r['trained'] / 1e6:.1f}M" if r["trained"] < r["params"] else "all"
        lines.append(
            f"| {r['shape']} | {r['setting']} | {r['devices']} | {trained} | {r['grad_accum']} | "
            f"{r['remat']} | {r['mu_dtype']} | "
            f"{gib(r['arguments'])} | {gib(r['outputs'] - r['aliased'])} | {gib(r['temporaries'])} | "
            f"**{gib(r['total'])}** | {r['compile_s']:.0f} s |"
        )
    return "\n".join(lines)


@cli.command
def main(argv=None) -> int:
    args = _args(argv)
    if args.platform == "cpu":  # read when the backend starts, which nothing has done yet
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = flags.strip()
    jax.config.update("jax_platforms", args.platform)
    rows = []
    for shape in args.shape.split(","):
        for name in args.setting.split(","):
            if name not in SETTINGS:
                raise UserError(f"--setting {name!r}: use some of {', '.join(SETTINGS)}")
            config = grid.get_config(args.config)
            for key, value in SETTINGS[name].items():
                group, field = key.split(".")
                config[group][field] = value
            if args.grad_accum:
                config.train.grad_accum = args.grad_accum
            out = step_memory(config, shape, args.length)
            rows.append(
                out
                | {"shape": shape, "setting": name, "grad_accum": config.train.grad_accum}
                | {"remat": config.model.remat_policy, "mu_dtype": config.optimizer.mu_dtype or "float32"}
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(
        f"\nper device, {rows[0]['devices']} devices, T = {args.length}, "
        f"batch {config.train.batch_size} pairs\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

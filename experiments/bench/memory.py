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

    python -m experiments.bench.memory --topology v5e:2x4,v5p:2x2x1 --shape 8b --setting paper

`--topology` compiles the same step with libtpu's own compiler for a TPU slice's abstract devices, on
any machine (`pip install -e ".[tpu]"` brings libtpu; nothing runs, JAX_PLATFORMS stays cpu): the
TPU compiler's per-device plan, the HBM it allows one program (read from its refusal of a program
that cannot fit: no API reports it for an abstract device), whether the step fits (a refusal is a
row that says so, with the compiler's figures), and a roofline estimate of the step time and MFU.
The estimate is analytic: the compiler's cost analysis counts each loop body (the layer scan, the
micro-batch scan) once, so its FLOPs are not the step's.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from apo_jax import cli, models, sharding
from apo_jax.cli import UserError
from apo_jax.data import layouts
from apo_jax.models.flops import flops_per_token, param_counts, peak_flops
from apo_jax.train.setup import setup
from apo_jax.train.state import model_policies, trainable
from apo_jax.train.step import StepConfig, make_train_step, sequence_sums
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
# TensorCores per chip and HBM bandwidth per chip (bytes/s) by device kind; a topology's device is a
# chip (v5e, v6e; v5p as a megacore) or one core (v4 here), so per device: × cores / cores per chip
CHIPS = {
    "TPU v4": (2, 1.2288e12),
    "TPU v5 lite": (1, 8.19e11),
    "TPU v5": (2, 2.765e12),
    "TPU v6 lite": (1, 1.64e12),
    "NVIDIA H100": (1, 3.35e12),
}
# An H100 SXM as XLA's GPU compiler describes it (xla GpuTargetConfigProto): what lets it compile for
# H100s on a machine without one (jax-ml/jax#28376 has the same description)
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_SIZE = re.compile(r"([0-9.]+)([KMGT]?)i?B?")


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
    p.add_argument(
        "--topology",
        default="",
        help="TPU slices to compile for with libtpu, comma-separated (v5e:2x4, v5p:2x2x1, v4:2x2x1, v6e:2x4)",
    )
    p.add_argument("--set", action="append", help="a config override KEY=VALUE (repeatable): mesh.tensor=2")
    p.add_argument("--out", default="", help="append one JSON line per row to this file")
    return p.parse_args(argv)


def topology_devices(name: str):
    """The abstract devices of the TPU slice `name` ("v5e:2x4", "v5p:2x2x1"; "v5e:2x4:2" is two such
    slices joined by the data-center network), from libtpu, or of `h100:N` (one host of N H100s),
    from the CUDA plugin with H100_TARGET and no GPU present."""
    from jax.experimental import topologies

    # libtpu locks /tmp/libtpu_lockfile for a process that drives TPUs; compiling drives none
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if name.startswith("h100:"):
            n = int(name.removeprefix("h100:"))
            return topologies.get_topology_desc(
                platform="cuda", target_config=H100_TARGET, topology=f"1x1x{n}"
            ).devices
        topology, _, slices = name.partition(":")[2].partition(":")  # v5e:2x4:2 is two v5e:2x4 slices
        kind = name.partition(":")[0]
        return topologies.get_topology_desc(
            platform="tpu", topology_name=f"{kind}:{topology}", num_slices=int(slices or 1)
        ).devices
    except Exception as e:  # no libtpu, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--topology {name}: {first} (libtpu comes with pip install -e '.[tpu]'; h100 needs "
            "jax-cuda12-plugin and jax-cuda12-pjrt of this jax version)"
        ) from None


def _bytes(text: str) -> float:
    number, unit = _SIZE.fullmatch(text).groups()
    return float(number) * 1024 ** "_KMGT".index(unit or "_")


def _refusal(e: Exception) -> dict | None:
    """The figures of the TPU compiler's out-of-memory refusal, or None for any other error."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text or "HBM" not in text:
        return None
    found = {k: re.search(rf"{k} \(([^)]+)\)", text) for k in ("HLO temporaries", "available HBM")}
    return {
        "temporaries": _bytes(found["HLO temporaries"].group(1)) if found["HLO temporaries"] else None,
        "hbm": _bytes(found["available HBM"].group(1)) if found["available HBM"] else None,
        "message": text.strip().splitlines()[0][:300],
    }


def available_hbm(device) -> float:
    """The memory (bytes) one program may use on `device`: a TPU compiler's own figure, from its
    refusal of a program that needs 256 GiB of temporaries; a GPU's from its target description
    (the GPU compiler plans without refusing, so `fits` compares against it)."""
    if not device.device_kind.startswith("TPU"):
        return float(re.search(r"device_memory_size: (\d+)", H100_TARGET).group(1))
    x = jax.ShapeDtypeStruct((1 << 28,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: jnp.sort(jnp.stack([a * i for i in range(256)]), axis=1)[:, ::7]).lower(x).compile()
    except Exception as e:
        if (found := _refusal(e)) and found["hbm"]:
            return found["hbm"]
        raise
    raise RuntimeError(f"{device.device_kind}: a 256 GiB program compiled; its HBM is unknown")


def roofline(model_config, config, length: int, devices, args_bytes: float) -> dict:
    """An estimate of the step time on `devices` (analytic, not measured): the FLOPs the step executes
    (the policy's forward and backward, the backward 2 forwards' worth, 1 with LoRA, whose frozen
    weights get no gradient; + a forward for full remat, + one for a frozen reference) at the
    device's peak bf16 rate, against the HBM traffic (every pass of every micro-batch reads the
    weights, all-gathered by FSDP; the state is read and written once) at its bandwidth; MFU counts
    the policy's forward and backward only."""
    device, n = devices[0], len(devices)
    kinds = [k for k in CHIPS if device.device_kind.startswith(k)]
    cores, bandwidth = CHIPS[max(kinds, key=len)] if kinds else (1, 0.0)
    share = getattr(device, "num_cores", 1) / cores
    peak, bandwidth = peak_flops(device.device_kind) * share, bandwidth * share
    tokens = config.train.batch_size * 2 * length  # a padded pair: chosen and rejected rows of T
    forward = flops_per_token(model_config, length) * tokens / n
    useful = 2 if config.lora.rank else 3
    passes = useful + (config.model.remat_policy == "full") + (config.reference.mode == "frozen")
    counts = param_counts(model_config)  # the matrices every pass reads, the output projection included
    matrices = counts["matmul_layers"] + model_config.hidden_size * model_config.vocab_size
    weight_bytes = matrices * jnp.dtype(model_config.dtype).itemsize
    traffic = weight_bytes / config.mesh.tensor * passes * config.train.grad_accum + 2 * args_bytes
    compute_s, memory_s = forward * passes / peak, traffic / bandwidth
    step_s = max(compute_s, memory_s)
    bound = "compute" if compute_s >= memory_s else "HBM"
    return {"est_step_s": step_s, "est_mfu": forward * useful / (step_s * peak), "bound": bound}


def placed_shapes(model, mesh):
    """The model's parameters as `jax.ShapeDtypeStruct`s placed by the rules table on `mesh`."""
    boxed = models.abstract_params(model)
    placed = sharding.param_shardings(boxed, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), placed
    )


def _rows(mesh, shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def compile_sampler(model, mesh, batch: int, prompt: int, new_tokens: int, temperature: float = 0.7):
    """The sampler (models/sample.py's jitted loop: prompt pass, KV cache, top-p) compiled for `mesh`'s
    devices from abstract shapes, as `generate` calls it."""
    from apo_jax.models import sample

    config, params = model.config, placed_shapes(model, mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return sample._generate.lower(
        config,
        (params,),
        _rows(mesh, (batch, 1), jnp.float32),
        _rows(mesh, (batch, prompt)),
        _rows(mesh, (batch, prompt)),
        jax.random.key(0),
        _rows(mesh, (batch,), jnp.float32),
        scalar,
        scalar,
        scalar,
        jax.ShapeDtypeStruct((config.vocab_size,), jnp.float32),
        max_new_tokens=new_tokens,
        top_k=0,
        eos_ids=tuple(config.eos_token_id),
        greedy=temperature == 0,
        nucleus=True,
        pad_id=0,
        mesh=mesh,
    ).compile()


def compile_reference(model, mesh, batch: int, length: int):
    """The reference precompute's scoring (per-sequence log-prob sums of padded pairs, as
    apo_jax.train.reference runs it) compiled for `mesh`'s devices."""
    pair = {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8]}
    rows = {k: _rows(mesh, (batch, *v.shape[1:]), v.dtype) for k, v in layouts.padded([pair], length).items()}
    score = sharding.on_mesh(lambda p, b: sequence_sums(model, p, b, StepConfig(layout="padded")), mesh)
    return jax.jit(score).lower(placed_shapes(model, mesh), rows).compile()


def topology_mesh(config, devices=None):
    """The config's mesh over `devices` (all devices when None). Several slices: `data` across the
    slices (DCN), fsdp and tensor inside each; a topology whose devices are cores (libtpu's v4),
    which jax.make_mesh refuses, gets a plain mesh."""
    slices = len({getattr(d, "slice_index", 0) for d in devices}) if devices is not None else 1
    try:
        if slices > 1:  # multi-slice: `data` across the slices (DCN), fsdp and tensor inside each
            from jax.experimental import mesh_utils

            inside = (1, len(devices) // slices // config.mesh.tensor, config.mesh.tensor)
            grid_ = mesh_utils.create_hybrid_device_mesh(inside, (slices, 1, 1), devices)
            auto = (jax.sharding.AxisType.Auto,) * 3
            return jax.sharding.Mesh(grid_, sharding.MESH_AXES, axis_types=auto)
        return sharding.make_mesh(**dict(config.mesh), devices=devices)
    except AssertionError:  # jax.make_mesh wants one device per chip; libtpu's v4 topology has cores
        sizes = [
            len(devices) if v == -1 else v for v in (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        ]
        return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), sharding.MESH_AXES)


def step_memory(config, shape: str, length: int, devices=None, keep: dict | None = None) -> dict:
    """The compiled train step's per-device memory (bytes) and its compile time, for `config` with
    the model preset `shape`, on a mesh of all devices (or of `devices`: a TPU topology's). A TPU
    compiler's refusal for lack of HBM gives a row with `fits` False and its figures. `keep` (a dict)
    receives the compiled step as "compiled" (its HLO: tests of the collectives)."""
    model = models.Llama(models.preset(shape, **model_policies(config)))
    mesh = topology_mesh(config, devices)
    params = placed_shapes(model, mesh)
    run = setup(config, mesh=mesh, model=model, params=params, data=False)
    loss, reference = run.loss, run.reference
    init = jax.jit(lambda p: run.init_fn()(p, None))
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
    step = sharding.on_mesh(make_train_step(model, loss, run.tx, run.lr, run.step_cfg), mesh)
    per_device = sum(_shard_bytes(x) for x in jax.tree.leaves((state, batch)))
    facts = {
        "devices": mesh.devices.size,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "trained": sum(x.size for x in jax.tree.leaves(trainable(params))),
    }
    if devices is not None:  # a TPU topology: its HBM and the roofline estimate
        facts["hbm"] = available_hbm(devices[0])
        facts |= roofline(model.config, config, length, devices, per_device)
    started = time.perf_counter()
    try:
        lowered = jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=0).lower(state, batch)
        compiled = lowered.compile()
        if keep is not None:
            keep["compiled"] = compiled
    except Exception as e:
        if devices is None or (refused := _refusal(e)) is None:
            raise
        temp = refused["temporaries"] or 0.0
        return facts | {
            "fits": False,
            "arguments": per_device,
            "outputs": 0,
            "aliased": 0,
            "temporaries": temp,
            "total": per_device + temp,
            "compile_s": time.perf_counter() - started,
            "refusal": refused["message"],
        }
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
    total = args + out - alias + temp
    return facts | {
        "arguments": args,
        "outputs": out,
        "aliased": alias,
        "temporaries": temp,
        "total": total,
        "compile_s": seconds,
        "fits": total <= facts["hbm"] if "hbm" in facts else None,
    }


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `x` (placed by its sharding)."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return jnp.dtype(x.dtype).itemsize * math.prod(shape)


def table(rows: list[dict]) -> str:
    tpu = any("hbm" in r for r in rows)
    columns = ("shape", "setting", *(("topology", "chip") if tpu else ()), "devices", "trained", "A")
    columns += ("remat", "mu")
    columns += ("arguments", "outputs − donated", "temporaries", "**total**")
    columns += ("HBM", "fits", "compile", "step (est.)", "MFU (est.)") if tpu else ("compile",)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        trained = f"{r['trained'] / 1e6:.1f}M" if r["trained"] < r["params"] else "all"
        cells = [r["shape"], r["setting"], *((r.get("topology", ""), r.get("chip", "")) if tpu else ())]
        cells += [r["devices"], trained, r["grad_accum"], r["remat"], r["mu_dtype"], gib(r["arguments"])]
        refused = r.get("fits") is False and "refusal" in r
        cells += ["?" if refused else gib(r["outputs"] - r["aliased"]), gib(r["temporaries"])]
        cells += [f"**{'≥ ' if refused else ''}{gib(r['total'])}**"]
        if tpu:
            fits = {True: "yes", False: "**no**", None: ""}[r.get("fits")]
            cells += [gib(r["hbm"]) if "hbm" in r else "", fits, f"{r['compile_s']:.0f} s"]
            estimate = [f"{r['est_step_s']:.2f} s ({r['bound']})", f"{r['est_mfu']:.0%}"]
            cells += estimate if "hbm" in r else ["", ""]
        else:
            cells += [f"{r['compile_s']:.0f} s"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _config(args, name: str):
    if name not in SETTINGS:
        raise UserError(f"--setting {name!r}: use some of {', '.join(SETTINGS)}")
    config = grid.get_config(args.config)
    for key, value in SETTINGS[name].items():
        group, field = key.split(".")
        config[group][field] = value
    for override in args.set or ():
        key, _, value = override.partition("=")
        group, _, field = key.partition(".")
        if group not in config or field not in config[group]:
            raise UserError(f"--set {override}: no config key {key!r}")
        try:
            config[group][field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[group][field] = value  # a word: a remat policy, a dtype
    if args.grad_accum:
        config.train.grad_accum = args.grad_accum
    return config


@cli.command
def main(argv=None) -> int:
    args = _args(argv)
    if args.topology:  # libtpu's compiler on abstract devices: nothing runs, so the backend stays CPU
        args.platform = "cpu"
    elif args.platform == "cpu":  # read when the backend starts, which nothing has done yet
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = flags.strip()
    jax.config.update("jax_platforms", args.platform)
    rows = []
    for topology in args.topology.split(",") if args.topology else [None]:
        devices = topology_devices(topology) if topology else None
        for shape in args.shape.split(","):
            for name in args.setting.split(","):
                config = _config(args, name)
                out = step_memory(config, shape, args.length, devices)
                rows.append(
                    out
                    | {"shape": shape, "setting": name, "grad_accum": config.train.grad_accum}
                    | {"remat": config.model.remat_policy, "mu_dtype": config.optimizer.mu_dtype or "float32"}
                    | ({"topology": topology, "chip": devices[0].device_kind} if topology else {})
                    | {"mesh": dict(config.mesh), "set": list(args.set or ())}
                )
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nper device, T = {args.length}, batch {config.train.batch_size} pairs\n")
    print(table(rows))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items()}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

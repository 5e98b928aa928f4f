"""The one place that knows mesh axis names: the mesh, the logical-axis rules, and placement.

Parameters and activations carry logical axis names (`embed`, `heads`, `batch`, ...) where they
are defined; `RULES` maps them onto the mesh axes `data`, `fsdp` and `tensor`. A strategy is a
whole table: pass another one to `rules=` rather than patching a rule.

Parameters are placed by `param_shardings`. Activations are pinned by `constrain` inside the model,
which acts only while a function is traced under `activation_rules(mesh)`: wrap every function
that runs the model with `on_mesh(fn, mesh)` before `jax.jit`, so the constraints take effect
whenever it is traced (big_vision and MaxText trace their steps inside the mesh and rules context).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights are split over `fsdp` along their embed axis and over
# `tensor` along heads / mlp / vocab (Megatron-style); the batch is split over data and fsdp.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def make_mesh(
    data: int | None = None, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; one size may be -1 (the rest).

    `data` left out takes the devices the other sizes leave: `make_mesh()` is pure data parallelism,
    `make_mesh(fsdp=-1)` puts every device on fsdp.

    On a single host, explicit sizes that multiply to fewer devices take the first ones.

    Axes are `AxisType.Auto`: the compiler places what the rules table does not pin.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = 1 if -1 in (fsdp, tensor) else -1
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))}: at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in (data, fsdp, tensor) and int(np.prod(sizes)) < len(devices) and jax.process_count() == 1:
        devices = devices[: int(np.prod(sizes))]  # a smaller mesh on one host: the first devices
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"there are {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=RULES) -> NamedSharding:
    """The NamedSharding of one array whose dimensions carry these logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, _fit(spec, mesh))


def _fit(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes of size 1 (a cleaner spec; the placement is the same)."""

    def keep(axes):
        if axes is None:
            return None
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return PartitionSpec(*(keep(a) for a in spec))


def param_shardings(abstract_params, mesh: Mesh, rules=RULES):
    """NamedShardings for a (boxed, `LogicallyPartitioned`) params pytree, e.g. from `jax.eval_shape`."""
    specs = nn.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, _fit(nn.logical_to_mesh_axes(tuple(s), rules), mesh)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params, shardings):
    """Places an (unboxed) params pytree onto the mesh."""
    return jax.device_put(params, shardings)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("apo_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules=RULES):
    """Within it, `constrain` pins activations to `mesh` by `rules` (nothing with `mesh=None`)."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def on_mesh(fn: Callable, mesh: Mesh | None, rules=RULES) -> Callable:
    """`fn` traced inside `activation_rules(mesh, rules)`: wrap a function before `jax.jit` so that
    the model's activation constraints take effect on every trace of it."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_rules(mesh, rules):
            return fn(*args, **kwargs)

    return traced


def mesh_of(tree) -> Mesh | None:
    """The mesh the first array of `tree` is placed on (None for unplaced or single-device arrays)."""
    for leaf in jax.tree.leaves(tree):
        placed = getattr(leaf, "sharding", None)
        if isinstance(placed, NamedSharding) and isinstance(placed.mesh, Mesh):
            return placed.mesh
    return None


def constrain(x, logical_axes: Sequence[str | None]):
    """Pins an activation's sharding by logical names on the mesh of the enclosing
    `activation_rules` (a no-op outside one). A dimension its mesh axes do not divide (a batch of
    one row while sampling, say) is left to the compiler."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = _fit(nn.logical_to_mesh_axes(tuple(logical_axes), rules), mesh)

    def size(axes):
        return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))

    spec = PartitionSpec(
        *(a if a is None or n % size(a) == 0 else None for a, n in zip(spec, x.shape, strict=True))
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over (data, fsdp), every other dimension whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def to_global(batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch -> global arrays on the mesh (rows over data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()
    }


def prefetch_to_mesh(batches, mesh: Mesh, size: int = 2):
    """Yields global arrays `size` batches ahead of use: host-to-device copies overlap the step."""
    queue = collections.deque()
    for host_batch in itertools.islice(batches, size):
        queue.append(to_global(host_batch, mesh))
    while queue:
        yield queue.popleft()
        for host_batch in itertools.islice(batches, 1):
            queue.append(to_global(host_batch, mesh))

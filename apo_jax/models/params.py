"""A model's parameters as values: their abstract shapes, random initialisation on the host, where
each leaf goes on the mesh (`param_slots`), and whether they fit this machine. `from_hf` and
`init_params` place leaves the same way; LoRA's adapters (apo_jax.models.lora) are drawn apart from
the base, so the base weights are the same with adapters or without.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apo_jax.models.config import SIZE_FIELDS, LlamaConfig
from apo_jax.models.llama import Llama, attention_mask, is_adapter
from apo_jax.sharding import param_shardings


def abstract_params(model: Llama):
    """The boxed (logically partitioned) parameter shapes, without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    mask = attention_mask(jnp.ones((1, 1), jnp.int32))
    return jax.eval_shape(model.init, jax.random.key(0), ids, jnp.zeros((1, 1), jnp.int32), mask)["params"]


def init_params(model: Llama, seed: int = 0, mesh=None):
    """Random parameters (normal, std 0.02; norms at 1, biases at 0), placed like `from_hf` does.

    Each leaf is drawn on the host with numpy (seeded by `seed` and its index) and sent straight
    to its sharding, one parameter at a time, so every process of a multi-host run builds the
    same values and nothing is compiled (XLA's compile of a random init costs seconds on CPU).
    LoRA adapters (`lora`) are drawn apart from the base (see `init_leaf`), so the base
    weights are the same with adapters or without.
    """
    slots, treedef = param_slots(model, mesh)
    check_fits(model.config, {"/".join(path): leaf for path, leaf, _, _ in slots})
    leaves = [place(init_leaf(path[-1], leaf, seed, i), sharding) for path, leaf, sharding, i in slots]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def host_memory() -> int:
    """This host's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory() -> int:
    """The memory of all devices of the run: each accelerator's limit, or the hosts' memory where
    the devices are CPUs (which share it); 0 where unknown."""

    def limit(device):
        try:
            return (device.memory_stats() or {}).get("bytes_limit")
        except (RuntimeError, NotImplementedError):  # a backend without memory statistics
            return None

    limits = [limit(d) for d in jax.local_devices()]
    return (sum(limits) if all(limits) else host_memory()) * jax.process_count()


def check_fits(config: LlamaConfig, leaves: dict[str, Any]) -> None:
    """Refuses parameters (`leaves`: name -> shape and dtype) that cannot fit this machine, before any
    is allocated: each one is built whole in host memory (drawn by `init_params`, stacked over layers
    by `from_hf`), and all of them must fit in the devices' memory. A ValueError naming the sizes."""
    sizes = {name: math.prod(x.shape) * np.dtype(x.dtype).itemsize for name, x in leaves.items()}
    name, largest = max(sizes.items(), key=lambda kv: kv[1])
    host, devices, total = host_memory(), device_memory(), sum(sizes.values())
    fields = ", ".join(f"{k}={getattr(config, k)}" for k in SIZE_FIELDS[:4])
    gib = "{:.1f} GiB".format
    if host and largest > host:
        raise ValueError(
            f"the model ({fields}) cannot fit: its parameter {name} alone takes {gib(largest / 2**30)}, "
            f"more than this host's {gib(host / 2**30)} of memory"
        )
    if devices and total > devices:
        raise ValueError(
            f"the model ({fields}) cannot fit: its parameters take {gib(total / 2**30)}, more than the "
            f"{gib(devices / 2**30)} of memory of the devices"
        )


def param_slots(model: Llama, mesh=None):
    """([(path, abstract leaf, sharding or None, init index)] of every parameter in tree order, treedef):
    where `init_params` puts each leaf and the index that seeds it. Base leaves count among the base
    only and adapters by their place in the whole tree, so adding adapters moves no base seed."""
    abstract = abstract_params(model)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    paths, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))
    flat_shardings = jax.tree.leaves(shardings) if shardings is not None else [None] * len(paths)
    slots, base_index = [], 0
    for i, ((path, leaf), sharding) in enumerate(zip(paths, flat_shardings, strict=True)):
        keys = tuple(getattr(k, "key", None) for k in path)
        adapter = is_adapter(keys)
        slots.append((keys, leaf, sharding, i if adapter else base_index))
        base_index += not adapter
    return slots, treedef


def init_leaf(name: str, leaf, seed: int, index: int) -> np.ndarray:
    """The host value of parameter `name` (its last path key) of shape/dtype `leaf`: norms 1, biases 0,
    weights normal(0.02) seeded by (seed, index); LoRA's `lora_b` 0 and `lora_a` uniform in
    ±1/√fan_in (PEFT's Kaiming-uniform init with a = √5), seeded by (seed, index, 1)."""
    shape = leaf.shape
    if name == "weight":
        host = np.ones(shape, np.float32)
    elif name in ("bias", "lora_b"):
        host = np.zeros(shape, np.float32)
    elif name == "lora_a":  # [L, in..., r]
        bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
        host = np.random.default_rng([seed, index, 1]).uniform(-bound, bound, shape).astype(np.float32)
    else:
        host = 0.02 * np.random.default_rng([seed, index]).standard_normal(shape, np.float32)
    return host.astype(leaf.dtype)


def place(host: np.ndarray, sharding=None) -> jax.Array:
    """A host array on the default device, or split over `sharding` (each device copies its slice)."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

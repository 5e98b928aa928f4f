"""LoRA: low-rank adapters beside a frozen base, and PEFT's adapter folders in and out.

A model whose config has a `lora` (LoraConfig) declares, beside the kernel of each targeted projection,
`lora_a` [L, in..., r] and `lora_b` [L, r, out...] (float32; `lora_b` starts at zero, so the
step-0 policy is the base); the projection adds (alpha / r) · (x A) B (`llama._linear`). The same
parameters without the adapter leaves (`base(params)`) are the base model: that is the reference,
with no second copy of the weights.

    adapters, frozen = split(params)     # what the optimizer updates / what it never touches
    params = join(adapters, frozen)
    save_peft(model, params, "adapter/")  # adapter_config.json + adapter_model.safetensors (PEFT)
    params = load_peft(model, params, "adapter/")
    plain, merged = merge(model, params)  # the base with the adapters folded in: for to_hf

PEFT's layout: `lora_A.weight` [r, in] and `lora_B.weight` [out, r] of each Linear, named
`base_model.model.<module>.lora_{A,B}.weight`, heads flattened as the kernels' are (models/hf.py).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from apo_jax.models.config import LORA_TARGETS, LlamaConfig, LoraConfig
from apo_jax.models.hf import CheckpointError, _mapping, _Safetensors, host_array
from apo_jax.models.llama import ADAPTER_KEYS, Llama, is_adapter
from apo_jax.models.llama import (
    has_adapters as has_adapters,  # re-exported: lora.has_adapters(params)
)
from apo_jax.models.params import init_leaf, param_slots, place

PEFT_PREFIX = "base_model.model."
_A, _B = ADAPTER_KEYS


def split(params) -> tuple[dict, dict]:
    """(adapters, base): two nested dicts of the same leaves, the adapter leaves in the first."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(adapters, base) -> dict:
    """The inverse of `split`."""
    return traverse_util.unflatten_dict(
        traverse_util.flatten_dict(base) | traverse_util.flatten_dict(adapters)
    )


def base(params) -> dict:
    """The parameters with the adapters off: the base model (the LoRA run's reference)."""
    return split(params)[1]


def add_adapters(model: Llama, params, seed: int = 0, mesh=None) -> dict:
    """`params` (a base, e.g. from `from_hf`) with freshly initialised adapters for `model`'s
    `lora` (rank, targets): A uniform (PEFT's init), B zero; split over `mesh` like their kernels."""
    out = traverse_util.flatten_dict(params)
    for path, leaf, sharding, index in param_slots(model, mesh)[0]:  # as init_params draws them
        if is_adapter(path):
            out[path] = place(init_leaf(path[-1], leaf, seed, index), sharding)
    return traverse_util.unflatten_dict(out)


def plain(config: LlamaConfig) -> LlamaConfig:
    """`config` without LoRA (the base model's config)."""
    return config.replace(lora=None)


def _targets(config: LlamaConfig):
    """(HF module name with {i}, our path to the projection) of every adapted projection."""
    for hf_name, keys, _, _ in _mapping(config):
        if keys[-1] == "kernel" and keys[-2] in config.lora.targets:
            yield hf_name.removesuffix(".weight"), keys[:-1]


def merge(model: Llama, params) -> tuple[Llama, dict]:
    """(the model without adapters, the base with each adapter folded into its kernel:
    W + (alpha / r) · A B, computed in float32 and stored in the kernel's dtype): what a merged
    Hugging Face export (`to_hf`) writes. PEFT's `merge_and_unload` gives the same weights."""
    config = model.config
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for _, path in _targets(config):
        if path + (_A,) not in flat:
            continue
        kernel, a, b = flat[path + ("kernel",)], flat[path + (_A,)], flat[path + (_B,)]
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(kernel.shape)
        merged = kernel.astype(jnp.float32) + config.lora.scale * delta
        out[path + ("kernel",)] = merged.astype(kernel.dtype)
    return Llama(plain(config)), traverse_util.unflatten_dict(out)


def adapter_config(config: LlamaConfig, base_model: str = "") -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "target_modules": sorted(config.lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(model: Llama, params, out_dir: str | os.PathLike, *, base_model: str = "") -> pathlib.Path:
    """Writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base model; `base_model` is
    recorded as its `base_model_name_or_path`."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    config = model.config
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for module, path in _targets(config):
        if path + (_A,) not in flat:
            raise ValueError(f"params have no adapters at {'/'.join(path)}: nothing to save as PEFT")
        a, b = host_array(flat[path + (_A,)]), host_array(flat[path + (_B,)])
        r = a.shape[-1]
        for i in range(a.shape[0]):
            name = PEFT_PREFIX + module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(adapter_config(config, base_model), indent=2))
    return out


def read_adapter_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT LoRA folder, refusing what apo_jax's adapters cannot hold
    (DoRA, rsLoRA, per-module ranks, trained biases, layer subsets, extra trained modules)."""
    file = pathlib.Path(path) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no adapter_config.json (a PEFT adapter folder has one)")
    cfg = json.loads(file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load")
    unsupported = {
        "use_dora": False,
        "use_rslora": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
    for key, plain in unsupported.items():
        if cfg.get(key) and cfg[key] != plain:
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (only {plain!r})")
    return cfg


def adapter_targets(cfg: dict, file="adapter_config.json") -> tuple[str, ...]:
    """The projections a PEFT config targets ("all-linear" or a list of module names)."""
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        return LORA_TARGETS
    if isinstance(targets, str) or not targets or not set(targets) <= set(LORA_TARGETS):
        raise CheckpointError(
            f"{file}: target_modules={targets!r}: use a list among {list(LORA_TARGETS)} or 'all-linear'"
        )
    return tuple(t for t in LORA_TARGETS if t in targets)


def check_adapter_config(path: str | os.PathLike, lora: LoraConfig) -> dict:
    """The PEFT folder's adapter_config.json, read once and held against `lora` (rank, alpha,
    targets must be the same), before any weight is read. Returns it for `load_peft`."""
    cfg, file = read_adapter_config(path), pathlib.Path(path) / "adapter_config.json"
    found = {
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "target_modules": adapter_targets(cfg, file),
    }
    wanted = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.targets}
    for key, value in found.items():
        if value != wanted[key] and not (key == "lora_alpha" and float(value) == float(wanted[key])):
            raise CheckpointError(
                f"{file}: {key}={value!r} but the run's lora config says {wanted[key]!r} "
                "(set lora.rank, lora.alpha and lora.targets to the adapter's)"
            )
    return cfg


def load_peft(model: Llama, params, path: str | os.PathLike, mesh=None, *, adapter_config=None) -> dict:
    """`params` with their adapters replaced by the PEFT adapter at `path` (its rank, alpha and
    targets must be `model.config`'s, checked by `check_adapter_config` unless its result is given as
    `adapter_config`; the base stays as it is)."""
    path, config = pathlib.Path(path), model.config
    if adapter_config is None:
        check_adapter_config(path, config.lora)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    st = _Safetensors(weights)
    slots = {path: (leaf, sharding) for path, leaf, sharding, _ in param_slots(model, mesh)[0]}
    out = traverse_util.flatten_dict(params)
    for module, mpath in _targets(config):
        for key, side in ((_A, "lora_A"), (_B, "lora_B")):
            leaf, sharding = slots[mpath + (key,)]
            r, size = leaf.shape[-1] if key == _A else leaf.shape[1], int(np.prod(leaf.shape[1:]))
            expected = (r, size // r) if key == _A else (size // r, r)
            layers = []
            for i in range(config.num_hidden_layers):
                name = f"{PEFT_PREFIX}{module.format(i=i)}.{side}.weight"
                if name not in st.header:
                    raise CheckpointError(f"{weights}: tensor {name} is missing")
                w = st[name]
                if tuple(w.shape) != expected:
                    raise CheckpointError(
                        f"{weights}: {name} has shape {tuple(w.shape)}, expected {expected}"
                    )
                layers.append(np.asarray(w, np.float32).T.reshape(leaf.shape[1:]))  # [in..., r] / [r, out...]
            stacked = np.stack(layers)
            lower = config.num_hidden_layers - config.lora.layers if config.lora.layers else 0
            if key == _B and np.any(stacked[:lower]):
                raise CheckpointError(
                    f"{weights}: {module.format(i='*')} has trained adapters below the top "
                    f"lora.layers={config.lora.layers} layers, which such a run skips: set lora.layers to 0"
                )
            out[mpath + (key,)] = place(stacked.astype(leaf.dtype), sharding)
    return traverse_util.unflatten_dict(out)

"""Hugging Face checkpoints in and out: config.json + safetensors <-> (Llama, params), for the
families one Llama-shaped model covers (apo_jax.models.families: what each adds to config.json, and its
transformers class on export).

Only safetensors are read: a pickle-based `pytorch_model.bin` could run code when loaded. Each
parameter goes straight from the memory-mapped file to its target sharding (only the slices a
device holds are copied), so the model is never in host memory twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable

import flax.linen as nn
import flax.traverse_util
import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from apo_jax.models.config import DTYPES, LlamaConfig, dtype_name
from apo_jax.models.families import FAMILIES, MODEL_TYPES
from apo_jax.models.llama import Llama, has_adapters
from apo_jax.models.params import abstract_params, check_fits
from apo_jax.sharding import param_shardings

# safetensors dtype names -> numpy (bfloat16 through ml_dtypes; the safetensors library's numpy
# backend cannot slice bfloat16 tensors, which is what Llama 3 checkpoints hold).
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_SUPPORTED_ACT = ("silu", "gelu_pytorch_tanh")


class CheckpointError(ValueError):
    """A directory, file or config field that cannot be loaded as a supported checkpoint."""


# --- config ---------------------------------------------------------------------------------


def read_config(path: str | os.PathLike, **policies) -> LlamaConfig:
    """LlamaConfig from `path/config.json`, in either rope form (published `rope_theta` +
    `rope_scaling`, or transformers 5's `rope_parameters`). `policies`: dtype, param_dtype, ..."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint directory: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_file}: model_type={model_type!r}, this loader reads {', '.join(MODEL_TYPES)} checkpoints"
        )
    # Gemma-2 names it hidden_activation; each family's transformers default where it is left out
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or FAMILIES[model_type].default_act
    if act not in _SUPPORTED_ACT:
        raise CheckpointError(
            f"{cfg_file}: hidden_act={act!r} is not supported (supported: {_SUPPORTED_ACT})"
        )
    # published checkpoints: rope_theta + rope_scaling; transformers 5 writes rope_parameters
    rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = dict(cfg.get(rope_key) or {})
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(
            f"{cfg_file}: {rope_key}.rope_type={rope_type!r} is not supported "
            "(supported: 'default', 'llama3')"
        )
    if cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{cfg_file}: partial_rotary_factor != 1 is not supported")
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    llama3 = {}
    if rope_type == "llama3":
        try:
            llama3 = {
                "rope_factor": float(rope["factor"]),
                "rope_low_freq_factor": float(rope["low_freq_factor"]),
                "rope_high_freq_factor": float(rope["high_freq_factor"]),
                "rope_original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
        except KeyError as e:
            raise CheckpointError(f"{cfg_file}: llama3 rope scaling lacks {e.args[0]!r}") from None
    try:
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            mlp_bias=cfg.get("mlp_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
            model_type=model_type,
            hidden_act=act,
            **FAMILIES[model_type].read(cfg),
            **llama3,
            **policies,
        )
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def config_json(config: LlamaConfig, torch_dtype: str) -> dict:
    """The published config.json form (`rope_theta` + `rope_scaling`): transformers 4 and 5 read it."""
    out = {
        "architectures": [FAMILIES[config.model_type].architecture],
        "model_type": config.model_type,
        "hidden_act": config.hidden_act,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.H,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id)
        if len(config.eos_token_id) != 1
        else config.eos_token_id[0],
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
    }
    FAMILIES[config.model_type].write(config, out)
    if config.rope_type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings,
        }
    return out


# --- the one mapping table ------------------------------------------------------------------

# (HF name, with {i} for the layer; our path; to ours; to HF). `c` is the LlamaConfig.
Mapping = tuple[str, tuple[str, ...], Callable, Callable]


def _mapping(c: LlamaConfig) -> list[Mapping]:
    D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.H

    def same(w):
        return w

    def t(w):  # HF Linear [out, in] <-> [in, out]
        return w.T

    def heads_in(n):  # [n*H, D] -> [D, n, H] and back
        return (
            lambda w: w.reshape(n, H, D).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(n * H, D),
        )

    def heads_bias(n):
        return (lambda b: b.reshape(n, H), lambda b: b.reshape(n * H))

    q, kv = heads_in(N), heads_in(K)
    table: list[Mapping] = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), same, same),
        ("model.norm.weight", ("norm", "weight"), same, same),
        ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "weight"), same, same),
        (
            "model.layers.{i}.post_attention_layernorm.weight",
            ("layers", "post_attention_layernorm", "weight"),
            same,
            same,
        ),
        ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), *q),
        ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), *kv),
        ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), *kv),
        (
            "model.layers.{i}.self_attn.o_proj.weight",
            ("layers", "self_attn", "o_proj", "kernel"),
            lambda w: w.T.reshape(N, H, D),
            lambda w: w.reshape(N * H, D).T,
        ),
        ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), t, t),
        ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), t, t),
        ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), t, t),
    ]
    if not c.tie_word_embeddings:
        table.append(("lm_head.weight", ("lm_head",), t, t))
    if c.attention_bias:
        table += [
            (f"model.layers.{{i}}.self_attn.{n}.bias", ("layers", "self_attn", n, "bias"), *heads_bias(h))
            for n, h in (("q_proj", N), ("k_proj", K), ("v_proj", K))
        ]
    if c.has_o_bias:
        table.append(
            ("model.layers.{i}.self_attn.o_proj.bias", ("layers", "self_attn", "o_proj", "bias"), same, same)
        )
    if c.sandwich_norms:
        table += [
            (f"model.layers.{{i}}.{n}.weight", ("layers", n, "weight"), same, same)
            for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        ]
    if c.qk_norm:
        table += [
            (f"model.layers.{{i}}.self_attn.{n}.weight", ("layers", "self_attn", n, "weight"), same, same)
            for n in ("q_norm", "k_norm")
        ]
    if c.mlp_bias:
        table += [
            (f"model.layers.{{i}}.mlp.{n}.bias", ("layers", "mlp", n, "bias"), same, same)
            for n in ("gate_proj", "up_proj", "down_proj")
        ]
    return table


# --- safetensors --------------------------------------------------------------------------


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header's length


class _Safetensors:
    """One .safetensors file, memory-mapped; tensors are numpy views (no copy until sliced).

    The header is checked against the file before any tensor is read: a Git LFS pointer (a clone
    without `git lfs pull`), a truncated download or a header whose offsets leave the file is named
    in one line, instead of failing later with an allocation or reshape error."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
            if head == LFS_POINTER:
                raise CheckpointError(
                    f"{path}: a Git LFS pointer file, not the weights: fetch them with `git lfs pull` in "
                    f"{path.parent} (or download the files with huggingface_hub)"
                )
            f.seek(0)
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path}: not a complete safetensors file ({size} bytes, header length {n}): "
                    "truncated or damaged, download it again"
                )
            try:
                header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: its safetensors header is not valid ({e})") from None
        header.pop("__metadata__", None)
        self.header, self.offset = header, 8 + n
        for name, info in header.items():
            self._check(name, info, size - self.offset)
        self.map = np.memmap(path, dtype=np.uint8, mode="r")

    def _check(self, name: str, info, data_bytes: int) -> None:
        """Tensor `name`'s entry: its bytes lie inside the file and match its shape and dtype."""
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(x) for x in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: the header entry of tensor {name} is malformed") from None
        if not 0 <= start <= end <= data_bytes:
            raise CheckpointError(
                f"{self.path}: tensor {name} lies at bytes {start}..{end} of the data, but the file holds "
                f"{data_bytes}: truncated, download it again"
            )
        need = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize if dtype in _ST_DTYPES else None
        if need is not None and end - start != need:
            raise CheckpointError(
                f"{self.path}: tensor {name} ({dtype}, shape {tuple(shape)}) needs {need} bytes, "
                f"its header offsets give {end - start}"
            )

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {info['dtype']}, which this loader cannot use"
            )
        start, end = info["data_offsets"]
        raw = self.map[self.offset + start : self.offset + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _shard_map(path: pathlib.Path, index: pathlib.Path) -> dict[str, str]:
    """An index's tensor -> shard file map, every shard inside `path`. The check is on the names, not
    on resolved paths: the Hugging Face cache links a snapshot's files to blobs outside the folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not a JSON object")
    for fname in set(weight_map.values()):
        name = os.path.normpath(str(fname))
        if not isinstance(fname, str) or os.path.isabs(name) or name.split(os.sep)[0] == os.pardir:
            raise CheckpointError(f"{index}: shard {fname!r} lies outside {path}; refusing to open it")
    return weight_map


def _open_weights(path: pathlib.Path) -> dict[str, _Safetensors]:
    """Tensor name -> the file holding it, from model.safetensors or its sharded index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _shard_map(path, index)
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise CheckpointError(f"{path}: shard {fname} named in {index.name} is missing")
            files[fname] = _Safetensors(path / fname)
        return {name: files[fname] for name, fname in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        st = _Safetensors(single)
        return {name: st for name in st.header}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickle-based weights (*.bin/*.pt) found; apo_jax loads safetensors only, "
            "since unpickling a downloaded file can run code. Convert with transformers' save_pretrained."
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


_BLOCK, _BLOCKS = 1 << 16, 16  # a weight file is fingerprinted by 16 blocks of 64 KiB spread over it


def checkpoint_fingerprint(path) -> str:
    """sha256 naming a checkpoint's weights without reading all of them: config.json whole, and each
    weight file's name, size and 16 blocks of 64 KiB spread over it (a small file is read whole).
    Headers alone would not do: two checkpoints of one architecture share them. `path` is a model
    folder or one weight file (a GGUF)."""
    path = pathlib.Path(path)
    weights = (".safetensors", ".gguf", ".bin")
    files = (
        sorted(p for p in path.iterdir() if p.suffix in weights or p.name == "config.json")
        if path.is_dir()
        else [path]
    )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(_BLOCKS):
                fh.seek(size * k // _BLOCKS)
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _get(d: dict, keys: tuple[str, ...]):
    for k in keys:
        d = d[k]
    return d


def _set(d: dict, keys: tuple[str, ...], value):
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def from_hf(path: str | os.PathLike, *, dtype="float32", param_dtype="float32", mesh=None, **policies):
    """(Llama, params) from a Hugging Face Llama directory.

    Args:
      path: directory with config.json and model.safetensors (or shards plus their index).
      dtype: compute dtype: "float32", "bfloat16", "float16" or the jnp/np dtype (jnp.bfloat16).
      param_dtype: parameter storage dtype.
      mesh: a `jax.sharding.Mesh` (see `apo_jax.sharding.make_mesh`); each tensor then goes
        straight to its sharding under the logical-axis rules. None: the default device.
      **policies: further LlamaConfig policies (remat_policy, attention_impl).
    """
    path = pathlib.Path(path)
    try:
        dtype, param_dtype = dtype_name(dtype), dtype_name(param_dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    config = read_config(path, dtype=dtype, param_dtype=param_dtype, **policies)
    tensors = _open_weights(path)
    shapes = {n: tuple(t.header[n]["shape"]) for n, t in tensors.items()}
    return assemble(config, shapes, lambda n: tensors[n][n], lambda n: tensors[n].path, mesh=mesh, where=path)


def assemble(
    config: LlamaConfig,
    shapes: dict,
    read: Callable,
    file_of: Callable,
    *,
    mesh=None,
    where="",
    implied_by="config.json",
) -> tuple:
    """(Llama, params) from tensors named as in a Hugging Face checkpoint: `shapes[name]` is each
    tensor's HF shape, `read(name)` its host array (read only once its shape is checked) and
    `file_of(name)` the file that errors name. Shared by `from_hf` and `gguf.from_gguf`."""
    model = Llama(config)
    abstract = abstract_params(model)
    try:
        check_fits(config, flax.traverse_util.flatten_dict(nn.unbox(abstract), sep="/"))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    target_dtype = np.dtype(DTYPES[config.param_dtype])
    params: dict = {}
    for hf_name, keys, to_ours, to_theirs in _mapping(config):
        leaf_shape = _get(abstract, keys).value.shape
        host = _read_param(
            where, implied_by, shapes, read, file_of, config, hf_name, leaf_shape, to_ours, to_theirs
        )
        host = host.astype(target_dtype, copy=False)
        if shardings is None:
            _set(params, keys, jax.device_put(host))
        else:
            sharding = _get(shardings, keys)
            _set(params, keys, jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
    return model, params


def _read_param(where, implied_by, shapes, read, file_of, config, hf_name, leaf_shape, to_ours, to_theirs):
    """One parameter on the host (stacked over layers where `hf_name` has `{i}`), each tensor's shape
    checked against what the config implies before anything is converted or stacked; a numpy array."""
    layered = "{i}" in hf_name
    names = [hf_name.format(i=i) for i in range(config.num_hidden_layers)] if layered else [hf_name]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing from the checkpoint")
    per_tensor = leaf_shape[1:] if layered else leaf_shape
    want = tuple(jax.eval_shape(to_theirs, jax.ShapeDtypeStruct(per_tensor, np.float32)).shape)
    for n in names:
        if shapes[n] != want:
            raise CheckpointError(
                f"{file_of(n)}: tensor {n} has shape {shapes[n]}, {implied_by} implies {want}"
            )
    parts = [to_ours(read(n)) for n in names]
    return np.stack(parts) if layered else parts[0]


def host_array(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array whole on this host, as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def to_hf(
    model: Llama,
    params,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
) -> pathlib.Path:
    """Writes `out_dir` so that `transformers.LlamaForCausalLM.from_pretrained` loads it as it is.

    Safetensors with `format: pt` metadata, split into files of at most `max_shard_bytes` (with
    model.safetensors.index.json), config.json in the published form, and the tokenizer if given.
    `dtype`: the stored dtype (default: the parameters' own).
    """
    if has_adapters(params):
        raise ValueError(
            "params hold LoRA adapters: export lora.merge(model, params) (a merged checkpoint) "
            "or write them with lora.save_peft"
        )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    store = np.dtype(DTYPES[dtype_name(dtype)]) if dtype else None

    def host(keys):
        x = host_array(_get(params, keys))
        return x.astype(store) if store is not None else x

    plan = []  # (hf name, keys, layer index or None, to_hf, nbytes)
    for hf_name, keys, _, to_theirs in _mapping(config):
        x = _get(params, keys)
        itemsize = (store or np.dtype(x.dtype)).itemsize
        if "{i}" in hf_name:
            per = math.prod(x.shape[1:]) * itemsize
            plan += [(hf_name.format(i=i), keys, i, to_theirs, per) for i in range(x.shape[0])]
        else:
            plan.append((hf_name, keys, None, to_theirs, math.prod(x.shape) * itemsize))
    shards, current, size = [], [], 0
    for item in plan:
        if current and size + item[4] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item[4]
    shards.append(current)
    from safetensors.numpy import save_file

    weight_map, total = {}, 0
    for s, items in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors, cache = {}, {}
        for name, keys, i, to_theirs, nbytes in items:
            if keys not in cache:
                cache = {keys: host(keys)}  # one stacked parameter in host memory at a time
            x = cache[keys] if i is None else cache[keys][i]
            tensors[name] = np.ascontiguousarray(to_theirs(x))
            weight_map[name] = fname
            total += nbytes
        if jax.process_index() == 0:
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
    if jax.process_index() != 0:
        return out
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stored = store or np.dtype(jax.tree.leaves(params)[0].dtype)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[str(stored)]
    (out / "config.json").write_text(json.dumps(config_json(config, torch_dtype), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) saved beside a checkpoint, read offline. A path that is
    not a folder of tokenizer files is named as such (transformers would take it for a hub name)."""
    from transformers import AutoTokenizer

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{path}: no such tokenizer folder (a folder holding tokenizer.json, e.g. a checkpoint)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

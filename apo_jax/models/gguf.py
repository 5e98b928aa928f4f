"""GGUF files in, without PyTorch: llama.cpp's single-file format (weights, often quantized, plus the
config and the tokenizer as metadata), read with the `gguf` package (numpy).

    model, params = models.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = models.gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    python -m apo_jax.models.convert --gguf FILE --output DIR     # a Hugging Face folder

What reading takes beyond safetensors:
- the config is metadata under the architecture's prefix (`llama.block_count`, ...);
- quantized tensors are dequantized to float32 by `gguf.quants` (F32, F16, BF16, Q8_0, Q4_0, Q4_1
  and every other type it implements; one it does not is refused naming the tensor);
- llama.cpp's converter permutes the rows of Q and K of a `llama` model for its RoPE layout (each
  head's two rotary halves interleaved); `unpermute` undoes it;
- the tokenizer is a vocabulary, merges, token types and a pre-tokenizer name: `gguf_tokenizer`
  rebuilds it with the `tokenizers` library, splitting text the way llama.cpp does for that name.
"""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

from apo_jax.models.config import LlamaConfig, dtype_name
from apo_jax.models.hf import CheckpointError, assemble

ARCHITECTURES = ("llama",)  # general.architecture values read (Mistral's GGUFs say "llama" too)

# GGUF tensor names (llama.cpp's) -> Hugging Face names
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp's pre-tokenizer names -> how the text is split before byte-level BPE (llama-vocab.cpp)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),  # each digit its own piece, then GPT-2's split
    "starcoder": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
}


def _reader(path):
    """The file's GGUFReader; the last two files read are kept open (parsing SmolLM2's 49K-token
    vocabulary takes the gguf package seconds, and a conversion reads the weights and the tokenizer)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _open(path.absolute(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open(path: pathlib.Path, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:  # a bad magic number, a cut file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(path, reader=None, **policies) -> LlamaConfig:
    """LlamaConfig from a GGUF file's metadata. `policies`: dtype, param_dtype, remat_policy..."""
    r = reader or _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture={arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: holds rope_freqs (Llama 3.1-style rope scaling), not supported from GGUF"
        )
    scaling = _field(r, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported")

    def need(key):
        value = _field(r, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: metadata {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    vocab = _field(r, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(
            f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens says the vocabulary size"
        )
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    try:
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(_field(r, f"{arch}.attention.head_count_kv", heads)),
            head_dim=_field(r, f"{arch}.attention.key_length") or _field(r, f"{arch}.rope.dimension_count"),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(_field(r, f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
            eos_token_id=() if eos is None else (int(eos),),
            pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"),
            model_type="llama",
            **policies,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for one without a counterpart)."""
    if name in _NAMES:
        return _NAMES[name]
    prefix, _, rest = name.partition(".")
    if prefix != "blk":
        return None
    layer, _, rest = rest.partition(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES and layer.isdigit() else None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's `permute` of a Q or K weight [n_heads * H, D]: it stores each head's rows as
    (H/2, 2) where Hugging Face has (2, H/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(path, tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (row-major) shape: GGUF lists dimensions innermost first."""
    from gguf import quants

    try:
        values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from None
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def from_gguf(path: str | os.PathLike, *, dtype="float32", param_dtype="float32", mesh=None, **policies):
    """(Llama, params) from a GGUF file: the same model `from_hf` gives for the checkpoint it came
    from, up to its quantization. Arguments as `from_hf`'s."""
    path = pathlib.Path(path)
    try:
        dtype, param_dtype = dtype_name(dtype), dtype_name(param_dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    r = _reader(path)
    config = read_config(path, r, dtype=dtype, param_dtype=param_dtype, **policies)
    tensors = {}
    for t in r.tensors:
        name = hf_name(t.name)
        if name is not None:
            tensors[name] = t
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}

    def read(name):
        w = dequantize(path, tensors[name])
        proj = name.rsplit(".", 2)[-2]
        return unpermute(w, heads[proj]) if proj in heads else w

    shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}
    return assemble(config, shapes, read, lambda n: path, mesh=mesh, where=path, implied_by="its metadata")


# --- the tokenizer --------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer a GGUF file describes, as a transformers `PreTrainedTokenizerFast` with the
    file's chat template and special tokens. Byte-level BPE (`tokenizer.ggml.model` "gpt2") only:
    Llama 3, SmolLM, Qwen and most recent models; a SentencePiece vocabulary is refused."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = pathlib.Path(path)
    r = _reader(path)
    kind = _field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2')")
    pre = _field(r, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})"
        )
    tokens = _field(r, "tokenizer.ggml.tokens")
    merges = _field(r, "tokenizer.ggml.merges") or []
    types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    )
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
    )

    def token(key):
        i = _field(r, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    if _field(r, "tokenizer.ggml.add_bos_token", False) and bos is not None:  # llama.cpp: off for BPE
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=_field(r, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )

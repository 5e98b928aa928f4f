"""Each model family's facts in one table (levanter registers one config per family the same way):
its `model_type`, transformers architecture and default activation, how its config.json maps to
`LlamaConfig` fields and back, the chat template shape of its tiny test tokenizers, and the named
presets of its shapes. apo_jax.models.llama holds the one architecture's math; apo_jax.models.hf
reads and writes checkpoints through this table. A family's name is spelled here and nowhere else
in the package.

| family | transformers class | beyond Llama |
|---|---|---|
| llama | LlamaForCausalLM | (Llama 2, 3, 3.1, 3.2) |
| mistral | MistralForCausalLM | a sliding window on every layer |
| qwen2 | Qwen2ForCausalLM | biases on q, k, v (none on o); Qwen2.5 too |
| qwen3 | Qwen3ForCausalLM | RMSNorm on each head of q and k |
| gemma2 | Gemma2ForCausalLM | GeGLU, (1 + w) norms, √D embeddings, sandwich norms, soft caps, |
| | | a window on alternate layers |

No import from the rest of the package: llama.py and hf.py both read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


def alternating_layer_types(n: int) -> tuple[str, ...]:
    """Gemma-2's layers: a sliding window on the even ones (0, 2, ...), full attention on the odd."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


# --- config.json <-> LlamaConfig, per family ------------------------------------------------------
# `read(cfg)`: the LlamaConfig fields a family sets beyond Llama's, from its config.json as its
# transformers config class reads it (ValueError on what is unsupported); `write(config, out)`: the
# family's own keys in the exported config.json `out` (changed in place).


def _no_sliding(cfg: dict) -> None:
    if cfg.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true is not supported for {cfg['model_type']}")


def _read_llama(cfg: dict) -> dict:
    return {"attention_bias": cfg.get("attention_bias", False)}


def _write_llama(config, out: dict) -> None:
    pass


def _read_mistral(cfg: dict) -> dict:
    return _read_llama(cfg) | {"sliding_window": cfg.get("sliding_window")}


def _write_mistral(config, out: dict) -> None:
    out["sliding_window"] = config.sliding_window
    del out["attention_bias"], out["mlp_bias"]


def _read_qwen2(cfg: dict) -> dict:
    _no_sliding(cfg)  # q, k and v carry biases, o does not (transformers' Qwen2Attention)
    return {"attention_bias": True, "o_proj_bias": False}


def _write_qwen2(config, out: dict) -> None:
    out |= {"use_sliding_window": False, "sliding_window": None}
    del out["attention_bias"], out["mlp_bias"]  # its biases are fixed by the class, not by fields


def _read_qwen3(cfg: dict) -> dict:
    _no_sliding(cfg)
    return _read_llama(cfg) | {"qk_norm": True}


def _write_qwen3(config, out: dict) -> None:
    out |= {"use_sliding_window": False, "sliding_window": None}
    del out["mlp_bias"]


def _read_gemma2(cfg: dict) -> dict:
    """transformers' Gemma2Config defaults where a field is left out."""
    return _read_llama(cfg) | {
        "norm_weight_offset": 1.0,
        "embed_scale": True,
        "sandwich_norms": True,
        "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar", 256),
        "attn_logit_softcapping": cfg.get("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": cfg.get("final_logit_softcapping", 30.0),
        "sliding_window": cfg.get("sliding_window", 4096),
        "layer_types": tuple(cfg.get("layer_types") or alternating_layer_types(cfg["num_hidden_layers"])),
    }


def _write_gemma2(config, out: dict) -> None:
    out |= {
        "hidden_activation": config.hidden_act,  # Gemma2Config's name for it
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types or ()),
    }
    del out["mlp_bias"]


SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
)
# Llama 3's template without the system-header date stamping (see DESIGN.md's pitfalls).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# The shapes of each family's shipped chat template (the published tokenizer_config.json templates,
# without tools), for the tiny tokenizers of tests and the miniature (apo_jax.data.tiny): what moves
# the prompt/completion boundary is kept, e.g. Qwen2.5's default system turn, Qwen3's empty think
# block opening the answer, Mistral's [INST] without a generation prompt, Gemma's `model` role and
# its refusal of a system turn. {family: (special tokens, bos, eos, pad, template)}
CHAT = {
    "llama": (SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "<|pad|>", CHAT_TEMPLATE),
    "qwen2": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ),
    "qwen3": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') }}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ),
    "mistral": (
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "<s>",
        "</s>",
        "<unk>",
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}",
    ),
    "gemma2": (
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
    ),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One family's row of the table."""

    model_type: str
    architecture: str  # the transformers class config.json names on export
    read: Callable[[dict], dict]
    write: Callable[[object, dict], None]
    default_act: str = "silu"  # the activation its config class assumes when config.json names none


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", _read_llama, _write_llama),
        Family("mistral", "MistralForCausalLM", _read_mistral, _write_mistral),
        Family("qwen2", "Qwen2ForCausalLM", _read_qwen2, _write_qwen2),
        Family("qwen3", "Qwen3ForCausalLM", _read_qwen3, _write_qwen3),
        Family("gemma2", "Gemma2ForCausalLM", _read_gemma2, _write_gemma2, default_act="gelu_pytorch_tanh"),
    )
}
MODEL_TYPES = tuple(FAMILIES)
assert set(CHAT) == set(FAMILIES)


# --- presets: the published config.json shapes (weights come from `from_hf`); a family's own fields
# come from its `read` of that config.json, as a checkpoint's would -------------------------------

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, bos_token_id=128000)
_QWEN = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643)  # Qwen2.5 and Qwen3 alike
# {name: LlamaConfig fields}; models.preset(name, **overrides) builds one
PRESETS = {
    # the tests' and the miniature's Llama: 2 layers of width 64, GQA (4 heads over 2)
    "tiny": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=(1, 4),
        pad_token_id=5,
    ),
    # GPT-3 Small's width and depth as a Llama (134M parameters with untied embeddings)
    "125m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=0,
    ),
    "llama2_7b": dict(max_position_embeddings=4096),
    "8b": _LLAMA3
    | dict(
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        eos_token_id=(128001, 128009),
    ),
    "1b": _LLAMA3
    | dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_type="llama3",
        rope_factor=32.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        eos_token_id=(128001, 128008, 128009),
    ),
    # Qwen/Qwen2.5-7B: biases on q, k and v; untied at this size (tied up to 3B)
    "qwen2.5-7b": _QWEN
    | dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        eos_token_id=(151643,),
    )
    | _read_qwen2({"model_type": "qwen2"}),
    # Qwen/Qwen3-8B: RMSNorm on each head of q and k, head_dim 128, no biases
    "qwen3-8b": _QWEN
    | dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        eos_token_id=(151645,),
    )
    | _read_qwen3({"model_type": "qwen3"}),
    # mistralai/Mistral-7B-v0.1: Llama's shape with GQA and a 4096-token sliding window
    "mistral-7b": dict(
        model_type="mistral",
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=32768,
    )
    | _read_mistral({"sliding_window": 4096}),
    # google/gemma-2-9b: GeGLU, (1 + w) norms, sandwich norms, soft-capped scores and logits, a
    # 4096-token window on alternate layers, tied 256k embeddings
    "gemma2-9b": dict(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        rms_norm_eps=1e-6,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=(1,),
        pad_token_id=0,
    )
    | _read_gemma2({"num_hidden_layers": 42}),  # its transformers defaults: caps 50 / 30, window 4096
}
PRESETS["llama3_1_8b"] = PRESETS["8b"] | dict(rope_type="llama3", max_position_embeddings=131072)

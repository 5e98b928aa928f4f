"""The one architecture's config: `LlamaConfig` (Hugging Face `LlamaConfig` field names, the other
families' departures, apo_jax's compute policies and LoRA's `LoraConfig`), its checks, and `preset`,
which builds a named shape of apo_jax.models.families. apo_jax.models.llama computes with it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax.models.families import MODEL_TYPES, PRESETS

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype) -> str:
    """ "bfloat16" for "bfloat16", jnp.bfloat16, np.dtype("bfloat16") alike: the key into DTYPES."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)} (a string or the jnp/np dtype)")
    return name


LORA_DROPOUT = "lora_dropout"  # the rng collection of LoRA's dropout
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters of a model (`LlamaConfig.lora`; None: no adapters), in PEFT's terms, checked here
    and nowhere else. The adapters are float32 beside the base, their product scaled by alpha / rank."""

    rank: int  # PEFT's r
    alpha: float = 16.0  # PEFT's lora_alpha
    targets: tuple[str, ...] = LORA_TARGETS  # projections ("q" and "q_proj" alike)
    dropout: float = 0.0  # PEFT's lora_dropout on each adapter's input, where a dropout rng is given
    # 0: adapters train on every layer; K: only the top K layers' do (PEFT's layers_to_transform =
    # L-K .. L-1). The layers below run once, without gradients (`llama.hidden_states`), so a step
    # costs the forward pass plus the top K layers' backward; the lower layers' adapters stay at B = 0.
    layers: int = 0

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        names = tuple(t if t.endswith("_proj") else f"{t}_proj" for t in targets)
        object.__setattr__(self, "targets", names)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        if not names or not set(names) <= set(LORA_TARGETS):
            raise ValueError(f"targets={targets}: name projections among {list(LORA_TARGETS)}")
        for key, ok, rule in (
            ("rank", self.rank >= 1, "at least 1"),
            ("alpha", self.alpha > 0, "> 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("layers", self.layers >= 0, ">= 0 (0: every layer)"),
        ):
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)}: must be {rule}")

    @property
    def scale(self) -> float:
        """PEFT's `scaling`: the adapters' product is multiplied by alpha / rank."""
        return self.alpha / self.rank

    def rank_of(self, projection: str) -> int:
        """The adapters' rank on `projection` (0: it has none)."""
        return self.rank if projection in self.targets else 0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (Hugging Face `LlamaConfig` field names) plus apo_jax's compute policies."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "llama3" (Llama 3.1 / 3.2 scaling)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Llama's `attention_bias`)
    mlp_bias: bool = False
    o_proj_bias: bool | None = None  # None: as attention_bias; Qwen2 has q/k/v biases and none on o
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    sliding_window: int | None = None  # Mistral: a token sees itself and the W - 1 tokens before it
    model_type: str = "llama"  # the checkpoint family (apo_jax.models.families)
    # Gemma-2's departures from Llama (transformers' Gemma2Config names)
    hidden_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    norm_weight_offset: float = 0.0  # 1.0: norms scale by (1 + w), in float32 (Gemma)
    embed_scale: bool = False  # embeddings × √D
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma-2)
    query_pre_attn_scalar: float | None = None  # attention scale 1/√this (default: 1/√H)
    attn_logit_softcapping: float | None = None  # attention scores capped by c·tanh(s / c)
    final_logit_softcapping: float | None = None  # output logits capped the same way
    layer_types: tuple[str, ...] | None = None  # per layer: sliding_attention | full_attention
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # policies: not part of a checkpoint
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # see REMAT_POLICIES
    attention_impl: str | None = None  # jax.nn.dot_product_attention's implementation= ("xla", "cudnn")
    lora: LoraConfig | None = None  # LoRA adapters (apo_jax.models.lora); None: none

    def __post_init__(self):
        for key in ("dtype", "param_dtype"):  # jnp.bfloat16 and "bfloat16" alike, stored as the name
            object.__setattr__(self, key, dtype_name(getattr(self, key)))
        for key in SIZE_FIELDS:  # token ids and traced shapes are int32; whether it fits: check_fits
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value < 2**31:
                raise ValueError(f"{key}={value!r}: must be a whole number from 1 to 2**31 - 1")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: use one of {sorted(REMAT_POLICIES)}")
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type={self.rope_type!r}: supported are 'default' and 'llama3'")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: supported are {list(MODEL_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported are {sorted(ACTIVATIONS)}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
                "sliding_attention",
                "full_attention",
            }:
                raise ValueError(
                    f"layer_types={self.layer_types}: one of sliding_attention/full_attention per layer"
                )
        if self.lora is not None and self.lora.layers > self.num_hidden_layers:
            raise ValueError(
                f"lora.layers={self.lora.layers}: 0 (every layer) up to {self.num_hidden_layers} (the layers)"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: must be at least 1 (or None)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def H(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends within the sliding window (all of them for Mistral)."""
        if self.sliding_window is None:
            return (False,) * self.num_hidden_layers
        if self.layer_types is None:
            return (True,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.o_proj_bias is None else self.o_proj_bias

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


def preset(name: str, **kw) -> LlamaConfig:
    """The LlamaConfig of a named shape (PRESETS, apo_jax.models.families), fields overridden by `kw`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(PRESETS)}")
    return LlamaConfig(**(PRESETS[name] | kw))

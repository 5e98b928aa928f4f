"""The Llama architecture in Flax Linen, one model for every family of apo_jax.models.families, with
Hugging Face parameter names; its config (`LlamaConfig`) is apo_jax.models.config's.

Shape letters: B batch, T query length, S key length, D embed, N heads, K kv heads, H head dim,
F mlp, V vocab, L layers. Modules only declare parameters (with logical axis names); the math is
in plain functions of a params dict, so that decoding (models/sample.py) runs the very same
functions over the stacked layer parameters with a KV cache.

Params tree (the HF names, minus `model.`; layers stacked on a leading L axis by `nn.scan`):
  embed_tokens/embedding [V, D]; norm/weight [D]; lm_head [D, V] (absent when tied);
  layers/{input_layernorm,post_attention_layernorm}/weight [L, D];
  layers/self_attn/{q,k,v}_proj/kernel [L, D, N|K, H] (+ bias [L, N|K, H]);
  layers/self_attn/o_proj/kernel [L, N, H, D] (+ bias [L, D]);
  layers/mlp/{gate,up}_proj/kernel [L, D, F] (+ bias [L, F]); layers/mlp/down_proj/kernel [L, F, D].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from apo_jax.logprobs import softcap
from apo_jax.logprobs import token_logps as _from_hidden
from apo_jax.models.config import ACTIVATIONS, DTYPES, LORA_DROPOUT, REMAT_POLICIES, LlamaConfig
from apo_jax.sharding import constrain

# --- the math, as functions of parameter dicts --------------------------------------------


def rms_norm(x, weight, eps, offset=0.0):
    """RMSNorm as Hugging Face computes it: in float32, scaled in the input dtype (Llama); with
    `offset` (Gemma: 1.0), scaled by (offset + w) in float32 and then cast."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (x32 * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def norm(config: LlamaConfig, x, p):
    """The configured RMSNorm of x with the norm parameters `p` ({"weight": [D]})."""
    return rms_norm(x, p["weight"], config.rms_norm_eps, config.norm_weight_offset)


def embed(config: LlamaConfig, embedding, ids):
    """Token embeddings [B, T, D] in the compute dtype (× √D for Gemma, in that dtype as Gemma does)."""
    dt = DTYPES[config.dtype]
    x = jnp.take(embedding, ids, axis=0).astype(dt)
    return x * jnp.asarray(config.hidden_size**0.5, dt) if config.embed_scale else x


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """[H/2] inverse frequencies, float32, with Llama 3.1's `llama3` scaling when configured."""
    H = config.H
    inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))
    if config.rope_type == "llama3":
        old = config.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old / config.rope_low_freq_factor, old / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / config.rope_factor, inv)
        smooth = (old / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, Hugging Face's rotate-half layout. x [B, T, N, H], positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _linear(config: LlamaConfig, p, x, spec):
    """x times the kernel (+ bias), in the compute dtype; + scale · (x A) B where the projection
    carries LoRA adapters (`lora_a` [in..., r], `lora_b` [r, out...]: PEFT's lora_A/lora_B), with
    x through (inverted) dropout at `lora.dropout` where the params carry a `dropout_key`."""
    dt = DTYPES[config.dtype]
    y = jnp.einsum(spec, x, p["kernel"].astype(dt))
    if "lora_a" in p:
        if "dropout_key" in p:  # as PEFT: result + lora_B(lora_A(dropout(x))) * scaling
            keep = jax.random.bernoulli(p["dropout_key"], 1.0 - config.lora.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - config.lora.dropout, dt), jnp.zeros((), dt))
        ins, out = spec.split("->")
        xs, ks = ins.split(",")
        rows = "".join(c for c in xs if c not in ks)  # B, T
        contract = "".join(c for c in ks if c in xs)
        xa = jnp.einsum(f"{xs},{contract}R->{rows}R", x, p["lora_a"].astype(dt))
        delta = jnp.einsum(f"{rows}R,R{ks[len(contract) :]}->{out}", xa, p["lora_b"].astype(dt))
        y = y + delta * jnp.asarray(config.lora.scale, dt)
    return y + p["bias"].astype(dt) if "bias" in p else y


def attention_qkv(config: LlamaConfig, p, x, positions, inv_freq):
    """q [B, T, N, H], k and v [B, T, K, H] of a normed input x [B, T, D], RoPE applied."""
    q = _linear(config, p["q_proj"], x, "BTD,DNH->BTNH")
    k = _linear(config, p["k_proj"], x, "BTD,DKH->BTKH")
    v = _linear(config, p["v_proj"], x, "BTD,DKH->BTKH")
    if config.qk_norm:  # Qwen3: each head of q and k normed over H
        q, k = norm(config, q, p["q_norm"]), norm(config, k, p["k_norm"])
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def attention_out(config: LlamaConfig, p, q, k, v, mask):
    """Grouped-query attention of q [B, T, N, H] over k, v [B, S, K, H]; mask [B, 1, T, S] bool."""
    if config.attn_logit_softcapping is None and config.query_pre_attn_scalar is None:
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=config.attention_impl)
    else:
        o = _capped_attention(config, q, k, v, mask)  # [B, T, N, H]
    return _linear(config, p["o_proj"], o, "BTNH,NHD->BTD")


def _capped_attention(config: LlamaConfig, q, k, v, mask):
    """Gemma-2's attention, as transformers' eager path computes it: scores scaled by
    1/√query_pre_attn_scalar, soft-capped, masked, softmax in float32. Query head n reads kv head
    n // (N / K), as jax.nn.dot_product_attention and transformers' repeat_kv group them."""
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = (config.query_pre_attn_scalar or H) ** -0.5
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H), k) * jnp.asarray(scale, q.dtype)
    s = softcap(s, config.attn_logit_softcapping)
    s = jnp.where(mask[:, :, None], s, jnp.finfo(s.dtype).min)  # mask [B, 1, T, S]
    w = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", w, v).reshape(B, T, N, H)


def mlp(config: LlamaConfig, p, x):
    """SwiGLU (GeGLU for Gemma): down(act(gate(x)) * up(x)). x [B, T, D]."""
    act = ACTIVATIONS[config.hidden_act]
    h = act(_linear(config, p["gate_proj"], x, "BTD,DF->BTF")) * _linear(
        config, p["up_proj"], x, "BTD,DF->BTF"
    )
    h = constrain(h, ("batch", "length", "mlp"))
    return _linear(config, p["down_proj"], h, "BTF,FD->BTD")


def decoder_layer(config: LlamaConfig, p, x, positions, mask, inv_freq, cache=None):
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Returns (x, (k, v)).

    With `cache` = (k_cache, v_cache [L, B, S, K, H], layer, start): every layer's cache, stacked,
    as the decoding loop carries it (models/sample.py). This step's keys and values are written in
    place at [layer, :, start], attention runs over that layer's whole cache, and the returned
    (k, v) are the updated stacked caches: only the new entries are written, where scanning the
    caches as per-layer inputs and outputs copies all of them on every step. Without, attention is
    over this input alone and (k, v) are this input's.
    """
    h = norm(config, x, p["input_layernorm"])
    q, k, v = attention_qkv(config, p["self_attn"], h, positions, inv_freq)
    if cache is not None:
        k_cache, v_cache, layer, start = cache
        at = (layer, 0, start, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], at)
        a = attention_out(config, p["self_attn"], q, k_cache[layer], v_cache[layer], mask)
        k, v = k_cache, v_cache
    else:
        a = attention_out(config, p["self_attn"], q, k, v, mask)
    if config.sandwich_norms:  # Gemma-2: the attention and the MLP outputs are normed as well
        x = x + norm(config, a, p["post_attention_layernorm"])
        m = mlp(config, p["mlp"], norm(config, x, p["pre_feedforward_layernorm"]))
        x = x + norm(config, m, p["post_feedforward_layernorm"])
    else:  # Llama's post_attention_layernorm is the norm before the MLP
        x = x + a
        x = x + mlp(config, p["mlp"], norm(config, x, p["post_attention_layernorm"]))
    return constrain(x, ("batch", "length", "act_embed")), (k, v)


def attention_mask(
    segment_ids,
    kv_segment_ids=None,
    *,
    q_index=None,
    kv_index=None,
    shared_segment=None,
    window=None,
    q_positions=None,
    kv_positions=None,
):
    """[B, 1, T, S] bool: causal (by index), no padding keys (segment 0), own segment only.

    With `shared_segment` (prompt-shared rows, DESIGN.md: 1 = the shared prompt, 2 and 3 the
    answers), a token also sees the shared prompt. With `window` (Mistral's sliding window), only
    keys less than `window` positions back (`q_positions`/`kv_positions`, default the indices).
    Every query sees itself, so padding rows stay finite (their outputs are never read).
    """
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    T, S = segment_ids.shape[1], kv_segment_ids.shape[1]
    q_index = jnp.arange(T)[None, :] if q_index is None else q_index  # [1 | B, T]
    kv_index = jnp.arange(S)[None, :] if kv_index is None else kv_index
    q_seg, k_seg = segment_ids[:, :, None], kv_segment_ids[:, None, :]
    same = q_seg == k_seg
    if shared_segment is not None:
        same = same | ((k_seg == shared_segment) & (q_seg != 0))
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    mask = causal & same & (k_seg != 0)
    if window is not None:  # by position (the index where not given): the W - 1 tokens before and itself
        q_pos = q_index if q_positions is None else q_positions
        kv_pos = kv_index if kv_positions is None else kv_positions
        mask = mask & (q_pos[:, :, None] - kv_pos[:, None, :] < window)
    mask = mask | (kv_index[:, None, :] == q_index[:, :, None])
    return mask[:, None]


def default_positions(segment_ids):
    """Positions that restart at 0 at the start of every run of equal segment ids (0 on padding)."""
    T = segment_ids.shape[1]
    idx = jnp.arange(T)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segment_ids != 0, idx - run_start, 0).astype(jnp.int32)


# --- parameter declarations -------------------------------------------------------------


def _init(axes, scale=0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(scale), axes)


class _Linear(nn.Module):
    """A projection's kernel (+ bias); with `lora_rank` > 0, LoRA adapters beside it: `lora_a` over the
    kernel's `n_in` input axes and `lora_b` over its output axes, float32 whatever the base's dtype.
    They are declared when initialising and read when present: parameters without them (the
    reference: the base with adapters off) apply the same module as the plain projection."""

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] | None
    param_dtype: Any
    n_in: int = 1
    lora_rank: int = 0

    @nn.compact
    def __call__(self):
        p = {"kernel": self.param("kernel", _init(self.kernel_axes), self.kernel_shape, self.param_dtype)}
        if self.bias_axes is not None:
            shape = self.kernel_shape[-len(self.bias_axes) :]
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes)
            p["bias"] = self.param("bias", init, shape, self.param_dtype)
        if self.has_variable("params", "lora_a") or (self.lora_rank and self.is_initializing()):
            n, r = self.n_in, self.lora_rank
            a_axes, b_axes = (*self.kernel_axes[:n], "lora_rank"), ("lora_rank", *self.kernel_axes[n:])
            a_shape, b_shape = (*self.kernel_shape[:n], r), (r, *self.kernel_shape[n:])
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, b_axes)
            p["lora_a"] = self.param("lora_a", _init(a_axes), a_shape, jnp.float32)
            p["lora_b"] = self.param("lora_b", zeros, b_shape, jnp.float32)
            if self.has_rng(LORA_DROPOUT):  # one key per projection and layer (scan splits it)
                p["dropout_key"] = self.make_rng(LORA_DROPOUT)
        return p


class _Norm(nn.Module):
    size: int
    param_dtype: Any

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        return {"weight": self.param("weight", init, (self.size,), self.param_dtype)}


class _SelfAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self):
        c, pd = self.config, DTYPES[self.config.param_dtype]
        D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.H

        def linear(name, shape, axes, bias_axes, bias, n_in=1):
            return _Linear(shape, axes, bias_axes if bias else None, pd, n_in, _rank(c, name), name=name)()

        b = c.attention_bias
        p = {
            "q_proj": linear("q_proj", (D, N, H), ("embed", "heads", "head_dim"), ("heads", "head_dim"), b),
            "k_proj": linear(
                "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), b
            ),
            "v_proj": linear(
                "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), b
            ),
            # o_proj reads heads × head_dim
            "o_proj": linear(
                "o_proj", (N, H, D), ("heads", "head_dim", "embed"), ("embed",), c.has_o_bias, 2
            ),
        }
        if c.qk_norm:
            p |= {"q_norm": _Norm(H, pd, name="q_norm")(), "k_norm": _Norm(H, pd, name="k_norm")()}
        return p


class _MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self):
        c, pd = self.config, DTYPES[self.config.param_dtype]
        D, F, b = c.hidden_size, c.intermediate_size, c.mlp_bias

        def linear(name, shape, axes, bias_axes):
            return _Linear(shape, axes, bias_axes if b else None, pd, 1, _rank(c, name), name=name)()

        return {
            "gate_proj": linear("gate_proj", (D, F), ("embed", "mlp"), ("mlp",)),
            "up_proj": linear("up_proj", (D, F), ("embed", "mlp"), ("mlp",)),
            "down_proj": linear("down_proj", (F, D), ("mlp", "embed"), ("embed",)),
        }


def _rank(config: LlamaConfig, name: str) -> int:
    """The LoRA rank of projection `name` (0: no adapters)."""
    return config.lora.rank_of(name) if config.lora is not None else 0


class DecoderLayer(nn.Module):
    """One block; scanned over layers. Returns (x, x if `collect_hidden` else None)."""

    config: LlamaConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, sliding):
        c, pd = self.config, DTYPES[self.config.param_dtype]
        norms = ("input_layernorm", "post_attention_layernorm")
        if c.sandwich_norms:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        p = {name: _Norm(c.hidden_size, pd, name=name)() for name in norms}
        p |= {"self_attn": _SelfAttention(c, name="self_attn")(), "mlp": _MLP(c, name="mlp")()}
        x, _ = decoder_layer(c, p, x, positions, layer_mask(mask, sliding), rope_inv_freq(c))
        return x, (x if self.collect_hidden else None)


class Llama(nn.Module):
    """The decoder stack: token ids -> final normed hidden states [B, T, D].

    The output projection is applied outside (`output_weight`), so that log-probs can be
    computed chunk by chunk without ever building [B, T, V] logits.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions, mask, *, return_hidden: bool = False):
        c, pd = self.config, DTYPES[self.config.param_dtype]
        x = embed(c, _Embedding(c, name="embed_tokens")(), input_ids)  # [B, T, D]
        x = constrain(x, ("batch", "length", "act_embed"))
        layer = DecoderLayer
        if c.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, LORA_DROPOUT: True},
            in_axes=(nn.broadcast, nn.broadcast, 0),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        sliding = jnp.asarray(c.sliding_layers)  # [L], scanned with the layers
        x, per_layer = stack(c, return_hidden, name="layers")(x, positions, mask, sliding)
        x = norm(c, x, _Norm(c.hidden_size, pd, name="norm")())
        if not c.tie_word_embeddings:
            self.param("lm_head", _init(("embed", "vocab")), (c.hidden_size, c.vocab_size), pd)
        return (x, per_layer) if return_hidden else x


class _Embedding(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self):
        c = self.config
        return self.param(
            "embedding", _init(("vocab", "embed")), (c.vocab_size, c.hidden_size), DTYPES[c.param_dtype]
        )


def output_weight(config: LlamaConfig, params) -> jax.Array:
    """[D, V]: the LM head, or the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]


def frozen_copy(config: LlamaConfig, params):
    """A frozen reference's copy of `params`, in the compute dtype (`config.dtype`) but for the output
    projection. Every layer casts its weights to the compute dtype before use, and the log-prob chunks
    use the output projection in its own dtype, so the copy gives the original's log-probs bit for bit;
    with float32 master weights and bfloat16 compute it takes about half the memory (~15 GB less at 8B)."""
    dt = DTYPES[config.dtype]

    def copy(path, x):
        names = [getattr(k, "key", None) for k in path]
        output = names[:1] == ["lm_head"] or (config.tie_word_embeddings and names[:1] == ["embed_tokens"])
        return jnp.copy(x) if output or x.dtype == dt else x.astype(dt)

    return jax.tree_util.tree_map_with_path(copy, params)


# --- the functional surface ---------------------------------------------------------------


def _inputs(attention_mask, segment_ids, positions):
    segment_ids = jnp.asarray(attention_mask, jnp.int32) if segment_ids is None else segment_ids
    positions = default_positions(segment_ids) if positions is None else positions
    return segment_ids, positions


def hidden_states(
    model: Llama,
    params,
    input_ids,
    attention_mask,
    segment_ids=None,
    positions=None,
    *,
    return_hidden=False,
    shared_segment=None,
    dropout_rng=None,
):
    """Final normed hidden states [B, T, D] (and, with `return_hidden`, per-layer outputs [L, B, T, D]).

    `attention_mask` [B, T] is 1 on real tokens. `segment_ids` (default: the attention mask) keep
    packed sequences apart; `positions` default to counting from 0 in every segment, so
    left-padded rows get the positions an unpadded row would. `dropout_rng` (a key) turns on LoRA's
    dropout (`lora.dropout`; training only).
    """
    segment_ids, positions = _inputs(attention_mask, segment_ids, positions)
    mask = _segment_mask(segment_ids, shared_segment, positions, model.config)
    c = model.config
    lora_layers = c.lora.layers if c.lora is not None else 0
    dropout_rng = dropout_rng if c.lora is not None and c.lora.dropout else None
    if 0 < lora_layers < c.num_hidden_layers:  # the reference (no adapters) too: see below
        return _top_layers_trained(c, params, input_ids, positions, mask, return_hidden, dropout_rng)
    rngs = {LORA_DROPOUT: dropout_rng} if dropout_rng is not None else None
    return model.apply({"params": params}, input_ids, positions, mask, return_hidden=return_hidden, rngs=rngs)


def _top_layers_trained(config: LlamaConfig, params, input_ids, positions, mask, return_hidden, dropout_rng):
    """`Llama.__call__` with adapters on the top `lora.layers` layers only: the layers below run as
    the base (their adapters, at B = 0, are skipped) under stop_gradient, so the backward pass stops
    at the first adapted layer. The same per-layer module (`DecoderLayer`), scanned in two parts.
    The reference of a LoRA run (the base: no adapters) takes this path too, so that its lower part
    is the same computation as the policy's and XLA computes it once for both in a jitted step."""
    c = config
    L, K = c.num_hidden_layers, c.lora.layers
    layer = DecoderLayer(c, collect_hidden=return_hidden)
    sliding = jnp.asarray(c.sliding_layers)

    def scan(x, layers, first, rng):
        def body(x, xs):
            p, index = xs
            rngs = None if rng is None else {LORA_DROPOUT: jax.random.fold_in(rng, index)}
            return layer.apply({"params": p}, x, positions, mask, sliding[index], rngs=rngs)

        if c.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        n = jax.tree.leaves(layers)[0].shape[0]
        return jax.lax.scan(body, x, (layers, first + jnp.arange(n)))

    def part(tree, lo, hi):
        return jax.tree.map(lambda a: a[lo:hi], tree)

    x = embed(c, params["embed_tokens"]["embedding"], input_ids)
    x = constrain(x, ("batch", "length", "act_embed"))
    lower = jax.lax.stop_gradient(part(_without_adapters(params["layers"]), 0, L - K))
    x, below = jax.lax.stop_gradient(scan(x, lower, 0, None))
    x, above = scan(x, part(params["layers"], L - K, L), L - K, dropout_rng)
    x = norm(c, x, params["norm"])
    return (x, jnp.concatenate([below, above])) if return_hidden else x


def _without_adapters(params):
    """`params` without the adapter leaves: lora.base's split, by the same `is_adapter` test."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


def _segment_mask(segment_ids, shared_segment, positions, config: LlamaConfig):
    # the public functions' `attention_mask` argument shadows the module's mask builder
    def build(window):
        return attention_mask(
            segment_ids,
            shared_segment=shared_segment,
            window=window,
            q_positions=positions,
            kv_positions=positions,
        )

    return layer_masks(config, build)


def layer_masks(config: LlamaConfig, build):
    """What the layers attend with: one mask, or (full, sliding) when only some layers slide (Gemma-2);
    `build(window)` makes one."""
    sliding = config.sliding_layers
    if all(sliding):
        return build(config.sliding_window)
    if not any(sliding):
        return build(None)
    return build(None), build(config.sliding_window)


def layer_mask(mask, sliding):
    """This layer's mask: the sliding one of a (full, sliding) pair where `sliding` (a traced bool)."""
    return jnp.where(sliding, mask[1], mask[0]) if isinstance(mask, tuple) else mask


def logits(
    model: Llama, params, input_ids, attention_mask, segment_ids=None, positions=None, *, return_hidden=False
):
    """[B, T, V] float32 logits (jittable). With `return_hidden`: (logits, final hidden, per-layer)."""
    out = hidden_states(
        model, params, input_ids, attention_mask, segment_ids, positions, return_hidden=return_hidden
    )
    h, per_layer = out if return_hidden else (out, None)
    w = output_weight(model.config, params)
    z = jnp.einsum("BTD,DV->BTV", h.astype(jnp.float32), w.astype(jnp.float32))
    z = softcap(z, model.config.final_logit_softcapping)
    return (z, h, per_layer) if return_hidden else z


def token_logps(
    model: Llama,
    params,
    input_ids,
    attention_mask,
    loss_mask,
    segment_ids=None,
    positions=None,
    *,
    chunk_size=256,
    with_entropy=False,
    with_sum_sq=False,
    with_greedy=False,
    shared_segment=None,
    ref_params=None,
    kl=None,
    dropout_rng=None,
):
    """Per-token log-probs [B, T] (`token_logps[:, t] = log p(ids[t] | ids[:t])`, 0 at t = 0) and
    their sums over `loss_mask`, from chunks of the output projection: no [B, T, V] array is
    built in the forward or the backward pass. With `ref_params` and `kl` ("ref_policy" or
    "policy_ref"), also the reference's log-probs and the per-position KL between the two models'
    next-token distributions. `dropout_rng`: LoRA's dropout in the policy's pass (not the
    reference's). See `apo_jax.logprobs.token_logps`."""

    def hidden(p, rng=None):
        return hidden_states(
            model,
            p,
            input_ids,
            attention_mask,
            segment_ids,
            positions,
            shared_segment=shared_segment,
            dropout_rng=rng,
        )

    ref = {}
    if kl is not None:
        if ref_params is None:
            raise ValueError(f"kl={kl!r} needs ref_params")
        ref_params = jax.lax.stop_gradient(ref_params)
        ref = {"ref_hidden": hidden(ref_params), "ref_weight": output_weight(model.config, ref_params)}
    return _from_hidden(
        hidden(params, dropout_rng),
        output_weight(model.config, params),
        input_ids,
        loss_mask,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        with_sum_sq=with_sum_sq,
        with_greedy=with_greedy,
        kl=kl,
        softcap=model.config.final_logit_softcapping,
        **ref,
    )


ADAPTER_KEYS = ("lora_a", "lora_b")


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (its keys) is a LoRA adapter leaf."""
    return path[-1] in ADAPTER_KEYS


def has_adapters(params) -> bool:
    """Whether `params` hold LoRA adapters (a structural test: free under jit)."""
    return any(is_adapter(k) for k in flax.traverse_util.flatten_dict(params))

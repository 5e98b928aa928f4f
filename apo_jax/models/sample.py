"""Batched sampling with a preallocated KV cache: the model's answers for CLAIR.

Decoding runs the same per-layer function as training (`llama.decoder_layer`), scanned over the
stacked layer parameters, with each layer's cache as scan input and output. Prompts are
left-padded; every row stops at its first EOS id and is padded after it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apo_jax.models.llama import (
    DTYPES,
    Llama,
    LlamaConfig,
    attention_mask,
    decoder_layer,
    default_positions,
    output_weight,
    rms_norm,
    rope_inv_freq,
)


def _forward(config: LlamaConfig, params, ids, positions, caches, start, kv_valid):
    """Runs ids [B, t] (written at cache index `start`) and returns (last hidden [B, D], caches)."""
    dt = DTYPES[config.dtype]
    x = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0).astype(dt)
    t, S = ids.shape[1], kv_valid.shape[1]
    q_index = (start + jnp.arange(t))[None, :]
    mask = attention_mask(
        jnp.ones_like(ids), kv_valid.astype(jnp.int32), q_index=q_index, kv_index=jnp.arange(S)[None, :]
    )
    inv_freq = rope_inv_freq(config)

    def layer(x, xs):
        p, k_cache, v_cache = xs
        x, kv = decoder_layer(config, p, x, positions, mask, inv_freq, cache=(k_cache, v_cache, start))
        return x, kv

    x, caches = jax.lax.scan(layer, x, (params["layers"], *caches))
    x = rms_norm(x[:, -1], params["norm"]["weight"], config.rms_norm_eps)
    return x, caches


def _sample(logits, rng, temperature, top_p, top_k, greedy):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # smallest set reaching top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "top_k", "eos_ids", "greedy", "pad_id")
)
def _generate(
    config,
    params,
    prompt_ids,
    prompt_mask,
    rng,
    temperature,
    top_p,
    *,
    max_new_tokens,
    top_k,
    eos_ids,
    greedy,
    pad_id,
):
    B, P = prompt_ids.shape
    S = P + max_new_tokens
    L, K, H = config.num_hidden_layers, config.num_key_value_heads, config.H
    dt = DTYPES[config.dtype]
    caches = (jnp.zeros((L, B, S, K, H), dt), jnp.zeros((L, B, S, K, H), dt))
    mask = prompt_mask.astype(bool)
    kv_valid = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), bool)], axis=1)
    positions = default_positions(mask.astype(jnp.int32))
    w = output_weight(config, params)

    def logits_of(h):
        return jnp.einsum("BD,DV->BV", h.astype(jnp.float32), w.astype(jnp.float32))

    h, caches = _forward(config, params, prompt_ids, positions, caches, 0, kv_valid)
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, caches, kv_valid, logits, rng = state
        rng, key = jax.random.split(rng)
        tok = _sample(logits, key, temperature, top_p, top_k, greedy)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        done = done | jnp.isin(tok, eos)
        kv_valid = kv_valid.at[:, P + i].set(True)
        h, caches = _forward(config, params, tok[:, None], (next_pos + i)[:, None], caches, P + i, kv_valid)
        return i + 1, tokens, done, caches, kv_valid, logits_of(h), rng

    tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, jnp.zeros((B,), bool), caches, kv_valid, logits_of(h), rng)
    _, tokens, done, *_ = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return {"tokens": tokens, "lengths": first_eos.astype(jnp.int32), "finished": done}


def generate(
    model: Llama, params, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, top_k: int = 0, eos_ids=None, rng=None, pad_id: int | None = None,
) -> dict[str, jax.Array]:  # fmt: skip
    """Samples up to `max_new_tokens` tokens after each left-padded prompt, jitted.

    Args:
      prompt_ids, prompt_mask: [B, P], left-padded (mask 1 on real tokens).
      temperature: 0 means greedy (argmax); otherwise logits / temperature, then top-k (0 = off)
        and nucleus top-p filtering.
      eos_ids: token ids that end a row (default: the config's eos_token_id); the EOS is kept.
      rng: a `jax.random.key`; a fixed key gives the same samples.
      pad_id: fills rows after their EOS (default: pad_token_id, else the first EOS id, else 0).

    Returns:
      dict with `tokens` [B, max_new_tokens] int32, `lengths` [B] (tokens up to and with the
      EOS) and `finished` [B] (the row met an EOS).
    """
    config = model.config
    eos_ids = tuple(config.eos_token_id if eos_ids is None else eos_ids)
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], top_k={top_k} >= 0"
        )
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        config, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32), rng,
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), max_new_tokens=max_new_tokens, top_k=top_k,
        eos_ids=eos_ids, greedy=temperature == 0, pad_id=int(pad_id),
    )  # fmt: skip

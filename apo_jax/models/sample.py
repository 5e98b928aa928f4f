"""Batched sampling with a preallocated KV cache: the model's answers for CLAIR.

Decoding runs the same per-layer function as training (`llama.decoder_layer`), scanned over the
stacked layer parameters, with the stacked [L, B, S, K, H] caches in the scan's carry so that each
step writes only its new keys and values. Prompts are
left-padded; every row stops at its first EOS id and is padded after it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apo_jax.models.config import DTYPES, LlamaConfig
from apo_jax.models.llama import (
    Llama,
    attention_mask,
    decoder_layer,
    default_positions,
    embed,
    layer_mask,
    layer_masks,
    norm,
    output_weight,
    rope_inv_freq,
    softcap,
)
from apo_jax.sharding import activation_rules, mesh_of


def _forward(config: LlamaConfig, params, ids, positions, caches, start, kv_valid):
    """Runs ids [B, t] (written at cache index `start`) and returns (last hidden [B, D], caches)."""
    x = embed(config, params["embed_tokens"]["embedding"], ids)
    t, S = ids.shape[1], kv_valid.shape[1]
    q_index = (start + jnp.arange(t))[None, :]

    def build(window):  # by cache index: a left-padded prompt, then its continuation
        kv_index = jnp.arange(S)[None, :]
        return attention_mask(
            jnp.ones_like(ids), kv_valid.astype(jnp.int32), q_index=q_index, kv_index=kv_index, window=window
        )

    masks, inv_freq = layer_masks(config, build), rope_inv_freq(config)

    def layer(carry, xs):
        x, k_cache, v_cache = carry
        p, sliding, index = xs
        mask = layer_mask(masks, sliding)
        cache = (k_cache, v_cache, index, start)
        x, caches = decoder_layer(config, p, x, positions, mask, inv_freq, cache=cache)
        return (x, *caches), None

    layers = (params["layers"], jnp.asarray(config.sliding_layers), jnp.arange(config.num_hidden_layers))
    (x, *caches), _ = jax.lax.scan(layer, (x, *caches), layers)
    return norm(config, x[:, -1], params["norm"]), tuple(caches)


def _nucleus(logits, top_p):
    """Keeps the smallest set of tokens whose probability reaches top_p: the logits at or above the
    highest threshold τ with P(logit ≥ τ) ≥ top_p, found by bisection over [min, max] logit (40
    halvings; O(V) each, where a sort of the vocabulary costs most of a decode step on a CPU)."""
    probs = jax.nn.softmax(logits, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds  # P(logit ≥ lo) ≥ top_p > P(logit ≥ hi)
        mid = (lo + hi) / 2
        enough = jnp.sum(jnp.where(logits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    finite = jnp.where(jnp.isfinite(logits), logits, jnp.inf)
    bounds = (jnp.min(finite, axis=-1), jnp.max(logits, axis=-1) + 1.0)
    lo, _ = jax.lax.fori_loop(0, 40, halve, bounds)
    return jnp.where(logits >= lo[:, None], logits, -jnp.inf)


def _categorical(rng, logits, width: int = 256):
    """One draw per row from softmax(logits) [B, V] by inverting its CDF in two levels (blocks of
    `width` tokens, then the tokens of the chosen block): one uniform per row and two short cumsums,
    where jax.random.categorical's Gumbel noise draws V uniforms per row (a fifth of a SmolLM2
    decode step at batch 64 on a CPU). Each level's index is clamped to its first and last entries
    with mass, so rounding in the cumsums cannot pick a masked token."""
    B, V = logits.shape
    pad = -V % width
    p = jax.nn.softmax(jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf), axis=-1)
    p = p.reshape(B, -1, width)

    def invert(mass, u):  # the first index whose running mass exceeds u, within those with mass
        first = jnp.argmax(mass > 0, axis=-1)
        last = mass.shape[-1] - 1 - jnp.argmax(jnp.flip(mass > 0, -1), axis=-1)
        return jnp.clip(jnp.sum(jnp.cumsum(mass, -1) <= u[:, None], axis=-1), first, last)

    block_mass = jnp.sum(p, axis=-1)
    u = jax.random.uniform(rng, (B,), jnp.float32) * jnp.sum(block_mass, axis=-1)
    block = invert(block_mass, u)
    before = jnp.sum(jnp.where(jnp.arange(block_mass.shape[1]) < block[:, None], block_mass, 0.0), axis=-1)
    row = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]
    return (block * width + invert(row, u - before)).astype(jnp.int32)


def _sample(logits, rng, temperature, top_p, top_k, greedy, nucleus):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature[:, None]
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if nucleus:
        logits = _nucleus(logits, top_p)
    return _categorical(rng, logits)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "top_k", "eos_ids", "greedy", "nucleus", "pad_id", "mesh"),
)
def _generate(
    config,
    all_params,
    mix,
    prompt_ids,
    prompt_mask,
    rng,
    temperature,
    top_p,
    temperature_step,
    temperature_max,
    step_end,
    *,
    max_new_tokens,
    top_k,
    eos_ids,
    greedy,
    nucleus,
    pad_id,
    mesh,
):
    """`all_params`: one params pytree per model; the logits sampled from are Σ_m mix[:, m]·logits_m.
    Activations are pinned by the rules table on `mesh`, the mesh the parameters live on."""
    with activation_rules(mesh):
        B, P = prompt_ids.shape
        S = P + max_new_tokens
        L, K, H = config.num_hidden_layers, config.num_key_value_heads, config.H
        dt = DTYPES[config.dtype]
        mask = prompt_mask.astype(bool)
        kv_valid = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), bool)], axis=1)
        positions = default_positions(mask.astype(jnp.int32))
        weights = [output_weight(config, p).astype(jnp.float32) for p in all_params]

        def mixed_logits(hs):
            return sum(
                mix[:, m, None]
                * softcap(jnp.einsum("BD,DV->BV", h.astype(jnp.float32), w), config.final_logit_softcapping)
                for m, (h, w) in enumerate(zip(hs, weights, strict=True))
            )

        def forward_all(ids, pos, caches, start, kv_valid):
            outs = [
                _forward(config, p, ids, pos, c, start, kv_valid)
                for p, c in zip(all_params, caches, strict=True)
            ]
            return [h for h, _ in outs], tuple(c for _, c in outs)

        empty = tuple((jnp.zeros((L, B, S, K, H), dt), jnp.zeros((L, B, S, K, H), dt)) for _ in all_params)
        hs, caches = forward_all(prompt_ids, positions, empty, 0, kv_valid)
        next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B]
        eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

        def cond(state):
            i, _, done, *_ = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, tokens, done, caches, kv_valid, logits, rng, steps = state
            rng, key = jax.random.split(rng)
            temp = jnp.minimum(temperature + temperature_step * steps, temperature_max)  # [B]
            tok = _sample(logits, key, temp, top_p, top_k, greedy, nucleus)
            tok = jnp.where(done, pad_id, tok)
            steps = steps + step_end[tok]
            tokens = tokens.at[:, i].set(tok)
            done = done | jnp.isin(tok, eos)
            kv_valid = kv_valid.at[:, P + i].set(True)
            hs, caches = forward_all(tok[:, None], (next_pos + i)[:, None], caches, P + i, kv_valid)
            return i + 1, tokens, done, caches, kv_valid, mixed_logits(hs), rng, steps

        tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
        steps = jnp.zeros((B,), jnp.float32)  # step ends emitted so far, per row
        state = (jnp.int32(0), tokens, jnp.zeros((B,), bool), caches, kv_valid, mixed_logits(hs), rng, steps)
        _, tokens, done, *_ = jax.lax.while_loop(cond, body, state)
        is_eos = jnp.isin(tokens, eos)
        first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
        return {"tokens": tokens, "lengths": first_eos.astype(jnp.int32), "finished": done}


def generate(
    model: Llama,
    params,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids=None,
    rng=None,
    pad_id: int | None = None,
    temperature_step: float = 0.0,
    temperature_max: float | None = None,
    step_end_ids=(),
    ref_params=None,
    mix=None,
) -> dict[str, jax.Array]:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt, jitted.

    Args:
      prompt_ids, prompt_mask: [B, P], left-padded (mask 1 on real tokens).
      temperature: 0 means greedy (argmax); otherwise logits / temperature, then top-k (0 = off)
        and nucleus top-p filtering.
      eos_ids: token ids that end a row (default: the config's eos_token_id); the EOS is kept.
      rng: a `jax.random.key`; a fixed key gives the same samples.
      pad_id: fills rows after their EOS (default: pad_token_id, else the first EOS id, else 0).
      temperature_step, temperature_max, step_end_ids: a temperature that rises with each reasoning
        step a row has written (Step-Controlled DPO): min(temperature + temperature_step·i,
        temperature_max), i the number of tokens from `step_end_ids` (e.g. the newline tokens) the row
        has emitted so far.
      ref_params, mix: logit mixing with a second model of the same shape ("The Crucial Role of
        Samplers in Online DPO"): row b samples from mix[b, 0]·logits_θ + mix[b, 1]·logits_ref, e.g.
        (1.5, −0.5) and (0.5, 0.5). `mix` is [B, 2] (or a pair for every row).

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
    step_end = jnp.zeros((config.vocab_size,), jnp.float32).at[jnp.asarray(step_end_ids, jnp.int32)].set(1.0)
    t_max = jnp.inf if temperature_max is None else temperature_max
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    B = prompt_ids.shape[0]
    if ref_params is None:
        all_params, mix = (params,), jnp.ones((B, 1), jnp.float32)
    else:
        if mix is None:
            raise ValueError("ref_params needs mix: the [B, 2] logit weights of policy and reference")
        all_params, mix = (params, ref_params), jnp.broadcast_to(jnp.asarray(mix, jnp.float32), (B, 2))
    return _generate(
        config,
        all_params,
        mix,
        prompt_ids,
        prompt_mask,
        rng,
        jnp.full((B,), max(temperature, 1e-6), jnp.float32),
        jnp.float32(top_p),
        jnp.float32(temperature_step),
        jnp.float32(t_max),
        step_end,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        eos_ids=eos_ids,
        greedy=temperature == 0,
        nucleus=top_p < 1,
        pad_id=int(pad_id),
        mesh=mesh_of(params),
    )

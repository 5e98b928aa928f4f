"""Per-token log-probs from final hidden states, chunk by chunk: never a [B, T, V] array.

A preference step needs, for every completion token, log p(token | prefix) under the policy
and the reference. The logits of a whole batch ([B, T, V], V = 128k for Llama 3) would dwarf
the model's activations, so the output projection runs over chunks of `chunk_size` positions
inside a `lax.scan`, each chunk under `jax.checkpoint`: the backward pass recomputes one
chunk's logits at a time instead of storing them all. Given the reference's hidden states too,
the same chunks give the reference's log-probs and the full-vocabulary KL at every position
(TDPO, TIS-DPO's token-level variant), still without a [B, T, V] array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _kl_stats(logp, ref_logits, targets, kl: str) -> dict:
    """One chunk's reference token log-probs and per-position KL (see `token_logps`'s `kl`)."""
    logr = jax.nn.log_softmax(ref_logits)
    out = {"ref_token_logps": jnp.take_along_axis(logr, targets[..., None], axis=-1)[..., 0]}
    if kl == "ref_policy":
        out["kl"] = jnp.sum(jnp.exp(logr) * (logr - logp), axis=-1)
    else:
        out["kl"] = jnp.sum(jnp.exp(logp) * (logp - logr), axis=-1)
    return out


def softcap(z, cap):
    """cap·tanh(z / cap) (Gemma-2's attention and final-logit soft-capping); z itself for cap None."""
    return z if cap is None else cap * jnp.tanh(z / cap)


_cap = softcap  # inside token_logps its `softcap` argument (the cap) shadows the function


def token_logps(
    hidden,
    weight,
    input_ids,
    loss_mask,
    *,
    chunk_size: int = 256,
    with_entropy: bool = False,
    with_sum_sq: bool = False,
    with_greedy: bool = False,
    ref_hidden=None,
    ref_weight=None,
    kl: str | None = None,
    softcap: float | None = None,
) -> dict[str, jax.Array]:
    """Log-probs of `input_ids` under logits = hidden @ weight, aligned with the ids.

    Args:
      hidden: [B, T, D] final (normed) hidden states; position t predicts token t + 1.
      weight: [D, V] output projection.
      input_ids: [B, T] int.
      loss_mask: [B, T], 1 on the tokens whose log-probs are summed (completion tokens).
      chunk_size: positions per chunk of the output projection.
      with_entropy: also return per-token entropy of the predictive distribution (no gradient).
      with_sum_sq: also return per-token log Σ_v p_v² (WPO's weighting statistic; no gradient).
      with_greedy: also return per-token whether the token is the argmax of its logits (bool).
      ref_hidden, ref_weight: the reference model's [B, T, D] hidden states and [D, V] output
        projection (no gradient flows into them); needed by `kl`.
      kl: the per-position KL over the vocabulary between policy π and reference π_ref:
        "ref_policy" = KL(π_ref ‖ π) = Σ_v π_ref (log π_ref − log π) (TDPO's sequential KL), or
        "policy_ref" = KL(π ‖ π_ref) = Σ_v π (log π − log π_ref) (TIS-DPO's token-level term).
      softcap: logits capped by c·tanh(z / c) before the softmax (Gemma-2's final soft-capping).

    Returns:
      dict with `token_logps` [B, T] (`[:, t] = log p(ids[t] | ids[:t])`, 0 at t = 0), `logps` [B]
      = Σ_t token_logps·loss_mask, `lengths` [B] = Σ_t loss_mask, and on request `entropy`,
      `log_sum_sq_probs` and `greedy` [B, T] aligned the same way (0 / False at t = 0). With `kl`,
      also `kl` [B, T] (gradient through π only), `ref_token_logps` [B, T] and `ref_logps` [B] (no
      gradient).
    """
    if kl not in (None, "ref_policy", "policy_ref"):
        raise ValueError(f"kl={kl!r}: use 'ref_policy' (KL(π_ref ‖ π)) or 'policy_ref' (KL(π ‖ π_ref))")
    if kl is not None and (ref_hidden is None or ref_weight is None):
        raise ValueError("kl needs the reference's ref_hidden and ref_weight")
    B, T, D = hidden.shape
    n = T - 1
    c = max(1, min(chunk_size, n))
    pad = (-n) % c

    def chunks(x):  # [B, T, ...] -> [C, B, c, ...]: positions 0..T-2 predict tokens 1..T-1
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(B, -1, c, *x.shape[2:]).swapaxes(0, 1)

    xs = (chunks(hidden[:, :-1].astype(weight.dtype)), chunks(input_ids[:, 1:]))
    if kl is not None:
        ref_weight = jax.lax.stop_gradient(ref_weight)
        xs += (chunks(jax.lax.stop_gradient(ref_hidden)[:, :-1].astype(ref_weight.dtype)),)

    @jax.checkpoint
    def chunk(w, wr, hc, tc, hrc=None):
        z = _cap(jnp.einsum("BcD,DV->BcV", hc, w, preferred_element_type=jnp.float32), softcap)
        lse = jax.nn.logsumexp(z, axis=-1)
        out = {"token_logps": jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0] - lse}
        if with_entropy:
            p = jnp.exp(z - lse[..., None])
            out["entropy"] = jax.lax.stop_gradient(lse - jnp.sum(p * z, axis=-1))
        if with_greedy:  # the first maximum, as torch's argmax (lm-eval's is_greedy)
            out["greedy"] = jnp.argmax(z, axis=-1) == tc
        if with_sum_sq:
            out["log_sum_sq_probs"] = jax.lax.stop_gradient(jax.nn.logsumexp(2 * z, axis=-1) - 2 * lse)
        if kl is not None:
            zr = _cap(jnp.einsum("BcD,DV->BcV", hrc, wr, preferred_element_type=jnp.float32), softcap)
            out |= _kl_stats(z - lse[..., None], zr, tc, kl)
        return out

    _, outs = jax.lax.scan(lambda carry, x: (carry, chunk(weight, ref_weight, *x)), None, xs)

    def unchunk(x):  # [C, B, c] -> [B, T], with the 0 at t = 0
        x = x.swapaxes(0, 1).reshape(B, -1)[:, :n]
        return jnp.pad(x, ((0, 0), (1, 0)))

    result = {k: unchunk(v) for k, v in outs.items()}
    mask = jnp.asarray(loss_mask, jnp.float32)
    result["logps"] = jnp.sum(result["token_logps"] * mask, axis=-1)
    result["lengths"] = jnp.sum(mask, axis=-1)
    if kl is not None:
        result["ref_logps"] = jnp.sum(result["ref_token_logps"] * mask, axis=-1)
    return result


def naive_token_logps(hidden, weight, input_ids):
    """The reference: full [B, T, V] log-softmax and a gather (for tests and small models)."""
    z = jnp.einsum("BTD,DV->BTV", hidden.astype(jnp.float32), weight.astype(jnp.float32))
    logp = jax.nn.log_softmax(z[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))

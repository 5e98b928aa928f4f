"""Token-level objectives and token-level aggregation of log-probs.

Token-level inputs are [B, T] per-token log-probs aligned with the input ids, plus
`*_loss_mask` [B, T] (1 on completion tokens). The helpers here turn per-token log-probs into
what sequence-level losses take: LD-DPO's `ld_alpha` aggregation and WPO's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._pairwise import paired_output
from apo_jax.losses._registry import check, f32, register


def _sum(mask, x, weights=None):
    """Σ_t m_t·w_t·x_t over the last axis (w = 1 without weights), in float32."""
    w = f32(mask) * (1.0 if weights is None else f32(weights))
    return jnp.sum(w * f32(x), axis=-1)


@register(
    "token_weighted",
    granularity="token",
    aliases=("tis_dpo", "d2po", "mask_dpo"),
    paper="TIS-DPO (arXiv 2410.04350), D²PO (arXiv 2502.14340), Mask-DPO (arXiv 2503.02846)",
)
def token_weighted(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_loss_mask,
    rejected_loss_mask,
    chosen_weights=None,
    rejected_weights=None,
):
    """Token-weighted DPO: ρ̃ = Σ_t m_t·w_t·(log π_t − log π_ref,t), L = −log σ(β(ρ̃_c − ρ̃_r)).

    All inputs are [B, T]. Weights default to 1 (plain DPO). The three papers differ only in w:
      - TIS-DPO: importance weights from two contrastive models, precomputed offline
        (`tis_dpo_weights`); its token-level KL variant is `tis_dpo_kl`.
      - D²PO: temporal decay w_t = γ^k, k = 1 at the first completion token (`d2po_weights`,
        γ = 0.98).
      - Mask-DPO: 0/1 sentence masks: the chosen answer keeps its correct sentences, the
        rejected its hallucinated ones (`mask_dpo_weights`).
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rho_c = _sum(chosen_loss_mask, pc - rc, chosen_weights)
    rho_r = _sum(rejected_loss_mask, pr - rr, rejected_weights)
    return paired_output(-jax.nn.log_sigmoid(beta * (rho_c - rho_r)), beta, rho_c, rho_r)


_ALPHA = {"alpha": (lambda v: v >= 0, "must be >= 0")}


@register(
    "tdpo",
    granularity="token",
    kl="ref_policy",
    checks={**_ALPHA, "tdpo2": (lambda v: isinstance(v, bool), "must be True (TDPO2) or False (TDPO1)")},
    paper="TDPO, Zeng et al., ICML 2024 (arXiv 2404.11999); formulas and defaults (α 0.5, TDPO2) from the "
    "official code, Vance0124/Token-level-Direct-Preference-Optimization `tdpo_loss`",
)
def tdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_loss_mask,
    rejected_loss_mask,
    chosen_kl,
    rejected_kl,
    alpha=0.5,
    tdpo2=True,
):
    """Token-level DPO: DPO's margin plus the sequential KLs D = Σ_t KL(π_ref ‖ π)(· | x, y_<t).

    With m = Σ_t (log π_t − log π_ref,t) over the completion and D_w, D_l the chosen and rejected
    answers' sequential KLs (`chosen_kl`/`rejected_kl` [B, T] per position, summed over the mask):
      TDPO1: L = −log σ(β(m_w − m_l + D_w − D_l))
      TDPO2: L = −log σ(β(m_w − m_l + α(sg(D_w) − D_l)))   (the default, α = 0.5)
    Rewards are β(m + D), as in the official code.
    """
    m_c = _sum(chosen_loss_mask, f32(policy_chosen_logps) - f32(ref_chosen_logps))
    m_r = _sum(rejected_loss_mask, f32(policy_rejected_logps) - f32(ref_rejected_logps))
    d_c, d_r = _sum(chosen_loss_mask, chosen_kl), _sum(rejected_loss_mask, rejected_kl)
    if tdpo2:
        z = m_c - m_r + alpha * (jax.lax.stop_gradient(d_c) - d_r)
    else:
        z = m_c - m_r + d_c - d_r
    metrics = {"kl/chosen": jnp.mean(d_c), "kl/rejected": jnp.mean(d_r)}
    return paired_output(-jax.nn.log_sigmoid(beta * z), beta, m_c + d_c, m_r + d_r, metrics=metrics)


@register(
    "tis_dpo_kl",
    granularity="token",
    kl="policy_ref",
    checks=_ALPHA,
    paper="TIS-DPO (arXiv 2410.04350), token_level variant; code PhiVanDat123/TIS-DPO (tisdpo_loss)",
)
def tis_dpo_kl(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_loss_mask,
    rejected_loss_mask,
    chosen_kl,
    rejected_kl,
    chosen_weights=None,
    rejected_weights=None,
    alpha=0.5,
):
    """TIS-DPO's token-level variant: the weighted margins minus α times the weighted KLs.

    ρ̃ = Σ_t m_t·w_t·(log π_t − log π_ref,t) and K̃ = Σ_t m_t·w_t·KL(π ‖ π_ref)(· | x, y_<t);
    L = −log σ(β(ρ̃_w − ρ̃_l − α(K̃_w − K̃_l))), rewards β(ρ̃ − K̃). With α = 0 it is `tis_dpo`.
    """
    rho_c = _sum(chosen_loss_mask, f32(policy_chosen_logps) - f32(ref_chosen_logps), chosen_weights)
    rho_r = _sum(rejected_loss_mask, f32(policy_rejected_logps) - f32(ref_rejected_logps), rejected_weights)
    k_c = _sum(chosen_loss_mask, chosen_kl, chosen_weights)
    k_r = _sum(rejected_loss_mask, rejected_kl, rejected_weights)
    z = rho_c - rho_r - alpha * (k_c - k_r)
    metrics = {"kl/chosen": jnp.mean(k_c), "kl/rejected": jnp.mean(k_r)}
    return paired_output(-jax.nn.log_sigmoid(beta * z), beta, rho_c - k_c, rho_r - k_r, metrics=metrics)


def d2po_weights(loss_mask, gamma=0.98):
    """D²PO's temporal decay: w_t = γ^k on the k-th completion token (k from 1), 0 elsewhere."""
    mask = f32(loss_mask)
    k = jnp.cumsum(mask, axis=-1)
    return mask * jnp.power(jnp.float32(gamma), k)


def mask_dpo_weights(token_is_correct, loss_mask, *, chosen):
    """Mask-DPO: keep the tokens of correct sentences in a chosen answer, of hallucinated
    sentences in a rejected one (`token_is_correct` maps each sentence's label onto its tokens)."""
    correct = jnp.asarray(token_is_correct, bool)
    keep = correct if chosen else ~correct
    return f32(loss_mask) * keep


def tis_dpo_weights(contrast_logratio, loss_mask, *, chosen, lower, upper, k=1.0):
    """TIS-DPO's paper form: w_t = k·exp(μ·clip(log π⁺(y_t) − log π⁻(y_t), L, U)), μ = +1 for
    chosen and −1 for rejected answers. π⁺/π⁻ are DPO models trained on the pairs and on the
    reversed pairs. The bounds are not fixed by the paper's code we could read: pass them."""
    mu = 1.0 if chosen else -1.0
    return f32(loss_mask) * k * jnp.exp(mu * jnp.clip(f32(contrast_logratio), lower, upper))


def ld_aggregate(chosen_token_logps, chosen_loss_mask, rejected_token_logps, rejected_loss_mask, ld_alpha):
    """LD-DPO's log-prob aggregation (TRL `ld_alpha`), for policy and reference alike.

    With ℓ_s = min(|y_w|, |y_l|) per pair, log p̂(y) = Σ_{k ≤ ℓ_s} logp_k + α·Σ_{k > ℓ_s} logp_k,
    k counting completion tokens. Returns the ([B] chosen, [B] rejected) aggregated sums;
    α = 1 is the plain sum, α = 0 drops the verbose tail. `ld_alpha` must lie in [0, 1].
    """
    check("ld_dpo", "ld_alpha", ld_alpha, (lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"))
    mc, mr = f32(chosen_loss_mask), f32(rejected_loss_mask)
    shared = jnp.minimum(jnp.sum(mc, -1), jnp.sum(mr, -1))[:, None]

    def aggregate(logps, mask):
        pos = jnp.cumsum(mask, axis=-1) * mask  # 1..|y| on completion tokens, 0 elsewhere
        head = (pos > 0) & (pos <= shared)
        tail = pos > shared
        logps = f32(logps)
        return jnp.sum(jnp.where(head, logps, 0.0), -1) + ld_alpha * jnp.sum(jnp.where(tail, logps, 0.0), -1)

    return aggregate(chosen_token_logps, mc), aggregate(rejected_token_logps, mr)


def wpo_weights(
    chosen_token_logps,
    chosen_log_sum_sq_probs,
    chosen_loss_mask,
    rejected_token_logps,
    rejected_log_sum_sq_probs,
    rejected_loss_mask,
):
    """WPO's per-pair weight (TRL `use_weighting`, WPO Eq. 2), gradient stopped: [B].

    w(y) = exp( mean over completion tokens of (log π(y_t) − log Σ_v π(v)²) ), the policy's
    length-normalized probability aligned to its own sampling distribution; the pair weight is
    w(y_w)·w(y_l), which multiplies each loss of the mix. `*_log_sum_sq_probs` are the model's
    per-token log Σ_v p_v² ([B, T], aligned with the log-probs).
    """

    def weight(logps, lss, mask):
        mask = f32(mask)
        aligned = jnp.sum((f32(logps) - f32(lss)) * mask, -1)
        return jnp.exp(aligned / jnp.maximum(jnp.sum(mask, -1), 1.0))

    w = weight(chosen_token_logps, chosen_log_sum_sq_probs, chosen_loss_mask) * weight(
        rejected_token_logps, rejected_log_sum_sq_probs, rejected_loss_mask
    )
    return jax.lax.stop_gradient(w)

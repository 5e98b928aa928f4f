"""Unpaired objectives: one completion per example with a desirable/undesirable label or a score.

Called as `fn(policy_logps, ref_logps, *, beta, label=..., ...)` with [B] summed completion
log-probs. They return `rewards` = β·(policy − reference), gradient stopped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._registry import LossOutput, f32, register, rewards

_WEIGHTS = {
    "desirable_weight": (lambda v: v >= 0, "must be >= 0"),
    "undesirable_weight": (lambda v: v >= 0, "must be >= 0"),
}


def kto_kl(policy_kl_logps, ref_kl_logps):
    """KTO's reference point z0 = max(mean(log π(y′|x) − log π_ref(y′|x)), 0), gradient stopped.

    y′ are mismatched completions (example i paired with completion i+1 of its micro-batch, as
    TRL's collator builds them); the mean is over the global batch (TRL gathers it).
    """
    diff = f32(policy_kl_logps) - f32(ref_kl_logps)
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(diff), 0.0))


def _unpaired(label, w_desirable, w_undesirable, loss_desirable, loss_undesirable, beta, rho, **extra):
    label = jnp.asarray(label, bool)
    loss = jnp.where(label, w_desirable * loss_desirable, w_undesirable * loss_undesirable)
    return LossOutput(loss=loss, rewards=rewards(beta, rho, 0.0), **extra)


@register(
    "kto", kind="unpaired", paper="KTO, Ethayarajh et al. 2024, Eq. 7", batch_coupled=True, checks=_WEIGHTS
)
def kto(policy_logps, ref_logps, *, beta, label, kl, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO: with ρ = log π/π_ref and the detached reference point z0 = `kl` (see `kto_kl`),

    desirable: L = w_D·(1 − σ(β(ρ − z0))); undesirable: L = w_U·(1 − σ(β(z0 − ρ))).
    The mean over the batch equals TRL's mean of the concatenated desirable and undesirable
    losses. TRL advises w_D·n_D / (w_U·n_U) in [1, 4/3] (KTO Eq. 8).
    """
    rho = f32(policy_logps) - f32(ref_logps)
    z0 = jax.lax.stop_gradient(f32(kl))
    return _unpaired(
        label,
        desirable_weight,
        undesirable_weight,
        1 - jax.nn.sigmoid(beta * (rho - z0)),
        1 - jax.nn.sigmoid(beta * (z0 - rho)),
        beta,
        rho,
        metrics={"kl": z0},
    )


@register(
    "apo_zero_unpaired",
    kind="unpaired",
    paper="APO, D'Oosterlinck et al. 2024, Eq. 7 (unpaired)",
    checks=_WEIGHTS,
)
def apo_zero_unpaired(policy_logps, ref_logps, *, beta, label, desirable_weight=1.0, undesirable_weight=1.0):
    """Unpaired APO-zero (TRL KTOTrainer): desirable w_D·(1 − σ(βρ)), undesirable w_U·σ(βρ)."""
    rho = f32(policy_logps) - f32(ref_logps)
    s = jax.nn.sigmoid(beta * rho)
    return _unpaired(label, desirable_weight, undesirable_weight, 1 - s, s, beta, rho)


_UNA_FORM = {"una_form": (lambda v: v in ("mse", "bce"), "must be 'mse' or 'bce'")}


@register("una_binary", kind="unpaired", paper="UNA, Wang et al. 2024, Eqs. 11-12", checks=_UNA_FORM)
def una_binary(policy_logps, ref_logps, *, beta, label, una_form="mse"):
    """UNA, binary feedback: s = σ(β·ρ) (implicit reward, no log Z), c = label ∈ {0, 1}.

    mse: L = (s − c)²; bce: L = −[c log s + (1 − c) log(1 − s)]. The paper's Eq. 11 prints a
    leading minus on the MSE; the official code minimizes the positive error, as here.
    Paper β = 0.01 for binary feedback.
    """
    rho = f32(policy_logps) - f32(ref_logps)
    c = jnp.asarray(label, jnp.float32)
    z = beta * rho
    if una_form == "mse":
        loss = (jax.nn.sigmoid(z) - c) ** 2
    else:
        loss = -(c * jax.nn.log_sigmoid(z) + (1 - c) * jax.nn.log_sigmoid(-z))
    return LossOutput(loss=loss, rewards=rewards(beta, rho, 0.0))


@register("una_score", kind="unpaired", paper="UNA, Wang et al. 2024, Eq. 13")
def una_score(policy_logps, ref_logps, *, beta, scores):
    """UNA, score feedback: L = (σ(β·ρ) − score)², score normalized to [0, 1]. Paper β = 0.03."""
    rho = f32(policy_logps) - f32(ref_logps)
    loss = (jax.nn.sigmoid(beta * rho) - f32(scores)) ** 2
    return LossOutput(loss=loss, rewards=rewards(beta, rho, 0.0))

"""Tie-aware preference optimization: TODO (arXiv 2411.02442)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._pairwise import log_ratios, paired_output
from apo_jax.losses._registry import register


@register(
    "todo",
    paper="TODO, Guo et al. 2024, arXiv 2411.02442 (TOBT model)",
    checks={"alpha": (lambda v: v > 0, "must be > 0 (the tie margin)")},
)
def todo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    is_tie,
    alpha=0.5,
):
    """TODO: a ternary (win / tie / loss) Bradley-Terry model with tie margin α.

    μ = β·h. Preference pairs: L = −log σ(μ − α). Tie pairs (`is_tie`):
    L = −log[(e^{2α} − 1) / ((1 + e^{μ+α})(1 + e^{−μ+α}))]
      = −log(e^{2α} − 1) + softplus(μ + α) + softplus(−μ + α)   (computed this way: stable).
    Defaults (XXares/TODO README): α = 0.5, β = 0.01.
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    mu = beta * (rc - rr)
    preference = jax.nn.softplus(alpha - mu)
    tie = -jnp.log(jnp.expm1(2 * alpha)) + jax.nn.softplus(mu + alpha) + jax.nn.softplus(-mu + alpha)
    return paired_output(jnp.where(jnp.asarray(is_tie, bool), tie, preference), beta, rc, rr)

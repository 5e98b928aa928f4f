"""Recent paired objectives (ICLR 2025 submissions and neighbours), per the team formula sheet.

Hyperparameters carry the paper's symbol names where TRL has none (`beta_chosen`, `gamma`,
`lam`, ...). Each docstring names the source its form was checked against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._pairwise import log_ratios, paired_output
from apo_jax.losses._registry import LossOutput, f32, register, rewards

_log_sigmoid = jax.nn.log_sigmoid
_positive_or_none = (lambda v: v is None or v > 0, "must be > 0 (or None for beta)")


@register(
    "flex_dpo",
    paper="3D-Properties (Flex-DPO), arXiv 2406.07327, Appendix B.2",
    checks={"beta_chosen": _positive_or_none, "beta_rejected": _positive_or_none},
)
def flex_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    beta_chosen=None,
    beta_rejected=None,
):
    """Flex-DPO: L = −log σ(β⁺ρ_c − β⁻ρ_r), separate temperatures for chosen and rejected.

    `beta_chosen` (β⁺) and `beta_rejected` (β⁻) default to β (plain DPO); the paper's Table 9
    uses β⁺ = 0.1, β⁻ = 0.08.
    """
    bc = beta if beta_chosen is None else beta_chosen
    br = beta if beta_rejected is None else beta_rejected
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return LossOutput(
        loss=-_log_sigmoid(bc * rc - br * rr),
        chosen_rewards=rewards(bc, rc, 0.0),
        rejected_rewards=rewards(br, rr, 0.0),
    )


@register(
    "ns_dpo",
    paper="NS-DPO, arXiv 2407.18676, Eq. 6 (official code geronest/ns-dpo)",
    checks={"gamma": (lambda v: 0 < v <= 1, "must lie in (0, 1]")},
)
def ns_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    timestamps,
    gamma=0.95,
    current_time=100,
    normalize=False,
):
    """NS-DPO: L_i = −w_i log σ(β h_i), w_i = γ^(T − t_i − 1), T = `current_time`.

    The newest training data (t = T − 1) gets weight 1 and γ = 1 is DPO. With `normalize`
    (the code's `normalise: true`) the weights are divided by their micro-batch sum before the
    batch mean, which makes the loss batch-coupled. Defaults: the release script (γ = 0.95, T = 100).
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    age = current_time - jnp.asarray(timestamps, jnp.float32) - 1.0
    w = jnp.power(jnp.float32(gamma), age)
    if normalize:
        w = w / jnp.sum(w)
    return paired_output(-w * _log_sigmoid(beta * (rc - rr)), beta, rc, rr)


@register(
    "dpo_cov",
    paper="DPO-COV, arXiv 2510.05526, Algorithm 1, Eqs. 17 and 19",
    checks={
        "lam": (lambda v: v > 0, "must be > 0"),
        "eta": (lambda v: v >= 0, "must be >= 0"),
    },
)
def dpo_cov(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
    lam=0.7,
    eta=0.0005,
    omega=0.0005,
):
    """DPO-COV (offline): corruption, over-optimization and verbosity in one loss.

    z = ω·(|y_w| − |y_l|) + β·h; the corruption variable in closed form
    ξ = max(log(1/λ − 1) − z, 0) for 0 < λ < 1, else 0;
    L = λ|ξ| − β·η·log π(y_w|x) − log σ(z + ξ).
    ξ is the minimizer over ξ, so its gradient path changes nothing (envelope theorem): the
    gradient is the same as with ξ held fixed. λ ≥ 1 and η = ω = 0 give DPO. Paper β = 0.05.
    """
    pc = f32(policy_chosen_logps)
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dlen = jnp.asarray(chosen_lengths, jnp.float32) - jnp.asarray(rejected_lengths, jnp.float32)
    z = omega * dlen + beta * (rc - rr)
    if lam < 1:
        xi = jnp.maximum(jnp.log(1 / lam - 1) - z, 0.0)
    else:
        xi = jnp.zeros_like(z)
    loss = lam * jnp.abs(xi) - beta * eta * pc - _log_sigmoid(z + xi)
    return paired_output(loss, beta, rc, rr)

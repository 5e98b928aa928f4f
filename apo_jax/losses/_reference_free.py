"""Reference-free paired objectives: SimPO (TRL `CPOTrainer`) and ORPO (TRL `ORPOTrainer`).

Both use length-averaged policy log-probs: the step passes sums and lengths, the loss divides.
The trainer skips the reference forward for them (`uses_reference=False`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._fdiv import log1mexp
from apo_jax.losses._pairwise import _smoothed_sigmoid
from apo_jax.losses._registry import LossOutput, f32, lengths, register, rewards


@register(
    "simpo",
    paper="SimPO, Meng et al. 2024, Eq. 6 (TRL CPOTrainer loss_type='simpo')",
    uses_reference=False,
    checks={"label_smoothing": (lambda v: 0 <= v <= 1, "must lie in [0, 1]")},
)
def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
    simpo_gamma=0.5,
    label_smoothing=0.0,
    alpha=0.0,
):
    """SimPO: with s = length-averaged policy log-prob and z = β(s_w − s_l) − γ,

    L = −(1−ε) log σ(z) − ε log σ(−z)   (SimPO Eq. 6 at ε = 0; γ = `simpo_gamma`).
    `alpha` ≠ 0 is TRL's AlphaPO reward r = (1 − p^{−α})/α with p = e^{s} in place of s.
    CPO's NLL term (`cpo_alpha`) is not built in: mix with `sft` (pure SimPO has none).
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    sw, sl = pc / lengths(chosen_lengths), pr / lengths(rejected_lengths)
    if alpha != 0.0:
        sw, sl = (1 - jnp.exp(-alpha * sw)) / alpha, (1 - jnp.exp(-alpha * sl)) / alpha
    loss = _smoothed_sigmoid(beta * ((sw - sl) - simpo_gamma / beta), label_smoothing)
    return LossOutput(
        loss=loss, chosen_rewards=rewards(beta, sw, 0.0), rejected_rewards=rewards(beta, sl, 0.0)
    )


@register(
    "orpo",
    paper="ORPO, Hong et al. 2024, Eqs. 4-7 (TRL ORPOTrainer)",
    uses_reference=False,
    batch_coupled=True,
)
def orpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
):
    """ORPO: NLL of the chosen answers plus β times the log odds-ratio loss (β is the paper's λ).

    a, b = length-averaged policy log-probs of y_w, y_l;
    log_odds = (a − b) − (log(1 − e^a) − log(1 − e^b));
    L_i = NLL − β·log σ(log_odds_i), NLL = −Σ_i log π(y_w,i) / Σ_i |y_w,i| (token mean over the
    batch, as the cross-entropy in TRL), so the batch mean of L is TRL's loss.
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    a, b = pc / lengths(chosen_lengths), pr / lengths(rejected_lengths)
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = -jnp.sum(pc) / jnp.maximum(jnp.sum(jnp.asarray(chosen_lengths, jnp.float32)), 1.0)
    sg = jax.lax.stop_gradient
    return LossOutput(
        loss=nll - beta * ratio,
        chosen_rewards=rewards(beta, a, 0.0),
        rejected_rewards=rewards(beta, b, 0.0),
        metrics={
            "nll_loss": sg(nll),
            "log_odds_ratio": sg(jnp.mean(ratio)),
            "log_odds_chosen": sg(jnp.mean(log_odds)),
        },
    )

"""Per-pair objectives of TRL 1.16's `DPOTrainer` (`loss_type`), with TRL's names and formulas.

Notation in the docstrings: ρ_c = log π(y_w|x) − log π_ref(y_w|x) (summed over completion
tokens), ρ_r the same for y_l, h = ρ_c − ρ_r, δ = the f-divergence score difference (h under
the default reverse KL), |y| the completion token count, σ the logistic function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apo_jax.losses._fdiv import score_delta
from apo_jax.losses._registry import LossOutput, f32, lengths, register, rewards

_log_sigmoid = jax.nn.log_sigmoid


def log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """(ρ_c, ρ_r) in float32."""
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return pc - rc, pr - rr


def paired_output(loss, beta, rho_c, rho_r, **extra) -> LossOutput:
    """The loss with TRL's rewards β·ρ (gradient stopped)."""
    return LossOutput(
        loss=loss,
        chosen_rewards=rewards(beta, rho_c, 0.0),
        rejected_rewards=rewards(beta, rho_r, 0.0),
        **extra,
    )


def _smoothed_sigmoid(z, label_smoothing):
    """−(1−ε) log σ(z) − ε log σ(−z): conservative DPO / CPO label smoothing."""
    return -(1 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)


_LABEL_SMOOTHING_01 = (lambda v: 0 <= v <= 1, "must lie in [0, 1]")


@register("sigmoid", aliases=("dpo",), paper="DPO, Rafailov et al. 2023, Eq. 7")
def sigmoid(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """DPO: L = −log σ(β·δ), δ = h under reverse KL (DPO paper Eq. 7; f-DPO for other δ).

    TRL 1.16's `sigmoid` has no label smoothing (conservative DPO is `robust` or `exo_pair`).
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = score_delta(rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return paired_output(-_log_sigmoid(beta * delta), beta, rc, rr)


@register("hinge", paper="SLiC-HF, Zhao et al. 2023, Eq. 3")
def hinge(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """SLiC hinge: L = max(0, 1 − β·δ); β plays the role of 1/margin."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = score_delta(rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return paired_output(jax.nn.relu(1 - beta * delta), beta, rc, rr)


@register("ipo", paper="IPO, Azar et al. 2023, Eq. 17 (TRL's length-normalized form)")
def ipo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """IPO: L = (δ_c/|y_w| − δ_r/|y_l| − 1/(2β))², β the paper's τ (Eq. 17).

    As in TRL, each score is divided by its completion length (the IPO authors' own choice,
    per TRL's comment), so β is comparable across lengths.
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = score_delta(
        rc, rr, f_divergence_type, f_alpha_divergence_coef, lengths(chosen_lengths), lengths(rejected_lengths)
    )
    return paired_output((delta - 1 / (2 * beta)) ** 2, beta, rc, rr)


@register(
    "exo_pair",
    paper="EXO, Ji et al. 2024, Eq. 16",
    checks={"label_smoothing": (lambda v: 0 < v < 1, "must lie in (0, 1) for exo_pair (paper: 1e-3)")},
)
def exo_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing=1e-3,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """EXO-pref: L = KL(q‖p) over {chosen, rejected}, q = softmax(β·scores), p = (1−ε, ε).

    L = σ(βδ)(log σ(βδ) − log(1−ε)) + σ(−βδ)(log σ(−βδ) − log ε) (Eq. 16). TRL requires
    ε = `label_smoothing` > 0 and has default 0, so TRL users must set it; the default here is the
    paper's recommended 1e-3.
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * score_delta(rc, rr, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    loss = jax.nn.sigmoid(z) * (_log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        _log_sigmoid(-z) - jnp.log(eps)
    )
    return paired_output(loss, beta, rc, rr)


@register("nca_pair", paper="NCA, Chen et al. 2024, Eq. 12")
def nca_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """NCA: L = −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -_log_sigmoid(beta * rc) - 0.5 * _log_sigmoid(-beta * rc) - 0.5 * _log_sigmoid(-beta * rr)
    return paired_output(loss, beta, rc, rr)


@register(
    "robust",
    paper="Robust DPO, Chowdhury et al. 2024, Eq. 8",
    checks={"label_smoothing": (lambda v: 0 <= v < 0.5, "must lie in [0, 0.5) for robust")},
)
def robust(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """rDPO: L = [−(1−ε) log σ(βδ) + ε log σ(−βδ)] / (1 − 2ε), ε the label-flip rate.

    TRL only warns outside [0, 0.5); at ε = 0.5 the loss divides by zero, so this raises.
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * score_delta(rc, rr, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    loss = (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps)
    return paired_output(loss, beta, rc, rr)


@register("bco_pair", paper="BCO, Jung et al. 2024, Eq. 11 (TRL's pairwise form, no δ shift)")
def bco_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """Pairwise BCO as in TRL 1.16: L = −log σ(βρ_c) − log σ(−βρ_r)."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -_log_sigmoid(beta * rc) - _log_sigmoid(-beta * rr)
    return paired_output(loss, beta, rc, rr)


@register("sppo_hard", paper="SPPO, Wu et al. 2024, Eq. 4.7 with hard P ∈ {0, 1}")
def sppo_hard(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """SPPO (hard labels): L = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = (rc - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    return paired_output(loss, beta, rc, rr)


@register("apo_zero", paper="APO, D'Oosterlinck et al. 2024, Eq. 7")
def apo_zero(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-zero: L = (1 − σ(βρ_c)) + σ(βρ_r). Raises chosen, lowers rejected likelihood.

    The paper writes L = −σ(βρ_c) + σ(βρ_r) (Eq. 7); TRL adds the constant 1 so that L ≥ 0.
    Same gradients; this follows TRL (L = 1 when policy = reference). Use it when the chosen
    answers are better than the model's own (CLAIR revisions).
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = (1 - jax.nn.sigmoid(beta * rc)) + jax.nn.sigmoid(beta * rr)
    return paired_output(loss, beta, rc, rr)


@register("apo_down", paper="APO, D'Oosterlinck et al. 2024, Eq. 8")
def apo_down(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-down: L = σ(βρ_c) + (1 − σ(β(ρ_c − ρ_r))). Lowers both, the rejected more.

    The paper writes L = σ(βρ_c) − σ(β(ρ_c − ρ_r)) (Eq. 8); TRL adds the constant 1 (same
    gradients; L = 1 when policy = reference). Use it when the model is better than the chosen
    answers.
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = jax.nn.sigmoid(beta * rc) + (1 - jax.nn.sigmoid(beta * (rc - rr)))
    return paired_output(loss, beta, rc, rr)


@register(
    "discopop",
    paper="DiscoPOP, Chris Lu et al. 2024, Eq. 5",
    checks={"discopop_tau": (lambda v: v > 0, "must be > 0")},
)
def discopop(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    discopop_tau=0.05,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """DiscoPOP (log-ratio modulated): with x = β·δ and m = σ(x/τ),

    L = −log σ(x)·(1 − m) + e^{−x}·m   (Eq. 5, τ = `discopop_tau`, default 0.05).

    Computed as softplus(−x)·σ(−x/τ) + exp(−x − softplus(−x/τ)): TRL's e^{−x}·m is inf·0 = NaN
    for x < −88 in float32, while the product is finite (→ 0 for τ < 1).
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    x = beta * score_delta(rc, rr, f_divergence_type, f_alpha_divergence_coef)
    tau = discopop_tau
    loss = jax.nn.softplus(-x) * jax.nn.sigmoid(-x / tau) + jnp.exp(-x - jax.nn.softplus(-x / tau))
    return paired_output(loss, beta, rc, rr)


@register("sigmoid_norm", paper="DPO on length-averaged log-ratios (TRL `sigmoid_norm`)")
def sigmoid_norm(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """Length-normalized DPO: L = −log σ(β(δ_c/|y_w| − δ_r/|y_l|))."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = score_delta(
        rc, rr, f_divergence_type, f_alpha_divergence_coef, lengths(chosen_lengths), lengths(rejected_lengths)
    )
    return paired_output(-_log_sigmoid(beta * delta), beta, rc, rr)

"""Batch-coupled objectives: one example's value depends on the rest of the micro-batch.

Each returns per-example values whose mean is the batch loss, so the trainer averages every
loss the same way. They see exactly the micro-batch they are given: under gradient
accumulation the coupling is per micro-batch, as in TRL (and the Dr. DPO code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from apo_jax.losses._pairwise import _smoothed_sigmoid, log_ratios, paired_output
from apo_jax.losses._registry import LossOutput, f32, lengths, register, rewards

_LS = {"label_smoothing": (lambda v: 0 <= v <= 1, "must lie in [0, 1]")}


def _sort_batch(x):
    """Sorts over the batch. Under explicit sharding (`AxisType.Explicit`) jnp.sort refuses a
    batch split over devices, so the whole batch is gathered first; auto sharding does it itself."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if any(axis is not None for axis in spec):
        x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
    return jnp.sort(x)


@register("aot", paper="AOT, Melnyk et al. 2024, Eq. 11 (paired)", batch_coupled=True, checks=_LS)
def aot(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing=0.0,
):
    """AOT (paired): sort the policy and the reference log-odds over the batch, pair them by rank.

    d = sort(log π(y_w) − log π(y_l)) − sort(log π_ref(y_w) − log π_ref(y_l));
    L_k = −(1−ε) log σ(β d_k) − ε log σ(−β d_k), one value per rank k.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    d = _sort_batch(pc - pr) - _sort_batch(rc - rr)
    return paired_output(_smoothed_sigmoid(beta * d, label_smoothing), beta, pc - rc, pr - rr)


@register("aot_unpaired", paper="AOT, Melnyk et al. 2024, Eq. 10 (unpaired)", batch_coupled=True, checks=_LS)
def aot_unpaired(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing=0.0,
):
    """AOT (unpaired): d = sort(ρ_c) − sort(ρ_r) over the batch; L_k as in `aot`."""
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    d = _sort_batch(rc) - _sort_batch(rr)
    return paired_output(_smoothed_sigmoid(beta * d, label_smoothing), beta, rc, rr)


@register(
    "sft",
    paper="negative log-likelihood of the chosen answers (TRL `sft`; RPO = sigmoid + α·sft)",
    uses_reference=False,
    batch_coupled=True,
)
def sft(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths,
    rejected_lengths=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """SFT on the chosen answers: L = −Σ_i log π(y_w,i) / Σ_i |y_w,i|, the token mean over the batch.

    Every example carries the batch value, as TRL's `batch_loss.expand(batch_size)` does, so
    WPO weights multiply it the same way. β and the f-divergence are accepted (TRL allows `sft`
    in an f-divergence mix) and unused; rewards are the reference-free β·(avg log-prob).
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    total = jnp.sum(jnp.asarray(chosen_lengths, jnp.float32))
    nll = -jnp.sum(pc) / jnp.maximum(total, 1.0)
    lr = 1.0 if rejected_lengths is None else lengths(rejected_lengths)
    return LossOutput(
        loss=jnp.broadcast_to(nll, pc.shape),
        chosen_rewards=rewards(beta, pc / lengths(chosen_lengths), 0.0),
        rejected_rewards=rewards(beta, pr / lr, 0.0),
        metrics={"nll_loss": jax.lax.stop_gradient(nll)},
    )


@register(
    "dr_dpo",
    paper="Dr. DPO, Wu et al. 2024, Eq. 12",
    batch_coupled=True,
    checks={"beta_prime": (lambda v: v > 0, "must be > 0")},
)
def dr_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    beta_prime=1.0,
):
    """Dr. DPO: L = −β′·log( (1/B) Σ_i exp(−ℓ_i/β′) ), ℓ_i = −log σ(β h_i) the DPO losses.

    β′ = `beta_prime` (the code's `mode_weight`, default 1.0); β′ → ∞ recovers DPO. The batch
    value is broadcast to every example (its mean is the batch loss, its gradient exact).
    """
    rc, rr = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ell = -jax.nn.log_sigmoid(beta * (rc - rr))
    batch = -beta_prime * (jax.nn.logsumexp(-ell / beta_prime) - jnp.log(ell.shape[0]))
    return paired_output(jnp.broadcast_to(batch, ell.shape), beta, rc, rr)


def _alpha_dpo_init_state():
    return {"mean": jnp.zeros((), jnp.float32), "std": jnp.zeros((), jnp.float32)}


@register(
    "alpha_dpo",
    paper="α-DPO, Wu et al. 2024, Eq. 11 (official code junkangwu/alpha-DPO)",
    batch_coupled=True,
    state_init=_alpha_dpo_init_state,
    checks={
        "ema_decay": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "label_smoothing": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    },
)
def alpha_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths,
    rejected_lengths,
    loss_state,
    alpha=0.2,
    gamma_beta_ratio=0.6,
    label_smoothing=0.0,
    ema_decay=0.9,
    ln=True,
):
    """α-DPO: an adaptive, batch-normalized margin on SimPO-style averaged log-probs.

    With a_w, a_l the policy and r_w, r_l the reference log-probs (length-averaged when `ln`),
    u = (a_w − a_l) − (r_w − r_l). Running statistics, updated before use with decay 0.9:
    μ ← 0.9μ + 0.1·mean(u), s ← 0.9s + 0.1·std(u) (ddof = 1, as torch.std), both from 0.
    M = stop_grad(α(u − μ)/(s + 1e-6) + γ/β), L = −(1−ε) log σ(β(a_w − a_l − M)) − ε log σ(−…).
    Deviation: the code divides by s alone, which is 0/0 while policy = reference; the 1e-6
    makes M = γ/β there (the SimPO margin). Defaults: Llama-3-8B-Instruct config (β = 2.5 there).
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if ln:
        lc, lr = lengths(chosen_lengths), lengths(rejected_lengths)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    u = jax.lax.stop_gradient((pc - pr) - (rc - rr))
    std = jnp.std(u, ddof=1) if u.shape[0] > 1 else jnp.zeros((), jnp.float32)
    mean = ema_decay * loss_state["mean"] + (1 - ema_decay) * jnp.mean(u)
    std = ema_decay * loss_state["std"] + (1 - ema_decay) * std
    margin = alpha * (u - mean) / (std + 1e-6) + gamma_beta_ratio
    loss = _smoothed_sigmoid(beta * (pc - pr - margin), label_smoothing)
    return LossOutput(
        loss=loss,
        chosen_rewards=rewards(beta, pc, rc),
        rejected_rewards=rewards(beta, pr, rr),
        loss_state={"mean": mean, "std": std},
        metrics={"alpha_dpo/mean": mean, "alpha_dpo/std": std},
    )

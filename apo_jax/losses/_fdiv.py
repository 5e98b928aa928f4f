"""TRL's f-divergence scores (f-DPO, Wang et al. 2023, arXiv 2309.16240), computed stably.

TRL 1.16 (`DPOTrainer._compute_loss`) replaces each log-ratio ρ = log π/π_ref by a score
f'(e^ρ) and uses δ = score_chosen − score_rejected in place of ρ_c − ρ_r:

  reverse_kl        score = ρ                                  (plain DPO)
  forward_kl        score = 1 − e^{−ρ}
  js_divergence     score = log 2 + log σ(ρ)
  alpha_divergence  score = (e^{(α−1)ρ} − 1)/(α − 1), exponent clamped at 80 as TRL does;
                    α = `f_alpha_divergence_coef` (default 0.5), α → 1 falls back to reverse_kl

Length-normalized losses (`ipo`, `sigmoid_norm`) divide each score by its completion length.

Deviation, documented in docs/papers.md: TRL forms forward_kl's δ as (1 − e^{−ρc}) − (1 − e^{−ρr}),
which is inf − inf = NaN once both ρ < −88 in float32, although δ itself is finite (0 when
ρc = ρr). Here δ = e^{−ρr} − e^{−ρc} directly while both exponents are below 80, and in the
factored form sign(h)·e^{−min(ρ)}·(1 − e^{−|h|}) beyond, which agrees wherever TRL's is finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EXP_SAFE = 80.0  # e^80 ≈ 5.5e34: far from float32's 3.4e38


def log1mexp(x):
    """log(1 − e^x) for x ≤ 0, accurate on both sides of −ln 2 (as TRL's ORPO `log1mexp`)."""
    return jnp.where(
        x < -0.6931471805599453,
        jnp.log1p(-jnp.exp(jnp.minimum(x, -0.6931471805599453))),
        jnp.log(-jnp.expm1(jnp.minimum(x, -1e-30))),
    )


def exp_diff(a, b):
    """e^{−b} − e^{−a} without inf − inf, and with the exact gradient at a = b."""
    direct_ok = jnp.maximum(-a, -b) <= _EXP_SAFE
    direct = jnp.exp(-jnp.maximum(b, -_EXP_SAFE)) - jnp.exp(-jnp.maximum(a, -_EXP_SAFE))
    h = a - b
    use_factored = ~direct_ok & (h != 0)
    # the branch not taken still gets a zero cotangent: feed it a harmless input (|h| = 1)
    abs_h = jnp.where(use_factored, jnp.abs(h), 1.0)
    factored = jnp.sign(h) * jnp.exp(-jnp.minimum(a, b) + log1mexp(-abs_h))
    return jnp.where(direct_ok, direct, jnp.where(use_factored, factored, 0.0))


def _alpha_scores(rho, coef):
    t = jnp.minimum((coef - 1.0) * rho, 80.0)  # TRL's clamp, for float32 and bfloat16
    return (jnp.exp(t) - 1.0) / (coef - 1.0)


def score_delta(rho_c, rho_r, f_divergence_type, coef, len_c=None, len_r=None):
    """score_c/len_c − score_r/len_r (lengths default to 1): TRL's `delta_score`."""
    one = jnp.ones_like(rho_c)
    len_c = one if len_c is None else len_c
    len_r = one if len_r is None else len_r
    if f_divergence_type == "alpha_divergence" and abs(coef - 1.0) < 1e-6:
        f_divergence_type = "reverse_kl"  # TRL: the α → 1 limit is log t
    if f_divergence_type == "reverse_kl":
        return rho_c / len_c - rho_r / len_r
    if f_divergence_type == "forward_kl":
        return (1.0 / len_c - 1.0 / len_r) + exp_diff(rho_c + jnp.log(len_c), rho_r + jnp.log(len_r))
    if f_divergence_type == "js_divergence":
        log2 = jnp.log(2.0)
        return (log2 + jax.nn.log_sigmoid(rho_c)) / len_c - (log2 + jax.nn.log_sigmoid(rho_r)) / len_r
    if f_divergence_type == "alpha_divergence":
        return _alpha_scores(rho_c, coef) / len_c - _alpha_scores(rho_r, coef) / len_r
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")

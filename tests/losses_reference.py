"""Independent float64 numpy versions of every objective, written out from the formulas.

Written from the team's formula sheet (PAPERS.md) and TRL 1.16's source as plain formulas, without the
numerically stable rewrites of apo_jax.losses, so that a wrong sign, constant, normalization
or reduction in the library shows up as a mismatch. Inputs are dicts of float64 arrays.
"""

from __future__ import annotations

import numpy as np


def sig(x):
    with np.errstate(over="ignore"):  # exp overflow → inf → σ = 0, the right limit
        return 1.0 / (1.0 + np.exp(-x))


def logsig(x):
    return -np.logaddexp(0.0, -x)


def _ratios(b):
    return b["pc"] - b["rc"], b["pr"] - b["rr"]


def _lens(b):
    return np.maximum(b["chosen_lengths"], 1.0), np.maximum(b["rejected_lengths"], 1.0)


def f_scores(rho, f_type, coef):
    if f_type == "reverse_kl" or (f_type == "alpha_divergence" and abs(coef - 1) < 1e-6):
        return rho
    if f_type == "forward_kl":
        return 1.0 - np.exp(-rho)
    if f_type == "js_divergence":
        return np.log(2.0) + logsig(rho)
    if f_type == "alpha_divergence":
        return (np.exp(np.minimum((coef - 1.0) * rho, 80.0)) - 1.0) / (coef - 1.0)
    raise ValueError(f_type)


def _delta(b, hp, normalize=False):
    rc, rr = _ratios(b)
    f_type = hp.get("f_divergence_type", "reverse_kl")
    coef = hp.get("f_alpha_divergence_coef", 0.5)
    sc, sr = f_scores(rc, f_type, coef), f_scores(rr, f_type, coef)
    if normalize:
        lc, lr = _lens(b)
        return sc / lc - sr / lr
    return sc - sr


def sigmoid(b, hp):
    return -logsig(hp["beta"] * _delta(b, hp))


def hinge(b, hp):
    return np.maximum(0.0, 1.0 - hp["beta"] * _delta(b, hp))


def ipo(b, hp):
    return (_delta(b, hp, normalize=True) - 1.0 / (2 * hp["beta"])) ** 2


def exo_pair(b, hp):
    z = hp["beta"] * _delta(b, hp)
    eps = hp.get("label_smoothing", 1e-3)
    return sig(z) * (logsig(z) - np.log(1 - eps)) + sig(-z) * (logsig(-z) - np.log(eps))


def nca_pair(b, hp):
    rc, rr = _ratios(b)
    beta = hp["beta"]
    return -logsig(beta * rc) - 0.5 * logsig(-beta * rc) - 0.5 * logsig(-beta * rr)


def robust(b, hp):
    z = hp["beta"] * _delta(b, hp)
    eps = hp.get("label_smoothing", 0.0)
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)


def bco_pair(b, hp):
    rc, rr = _ratios(b)
    return -logsig(hp["beta"] * rc) - logsig(-hp["beta"] * rr)


def sppo_hard(b, hp):
    rc, rr = _ratios(b)
    return (rc - 0.5 / hp["beta"]) ** 2 + (rr + 0.5 / hp["beta"]) ** 2


def _smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def aot(b, hp):
    d = np.sort(b["pc"] - b["pr"]) - np.sort(b["rc"] - b["rr"])
    return _smoothed(hp["beta"] * d, hp.get("label_smoothing", 0.0))


def aot_unpaired(b, hp):
    rc, rr = _ratios(b)
    d = np.sort(rc) - np.sort(rr)
    return _smoothed(hp["beta"] * d, hp.get("label_smoothing", 0.0))


def apo_zero(b, hp):
    rc, rr = _ratios(b)
    return 1 - sig(hp["beta"] * rc) + sig(hp["beta"] * rr)


def apo_down(b, hp):
    rc, rr = _ratios(b)
    return sig(hp["beta"] * rc) + 1 - sig(hp["beta"] * (rc - rr))


def discopop(b, hp):
    x = hp["beta"] * _delta(b, hp)
    tau = hp.get("discopop_tau", 0.05)
    m = sig(x / tau)
    return -logsig(x) * (1 - m) + np.exp(-x) * m


def sft(b, hp):
    # token mean of the chosen NLL over the whole batch, broadcast
    return np.full_like(b["pc"], -b["pc"].sum() / b["chosen_lengths"].sum())


def sigmoid_norm(b, hp):
    return -logsig(hp["beta"] * _delta(b, hp, normalize=True))


def simpo(b, hp):
    lc, lr = _lens(b)
    sw, sl = b["pc"] / lc, b["pr"] / lr
    alpha = hp.get("alpha", 0.0)
    if alpha:
        sw, sl = (1 - np.exp(sw) ** (-alpha)) / alpha, (1 - np.exp(sl) ** (-alpha)) / alpha
    logits = (sw - sl) - hp.get("simpo_gamma", 0.5) / hp["beta"]
    return _smoothed(hp["beta"] * logits, hp.get("label_smoothing", 0.0))


def orpo(b, hp):
    lc, lr = _lens(b)
    a, c = b["pc"] / lc, b["pr"] / lr
    log_odds = np.log(np.exp(a) / (1 - np.exp(a))) - np.log(np.exp(c) / (1 - np.exp(c)))
    nll = -b["pc"].sum() / b["chosen_lengths"].sum()
    return nll - hp["beta"] * logsig(log_odds)


def todo(b, hp):
    rc, rr = _ratios(b)
    mu = hp["beta"] * (rc - rr)
    a = hp.get("alpha", 0.5)
    p_win = sig(mu - a)
    p_tie = (np.exp(2 * a) - 1) / ((1 + np.exp(mu + a)) * (1 + np.exp(-mu + a)))
    # the tie probability is also 1 − P(win) − P(loss): check the identity on the way
    np.testing.assert_allclose(p_tie, 1 - sig(mu - a) - sig(-mu - a), rtol=1e-9, atol=1e-12)
    return np.where(b["is_tie"], -np.log(p_tie), -np.log(p_win))


def dr_dpo(b, hp):
    rc, rr = _ratios(b)
    ell = -logsig(hp["beta"] * (rc - rr))
    bp = hp.get("beta_prime", 1.0)
    value = -bp * np.log(np.mean(np.exp(-ell / bp)))
    return np.full_like(ell, value)


def ns_dpo(b, hp):
    rc, rr = _ratios(b)
    gamma, t_now = hp.get("gamma", 0.95), hp.get("current_time", 100)
    w = gamma ** (t_now - b["timestamps"] - 1)
    if hp.get("normalize", False):
        w = w / w.sum()
    return -w * logsig(hp["beta"] * (rc - rr))


def dpo_cov(b, hp):
    rc, rr = _ratios(b)
    lam, eta, omega = hp.get("lam", 0.7), hp.get("eta", 0.0005), hp.get("omega", 0.0005)
    beta = hp["beta"]
    z = omega * (b["chosen_lengths"] - b["rejected_lengths"]) + beta * (rc - rr)
    xi = np.maximum(np.log(1 / lam - 1) - z, 0.0) if lam < 1 else np.zeros_like(z)
    return lam * np.abs(xi) - beta * eta * b["pc"] - logsig(z + xi)


def flex_dpo(b, hp):
    rc, rr = _ratios(b)
    bc = hp.get("beta_chosen") or hp["beta"]
    br = hp.get("beta_rejected") or hp["beta"]
    return -logsig(bc * rc - br * rr)


def alpha_dpo(b, hp, state=(0.0, 0.0)):
    lc, lr = _lens(b)
    aw, al, rw, rl = b["pc"] / lc, b["pr"] / lr, b["rc"] / lc, b["rr"] / lr
    u = (aw - al) - (rw - rl)
    decay = hp.get("ema_decay", 0.9)
    mu = decay * state[0] + (1 - decay) * u.mean()
    s = decay * state[1] + (1 - decay) * u.std(ddof=1)
    margin = hp.get("alpha", 0.2) * (u - mu) / (s + 1e-6) + hp.get("gamma_beta_ratio", 0.6)
    return _smoothed(hp["beta"] * (aw - al - margin), hp.get("label_smoothing", 0.0)), (mu, s)


def kto(b, hp):
    rho = b["pc"] - b["rc"]
    z0 = max((b["kl_policy"] - b["kl_ref"]).mean(), 0.0)
    wd, wu = hp.get("desirable_weight", 1.0), hp.get("undesirable_weight", 1.0)
    beta = hp["beta"]
    return np.where(b["label"], wd * (1 - sig(beta * (rho - z0))), wu * (1 - sig(beta * (z0 - rho))))


def apo_zero_unpaired(b, hp):
    rho = b["pc"] - b["rc"]
    wd, wu = hp.get("desirable_weight", 1.0), hp.get("undesirable_weight", 1.0)
    s = sig(hp["beta"] * rho)
    return np.where(b["label"], wd * (1 - s), wu * s)


def una_binary(b, hp):
    s = sig(hp["beta"] * (b["pc"] - b["rc"]))
    c = b["label"].astype(np.float64)
    if hp.get("una_form", "mse") == "mse":
        return (s - c) ** 2
    return -(c * np.log(s) + (1 - c) * np.log(1 - s))


def una_score(b, hp):
    return (sig(hp["beta"] * (b["pc"] - b["rc"])) - b["scores"]) ** 2


def token_weighted(b, hp):
    wc = b["chosen_loss_mask"] * b.get("chosen_weights", 1.0)
    wr = b["rejected_loss_mask"] * b.get("rejected_weights", 1.0)
    rho_c = (wc * (b["tpc"] - b["trc"])).sum(-1)
    rho_r = (wr * (b["tpr"] - b["trr"])).sum(-1)
    return -logsig(hp["beta"] * (rho_c - rho_r))


def tdpo(b, hp):
    """TDPO (Zeng et al. 2024), the official code's `tdpo_loss` on sums over the completion."""
    m_c = (b["chosen_loss_mask"] * (b["tpc"] - b["trc"])).sum(-1)
    m_r = (b["rejected_loss_mask"] * (b["tpr"] - b["trr"])).sum(-1)
    d_c = (b["chosen_loss_mask"] * b["chosen_kl"]).sum(-1)
    d_r = (b["rejected_loss_mask"] * b["rejected_kl"]).sum(-1)
    alpha = 1.0 if not hp.get("tdpo2", True) else hp.get("alpha", 0.5)  # TDPO1 has no α
    return -logsig(hp["beta"] * (m_c - m_r + alpha * (d_c - d_r)))


def tis_dpo_kl(b, hp):
    """TIS-DPO's token_level variant (PhiVanDat123/TIS-DPO `tisdpo_loss`, weighted sums)."""
    wc = b["chosen_loss_mask"] * b["chosen_weights"]
    wr = b["rejected_loss_mask"] * b["rejected_weights"]
    rho = (wc * (b["tpc"] - b["trc"])).sum(-1) - (wr * (b["tpr"] - b["trr"])).sum(-1)
    kl = (wc * b["chosen_kl"]).sum(-1) - (wr * b["rejected_kl"]).sum(-1)
    return -logsig(hp["beta"] * (rho - hp.get("alpha", 0.5) * kl))

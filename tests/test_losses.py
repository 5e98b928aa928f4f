"""Every objective against an independent float64 numpy formula (tests/losses_reference.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import losses_reference as ref
import numpy as np
import pytest
from helpers import ATOL, RTOL, B, call, f64, make_batch

from apo_jax import losses

# (name, hyperparameters) cases; each runs on three random batches at two β scales.
CASES = [
    ("sigmoid", {}),
    ("dpo", {}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
    ("hinge", {}),
    ("hinge", {"f_divergence_type": "js_divergence"}),
    ("ipo", {}),
    ("ipo", {"f_divergence_type": "forward_kl"}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.2, "f_divergence_type": "alpha_divergence"}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("robust", {"label_smoothing": 0.3, "f_divergence_type": "js_divergence"}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("aot_unpaired", {"label_smoothing": 0.2}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("discopop", {"discopop_tau": 0.5, "f_divergence_type": "forward_kl"}),
    ("sft", {}),
    ("sigmoid_norm", {}),
    ("sigmoid_norm", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ("simpo", {}),
    ("simpo", {"simpo_gamma": 1.2, "label_smoothing": 0.1}),
    ("simpo", {"alpha": 0.25}),
    ("orpo", {}),
    ("todo", {}),
    ("todo", {"alpha": 1.3}),
    ("dr_dpo", {}),
    ("dr_dpo", {"beta_prime": 0.3}),
    ("ns_dpo", {}),
    ("ns_dpo", {"gamma": 0.8, "current_time": 120, "normalize": True}),
    ("dpo_cov", {}),
    ("dpo_cov", {"lam": 0.2, "eta": 0.01, "omega": 0.05}),
    ("dpo_cov", {"lam": 1.5}),
    ("flex_dpo", {}),
    ("flex_dpo", {"beta_chosen": 0.1, "beta_rejected": 0.08}),
    ("kto", {}),
    ("kto", {"desirable_weight": 1.33, "undesirable_weight": 0.7}),
    ("apo_zero_unpaired", {}),
    ("apo_zero_unpaired", {"undesirable_weight": 2.0}),
    ("una_binary", {}),
    ("una_binary", {"una_form": "bce"}),
    ("una_score", {}),
    ("token_weighted", {}),
    ("tis_dpo", {}),
    ("d2po", {}),
    ("mask_dpo", {}),
    ("tdpo", {}),
    ("tdpo", {"tdpo2": False}),
    ("tdpo", {"alpha": 1.7}),
    ("tis_dpo_kl", {}),
    ("tis_dpo_kl", {"alpha": 0.0}),
]
REFERENCE = {
    "dpo": ref.sigmoid,
    "tis_dpo": ref.token_weighted,
    "d2po": ref.token_weighted,
    "mask_dpo": ref.token_weighted,
}


def test_every_registered_name_has_a_reference_case():
    covered = {name for name, _ in CASES} | {"alpha_dpo"}  # alpha_dpo: its own test below
    assert set(losses.names()) == covered


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_matches_numpy_formula(name, hp, beta):
    expected_fn = REFERENCE.get(name) or getattr(ref, name)
    for seed in range(3):
        b = make_batch(seed, beta_scale=0.1 / beta)
        out = call(name, b, beta=beta, **hp)
        expected = expected_fn(f64(b), {"beta": beta, **hp})
        assert out.loss.shape == (B,) and out.loss.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out.loss), expected, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("name", ["sigmoid", "apo_zero", "apo_down", "ipo", "todo", "kto", "flex_dpo"])
def test_rewards_are_beta_times_log_ratios(name):
    b = make_batch(7)
    out = call(name, b, beta=0.3)
    if losses.get(name).kind == "unpaired":
        np.testing.assert_allclose(out.rewards, 0.3 * (f64(b)["pc"] - b["rc"]), rtol=1e-5, atol=1e-5)
        return
    np.testing.assert_allclose(out.chosen_rewards, 0.3 * (f64(b)["pc"] - b["rc"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards, 0.3 * (f64(b)["pr"] - b["rr"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_rewards_are_beta_times_average_logps(name):
    b = make_batch(8)
    out = call(name, b, beta=0.5)
    assert not losses.get(name).uses_reference
    np.testing.assert_allclose(out.chosen_rewards, 0.5 * b["pc"] / b["chosen_lengths"], rtol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards, 0.5 * b["pr"] / b["rejected_lengths"], rtol=1e-5)
    # the reference is never read: None works
    loss = losses.get(name)
    again = loss(
        b["pc"],
        b["pr"],
        None,
        None,
        beta=0.5,
        chosen_lengths=b["chosen_lengths"],
        rejected_lengths=b["rejected_lengths"],
    )
    np.testing.assert_array_equal(again.loss, out.loss)


def test_alpha_dpo_running_statistics_over_three_steps():
    loss = losses.get("alpha_dpo")
    hp = {"beta": 2.5, "alpha": 0.2, "gamma_beta_ratio": 0.6}
    state, np_state = loss.init_state(), (0.0, 0.0)
    for seed in range(3):
        b = make_batch(20 + seed)
        out = call("alpha_dpo", b, loss_state=state, **hp)
        expected, np_state = ref.alpha_dpo(f64(b), hp, np_state)
        np.testing.assert_allclose(out.loss, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.loss_state["mean"], np_state[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.loss_state["std"], np_state[1], rtol=1e-5, atol=1e-6)
        state = out.loss_state


def test_alpha_dpo_at_policy_equal_reference_uses_the_simpo_margin():
    # u = 0 everywhere, so the running std is 0; the margin is γ/β (docs/papers.md deviation)
    b = make_batch(3)
    b["rc"], b["rr"] = b["pc"], b["pr"]
    out = call("alpha_dpo", b, beta=2.5, gamma_beta_ratio=0.6)
    aw, al = f64(b)["pc"] / b["chosen_lengths"], f64(b)["pr"] / b["rejected_lengths"]
    np.testing.assert_allclose(out.loss, -ref.logsig(2.5 * (aw - al - 0.6)), rtol=RTOL, atol=ATOL)


def test_dpo_cov_closed_form_xi_minimizes_the_corruption_objective():
    # ξ* = argmin_ξ λ|ξ| − log σ(z + ξ), checked by brute force on a fine grid
    lam = 0.3
    for z in [-4.0, -0.5, 0.0, 0.8, 3.0]:
        grid = np.linspace(-10, 10, 200001)
        objective = lam * np.abs(grid) - ref.logsig(z + grid)
        closed = max(np.log(1 / lam - 1) - z, 0.0)
        assert abs(grid[np.argmin(objective)] - closed) < 1e-3


def test_todo_tie_loss_is_symmetric_and_minimal_at_zero_margin():
    loss = losses.get("todo")
    mus = np.linspace(-3, 3, 13).astype(np.float32)
    zero = np.zeros_like(mus)
    out = loss(mus, zero, zero, zero, beta=1.0, is_tie=np.ones_like(mus, bool))
    np.testing.assert_allclose(out.loss, out.loss[::-1], rtol=1e-6)
    assert np.argmin(out.loss) == 6  # μ = 0


# --- gradients -------------------------------------------------------------------------------


def _grad_wrt_logps(name, pc, pr, rc, rr, beta):
    fn = losses.get(name)
    return jax.grad(lambda *x: fn(*x, beta=beta).loss.sum(), argnums=(0, 1, 2, 3))(pc, pr, rc, rr)


def dsig(x):  # δ(x) = σ(x)(1 − σ(x)), the logistic derivative
    return ref.sig(x) * (1 - ref.sig(x))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_analytic_gradients_dpo_apo_zero_apo_down(beta):
    b = f64(make_batch(11, beta_scale=0.1 / beta))
    rho_c, rho_r = b["pc"] - b["rc"], b["pr"] - b["rr"]
    args = [jnp.asarray(b[k], jnp.float32) for k in ("pc", "pr", "rc", "rr")]
    s = 1 - ref.sig(beta * (rho_c - rho_r))
    analytic = {
        # L = −log σ(βh): ∂L/∂ρ_c = −β(1 − σ(βh)), ∂L/∂ρ_r = +β(1 − σ(βh))
        "sigmoid": (-beta * s, beta * s),
        # L = 1 − σ(βρ_c) + σ(βρ_r)
        "apo_zero": (-beta * dsig(beta * rho_c), beta * dsig(beta * rho_r)),
        # L = σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))
        "apo_down": (
            beta * (dsig(beta * rho_c) - dsig(beta * (rho_c - rho_r))),
            beta * dsig(beta * (rho_c - rho_r)),
        ),
    }
    for name, (d_c, d_r) in analytic.items():
        g_pc, g_pr, g_rc, g_rr = _grad_wrt_logps(name, *args, beta)
        np.testing.assert_allclose(g_pc, d_c, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(g_pr, d_r, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(g_rc, -d_c, rtol=1e-4, atol=1e-7, err_msg=name)  # ρ = π − ref
        np.testing.assert_allclose(g_rr, -d_r, rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("tdpo2", [True, False])
def test_tdpo_kl_gradients(tdpo2):
    """∂L/∂KL per position: TDPO2 stops the chosen KL's gradient and scales the rejected one by α;
    TDPO1 has both, unscaled (L = −log σ(βz), ∂L/∂z = −β σ(−βz))."""
    b, beta, alpha = make_batch(12), 0.4, 0.3
    loss = losses.get("tdpo")
    fields = {k: b[k] for k in ("chosen_loss_mask", "rejected_loss_mask")}

    def total(kc, kr):
        out = loss(
            b["tpc"],
            b["tpr"],
            b["trc"],
            b["trr"],
            beta=beta,
            alpha=alpha,
            tdpo2=tdpo2,
            chosen_kl=kc,
            rejected_kl=kr,
            **fields,
        )
        return out.loss.sum()

    g_c, g_r = jax.grad(total, argnums=(0, 1))(b["chosen_kl"], b["rejected_kl"])
    f = f64(b)
    a = alpha if tdpo2 else 1.0
    mc, mr = f["chosen_loss_mask"], f["rejected_loss_mask"]
    margin = (mc * (f["tpc"] - f["trc"])).sum(-1) - (mr * (f["tpr"] - f["trr"])).sum(-1)
    z = margin + a * ((mc * f["chosen_kl"]).sum(-1) - (mr * f["rejected_kl"]).sum(-1))
    dz = -beta * ref.sig(-beta * z)[:, None]
    expected_c = np.zeros_like(mc) if tdpo2 else dz * mc
    expected_r = -a * dz * mr
    np.testing.assert_allclose(g_c, expected_c, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_r, expected_r, rtol=1e-4, atol=1e-7)


def test_figure3_gradient_directions():
    """APO paper Figure 3: the descent direction −∂L/∂ρ on a grid of (ρ_c, ρ_r)."""
    beta = 0.1
    grid = np.linspace(-60, 60, 49, dtype=np.float32)
    rho_c, rho_r = (a.ravel() for a in np.meshgrid(grid, grid))
    zero = np.zeros_like(rho_c)
    gz = _grad_wrt_logps("apo_zero", rho_c, rho_r, zero, zero, beta)
    gd = _grad_wrt_logps("apo_down", rho_c, rho_r, zero, zero, beta)
    # APO-zero: chosen up, rejected down, everywhere
    assert np.all(-gz[0] > 0) and np.all(-gz[1] < 0)
    # APO-down: rejected down everywhere; chosen down exactly where |ρ_c| < |ρ_c − ρ_r|
    assert np.all(-gd[1] < 0)
    a, m = np.abs(rho_c), np.abs(rho_c - rho_r)
    clear = np.abs(a - m) > 1.0  # away from the boundary, where the sign flips
    assert np.all((-gd[0] < 0)[clear] == (a < m)[clear])
    assert (a < m)[clear].any() and (a > m)[clear].any()


# --- numerics --------------------------------------------------------------------------------

EXTREME = np.array([-1e4, -1e3, -30.0, 0.0, 30.0, 1e3, 1e4], np.float32)


def _extreme_batch(dtype):
    rho_c, rho_r = (a.ravel() for a in np.meshgrid(EXTREME, EXTREME))
    n = rho_c.size
    # policy log-probs stay negative (ORPO needs log-probs < 0); reference = policy − ρ
    pc = -np.abs(rho_c) - 5.0
    pr = -np.abs(rho_r) - 7.0
    lens = np.full(n, 9.0, np.float32)
    b = make_batch(0)
    extras = {k: np.resize(b[k], n) for k in ("is_tie", "timestamps", "scores", "label")}
    return {
        "pc": pc.astype(dtype),
        "pr": pr.astype(dtype),
        "rc": (pc - rho_c).astype(dtype),
        "rr": (pr - rho_r).astype(dtype),
        "chosen_lengths": lens,
        "rejected_lengths": lens,
        "kl_policy": (pc - rho_c * 0.5).astype(dtype),
        "kl_ref": pc.astype(dtype),
        **extras,
    }


def _sequence_names():
    return [n for n in losses.names() if losses.get(n).granularity == "sequence"]


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_finite_values_and_gradients_at_extreme_log_ratios(dtype):
    b = _extreme_batch(dtype)
    for name in _sequence_names():
        loss = losses.get(name)
        hp = {"beta": 0.1}
        if name == "exo_pair":
            hp["label_smoothing"] = 1e-3
        argnames = ("pc", "rc") if loss.kind == "unpaired" else ("pc", "pr", "rc", "rr")

        def total(*xs, loss=loss, hp=hp, argnames=argnames):
            c = dict(b, **dict(zip(argnames, xs, strict=True)))
            return call(loss.name, c, **hp).loss.astype(jnp.float32).sum()

        args = [jnp.asarray(b[k]) for k in argnames]
        value, grads = jax.value_and_grad(total, argnums=tuple(range(len(args))))(*args)
        assert np.isfinite(float(value)), name
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g, np.float32))), name


@pytest.mark.parametrize("f_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_finite_where_the_true_value_is(f_type):
    # Equal log-ratios give δ = 0 whatever their size: TRL's forward_kl is inf − inf = NaN below −88.
    rho = np.array([-1e4, -1e3, -100.0, 0.0, 100.0, 1e3, 1e4], np.float32)
    pc = -np.abs(rho) - 1.0
    for name in ["sigmoid", "hinge", "robust", "discopop", "exo_pair"]:
        hp = {"beta": 0.1, "f_divergence_type": f_type}
        if name == "exo_pair":
            hp["label_smoothing"] = 0.1
        fn = functools.partial(losses.get(name), **hp)
        value, grads = jax.value_and_grad(lambda a, c, fn=fn: fn(a, a, c, c).loss.sum(), argnums=(0, 1))(
            pc, pc - rho
        )
        expected = ref.__dict__[name](
            {"pc": 0.0 * rho, "pr": 0.0 * rho, "rc": 0.0 * rho, "rr": 0.0 * rho}, hp
        )
        np.testing.assert_allclose(float(value), expected.sum(), rtol=1e-5, err_msg=f"{name}/{f_type}")
        # forward_kl's true gradient grows as e^{−ρ}: infinite in float32 below ρ ≈ −88
        finite_grad = rho > -80 if f_type == "forward_kl" else np.ones_like(rho, bool)
        assert all(np.all(np.isfinite(np.asarray(g)[finite_grad])) for g in grads)


def test_discopop_stable_where_trl_overflows():
    # x = β·h = −1000: TRL's e^{−x}·σ(x/τ) is inf·0; the value is softplus(1000)·1 + e^{−19000}.
    out = losses.get("discopop")(np.float32(-1e4), np.float32(0), np.float32(0), np.float32(0), beta=0.1)
    np.testing.assert_allclose(out.loss, 1000.0, rtol=1e-6)
    g = jax.grad(lambda x: losses.get("discopop")(x, 0.0, 0.0, 0.0, beta=0.1).loss)(jnp.float32(-1e4))
    np.testing.assert_allclose(g, -0.1, rtol=1e-5)  # d/dρ softplus(−βρ) = −β σ(−βρ)


def test_forward_kl_gradient_is_exact_at_equal_log_ratios():
    # δ = e^{−ρ_r} − e^{−ρ_c}; at ρ_c = ρ_r = 0: ∂(−log σ(βδ))/∂ρ_c = −β·½·e^0 = −β/2
    fn = losses.get("sigmoid")
    g = jax.grad(lambda x: fn(x, 0.0, 0.0, 0.0, beta=0.2, f_divergence_type="forward_kl").loss)(0.0)
    np.testing.assert_allclose(g, -0.1, rtol=1e-6)


def test_jit_gives_the_same_values_as_eager():
    b = make_batch(5)
    for name in losses.names():
        loss = losses.get(name)
        hp = {"beta": 0.2, **({"label_smoothing": 0.01} if name == "exo_pair" else {})}
        eager = call(name, b, **hp)
        jitted = jax.jit(lambda b, name=name, hp=hp: call(name, b, **hp))({k: v for k, v in b.items()})
        np.testing.assert_allclose(jitted.loss, eager.loss, rtol=1e-6, atol=1e-7, err_msg=name)
        if loss.stateful:
            np.testing.assert_allclose(jitted.loss_state["std"], eager.loss_state["std"], rtol=1e-6)

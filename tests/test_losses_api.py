"""The registry's contract, mixtures, aggregation helpers and hyperparameter validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import losses_reference as ref
import numpy as np
import pytest
from helpers import ATOL, RTOL, call, f64, make_batch

from apo_jax import losses


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'.*apo_zero"):
        losses.get("dpoo")


def test_ld_dpo_points_to_the_aggregation():
    with pytest.raises(ValueError, match="ld_alpha"):
        losses.get("ld_dpo")


def test_log_probs_may_be_passed_by_their_names():
    """What the docstrings call them works as keywords: loss(policy_chosen_logps=..., ...). APO-zero
    by hand: ρ = (1, −1) nats, β = 0.1 -> 1 − σ(0.1) + σ(−0.1) = 0.950041652..."""
    pc, pr, rc, rr = jnp.array([-12.0]), jnp.array([-15.0]), jnp.array([-13.0]), jnp.array([-14.0])
    apo = losses.get("apo_zero")
    out = apo(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1
    )
    np.testing.assert_allclose(out.loss, [0.9500416527802576], rtol=1e-6)
    mixed = apo(pc, pr, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)
    np.testing.assert_array_equal(mixed.loss, out.loss)
    kto = losses.get("kto")(policy_logps=pc, ref_logps=rc, beta=0.1, label=jnp.array([True]), kl=0.0)
    np.testing.assert_allclose(kto.loss, [1 - 1 / (1 + np.exp(-0.1))], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['ref_rejected_logps'\] missing"):
        apo(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, beta=0.1)


def test_declared_fields_and_reference_use():
    assert losses.get("todo").needs == ("is_tie",)
    assert losses.get("ns_dpo").needs == ("timestamps",)
    assert set(losses.get("kto").needs) == {"label", "kl"}
    assert losses.get("una_score").needs == ("scores",)
    assert set(losses.get("ipo").needs) == {"chosen_lengths", "rejected_lengths"}
    assert losses.get("apo_zero").needs == ()
    assert not losses.get("simpo").uses_reference and not losses.get("orpo").uses_reference
    assert losses.get("apo_zero").uses_reference
    assert losses.get("d2po").granularity == "token" and losses.get("d2po") is losses.get("token_weighted")
    assert losses.get("dpo") is losses.get("sigmoid")
    assert losses.get("alpha_dpo").stateful and losses.get("alpha_dpo").batch_coupled
    assert losses.get("kto").kind == "unpaired"
    # hyperparameters carry TRL's defaults
    assert losses.get("discopop").hparams["discopop_tau"] == 0.05
    assert losses.get("simpo").hparams == {
        "beta": 0.1,
        "simpo_gamma": 0.5,
        "label_smoothing": 0.0,
        "alpha": 0.0,
    }
    assert losses.F_DIVERGENCE_LOSSES == {
        "sigmoid",
        "sigmoid_norm",
        "hinge",
        "ipo",
        "exo_pair",
        "robust",
        "discopop",
        "sft",
    }


@pytest.mark.parametrize(
    "name,hp,key",
    [
        ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
        ("robust", {"label_smoothing": -0.1}, "label_smoothing"),
        ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
        ("sigmoid", {"beta": 0.0}, "beta"),
        ("apo_zero", {"beta": -0.1}, "beta"),
        ("discopop", {"discopop_tau": 0.0}, "discopop_tau"),
        ("todo", {"alpha": 0.0}, "alpha"),
        ("ns_dpo", {"gamma": 1.5}, "gamma"),
        ("dpo_cov", {"lam": 0.0}, "lam"),
        ("dr_dpo", {"beta_prime": 0.0}, "beta_prime"),
        ("una_binary", {"una_form": "hinge"}, "una_form"),
        ("kto", {"desirable_weight": -1.0}, "desirable_weight"),
        ("alpha_dpo", {"ema_decay": 1.0}, "ema_decay"),
        ("sigmoid", {"f_divergence_type": "kl"}, "f_divergence_type"),
        ("sigmoid", {"label_smoothing": 0.1}, "label_smoothing"),  # TRL's sigmoid takes none
        ("apo_zero", {"simpo_gamma": 0.5}, "simpo_gamma"),
    ],
)
def test_invalid_hyperparameters_raise_naming_them(name, hp, key):
    hp = {"beta": 0.1, **hp}
    with pytest.raises(ValueError, match=key):
        call(name, make_batch(0), **hp)
    with pytest.raises(ValueError, match=key):
        losses.get(name).validate(**hp)


def test_f_divergence_only_where_trl_allows_it():
    with pytest.raises(
        ValueError, match="f_divergence_type='forward_kl' is not supported by loss 'apo_zero'"
    ):
        call("apo_zero", make_batch(0), beta=0.1, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="not supported by loss 'kto'"):
        losses.get("kto").validate(f_divergence_type="js_divergence")
    # the default is accepted everywhere, as TRL's config always carries it
    out = call("apo_zero", make_batch(0), beta=0.1, f_divergence_type="reverse_kl")
    np.testing.assert_allclose(
        out.loss, ref.apo_zero(f64(make_batch(0)), {"beta": 0.1}), rtol=RTOL, atol=ATOL
    )
    with pytest.raises(ValueError, match="not supported by loss 'apo_zero'"):
        losses.build(["sigmoid", "apo_zero"]).validate(f_divergence_type="js_divergence")


def test_missing_and_unexpected_batch_fields_are_named():
    b = make_batch(0)
    with pytest.raises(ValueError, match="needs batch field.*chosen_lengths"):
        losses.get("ipo")(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1)
    with pytest.raises(ValueError, match="does not take batch field.*is_tie"):
        losses.get("sigmoid")(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1, is_tie=b["is_tie"])
    with pytest.raises(ValueError, match="'beta'"):
        losses.get("sigmoid")(b["pc"], b["pr"], b["rc"], b["rr"])


def test_rpo_mixture_is_sigmoid_plus_alpha_sft():
    b = make_batch(4)
    rpo = losses.build(["sigmoid", "sft"], [1.0, 0.3])
    out = rpo(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1, chosen_lengths=b["chosen_lengths"])
    hp = {"beta": 0.1}
    expected = ref.sigmoid(f64(b), hp) + 0.3 * ref.sft(f64(b), hp)
    np.testing.assert_allclose(out.loss, expected, rtol=RTOL, atol=ATOL)
    assert not losses.build("sft").uses_reference and rpo.uses_reference
    assert rpo.needs == ("chosen_lengths",)
    np.testing.assert_allclose(out.metrics["nll_loss"], ref.sft(f64(b), hp)[0], rtol=1e-6)
    # rewards are the first part's: β·ρ
    np.testing.assert_allclose(out.chosen_rewards, 0.1 * (f64(b)["pc"] - b["rc"]), rtol=1e-5, atol=1e-5)


def test_mixture_shares_hyperparameters_and_carries_state():
    b = make_batch(6)
    mix = losses.build(["robust", "alpha_dpo"], [0.5, 2.0])
    assert mix.stateful and set(mix.init_state()) == {"alpha_dpo"}
    kw = {"chosen_lengths": b["chosen_lengths"], "rejected_lengths": b["rejected_lengths"]}
    out = mix(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.2, label_smoothing=0.1, alpha=0.3, **kw)
    hp = {"beta": 0.2, "label_smoothing": 0.1, "alpha": 0.3}
    expected_alpha, (mu, s) = ref.alpha_dpo(f64(b), hp)
    np.testing.assert_allclose(
        out.loss, 0.5 * ref.robust(f64(b), hp) + 2.0 * expected_alpha, rtol=RTOL, atol=1e-5
    )
    np.testing.assert_allclose(out.loss_state["alpha_dpo"]["mean"], mu, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown hyperparameter.*simpo_gamma"):
        mix(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.2, simpo_gamma=1.0, **kw)


def test_hyperparameters_bound_at_build_are_checked_once_and_overridable():
    """`build(name, **hparams)` is what the trainer calls: the bound loss equals the formula at those
    values, a bad value fails at build (not in the step), and a keyword at call time wins."""
    b = make_batch(5)
    kw = {"chosen_lengths": b["chosen_lengths"], "rejected_lengths": b["rejected_lengths"]}
    simpo = losses.build("simpo", beta=2.0, simpo_gamma=0.7)
    np.testing.assert_allclose(
        simpo(b["pc"], b["pr"], None, None, **kw).loss,
        ref.simpo(f64(b), {"beta": 2.0, "simpo_gamma": 0.7, "label_smoothing": 0.0}),
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        simpo(b["pc"], b["pr"], None, None, beta=1.0, **kw).loss,
        ref.simpo(f64(b), {"beta": 1.0, "simpo_gamma": 0.7, "label_smoothing": 0.0}),
        rtol=RTOL,
        atol=ATOL,
    )
    assert losses.get("simpo").bound == {}  # the registry's loss is untouched
    with pytest.raises(ValueError, match="beta=-1"):
        losses.build("apo_zero", beta=-1)
    with pytest.raises(ValueError, match="unknown hyperparameter.*simpo_gamma"):
        losses.build(["sigmoid", "sft"], [1.0, 0.3], beta=0.1, simpo_gamma=1.0)
    rpo = losses.build(["sigmoid", "sft"], [1.0, 0.3], beta=0.1)
    hp = {"beta": 0.1}
    np.testing.assert_allclose(
        rpo(b["pc"], b["pr"], b["rc"], b["rr"], **kw).loss,
        ref.sigmoid(f64(b), hp) + 0.3 * ref.sft(f64(b), hp),
        rtol=RTOL,
        atol=ATOL,
    )


def test_mixture_rejects_incompatible_parts():
    with pytest.raises(ValueError, match="kinds"):
        losses.build(["sigmoid", "kto"])
    with pytest.raises(ValueError, match="granularities"):
        losses.build(["sigmoid", "d2po"])
    with pytest.raises(ValueError, match="one entry per loss"):
        losses.build(["sigmoid", "sft"], [1.0])
    with pytest.raises(ValueError, match="empty"):
        losses.build([])
    b = make_batch(0)
    with pytest.raises(ValueError, match="aot"):
        losses.build(["aot"])(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1, example_weights=np.ones(8))


def _np_token_stats(b):
    """Per-row completion positions k = 1..|y| (0 off the completion), float64."""
    return {
        side: np.cumsum(b[f"{side}_loss_mask"], -1) * b[f"{side}_loss_mask"]
        for side in ("chosen", "rejected")
    }


@pytest.mark.parametrize("ld_alpha", [0.0, 0.37, 1.0])
def test_ld_aggregate_matches_trl_formula(ld_alpha):
    b = f64(make_batch(9))
    pos = _np_token_stats(b)
    got_c, got_r = losses.ld_aggregate(
        b["tpc"], b["chosen_loss_mask"], b["tpr"], b["rejected_loss_mask"], ld_alpha
    )
    for row in range(b["tpc"].shape[0]):
        shared = min(pos["chosen"][row].max(), pos["rejected"][row].max())
        for got, logps, k in ((got_c, b["tpc"], pos["chosen"]), (got_r, b["tpr"], pos["rejected"])):
            expected = sum(
                (1.0 if kk <= shared else ld_alpha) * lp
                for lp, kk in zip(logps[row], k[row], strict=True)
                if kk > 0
            )
            np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ld_alpha"):
        losses.ld_aggregate(b["tpc"], b["chosen_loss_mask"], b["tpr"], b["rejected_loss_mask"], 1.5)


def test_wpo_weights_and_weighted_mixture():
    b = f64(make_batch(10))
    rng = np.random.default_rng(0)
    lss_c, lss_r = -rng.uniform(0.5, 2, b["tpc"].shape), -rng.uniform(0.5, 2, b["tpr"].shape)
    w = losses.wpo_weights(b["tpc"], lss_c, b["chosen_loss_mask"], b["tpr"], lss_r, b["rejected_loss_mask"])

    def np_weight(lp, lss, m):
        return np.exp(((lp - lss) * m).sum(-1) / m.sum(-1))

    expected = np_weight(b["tpc"], lss_c, b["chosen_loss_mask"]) * np_weight(
        b["tpr"], lss_r, b["rejected_loss_mask"]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    g = jax.grad(
        lambda x: losses.wpo_weights(
            x, lss_c, b["chosen_loss_mask"], b["tpr"], lss_r, b["rejected_loss_mask"]
        ).sum()
    )(jnp.asarray(b["tpc"], jnp.float32))
    assert np.all(np.asarray(g) == 0)  # the weights carry no gradient (TRL computes them under no_grad)
    mix = losses.build(["sigmoid", "sft"], [1.0, 0.5])
    out = mix(
        b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1, chosen_lengths=b["chosen_lengths"], example_weights=w
    )
    hp = {"beta": 0.1}
    np.testing.assert_allclose(
        out.loss, expected * (ref.sigmoid(b, hp) + 0.5 * ref.sft(b, hp)), rtol=RTOL, atol=ATOL
    )


def test_kto_reference_point_is_clamped_mean_without_gradient():
    pol, refl = np.array([-3.0, -1.0, -2.0], np.float32), np.array([-1.0, -2.5, -2.0], np.float32)
    np.testing.assert_allclose(losses.kto_kl(pol, refl), max(np.mean(pol - refl), 0.0), rtol=1e-6)
    assert float(losses.kto_kl(pol - 5, refl)) == 0.0
    assert float(jax.grad(lambda p: losses.kto_kl(p + 10, refl))(jnp.asarray(pol)).sum()) == 0.0


def test_d2po_weights_decay_from_the_first_completion_token():
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)
    w = np.asarray(losses.d2po_weights(mask, gamma=0.5))
    np.testing.assert_allclose(w[0], [0, 0, 0.5, 0.25, 0.125, 0])
    np.testing.assert_allclose(w[1], [0, 0.5, 0.25, 0.125, 0.0625, 0.03125])
    # D²PO: Σ_t γ^t logp_t for policy and reference, then DPO
    b = f64(make_batch(12))
    wc, wr = (
        losses.d2po_weights(b["chosen_loss_mask"], 0.98),
        losses.d2po_weights(b["rejected_loss_mask"], 0.98),
    )
    out = losses.get("d2po")(
        b["tpc"],
        b["tpr"],
        b["trc"],
        b["trr"],
        beta=0.1,
        chosen_loss_mask=b["chosen_loss_mask"],
        rejected_loss_mask=b["rejected_loss_mask"],
        chosen_weights=wc,
        rejected_weights=wr,
    )

    def decayed(lp, m):
        k = np.cumsum(m, -1)
        return (0.98**k * m * lp).sum(-1)

    h = decayed(b["tpc"] - b["trc"], b["chosen_loss_mask"]) - decayed(
        b["tpr"] - b["trr"], b["rejected_loss_mask"]
    )
    np.testing.assert_allclose(out.loss, -ref.logsig(0.1 * h), rtol=RTOL, atol=ATOL)


def test_mask_and_tis_weights():
    mask = np.array([[0, 1, 1, 1]], np.float32)
    correct = np.array([[True, True, False, True]])
    np.testing.assert_array_equal(losses.mask_dpo_weights(correct, mask, chosen=True), [[0, 1, 0, 1]])
    np.testing.assert_array_equal(losses.mask_dpo_weights(correct, mask, chosen=False), [[0, 0, 1, 0]])
    d = np.array([[5.0, -2.0, 0.3, 0.9]], np.float32)
    w = losses.tis_dpo_weights(d, mask, chosen=False, lower=-0.5, upper=0.5, k=2.0)
    np.testing.assert_allclose(w, [[0, 2 * np.exp(0.5), 2 * np.exp(-0.3), 2 * np.exp(-0.5)]], rtol=1e-6)

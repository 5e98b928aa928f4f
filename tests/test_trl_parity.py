"""apo_jax.losses against values computed by TRL 1.16's own trainer code (tests/golden/).

The golden file was written by tests/golden/make_trl_golden.py, which calls TRL's
`DPOTrainer._compute_loss`, `KTOTrainer._compute_loss`, `CPOTrainer.cpo_loss` and
`ORPOTrainer.odds_ratio_loss` in float64 (float32 for the alpha divergence, as TRL requires).
Here the same per-token log-probs go through what apo_jax's train step will do: sums over the
completion mask (or `ld_aggregate`), lengths, `wpo_weights`, then `losses.build(...)`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from apo_jax import losses

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "trl_losses.json").read_text())
CASES = GOLDEN["cases"]
RTOL, ATOL = 1e-5, 2e-6


def _case_id(case):
    cfg = case["config"]
    name = "+".join(cfg.get("loss_types", [cfg.get("loss_type", case["trainer"])]))
    extra = [
        f"{k}={cfg[k]}" for k in ("f_divergence_type", "ld_alpha", "use_weighting", "beta") if cfg.get(k)
    ]
    return f"{case['trainer']}:{name}:" + ",".join(str(e) for e in extra)


def _arrays(case):
    mask = np.asarray(case["completion_mask"], np.float32)
    policy = np.asarray(case["policy_token_logps"], np.float32)
    ref = np.asarray(case.get("ref_token_logps", case["policy_token_logps"]), np.float32)
    return mask, policy, ref


def _halves(x):
    return x[: len(x) // 2], x[len(x) // 2 :]


def _dpo(case):
    cfg = case["config"]
    mask, policy, ref = _arrays(case)
    (mc, mr), (pc_t, pr_t), (rc_t, rr_t) = _halves(mask), _halves(policy), _halves(ref)
    if cfg["ld_alpha"] is None:
        sums = [np.sum(x * m, -1) for x, m in ((pc_t, mc), (pr_t, mr), (rc_t, mc), (rr_t, mr))]
    else:
        sums = [
            *losses.ld_aggregate(pc_t, mc, pr_t, mr, cfg["ld_alpha"]),
            *losses.ld_aggregate(rc_t, mc, rr_t, mr, cfg["ld_alpha"]),
        ]
    loss = losses.build(cfg["loss_types"], cfg["loss_weights"])
    hp = {"beta": cfg["beta"], "f_divergence_type": cfg["f_divergence_type"]}
    hp["f_alpha_divergence_coef"] = cfg["f_alpha_divergence_coef"]
    for key in ("label_smoothing", "discopop_tau"):
        if key in loss.hparams:
            hp[key] = cfg[key]
    kw = {"chosen_lengths": mc.sum(-1), "rejected_lengths": mr.sum(-1)}
    kw = {k: v for k, v in kw.items() if k in loss.needs + loss.accepts}
    if cfg["use_weighting"]:
        lss_c, lss_r = _halves(np.asarray(case["log_sum_sq_probs"], np.float32))
        kw["example_weights"] = losses.wpo_weights(pc_t, lss_c, mc, pr_t, lss_r, mr)
    out = loss(*sums, **hp, **kw)
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c["trainer"] == "dpo"], ids=_case_id)
def test_dpo_trainer_parity(case):
    out = _dpo(case)
    np.testing.assert_allclose(float(np.mean(out.loss)), case["loss"], rtol=RTOL, atol=ATOL)
    if case["config"]["loss_types"] == ["sft"]:
        # DPOTrainer always logs β·(policy − reference); apo_jax's `sft` is reference-free and
        # reports β·(average policy log-prob), as TRL's CPO does for reference-free losses.
        return
    np.testing.assert_allclose(
        float(np.mean(out.chosen_rewards)), case["metrics"]["rewards/chosen"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        float(np.mean(out.rejected_rewards)), case["metrics"]["rewards/rejected"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("case", [c for c in CASES if c["trainer"] == "kto"], ids=_case_id)
def test_kto_trainer_parity(case):
    cfg = case["config"]
    mask, policy, ref = _arrays(case)
    sums, ref_sums = np.sum(policy * mask, -1), np.sum(ref * mask, -1)
    (main, kl_rows), (ref_main, ref_kl) = _halves(sums), _halves(ref_sums)
    hp = {k: cfg[k] for k in ("beta", "desirable_weight", "undesirable_weight")}
    extra = {"kl": losses.kto_kl(kl_rows, ref_kl)} if cfg["loss_type"] == "kto" else {}
    out = losses.get(cfg["loss_type"])(main, ref_main, label=np.asarray(case["label"]), **hp, **extra)
    np.testing.assert_allclose(float(np.mean(out.loss)), case["loss"], rtol=RTOL, atol=ATOL)


def _averages(case):
    mask, policy, _ = _arrays(case)
    sums, lens = np.sum(policy * mask, -1), mask.sum(-1)
    return _halves(sums), _halves(lens)


@pytest.mark.parametrize("case", [c for c in CASES if c["trainer"] == "cpo"], ids=_case_id)
def test_cpo_simpo_parity(case):
    (pc, pr), (lc, lr) = _averages(case)
    out = losses.get("simpo")(pc, pr, None, None, chosen_lengths=lc, rejected_lengths=lr, **case["config"])
    np.testing.assert_allclose(out.loss, case["losses"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.chosen_rewards, case["chosen_rewards"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c["trainer"] == "orpo"], ids=_case_id)
def test_orpo_parity(case):
    (pc, pr), (lc, lr) = _averages(case)
    out = losses.get("orpo")(pc, pr, None, None, chosen_lengths=lc, rejected_lengths=lr, **case["config"])
    nll = -pc.sum() / lc.sum()
    # TRL: loss = NLL − mean(β·log σ(log_odds)); per example here: NLL − β·log σ(log_odds_i)
    np.testing.assert_allclose(
        np.asarray(out.loss) - nll, -np.asarray(case["or_losses"]), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(out.metrics["log_odds_chosen"], case["log_odds_chosen"], rtol=1e-5, atol=1e-6)


def test_golden_file_covers_every_trl_loss_type():
    dpo_types = {t for c in CASES if c["trainer"] == "dpo" for t in c["config"]["loss_types"]}
    assert dpo_types == {
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    }
    assert GOLDEN["trl_version"] == "1.16.0"

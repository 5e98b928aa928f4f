"""Generates tests/golden/trl_losses.json: loss values computed by TRL 1.16's own trainer code.

    pip install trl==1.16.0   # beside the test extra
    python tests/golden/make_trl_golden.py

Runs `DPOTrainer._compute_loss` and `KTOTrainer._compute_loss` (the methods a TRL training
step calls) on a trainer object with only the attributes those methods read, and a stand-in
model that returns fixed per-token log-probs, in float64. `CPOTrainer.cpo_loss` (SimPO) and
`ORPOTrainer.odds_ratio_loss` are called the same way. The JSON holds the inputs and TRL's
outputs; tests/test_trl_parity.py recomputes them with apo_jax.losses.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import types
from collections import defaultdict

import numpy as np
import torch
import trl
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

B, T = 4, 10
OUT = pathlib.Path(__file__).with_name("trl_losses.json")


class _Accelerator:
    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather


class _Model:
    """Returns the per-token log-probs stored for each row; row r is recognized by input_ids[r, 0]."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, table, lss=None):
        self.table, self.lss = table, lss

    def __call__(self, input_ids, labels=None, **_):
        rows = input_ids[:, 0].long()
        logps = self.table[rows][:, 1:]  # TRL's log_probs are shifted: position t predicts token t+1
        out = types.SimpleNamespace(
            log_probs=logps,
            entropy=torch.ones_like(logps),
            mean_logits=torch.zeros_like(logps),
            is_top1=torch.zeros_like(logps, dtype=torch.bool),
        )
        if self.lss is not None:
            out.log_sum_sq_probs = self.lss[rows][:, 1:]
        return out


def _trainer(cls, model, **attrs):
    t = object.__new__(cls)
    t.__dict__.update(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        ref_model=object(),  # not None: the reference is precomputed, never a PEFT adapter
        **attrs,
    )
    return t


def _token_inputs(rng, n):
    """[n, T] completion masks (prompt first) and per-token log-probs aligned with input ids."""
    starts = rng.integers(1, T - 2, n)
    ends = rng.integers(starts + 1, T + 1)
    pos = np.arange(T)[None]
    mask = ((pos >= starts[:, None]) & (pos < ends[:, None])).astype(np.float64)
    policy = -rng.uniform(0.01, 3.0, (n, T)) * mask
    ref = (policy + rng.normal(0, 0.5, (n, T))) * mask
    ref = np.minimum(ref, 0.0)
    lss = -rng.uniform(0.2, 2.0, (n, T)) * mask
    # values exactly representable in float32, so float32 and float64 runs see the same inputs
    return tuple(x.astype(np.float32).astype(np.float64) for x in (mask, policy, ref, lss))


def dpo_case(seed, **config):
    rng = np.random.default_rng(seed)
    mask, policy, ref, lss = _token_inputs(rng, 2 * B)  # rows [chosen; rejected], as TRL batches
    input_ids = torch.arange(2 * B)[:, None].repeat(1, T)
    # TRL's alpha-divergence clamp table has no float64 entry: that path runs in float32
    dtype = torch.float32 if config.get("f_divergence_type") == "alpha_divergence" else torch.float64
    model = _Model(torch.tensor(policy, dtype=dtype), torch.tensor(lss, dtype=dtype))
    cfg = {
        "loss_types": ["sigmoid"],
        "loss_weights": None,
        "beta": 0.1,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "ld_alpha": None,
        "use_weighting": False,
        "discopop_tau": 0.05,
        **config,
    }
    trainer = _trainer(
        DPOTrainer,
        model,
        args=types.SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
        **{k: v for k, v in cfg.items() if k not in ("discopop_tau", "loss_weights")},
        loss_weights=cfg["loss_weights"] or [1.0] * len(cfg["loss_types"]),
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
    }
    # the reference log-probs go through TRL's own precompute path (it applies ld_alpha too)
    ref_c, ref_r = DPOTrainer.compute_ref_log_probs(trainer, _Model(torch.tensor(ref, dtype=dtype)), inputs)
    inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return {
        "trainer": "dpo",
        "config": cfg,
        "completion_mask": mask.tolist(),
        "policy_token_logps": policy.tolist(),
        "ref_token_logps": ref.tolist(),
        "log_sum_sq_probs": lss.tolist(),
        "loss": float(loss),
        "metrics": metrics,
    }


def kto_case(seed, loss_type, desirable_weight=1.0, undesirable_weight=1.0, beta=0.1):
    rng = np.random.default_rng(seed)
    n = 2 * B
    mask, policy, ref, _ = _token_inputs(rng, 2 * n)  # rows [completions; mismatched KL completions]
    label = rng.random(n) < 0.5
    label[:2] = [True, False]
    model = _Model(torch.tensor(policy))
    trainer = _trainer(
        KTOTrainer,
        model,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=loss_type == "kto",
    )
    ids = torch.arange(2 * n)[:, None].repeat(1, T)
    mask_t = torch.tensor(mask, dtype=torch.long)
    ref_sums = torch.tensor((ref * mask).sum(-1))
    inputs = {
        "input_ids": ids[:n],
        "attention_mask": torch.ones_like(ids[:n]),
        "completion_mask": mask_t[:n],
        "KL_input_ids": ids[n:],
        "KL_attention_mask": torch.ones_like(ids[n:]),
        "KL_completion_mask": mask_t[n:],
        "label": torch.tensor(label),
        "ref_logps": ref_sums[:n],
        "ref_KL_logps": ref_sums[n:],
    }
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return {
        "trainer": "kto",
        "config": {
            "loss_type": loss_type,
            "beta": beta,
            "desirable_weight": desirable_weight,
            "undesirable_weight": undesirable_weight,
        },
        "completion_mask": mask.tolist(),
        "policy_token_logps": policy.tolist(),
        "ref_token_logps": ref.tolist(),
        "label": label.tolist(),
        "loss": float(loss),
    }


def cpo_case(seed, beta=0.1, simpo_gamma=0.5, label_smoothing=0.0, alpha=0.0):
    rng = np.random.default_rng(seed)
    mask, policy, _, _ = _token_inputs(rng, 2 * B)
    avg = torch.tensor((policy * mask).sum(-1) / mask.sum(-1))  # CPO averages for simpo
    trainer = _trainer(
        CPOTrainer,
        None,
        beta=beta,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        alpha=alpha,
        loss_type="simpo",
    )
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(trainer, avg[:B], avg[B:])
    return {
        "trainer": "cpo",
        "config": {
            "beta": beta,
            "simpo_gamma": simpo_gamma,
            "label_smoothing": label_smoothing,
            "alpha": alpha,
        },
        "completion_mask": mask.tolist(),
        "policy_token_logps": policy.tolist(),
        "losses": losses.tolist(),
        "chosen_rewards": chosen_rewards.tolist(),
    }


def orpo_case(seed, beta=0.1):
    rng = np.random.default_rng(seed)
    mask, policy, _, _ = _token_inputs(rng, 2 * B)
    avg = torch.tensor((policy * mask).sum(-1) / mask.sum(-1))
    trainer = _trainer(ORPOTrainer, None, beta=beta)
    losses, _, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, avg[:B], avg[B:])
    return {
        "trainer": "orpo",
        "config": {"beta": beta},
        "completion_mask": mask.tolist(),
        "policy_token_logps": policy.tolist(),
        "or_losses": losses.tolist(),  # TRL's loss is NLL − mean(or_losses)
        "log_odds_chosen": float(log_odds),
    }


def main():
    torch.set_default_dtype(torch.float64)
    dpo_types = [
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
    ]
    cases = []
    seed = 0
    for loss_type in dpo_types:
        for beta in (0.1, 0.5):
            seed += 1
            smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05}.get(loss_type, 0.0)
            cases.append(dpo_case(seed, loss_types=[loss_type], beta=beta, label_smoothing=smoothing))
    for f_type, coef in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]:
        for loss_type in ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"]:
            seed += 1
            smoothing = {"exo_pair": 0.01, "robust": 0.2}.get(loss_type, 0.0)
            cases.append(
                dpo_case(
                    seed,
                    loss_types=[loss_type],
                    beta=0.5,
                    label_smoothing=smoothing,
                    f_divergence_type=f_type,
                    f_alpha_divergence_coef=coef,
                )
            )
    for ld_alpha in (0.0, 0.5):
        seed += 1
        cases.append(dpo_case(seed, loss_types=["sigmoid"], ld_alpha=ld_alpha, beta=0.3))
    # (TRL 1.16 crashes on use_weighting with "sft": an in-place multiply of an expanded tensor)
    for loss_types in (["sigmoid"], ["apo_zero", "sigmoid"]):
        seed += 1
        cases.append(dpo_case(seed, loss_types=loss_types, use_weighting=True, beta=0.2))
    seed += 1
    cases.append(dpo_case(seed, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.4]))
    seed += 1
    cases.append(
        dpo_case(seed, loss_types=["apo_down", "ipo", "sft"], loss_weights=[0.5, 0.1, 2.0], beta=0.4)
    )
    for loss_type in ("kto", "apo_zero_unpaired"):
        for weights in ((1.0, 1.0), (1.33, 0.8)):
            seed += 1
            cases.append(kto_case(seed, loss_type, *weights, beta=0.3))
    for kw in ({}, {"beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.1}, {"alpha": 0.2}):
        seed += 1
        cases.append(cpo_case(seed, **kw))
    for beta in (0.1, 0.25):
        seed += 1
        cases.append(orpo_case(seed, beta))
    OUT.write_text(json.dumps({"trl_version": trl.__version__, "cases": cases}, indent=None) + "\n")
    print(f"wrote {len(cases)} cases from TRL {trl.__version__} to {OUT}")


if __name__ == "__main__":
    main()

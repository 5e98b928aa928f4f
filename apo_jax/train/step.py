"""The train step: `step(state, batch) -> (state, metrics)`, built from parts and jitted once.

Policy token log-probs of the batch in its layout -> per-completion sums (optionally LD-DPO's
`ld_alpha` aggregation) and lengths -> reference log-probs (frozen/synced parameters, or
precomputed in the batch, or none) -> the configured loss (`apo_jax.losses`, one or a weighted
mix, WPO weights optional) -> gradients, accumulated over micro-batches -> optax update, skipped
when the loss or gradients are not finite. Metrics carry TRL's names.

Micro-batch k of a global batch of G rows with A accumulation steps is rows k, k + A, k + 2A, ...
so that each micro-batch draws evenly from every device's shard (no data movement). Batch-coupled
losses (aot, dr_dpo, sft, alpha_dpo, KTO's reference point) see one whole micro-batch across all
devices; gradient accumulation therefore changes them, and TRL, which sorts `aot` per device,
differs from apo_jax on more than one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from apo_jax import losses as losses_lib
from apo_jax.data.layouts import EXTRA_KEYS, sequence_logps
from apo_jax.models import token_logps
from apo_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs to know, all static."""

    mode: str = "preference"  # preference | sft
    layout: str = "padded"
    grad_accum: int = 1
    reference: str = "frozen"  # frozen | precomputed | sync | none
    sync_steps: int = 512
    mixup_alpha: float = 0.6
    ld_alpha: float | None = None
    use_weighting: bool = False
    hparams: tuple = ()  # sorted (name, value) pairs of the loss hyperparameters, beta included
    token_level: bool = False  # the loss takes [B, T] token log-probs (padded layout only)
    kl: str | None = None  # the per-position KL a token-level loss takes (`Loss.kl`), from one joint pass
    chunk_size: int = 256
    with_entropy: bool = True


def _sides_padded(model, params, batch, cfg: StepConfig, *, with_entropy, ref_params=None):
    """Per-completion sums for chosen and rejected from the padded layout (one forward of [2b, T]).

    With `ref_params` (losses with a `kl`), the same pass over the output projection also gives
    the reference's sums and token log-probs (under "ref") and the per-position KL (`*_kl`)."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    kl = cfg.kl if ref_params is not None else None
    out = token_logps(
        model, params, ids, attn, loss_mask, chunk_size=cfg.chunk_size, with_entropy=with_entropy,
        with_sum_sq=cfg.use_weighting, ref_params=ref_params, kl=kl,
    )  # fmt: skip
    b = batch["chosen_input_ids"].shape[0]
    res = {"tokens": jnp.sum(attn), "loss_tokens": jnp.sum(loss_mask)}
    c_tok, r_tok = out["token_logps"][:b], out["token_logps"][b:]
    if kl is not None:
        res["chosen_kl"], res["rejected_kl"] = out["kl"][:b], out["kl"][b:]
        ref_tok = out["ref_token_logps"]
        res["ref"] = {"chosen": out["ref_logps"][:b], "rejected": out["ref_logps"][b:],
                      "chosen_tok": ref_tok[:b], "rejected_tok": ref_tok[b:]}  # fmt: skip
    if cfg.ld_alpha is not None:
        res["chosen"], res["rejected"] = losses_lib.ld_aggregate(
            c_tok, batch["chosen_loss_mask"], r_tok, batch["rejected_loss_mask"], cfg.ld_alpha
        )
    else:
        res["chosen"], res["rejected"] = out["logps"][:b], out["logps"][b:]
    res["chosen_lengths"], res["rejected_lengths"] = out["lengths"][:b], out["lengths"][b:]
    if cfg.token_level:
        res["chosen_tok"], res["rejected_tok"] = c_tok, r_tok
    if with_entropy:
        res["entropy_sum"] = jnp.sum(out["entropy"] * loss_mask)
    if cfg.use_weighting:
        lss = out["log_sum_sq_probs"]
        res["wpo"] = losses_lib.wpo_weights(
            c_tok, lss[:b], batch["chosen_loss_mask"], r_tok, lss[b:], batch["rejected_loss_mask"]
        )
    return res


def _sides_rows(model, params, batch, cfg: StepConfig, *, with_entropy):
    """The same from packed or prompt-shared rows, summed per sequence by (row, segment)."""
    shared = 1 if cfg.layout == "prompt_shared" else None
    out = token_logps(
        model, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["segment_ids"],
        batch["positions"], chunk_size=cfg.chunk_size, with_entropy=with_entropy, shared_segment=shared,
    )  # fmt: skip
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    res = {"tokens": jnp.sum(batch["attention_mask"]), "loss_tokens": jnp.sum(mask)}
    for side in ("chosen", "rejected"):
        index = batch[f"{side}_index"]
        res[side] = sequence_logps(out["token_logps"], mask, seg, index)
        res[f"{side}_lengths"] = sequence_logps(jnp.ones_like(mask), mask, seg, index)
    if with_entropy:
        res["entropy_sum"] = jnp.sum(out["entropy"] * mask)
    return res


def _unpaired(model, params, batch, cfg: StepConfig, *, with_entropy):
    ids = jnp.concatenate([batch["input_ids"], batch["kl_input_ids"]])
    attn = jnp.concatenate([batch["attention_mask"], batch["kl_attention_mask"]])
    loss_mask = jnp.concatenate([batch["loss_mask"], batch["kl_loss_mask"]])
    out = token_logps(
        model, params, ids, attn, loss_mask, chunk_size=cfg.chunk_size, with_entropy=with_entropy
    )
    b = batch["input_ids"].shape[0]
    res = {"main": out["logps"][:b], "kl": out["logps"][b:], "tokens": jnp.sum(attn[:b]),
           "loss_tokens": jnp.sum(batch["loss_mask"])}  # fmt: skip
    if with_entropy:
        res["entropy_sum"] = jnp.sum(out["entropy"][:b] * batch["loss_mask"])
    return res


def sequence_sums(model, params, batch, cfg: StepConfig, *, with_entropy=False):
    """Per-sequence log-prob sums (and lengths, token counts) for the batch's layout."""
    if "kl_input_ids" in batch:
        return _unpaired(model, params, batch, cfg, with_entropy=with_entropy)
    if cfg.layout == "padded":
        return _sides_padded(model, params, batch, cfg, with_entropy=with_entropy)
    return _sides_rows(model, params, batch, cfg, with_entropy=with_entropy)


_FIELDS = tuple(EXTRA_KEYS.values())  # the batch keys of the records' extra columns
_TOKEN_FIELDS = ("chosen_loss_mask", "rejected_loss_mask", "chosen_weights", "rejected_weights")


def preference_loss(model, loss, cfg: StepConfig, params, ref_params, loss_state, batch):
    """(scalar loss, (metrics, new loss_state)) of one micro-batch."""
    hp = dict(cfg.hparams)
    use_ref = loss.uses_reference and cfg.reference != "none"
    if cfg.kl is not None:  # policy, reference and their KL in one pass over the output projection
        pol = _sides_padded(model, params, batch, cfg, with_entropy=cfg.with_entropy, ref_params=ref_params)
        ref = pol.pop("ref")
    else:
        pol = sequence_sums(model, params, batch, cfg, with_entropy=cfg.with_entropy)
        if use_ref and cfg.reference == "precomputed":
            ref = {"chosen": batch["ref_chosen_logps"], "rejected": batch["ref_rejected_logps"]}
        elif use_ref:
            ref = jax.lax.stop_gradient(sequence_sums(model, ref_params, batch, cfg))
        else:
            ref = None
    fields = {k: batch[k] for k in _FIELDS if k in batch and k in loss.needs + loss.accepts}
    mix = loss if isinstance(loss, losses_lib.Mixture) else losses_lib.Mixture((loss,), (1.0,))
    state_in = loss_state or None
    if loss.kind == "unpaired":
        kl = losses_lib.kto_kl(pol["kl"], ref["kl"]) if "kl" in loss.needs else None
        if kl is not None:
            fields["kl"] = kl
        out = mix(pol["main"], ref["main"], **hp, **fields, loss_state=state_in)
        rho = pol["main"] - ref["main"]
        label = batch["label"].astype(bool)
        n_pos, n_neg = jnp.maximum(jnp.sum(label), 1), jnp.maximum(jnp.sum(~label), 1)
        metrics = {
            "rewards/chosen": jnp.sum(jnp.where(label, out.rewards, 0.0)) / n_pos,
            "rewards/rejected": jnp.sum(jnp.where(label, 0.0, out.rewards)) / n_neg,
            "logps/chosen": jnp.sum(jnp.where(label, pol["main"], 0.0)) / n_pos,
            "logps/rejected": jnp.sum(jnp.where(label, 0.0, pol["main"])) / n_neg,
            "rewards/chosen_positive": jnp.sum(jnp.where(label, rho > 0, False)) / n_pos,
            "rewards/rejected_negative": jnp.sum(jnp.where(label, False, rho < 0)) / n_neg,
        }
        if kl is not None:
            metrics["kl"] = kl
    else:
        for key in ("chosen_lengths", "rejected_lengths"):
            if key in loss.needs + loss.accepts:
                fields[key] = pol[key]
        side = "_tok" if cfg.token_level else ""  # token-level losses take [B, T] and the masks
        if cfg.token_level:
            fields |= {k: batch[k] for k in _TOKEN_FIELDS if k in batch}
        if cfg.kl is not None:
            fields |= {"chosen_kl": pol["chosen_kl"], "rejected_kl": pol["rejected_kl"]}
        rc, rr = (ref["chosen" + side], ref["rejected" + side]) if ref is not None else (None, None)
        weights = pol.get("wpo")
        out = mix(
            pol["chosen" + side],
            pol["rejected" + side],
            rc,
            rr,
            **hp,
            **fields,
            loss_state=state_in,
            example_weights=weights,
        )
        cr, rj = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "rewards/chosen": jnp.mean(cr),
            "rewards/rejected": jnp.mean(rj),
            "rewards/accuracies": jnp.mean((cr > rj).astype(jnp.float32)),
            "rewards/margins": jnp.mean(cr - rj),
            "logps/chosen": jnp.mean(pol["chosen"]),
            "logps/rejected": jnp.mean(pol["rejected"]),
        }
        if ref is not None:
            c_pos, r_neg = pol["chosen"] - ref["chosen"] > 0, pol["rejected"] - ref["rejected"] < 0
            metrics["rewards/chosen_positive"] = jnp.mean(c_pos.astype(jnp.float32))
            metrics["rewards/rejected_negative"] = jnp.mean(r_neg.astype(jnp.float32))
    metrics |= out.metrics or {}
    metrics |= {
        "tokens": pol["tokens"],
        "entropy_sum": pol.get("entropy_sum", 0.0),
        "loss_tokens": pol["loss_tokens"],
    }
    loss_value = jnp.mean(out.loss)
    return loss_value, (metrics, out.loss_state or {})


def sft_loss(model, cfg: StepConfig, params, batch):
    """Token-mean NLL of the chosen completions: the SFT objective."""
    out = token_logps(
        model, params, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"],
        chunk_size=cfg.chunk_size, with_entropy=cfg.with_entropy,
    )  # fmt: skip
    n = jnp.maximum(jnp.sum(out["lengths"]), 1.0)
    loss = -jnp.sum(out["logps"]) / n
    metrics = {"tokens": jnp.sum(batch["chosen_attention_mask"]), "loss_tokens": jnp.sum(out["lengths"])}
    if cfg.with_entropy:
        metrics["entropy_sum"] = jnp.sum(out["entropy"] * batch["chosen_loss_mask"])
    return loss, (metrics, {})


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _micro(batch, A, k):
    return jax.tree.map(lambda x: x[k::A], batch) if A > 1 else batch


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(model, loss, tx, lr_schedule, cfg: StepConfig):
    """`step(state, batch) -> (state, metrics)`; jit it with shardings (see apo_jax.train.loop)."""

    def loss_fn(params, state: TrainState, batch):
        if cfg.mode == "sft":
            return sft_loss(model, cfg, params, batch)
        return preference_loss(model, loss, cfg, params, state.ref_params, state.loss_state, batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
        A = cfg.grad_accum
        loss_state = state.loss_state
        grads, total, metrics = None, 0.0, None
        for k in range(A):  # unrolled: A is small, and each micro-batch is a strided slice
            (value, (m, loss_state)), g = grad_fn(
                state.params, state.replace(loss_state=loss_state), _micro(batch, A, k)
            )
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            total = total + value
            metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
        grads = jax.tree.map(lambda g: g / A, grads)
        loss_value = total / A
        summed = {"tokens", "loss_tokens", "entropy_sum"}
        metrics = {k: (v if k in summed else v / A) for k, v in metrics.items()}
        grad_norm = _global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm) & _all_finite(metrics)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        ref_params = state.ref_params
        if cfg.reference == "sync":  # TR-DPO: every τ steps, ref ← α·policy + (1 − α)·ref
            due = ok & ((state.step + 1) % cfg.sync_steps == 0)
            a = cfg.mixup_alpha
            ref_params = jax.tree.map(
                lambda p, r: jnp.where(due, a * p + (1 - a) * r, r).astype(r.dtype), params, ref_params
            )
        new = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ref_params=ref_params,
            loss_state=keep(loss_state, state.loss_state) if state.loss_state else state.loss_state,
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
            nonfinite_run=jnp.where(ok, 0, state.nonfinite_run + 1),
        )
        entropy = metrics.pop("entropy_sum") / jnp.maximum(metrics["loss_tokens"], 1.0)
        metrics |= {
            "loss": loss_value,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "skipped": (~ok).astype(jnp.int32),
        }
        if cfg.with_entropy:
            metrics["entropy"] = entropy
        return new, metrics

    return step


def make_eval_step(model, cfg: StepConfig, beta: float):
    """Held-out log-likelihoods and rewards (APO paper, Figure 4): `eval(state, batch) -> metrics`.
    For losses with a `kl` (TDPO, TIS-DPO's token-level variant), also each side's summed
    per-position KL, `eval/kl/chosen` and `eval/kl/rejected` (TDPO's sequential KL curves)."""

    def evaluate(state: TrainState, batch, ref=None):
        kl = cfg.kl is not None and bool(state.ref_params) and cfg.layout == "padded"
        if kl:  # the policy, the reference and their KL in one pass
            ref_params = state.ref_params
            pol = _sides_padded(model, state.params, batch, cfg, with_entropy=False, ref_params=ref_params)
            ref = pol.pop("ref")
        else:
            pol = sequence_sums(model, state.params, batch, cfg)
            if cfg.reference == "precomputed":
                ref = {"chosen": batch["ref_chosen_logps"], "rejected": batch["ref_rejected_logps"]}
            elif state.ref_params:
                ref = sequence_sums(model, state.ref_params, batch, cfg)
        out = {"eval/logps/chosen": jnp.mean(pol["chosen"]), "eval/logps/rejected": jnp.mean(pol["rejected"])}
        if kl:
            for side in ("chosen", "rejected"):
                out[f"eval/kl/{side}"] = jnp.mean(jnp.sum(pol[f"{side}_kl"] * batch[f"{side}_loss_mask"], -1))
        if ref is not None:
            cr, rj = beta * (pol["chosen"] - ref["chosen"]), beta * (pol["rejected"] - ref["rejected"])
            out |= {
                "eval/rewards/chosen": jnp.mean(cr),
                "eval/rewards/rejected": jnp.mean(rj),
                "eval/rewards/accuracies": jnp.mean((cr > rj).astype(jnp.float32)),
                "eval/rewards/margins": jnp.mean(cr - rj),
            }
        return out

    return evaluate

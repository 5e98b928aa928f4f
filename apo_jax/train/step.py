"""The train step: `step(state, batch) -> (state, metrics)`, built from parts and jitted once.

`forward` runs the policy (and the reference: frozen/synced parameters, LoRA's base, precomputed in
the batch, or none) over the batch in its layout and returns a `Forward` of per-completion sums (optionally
LD-DPO's `ld_alpha` aggregation), lengths, and what the loss asks for (token log-probs, the
per-position KL, WPO weights). `apply_loss` feeds it to the configured loss (`apo_jax.losses`,
one or a weighted mix, built with its hyperparameters bound), `trl_metrics` names the results as
TRL does, and the train step accumulates gradients over micro-batches and applies the optax
update, skipped when the loss or gradients are not finite. The eval step shares all three.

Micro-batch k of a global batch of G rows with A accumulation steps is rows k, k + A, k + 2A, ...
so that each micro-batch draws evenly from every device's shard (no data movement); the A
micro-batches run in one `lax.scan`. Packed and prompt-shared batches are built per micro-batch
by the reader (`PreferenceReader(grad_accum=A)`), so their row indices hold within each. Batch-coupled
losses (aot, dr_dpo, sft, alpha_dpo, KTO's reference point) see one whole micro-batch across all
devices; gradient accumulation therefore changes them, and TRL, which sorts `aot` per device,
differs from apo_jax on more than one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from apo_jax import losses as losses_lib
from apo_jax.data.layouts import EXTRA_KEYS, PADDED, PROMPT_SHARED, sequence_logps
from apo_jax.models import lora, token_logps
from apo_jax.train.state import TrainState, trainable, with_trainable

# where the reference log-probs come from (apo_jax.train.setup.reference_source decides, once per run)
REFERENCES = ("none", "precomputed", "frozen", "base", "sync")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How the step runs, all static; what the loss needs it asks the loss."""

    mode: str = "preference"  # preference | sft
    layout: str = PADDED  # apo_jax.data.layouts.LAYOUTS
    grad_accum: int = 1
    reference: str = "frozen"  # one of REFERENCES
    sync_steps: int = 512
    mixup_alpha: float = 0.6
    ld_alpha: float | None = None  # LD-DPO's aggregation of the per-completion log-probs
    use_weighting: bool = False  # WPO's per-pair weights
    chunk_size: int = 256
    with_entropy: bool = True


class Logps(NamedTuple):
    """One model's log-probs of a paired batch's completions."""

    chosen: jax.Array  # [B] summed over the completion (LD-DPO's aggregate with ld_alpha)
    rejected: jax.Array  # [B]
    chosen_tokens: jax.Array | None = None  # [B, T] per token, for token-level losses
    rejected_tokens: jax.Array | None = None


class Unpaired(NamedTuple):
    """One model's log-probs of an unpaired (KTO) batch."""

    completion: jax.Array  # [B] summed over each completion
    mismatched: jax.Array  # [B] over the mismatched completions of KTO's reference point


class Forward(NamedTuple):
    """The policy's (and reference's) results on one batch: all a loss and its metrics read."""

    policy: Logps | Unpaired
    reference: Logps | Unpaired | None
    tokens: jax.Array  # [] attended tokens of the batch
    loss_tokens: jax.Array  # [] completion tokens
    entropy_sum: jax.Array | float = 0.0  # [] the policy's entropy summed over completion tokens
    chosen_lengths: jax.Array | None = None  # [B] completion token counts (paired)
    rejected_lengths: jax.Array | None = None
    chosen_kl: jax.Array | None = None  # [B, T] per-position KL (`Loss.kl`), from the joint pass
    rejected_kl: jax.Array | None = None
    wpo: jax.Array | None = None  # [B] WPO weights (use_weighting)


def _stacked_logps(model, params, batch, cfg: StepConfig, first: str, second: str, **kw):
    """(token_logps' outputs, attention mask, loss mask) of two row groups of the batch (by key prefix)
    stacked into one forward."""
    ids, attn, loss_mask = (
        jnp.concatenate([batch[f"{first}{k}"], batch[f"{second}{k}"]])
        for k in ("input_ids", "attention_mask", "loss_mask")
    )
    return token_logps(model, params, ids, attn, loss_mask, chunk_size=cfg.chunk_size, **kw), attn, loss_mask


def _paired_padded(
    model,
    params,
    batch,
    cfg: StepConfig,
    *,
    tokens,
    with_entropy,
    weights,
    ref_params=None,
    kl=None,
    rng=None,
) -> Forward:
    """Chosen and rejected from the padded layout in one forward of [2b, T]. With `ref_params` and
    `kl`, the same pass over the output projection also gives the reference and the KL."""
    out, attn, loss_mask = _stacked_logps(
        model,
        params,
        batch,
        cfg,
        "chosen_",
        "rejected_",
        with_entropy=with_entropy,
        with_sum_sq=weights,
        ref_params=ref_params,
        kl=kl,
        dropout_rng=rng,
    )
    b = batch["chosen_input_ids"].shape[0]
    c_mask, r_mask = batch["chosen_loss_mask"], batch["rejected_loss_mask"]
    tok = out["token_logps"]
    if cfg.ld_alpha is not None:
        sums = losses_lib.ld_aggregate(tok[:b], c_mask, tok[b:], r_mask, cfg.ld_alpha)
    else:
        sums = out["logps"][:b], out["logps"][b:]
    policy = Logps(*sums, *((tok[:b], tok[b:]) if tokens else ()))
    fwd = Forward(
        policy,
        None,
        tokens=jnp.sum(attn),
        loss_tokens=jnp.sum(loss_mask),
        chosen_lengths=out["lengths"][:b],
        rejected_lengths=out["lengths"][b:],
    )
    if with_entropy:
        fwd = fwd._replace(entropy_sum=jnp.sum(out["entropy"] * loss_mask))
    if weights:
        lss = out["log_sum_sq_probs"]
        fwd = fwd._replace(wpo=losses_lib.wpo_weights(tok[:b], lss[:b], c_mask, tok[b:], lss[b:], r_mask))
    if kl is not None:
        ref, ref_tok = out["ref_logps"], out["ref_token_logps"]
        fwd = fwd._replace(
            reference=Logps(ref[:b], ref[b:], ref_tok[:b], ref_tok[b:]),
            chosen_kl=out["kl"][:b],
            rejected_kl=out["kl"][b:],
        )
    return fwd


def _paired_rows(model, params, batch, cfg: StepConfig, *, with_entropy, rng=None) -> Forward:
    """The same from packed or prompt-shared rows, summed per sequence by (row, segment)."""
    shared = 1 if cfg.layout == PROMPT_SHARED else None
    out = token_logps(
        model,
        params,
        batch["input_ids"],
        batch["attention_mask"],
        batch["loss_mask"],
        batch["segment_ids"],
        batch["positions"],
        chunk_size=cfg.chunk_size,
        with_entropy=with_entropy,
        shared_segment=shared,
        dropout_rng=rng,
    )
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    sums, lengths = {}, {}
    for side in ("chosen", "rejected"):
        index = batch[f"{side}_index"]
        sums[side] = sequence_logps(out["token_logps"], mask, seg, index)
        lengths[side] = sequence_logps(jnp.ones_like(mask), mask, seg, index)
    return Forward(
        Logps(sums["chosen"], sums["rejected"]),
        None,
        tokens=jnp.sum(batch["attention_mask"]),
        loss_tokens=jnp.sum(mask),
        entropy_sum=jnp.sum(out["entropy"] * mask) if with_entropy else 0.0,
        chosen_lengths=lengths["chosen"],
        rejected_lengths=lengths["rejected"],
    )


def _unpaired(model, params, batch, cfg: StepConfig, *, with_entropy, rng=None) -> Forward:
    out, attn, loss_mask = _stacked_logps(
        model, params, batch, cfg, "", "kl_", with_entropy=with_entropy, dropout_rng=rng
    )
    b = batch["input_ids"].shape[0]
    return Forward(
        Unpaired(out["logps"][:b], out["logps"][b:]),
        None,
        tokens=jnp.sum(attn[:b]),
        loss_tokens=jnp.sum(batch["loss_mask"]),
        entropy_sum=jnp.sum(out["entropy"][:b] * batch["loss_mask"]) if with_entropy else 0.0,
    )


def sequence_sums(
    model, params, batch, cfg: StepConfig, *, tokens=False, with_entropy=False, weights=False, rng=None
) -> Forward:
    """One model's per-sequence log-prob sums (and lengths, token counts) for the batch's layout;
    `tokens` adds the [B, T] token log-probs (padded layout), `weights` WPO's weights, `rng` LoRA's
    dropout."""
    if "kl_input_ids" in batch:
        return _unpaired(model, params, batch, cfg, with_entropy=with_entropy, rng=rng)
    if cfg.layout == PADDED:
        return _paired_padded(
            model, params, batch, cfg, tokens=tokens, with_entropy=with_entropy, weights=weights, rng=rng
        )
    return _paired_rows(model, params, batch, cfg, with_entropy=with_entropy, rng=rng)


def forward(
    model, loss, cfg: StepConfig, params, ref_params, batch, *, with_entropy=False, rng=None
) -> Forward:
    """The policy and, when the loss uses one, the reference on `batch`: what `loss` asks for
    (token log-probs, the per-position KL, lengths), shared by the train and eval steps. `rng`:
    LoRA's dropout in the policy's pass (training)."""
    tokens = loss.granularity == "token"
    if cfg.reference == "base":  # LoRA: the reference is the base, adapters off
        ref_params = lora.base(params)
    elif cfg.reference in ("frozen", "sync") and loss.uses_reference and not ref_params:
        raise ValueError(
            f"StepConfig.reference={cfg.reference!r} but no reference parameters were given "
            "(a LoRA run's reference is 'base': the adapters off)"
        )
    common = {"tokens": tokens, "with_entropy": with_entropy, "weights": cfg.use_weighting, "rng": rng}
    if loss.kl is not None and ref_params:  # policy, reference and their KL in one pass
        return _paired_padded(model, params, batch, cfg, ref_params=ref_params, kl=loss.kl, **common)
    fwd = sequence_sums(model, params, batch, cfg, **common)
    if not loss.uses_reference or cfg.reference == "none":
        return fwd
    if cfg.reference == "precomputed":
        return fwd._replace(reference=Logps(batch["ref_chosen_logps"], batch["ref_rejected_logps"]))
    ref = sequence_sums(model, ref_params, batch, cfg, tokens=tokens).policy
    return fwd._replace(reference=jax.lax.stop_gradient(ref))


_FIELDS = tuple(EXTRA_KEYS.values())  # the batch keys of the records' extra columns
_TOKEN_FIELDS = ("chosen_loss_mask", "rejected_loss_mask", "chosen_weights", "rejected_weights")


def apply_loss(loss, fwd: Forward, batch, loss_state=None) -> losses_lib.LossOutput:
    """The loss (hyperparameters bound) on a `Forward`, with the batch fields it takes."""
    taken = loss.needs + loss.accepts
    fields = {k: batch[k] for k in _FIELDS if k in batch and k in taken}
    mix = loss if isinstance(loss, losses_lib.Mixture) else losses_lib.Mixture((loss,), (1.0,))
    pol, ref = fwd.policy, fwd.reference
    if loss.kind == "unpaired":
        if "kl" in loss.needs:
            fields["kl"] = losses_lib.kto_kl(pol.mismatched, ref.mismatched)
        return mix(pol.completion, ref.completion, **fields, loss_state=loss_state or None)
    fields |= {k: getattr(fwd, k) for k in ("chosen_lengths", "rejected_lengths") if k in taken}
    if loss.granularity == "token":  # [B, T] log-probs with their masks and weights
        fields |= {k: batch[k] for k in _TOKEN_FIELDS if k in batch}
        pol, ref = (pol.chosen_tokens, pol.rejected_tokens), ref and (ref.chosen_tokens, ref.rejected_tokens)
    if loss.kl is not None:
        fields |= {"chosen_kl": fwd.chosen_kl, "rejected_kl": fwd.rejected_kl}
    rc, rr = (None, None) if ref is None else ref[:2]
    return mix(*pol[:2], rc, rr, **fields, loss_state=loss_state or None, example_weights=fwd.wpo)


def trl_metrics(loss, fwd: Forward, out: losses_lib.LossOutput, batch) -> dict[str, jax.Array]:
    """TRL's `rewards/*` and `logps/*` of one batch, the loss's own metrics (`nll_loss`, `kl`, ...)."""
    pol, ref = fwd.policy, fwd.reference
    if loss.kind == "unpaired":
        rho = pol.completion - ref.completion
        label = batch["label"].astype(bool)
        n_pos, n_neg = jnp.maximum(jnp.sum(label), 1), jnp.maximum(jnp.sum(~label), 1)
        metrics = {
            "rewards/chosen": jnp.sum(jnp.where(label, out.rewards, 0.0)) / n_pos,
            "rewards/rejected": jnp.sum(jnp.where(label, 0.0, out.rewards)) / n_neg,
            "logps/chosen": jnp.sum(jnp.where(label, pol.completion, 0.0)) / n_pos,
            "logps/rejected": jnp.sum(jnp.where(label, 0.0, pol.completion)) / n_neg,
            "rewards/chosen_positive": jnp.sum(jnp.where(label, rho > 0, False)) / n_pos,
            "rewards/rejected_negative": jnp.sum(jnp.where(label, False, rho < 0)) / n_neg,
        }
        return metrics | (out.metrics or {})  # KTO's reports its reference point as `kl`
    cr, rj = out.chosen_rewards, out.rejected_rewards
    metrics = {
        "rewards/chosen": jnp.mean(cr),
        "rewards/rejected": jnp.mean(rj),
        "rewards/accuracies": jnp.mean((cr > rj).astype(jnp.float32)),
        "rewards/margins": jnp.mean(cr - rj),
        "logps/chosen": jnp.mean(pol.chosen),
        "logps/rejected": jnp.mean(pol.rejected),
    }
    if ref is not None:
        c_pos, r_neg = pol.chosen - ref.chosen > 0, pol.rejected - ref.rejected < 0
        metrics["rewards/chosen_positive"] = jnp.mean(c_pos.astype(jnp.float32))
        metrics["rewards/rejected_negative"] = jnp.mean(r_neg.astype(jnp.float32))
    return metrics | (out.metrics or {})


def preference_loss(model, loss, cfg: StepConfig, params, ref_params, loss_state, batch, rng=None):
    """(scalar loss, (metrics, new loss_state)) of one micro-batch."""
    fwd = forward(model, loss, cfg, params, ref_params, batch, with_entropy=cfg.with_entropy, rng=rng)
    out = apply_loss(loss, fwd, batch, loss_state)
    metrics = trl_metrics(loss, fwd, out, batch)
    metrics |= {"tokens": fwd.tokens, "entropy_sum": fwd.entropy_sum, "loss_tokens": fwd.loss_tokens}
    return jnp.mean(out.loss), (metrics, out.loss_state or {})


def sft_loss(model, cfg: StepConfig, params, batch, rng=None):
    """Token-mean NLL of the chosen completions: the SFT objective."""
    out = token_logps(
        model,
        params,
        batch["chosen_input_ids"],
        batch["chosen_attention_mask"],
        batch["chosen_loss_mask"],
        chunk_size=cfg.chunk_size,
        with_entropy=cfg.with_entropy,
        dropout_rng=rng,
    )
    n = jnp.maximum(jnp.sum(out["lengths"]), 1.0)
    loss = -jnp.sum(out["logps"]) / n
    metrics = {"tokens": jnp.sum(batch["chosen_attention_mask"]), "loss_tokens": jnp.sum(out["lengths"])}
    if cfg.with_entropy:
        metrics["entropy_sum"] = jnp.sum(out["entropy"] * batch["chosen_loss_mask"])
    return loss, (metrics, {})


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def micro_batches(batch, A: int):
    """[G, ...] -> [A, G/A, ...]: micro-batch k is rows k, k + A, k + 2A, ... Each device's
    contiguous shard of rows splits in place, so no data moves between devices."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)


def _accumulate(grad_fn, train, state: TrainState, batch, A: int, rng=None):
    """((summed loss, summed metrics, loss_state), summed grads of `train`) over the A micro-batches of
    `batch`: one `lax.scan`, so the step body is traced and compiled once whatever A is (MaxText's
    gradient accumulation). The loss state (alpha-DPO's running statistics) flows through them;
    micro-batch k's dropout key is `rng` folded with k."""
    if A == 1:
        (value, (metrics, loss_state)), grads = grad_fn(train, state, batch, rng)
        return (value, metrics, loss_state), grads
    micro = micro_batches(batch, A)
    shapes = jax.eval_shape(grad_fn, train, state, jax.tree.map(lambda x: x[0], micro), rng)
    (value, (metrics, _)), grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
        mb, k = xs
        (total, summed, loss_state), grads = carry
        key = None if rng is None else jax.random.fold_in(rng, k)
        (value, (m, loss_state)), g = grad_fn(train, state.replace(loss_state=loss_state), mb, key)
        add = functools.partial(jax.tree.map, jnp.add)
        return ((total + value, add(summed, m), loss_state), add(grads, g)), None

    carry, _ = jax.lax.scan(body, ((value, metrics, state.loss_state), grads), (micro, jnp.arange(A)))
    return carry


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(model, loss, tx, lr_schedule, cfg: StepConfig):
    """`step(state, batch) -> (state, metrics)`; jit it with shardings (see apo_jax.train.loop).
    Gradients, clipping and the update cover what `trainable` gives: the LoRA adapters when the
    params hold them (the frozen base gets no gradient at all), else every parameter."""

    def loss_fn(train, state: TrainState, batch, rng):
        params = with_trainable(state.params, train)
        if cfg.mode == "sft":
            return sft_loss(model, cfg, params, batch, rng)
        return preference_loss(model, loss, cfg, params, state.ref_params, state.loss_state, batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
        A = cfg.grad_accum
        train = trainable(state.params)
        rng = None  # LoRA's dropout: a key per step (and micro-batch) from the state's, so resumes replay it
        if model.config.lora is not None and model.config.lora.dropout:
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (total, metrics, loss_state), grads = _accumulate(grad_fn, train, state, batch, A, rng)
        grads = jax.tree.map(lambda g: g / A, grads)
        loss_value = total / A
        summed = {"tokens", "loss_tokens", "entropy_sum"}
        metrics = {k: (v if k in summed else v / A) for k, v in metrics.items()}
        grad_norm = _global_norm(grads)
        ok = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm) & _all_finite(metrics)

        def update(current):  # only on a finite step: no second copy of the state is held
            updates, opt_state = tx.update(grads, current[1], current[0])
            return optax.apply_updates(current[0], updates), opt_state

        train, opt_state = jax.lax.cond(ok, update, lambda current: current, (train, state.opt_state))
        params = with_trainable(state.params, train)

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
            params=params,
            opt_state=opt_state,
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


def make_eval_step(model, loss, cfg: StepConfig):
    """Held-out loss, rewards and log-likelihoods (APO paper, Figure 4), as the train step defines
    them for `loss`: `eval(state, batch) -> {"eval/loss", "eval/rewards/...", "eval/logps/...", ...}`.
    For losses with a `kl` (TDPO, TIS-DPO's token-level variant), `eval/kl/chosen` and
    `eval/kl/rejected` are each side's summed per-position KL, unweighted (TDPO's sequential KL)."""

    def evaluate(state: TrainState, batch):
        fwd = forward(model, loss, cfg, state.params, state.ref_params, batch)
        out = apply_loss(loss, fwd, batch, state.loss_state)
        metrics = {"loss": jnp.mean(out.loss)} | trl_metrics(loss, fwd, out, batch)
        if fwd.chosen_kl is not None:
            for side in ("chosen", "rejected"):
                kl = getattr(fwd, f"{side}_kl") * batch[f"{side}_loss_mask"]
                metrics[f"kl/{side}"] = jnp.mean(jnp.sum(kl, -1))
        return {"eval/" + k: v for k, v in metrics.items()}

    return evaluate

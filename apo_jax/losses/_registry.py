"""The loss registry: every objective by name, with what it needs from a batch.

A loss is a pure function of log-probabilities. `register` wraps it in a `Loss`, which reads
the function's keyword-only parameters to know which batch fields it needs (a fixed vocabulary,
`BATCH_FIELDS`) and which hyperparameters it takes (everything else, with its default), checks
hyperparameter names and values before the function runs, and leaves the arithmetic alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Per-example arrays a loss may take beside the log-probs. Dataset columns `timestamp` and
# `score` arrive as `timestamps` and `scores` (DESIGN.md, "Field names across stages").
BATCH_FIELDS = (
    "chosen_lengths",  # [B] completion token counts of the chosen answers
    "rejected_lengths",  # [B]
    "chosen_loss_mask",  # [B, T] token-level losses: 1 on completion tokens
    "rejected_loss_mask",  # [B, T]
    "chosen_weights",  # [B, T] token-level losses: per-token weights
    "rejected_weights",  # [B, T]
    "chosen_kl",  # [B, T] token-level losses: KL between policy and reference at each position
    "rejected_kl",  # [B, T] (which KL: the loss's `kl`)
    "is_tie",  # [B] bool, TODO
    "timestamps",  # [B] int, NS-DPO
    "scores",  # [B] float in [0, 1], UNA score feedback
    "label",  # [B] bool, unpaired losses: True = desirable
    "kl",  # [] KTO's reference point z0 (see `kto_kl`)
)
DEFAULT_BETA = 0.1  # TRL's DPOConfig/KTOConfig/CPOConfig default


class LossOutput(NamedTuple):
    """What every loss returns (a pytree, so it passes through `jax.jit`).

    Attributes:
      loss: [B] per-example losses; their mean is the batch loss (for batch-coupled losses
        the per-example split is a convention, the mean is exact).
      chosen_rewards: [B] β·(policy − reference) log-prob of the chosen answer, gradient
        stopped (β·length-averaged policy log-prob for reference-free losses). Paired only.
      rejected_rewards: [B] the same for the rejected answer. Paired only.
      rewards: [B] β·(policy − reference) log-prob of the one completion. Unpaired only.
      loss_state: the new running state of a stateful loss (alpha-DPO), else None.
      metrics: scalar diagnostics under TRL's metric names (e.g. `nll_loss`, `kl`), or None.
    """

    loss: jax.Array
    chosen_rewards: jax.Array | None = None
    rejected_rewards: jax.Array | None = None
    rewards: jax.Array | None = None
    loss_state: Any = None
    metrics: dict[str, jax.Array] | None = None


Check = tuple[Callable[[Any], bool], str]


@dataclasses.dataclass(frozen=True, eq=False)
class Loss:
    """A registered objective: call it like the function it wraps.

    Attributes:
      name: the registry name (TRL's `loss_type` where TRL has the loss).
      fn: the pure function.
      kind: "paired" (chosen and rejected log-probs) or "unpaired" (one completion + label).
      granularity: "sequence" ([B] summed completion log-probs plus lengths) or "token"
        ([B, T] per-token log-probs plus `*_loss_mask`).
      uses_reference: False when the reference log-probs are ignored (the trainer may then
        skip the reference forward and pass None).
      needs: batch fields that must be passed (see `BATCH_FIELDS`).
      accepts: batch fields that may be passed.
      hparams: hyperparameter name -> default (`beta` included).
      batch_coupled: the value of one example depends on the others in the micro-batch.
      stateful: takes `loss_state=` and returns the new state; see `init_state`.
      f_divergence: supports TRL's `f_divergence_type`.
      paper: where the formula comes from.
      aliases: other registry names of the same loss.
      kl: for losses that take `chosen_kl`/`rejected_kl`, which per-position KL the trainer
        computes: "ref_policy" = KL(π_ref ‖ π) or "policy_ref" = KL(π ‖ π_ref); else None.
      logp_names: the log-prob arguments in order, which may also be passed by these names.
      bound: hyperparameters fixed by `bind` (validated then); keywords at call time override them.
    """

    name: str
    fn: Callable[..., LossOutput]
    kind: str
    granularity: str
    uses_reference: bool
    needs: tuple[str, ...]
    accepts: tuple[str, ...]
    hparams: Mapping[str, Any]
    batch_coupled: bool
    stateful: bool
    f_divergence: bool
    paper: str
    checks: Mapping[str, Check]
    state_init: Callable[[], Any] | None = None
    aliases: tuple[str, ...] = ()
    kl: str | None = None
    logp_names: tuple[str, ...] = ()
    bound: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "__doc__", self.fn.__doc__)  # the formula, for help()

    def init_state(self):
        """The initial `loss_state` of a stateful loss (None for the others)."""
        return None if self.state_init is None else self.state_init()

    def bind(self, **hparams) -> Loss:
        """This loss with `hparams` fixed, checked once here: what a trainer builds from its config
        and then calls with log-probs and batch fields only."""
        self.validate(**hparams)
        return dataclasses.replace(self, bound={**self.bound, **hparams})

    def validate(self, **hparams) -> None:
        """Raises ValueError naming any unknown or out-of-range hyperparameter."""
        if not self.f_divergence:
            # TRL's configs always carry the default; other divergences only some losses take
            f_div = hparams.pop("f_divergence_type", "reverse_kl")
            hparams.pop("f_alpha_divergence_coef", None)
            if f_div != "reverse_kl":
                raise ValueError(
                    f"f_divergence_type={f_div!r} is not supported by loss {self.name!r}; "
                    f"TRL allows it only for {sorted(F_DIVERGENCE_LOSSES)}"
                )
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} got unknown hyperparameter(s) {unknown}; it takes {sorted(self.hparams)}"
            )
        for key, value in hparams.items():
            check(self.name, key, value, self.checks.get(key))

    def __call__(self, *logps, **kwargs) -> LossOutput:
        """`loss(policy_chosen_logps, ..., beta=0.1, ...)`: the log-probs positionally or by their
        names (`logp_names`), batch fields and hyperparameters by keyword."""
        named = {k: kwargs.pop(k) for k in self.logp_names if k in kwargs}
        if named:
            rest = self.logp_names[len(logps) :]
            missing = [k for k in rest if k not in named]
            if missing or len(named) != len(rest):
                raise ValueError(
                    f"loss {self.name!r} takes the log-probs {list(self.logp_names)}: {len(logps)} given "
                    f"by position, {sorted(named)} by name, {missing} missing"
                )
            logps = (*logps, *(named[k] for k in rest))
        fields = {k: v for k, v in kwargs.items() if k in BATCH_FIELDS or k == "loss_state"}
        given = {k: v for k, v in kwargs.items() if k not in fields}
        missing = [f for f in self.needs if fields.get(f) is None]
        if missing:
            raise ValueError(f"loss {self.name!r} needs batch field(s) {missing}")
        extra = sorted(set(fields) - set(self.needs) - set(self.accepts) - {"loss_state"})
        if extra:
            raise ValueError(
                f"loss {self.name!r} does not take batch field(s) {extra}; "
                f"it takes {sorted(self.needs + self.accepts)}"
            )
        self.validate(**given)  # the bound ones were checked by `bind`
        hparams = {**self.bound, **given}
        if "beta" not in hparams:
            raise ValueError(f"loss {self.name!r} needs the keyword argument 'beta'")
        if not self.f_divergence:
            hparams.pop("f_divergence_type", None)
            hparams.pop("f_alpha_divergence_coef", None)
        if self.stateful:
            if fields.get("loss_state") is None:
                fields["loss_state"] = self.init_state()
        else:
            fields.pop("loss_state", None)
        return self.fn(*logps, **fields, **hparams)


F_DIVERGENCE_LOSSES: set[str] = set()
_REGISTRY: dict[str, Loss] = {}
_BETA_CHECK: Check = (lambda b: b > 0, "must be > 0")


def check(loss_name: str, key: str, value: Any, rule: Check | None) -> None:
    """Applies one (predicate, message) rule to a concrete hyperparameter value."""
    if rule is None:
        return
    predicate, message = rule
    try:
        ok = bool(predicate(value))
    except jax.errors.ConcretizationTypeError:
        return  # a traced value (a scheduled beta, say) is checked where it is made
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"loss {loss_name!r}: hyperparameter {key}={value!r} {message}")


def register(
    name: str,
    *,
    paper: str,
    kind: str = "paired",
    granularity: str = "sequence",
    uses_reference: bool = True,
    batch_coupled: bool = False,
    checks: Mapping[str, Check] | None = None,
    state_init: Callable[[], Any] | None = None,
    aliases: tuple[str, ...] = (),
    kl: str | None = None,
) -> Callable[[Callable[..., LossOutput]], Loss]:
    """Decorator: registers `fn` under `name` (and `aliases`) and returns its `Loss`."""

    def wrap(fn: Callable[..., LossOutput]) -> Loss:
        params = inspect.signature(fn).parameters.values()
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        needs = tuple(p.name for p in keyword if p.name in BATCH_FIELDS and p.default is p.empty)
        accepts = tuple(p.name for p in keyword if p.name in BATCH_FIELDS and p.default is not p.empty)
        hparams = {
            p.name: (DEFAULT_BETA if p.name == "beta" else p.default)
            for p in keyword
            if p.name not in BATCH_FIELDS and p.name != "loss_state"
        }
        for p in keyword:
            if p.name in hparams and p.name != "beta" and p.default is p.empty:
                raise TypeError(f"{fn.__name__}: hyperparameter {p.name} needs a default")
        if (kl is not None) != ("chosen_kl" in needs) or kl not in (None, "ref_policy", "policy_ref"):
            raise TypeError(f"{fn.__name__}: kl={kl!r} must name the KL that its chosen_kl/rejected_kl hold")
        stateful = any(p.name == "loss_state" for p in keyword)
        f_div = "f_divergence_type" in hparams
        all_checks = {"beta": _BETA_CHECK, **(F_DIVERGENCE_CHECKS if f_div else {})}
        all_checks.update(checks or {})
        loss = Loss(
            name=name,
            fn=fn,
            kind=kind,
            granularity=granularity,
            uses_reference=uses_reference,
            needs=needs,
            accepts=accepts,
            hparams=hparams,
            batch_coupled=batch_coupled,
            stateful=stateful,
            f_divergence=f_div,
            paper=paper,
            checks=all_checks,
            state_init=state_init,
            aliases=aliases,
            kl=kl,
            logp_names=positional,
        )
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"loss name {key!r} registered twice")
            _REGISTRY[key] = loss
        if f_div:
            F_DIVERGENCE_LOSSES.add(name)
        return loss

    return wrap


F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_CHECKS: dict[str, Check] = {
    "f_divergence_type": (lambda v: v in F_DIVERGENCE_TYPES, f"must be one of {F_DIVERGENCE_TYPES}"),
    "f_alpha_divergence_coef": (lambda v: math.isfinite(v), "must be a finite number"),
}


def get(name: str) -> Loss:
    """The loss registered under `name`; ValueError listing the known names otherwise."""
    if name == "ld_dpo":
        raise ValueError(
            "LD-DPO is not a loss but a log-prob aggregation: keep a loss such as 'sigmoid' and set "
            "loss.ld_alpha (TRL's `ld_alpha`); see apo_jax.losses.ld_aggregate"
        )
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {names()}") from None


def names() -> list[str]:
    """Every registered name, aliases included, sorted."""
    return sorted(_REGISTRY)


def f32(*xs):
    """Casts arrays to float32 (None passes through): losses compute in float32."""
    out = tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)
    return out if len(out) > 1 else out[0]


def rewards(beta, policy, ref):
    """β·(policy − reference), gradient stopped: TRL's `rewards/*` values."""
    return jax.lax.stop_gradient(beta * (policy - ref))


def lengths(x):
    """Completion token counts as float32, at least 1 (TRL's `clamp(min=1)`)."""
    return jnp.maximum(jnp.asarray(x, jnp.float32), 1.0)

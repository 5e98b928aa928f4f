"""Weighted mixtures of losses: TRL's `loss_type=[...]` with `loss_weights=[...]`.

L = Σ_k w_k·L_k, per example. RPO is `build(["sigmoid", "sft"], [1.0, alpha])` (TRL 1.16 has
no `rpo_alpha`). Hyperparameters are shared by name, as in TRL: each part takes the ones it
declares. WPO weights (`example_weights`, see `wpo_weights`) multiply every part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp

from apo_jax.losses._registry import BATCH_FIELDS, Loss, LossOutput, get

_SORTING = ("aot", "aot_unpaired")


@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
    """Several registered losses with weights; called and inspected like a `Loss`."""

    parts: tuple[Loss, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        kinds = {p.kind for p in self.parts}
        grains = {p.granularity for p in self.parts}
        if len(kinds) > 1 or len(grains) > 1:
            raise ValueError(
                f"cannot mix losses {[p.name for p in self.parts]}: kinds {sorted(kinds)} and "
                f"granularities {sorted(grains)} must agree"
            )
        if len({p.kl for p in self.parts} - {None}) > 1:
            raise ValueError(f"cannot mix losses {[p.name for p in self.parts]}: they need different KLs")
        if len(self.weights) != len(self.parts):
            raise ValueError(
                f"loss weights {list(self.weights)} must have one entry per loss "
                f"{[p.name for p in self.parts]}"
            )
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"loss weights {list(self.weights)} must be finite")

    name = property(lambda self: "+".join(p.name for p in self.parts))
    kind = property(lambda self: self.parts[0].kind)
    granularity = property(lambda self: self.parts[0].granularity)
    uses_reference = property(lambda self: any(p.uses_reference for p in self.parts))
    batch_coupled = property(lambda self: any(p.batch_coupled for p in self.parts))
    stateful = property(lambda self: any(p.stateful for p in self.parts))
    f_divergence = property(lambda self: all(p.f_divergence for p in self.parts))
    needs = property(lambda self: tuple(dict.fromkeys(f for p in self.parts for f in p.needs)))
    kl = property(lambda self: next((p.kl for p in self.parts if p.kl is not None), None))

    @property
    def accepts(self):
        return tuple(dict.fromkeys(f for p in self.parts for f in p.accepts if f not in self.needs))

    @property
    def hparams(self):
        out = {}
        for p in self.parts:
            for key, default in p.hparams.items():
                out.setdefault(key, default)
        return out

    def init_state(self):
        """{part name: its initial state} for the stateful parts, or None."""
        states = {p.name: p.init_state() for p in self.parts if p.stateful}
        return states or None

    def bind(self, **hparams) -> Mixture:
        """The mixture with `hparams` fixed: each part bound to its share of them (`Loss.bind`)."""
        self._check_names(hparams)
        return dataclasses.replace(self, parts=tuple(p.bind(**_share(p, hparams)) for p in self.parts))

    def validate(self, **hparams) -> None:
        """Raises ValueError naming any hyperparameter no part takes, or an invalid value."""
        self._check_names(hparams)
        for p in self.parts:
            p.validate(**_share(p, hparams))

    def _check_names(self, hparams) -> None:
        unknown = sorted(set(hparams) - set(self.hparams) - {"f_divergence_type", "f_alpha_divergence_coef"})
        if unknown:
            raise ValueError(
                f"loss {self.name!r} got unknown hyperparameter(s) {unknown}; it takes {sorted(self.hparams)}"
            )

    def __call__(self, *logps, example_weights=None, loss_state=None, **kwargs) -> LossOutput:
        hparams = {k: v for k, v in kwargs.items() if k not in BATCH_FIELDS}
        fields = {k: v for k, v in kwargs.items() if k in BATCH_FIELDS}
        self._check_names(hparams)  # each part checks the values of its share when called
        if example_weights is not None and any(p.name in _SORTING for p in self.parts):
            raise ValueError(
                "WPO weighting (use_weighting) cannot be combined with 'aot' or 'aot_unpaired': "
                "they sort examples, which would misalign per-pair weights"
            )
        total, outputs, states = 0.0, [], {}
        for part, weight in zip(self.parts, self.weights, strict=True):
            taken = _share(part, hparams)
            taken.update({k: v for k, v in fields.items() if k in part.needs + part.accepts})
            if part.stateful:
                taken["loss_state"] = None if loss_state is None else loss_state.get(part.name)
            out = part(*logps, **taken)
            loss = out.loss if example_weights is None else out.loss * example_weights
            total = total + weight * loss
            outputs.append(out)
            if part.stateful:
                states[part.name] = out.loss_state
        metrics = {}
        for out in outputs:
            metrics.update(out.metrics or {})
        first = outputs[0]
        return LossOutput(
            loss=jnp.asarray(total),
            chosen_rewards=first.chosen_rewards,
            rejected_rewards=first.rejected_rewards,
            rewards=first.rewards,
            loss_state=states or None,
            metrics=metrics or None,
        )


def _share(part: Loss, hparams) -> dict:
    """The hyperparameters `part` takes (TRL shares them by name; f-divergence settings go to all)."""
    return {k: v for k, v in hparams.items() if k in part.hparams or k.startswith("f_")}


def build(name: str | Sequence[str], weights: Sequence[float] | None = None, **hparams) -> Loss | Mixture:
    """The loss for a config's `loss.name` and `loss.weights` (TRL's `loss_type`, `loss_weights`),
    with `hparams` (beta included) bound: `build("apo_zero", beta=0.1)(pc, pr, rc, rr)`.

    A single name with no weights is `get(name)` (bound when hparams are given); a list (or
    weights) gives a `Mixture`.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("loss.name is empty; give a loss name or a list of them")
    if isinstance(name, str) and weights is None:
        loss = get(name)
    else:
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        loss = Mixture(tuple(get(n) for n in names), tuple(weights))
    return loss.bind(**hparams) if hparams else loss

"""Preference objectives as pure, jittable functions of log-probabilities.

    loss = apo_jax.losses.get("apo_zero")
    out = loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    out.loss            # [B] per example; out.loss.mean() is the batch loss

`names()` lists every objective; each `Loss` says which batch fields it `needs`, whether it
`uses_reference`, its `granularity` and its `hparams` with defaults. `build(name_or_names,
weights)` gives TRL-style weighted mixtures. docs/papers.md indexes the papers.
"""

from apo_jax.losses import _batch, _pairwise, _recent, _reference_free, _ties, _token, _unpaired  # noqa: F401
from apo_jax.losses._combine import Mixture, build
from apo_jax.losses._registry import (
    BATCH_FIELDS,
    DEFAULT_BETA,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCE_TYPES,
    Loss,
    LossOutput,
    get,
    names,
)
from apo_jax.losses._token import (
    d2po_weights,
    ld_aggregate,
    mask_dpo_weights,
    tis_dpo_weights,
    wpo_weights,
)
from apo_jax.losses._unpaired import kto_kl

__all__ = [
    "BATCH_FIELDS",
    "DEFAULT_BETA",
    "F_DIVERGENCE_LOSSES",
    "F_DIVERGENCE_TYPES",
    "Loss",
    "LossOutput",
    "Mixture",
    "build",
    "d2po_weights",
    "get",
    "kto_kl",
    "ld_aggregate",
    "mask_dpo_weights",
    "names",
    "tis_dpo_weights",
    "wpo_weights",
]

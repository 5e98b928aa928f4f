"""CHES: centered hidden-embedding similarity of a pair, the predictor of likelihood displacement.

"Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization" (Razin et
al., arXiv 2410.08847; princeton-nlp/unintentional-unalignment `ches/ches.py`): with h_k the model's
last-layer hidden states at the positions that predict each answer token (the last prompt token
through the answer's second-to-last token), S+ = Σ_k h+_k and S- = Σ_k h-_k,

    CHES(x, y+, y-) = <S+, S-> - ||S+||²      (length-normalized: means instead of sums)

High CHES means the two answers look alike to the model, so pushing the rejected one down drags the
chosen one with it; the paper removes the highest-CHES pairs. CLAIR's minimal revisions are alike by
design: `python -m apo_jax.data.clair stats --model DIR` reports their CHES beside the baselines'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import models, sharding
from apo_jax.data import layouts


def _sums(model, params, ids, attention_mask, loss_mask):
    """Σ of the final hidden states at the positions that predict each answer token, and their count."""
    h = models.hidden_states(model, params, ids, attention_mask).astype(jnp.float32)
    # position t - 1 predicts token t: the predicting positions are the loss mask shifted left by one
    predicting = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
    return jnp.einsum("btd,bt->bd", h, predicting), predicting.sum(-1, keepdims=True)


def ches(model, params, batch) -> dict[str, jax.Array]:
    """[b] CHES scores of a padded batch (apo_jax.data.layouts.padded's keys): `ches` from the sums,
    `ches_norm` from the means, from one forward pass of each side."""
    sums, means = {}, {}
    for side in ("chosen", "rejected"):
        sums[side], count = _sums(
            model,
            params,
            batch[f"{side}_input_ids"],
            batch[f"{side}_attention_mask"],
            batch[f"{side}_loss_mask"],
        )
        means[side] = sums[side] / jnp.maximum(count, 1.0)
    return {
        name: jnp.sum(s["chosen"] * s["rejected"], -1) - jnp.sum(s["chosen"] ** 2, -1)
        for name, s in (("ches", sums), ("ches_norm", means))
    }


def ches_all(model_dir, records, *, batch_size: int = 8) -> dict[str, np.ndarray]:
    """{"ches", "ches_norm"}: [N] scores of tokenized records (prompt_ids, chosen_ids, rejected_ids)
    under a Hugging Face Llama, both from one pass."""
    model, params = models.from_hf(model_dir)
    score = jax.jit(sharding.on_mesh(lambda p, b: ches(model, p, b), sharding.mesh_of(params)))
    out = {"ches": [], "ches_norm": []}
    # lengths rounded to 16: a few shapes, a few compilations
    for batch, n in layouts.padded_batches(records, batch_size, multiple=16):
        for k, v in score(params, batch).items():
            out[k].append(np.asarray(v)[:n])
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}


def ches_scores(model_dir, records, *, batch_size: int = 8, normalized: bool = False) -> np.ndarray:
    """[N] CHES (or, `normalized`, its length-normalized variant) of tokenized records."""
    return ches_all(model_dir, records, batch_size=batch_size)["ches_norm" if normalized else "ches"]

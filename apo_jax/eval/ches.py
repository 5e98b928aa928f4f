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


def _sums(model, params, ids, attention_mask, loss_mask, normalized: bool):
    from apo_jax import models

    h = models.hidden_states(model, params, ids, attention_mask).astype(jnp.float32)
    # position t - 1 predicts token t: the predicting positions are the loss mask shifted left by one
    predicting = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
    s = jnp.einsum("btd,bt->bd", h, predicting)
    if normalized:
        s = s / jnp.maximum(predicting.sum(-1, keepdims=True), 1.0)
    return s


def ches(model, params, batch, *, normalized: bool = False) -> jax.Array:
    """[b] CHES scores of a padded batch (apo_jax.data.layouts.padded's keys)."""
    s = {
        side: _sums(model, params, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                    batch[f"{side}_loss_mask"], normalized)
        for side in ("chosen", "rejected")
    }  # fmt: skip
    return jnp.sum(s["chosen"] * s["rejected"], -1) - jnp.sum(s["chosen"] ** 2, -1)


def ches_scores(model_dir, records, *, batch_size: int = 8, normalized: bool = False) -> np.ndarray:
    """CHES of tokenized records (prompt_ids, chosen_ids, rejected_ids) under a Hugging Face Llama."""
    from apo_jax import models
    from apo_jax.data import layouts

    model, params = models.from_hf(model_dir)
    length = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in records)
    length = -(-length // 16) * 16  # a few shapes, a few compilations
    score = jax.jit(lambda p, b: ches(model, p, b, normalized=normalized))
    out = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # a fixed batch: one compiled program
        out.append(np.asarray(score(params, layouts.padded(chunk, length)))[:n])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

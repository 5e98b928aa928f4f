"""How contrastive a preference dataset is (APO paper, Table 1): Jaccard and Levenshtein, and, with a
model, CHES (apo_jax.data.ches: how alike the model finds the two answers; high predicts likelihood
displacement).

Jaccard similarity of the token sets of chosen and rejected (higher: more contrastive, the pair
shares more and differs only where it matters) and the character Levenshtein distance (lower:
more contrastive). Tokens are whitespace-split words by default, or a tokenizer's ids.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
from rapidfuzz.distance import Levenshtein

from apo_jax.data import formats, tokenize
from apo_jax.data.ches import ches_all
from apo_jax.models import load_tokenizer


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two token collections (1.0 for two empty ones)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions: cost 1 each)."""
    return Levenshtein.distance(a, b)


def _text(x) -> str:
    if isinstance(x, list):  # a conversation: the assistant turns
        return "\n".join(m["content"] for m in x if m.get("role") == "assistant")
    return x


def pair_stats(pairs, tokenize=str.split) -> dict:
    """Mean and median Jaccard and Levenshtein, and mean token lengths, over (chosen, rejected) pairs."""
    jac, lev, lc, lr = [], [], [], []
    for chosen, rejected in pairs:
        chosen, rejected = _text(chosen), _text(rejected)
        tc, tr = tokenize(chosen), tokenize(rejected)
        jac.append(jaccard(tc, tr))
        lev.append(levenshtein(chosen, rejected))
        lc.append(len(tc))
        lr.append(len(tr))
    if not jac:
        raise ValueError("no pairs to measure")
    return {
        "pairs": len(jac),
        "jaccard_mean": statistics.fmean(jac),
        "jaccard_median": statistics.median(jac),
        "levenshtein_mean": statistics.fmean(lev),
        "levenshtein_median": statistics.median(lev),
        "chosen_tokens_mean": statistics.fmean(lc),
        "rejected_tokens_mean": statistics.fmean(lr),
    }


def ches_stats(model_dir, pairs, *, as_chat: bool = False) -> dict:
    """Median CHES (apo_jax.data.ches) of the pairs under a model, summed and length-normalized."""
    tok = load_tokenizer(model_dir)
    records = []
    for i, (chosen, rejected, prompt) in enumerate(pairs):
        example = formats.normalize_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, i)
        t = tokenize.tokenize_example(tok, formats.as_chat(example) if as_chat else example)
        records.append({k: np.asarray(getattr(t, k)) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    scores = ches_all(model_dir, records)  # one pass gives both
    return {
        "ches_median": float(np.median(scores["ches"])),
        "ches_norm_median": float(np.median(scores["ches_norm"])),
    }


COLUMNS = [
    "pairs",
    "jaccard_mean",
    "jaccard_median",
    "levenshtein_mean",
    "levenshtein_median",
    "chosen_tokens_mean",
    "rejected_tokens_mean",
    "ches_median",
    "ches_norm_median",
]


def table(results: dict[str, dict]) -> str:
    """A plain-text table, one row per dataset (CHES columns when measured)."""
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    head = "dataset".ljust(24) + "".join(c.rjust(22) for c in cols)

    def cell(c, v):
        return "" if v is None else str(v) if c == "pairs" else f"{float(v):.3f}"

    rows = [
        name.ljust(24) + "".join(cell(c, r.get(c)).rjust(22) for c in cols) for name, r in results.items()
    ]
    return "\n".join([head, *rows])


def to_json(results: dict[str, dict]) -> str:
    return json.dumps(results, indent=2)

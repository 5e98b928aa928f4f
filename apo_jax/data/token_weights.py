"""Per-token weights for token-weighted DPO (`loss.name = tis_dpo | mask_dpo | d2po`), added to records.

    # TIS-DPO: weights from two contrastive models, e.g. DPO on the pairs and on the reversed pairs
    python -m apo_jax.data.token_weights --records data/train --output data/train_tis \
        --method tis --plus-model runs/plus/hf --minus-model runs/minus/hf --lower -1 --upper 1
    # Mask-DPO: sentence labels of each answer (pair rows carry chosen_labels / rejected_labels)
    python -m apo_jax.data.token_weights --records data/train --output data/train_mask \
        --method mask --pairs pairs.jsonl --tokenizer Meta-Llama-3-8B-Instruct --split lines
    # D²PO: temporal decay γ^k from the k-th answer token
    python -m apo_jax.data.token_weights --records data/train --output data/train_d2po --method d2po

The output is a copy of the record directory whose records carry `chosen_weights` and `rejected_weights`
(float lists aligned with `chosen_ids` / `rejected_ids`); `metadata.json["token_weights"]` says how they
were made. The train step feeds them to the token-weighted loss (apo_jax.losses.token_weighted):

- TIS-DPO (arXiv 2410.04350): with d_t = log π⁺(y_t) − log π⁻(y_t) under the two contrastive models
  and s_t = μ·d_t (μ = +1 on chosen, −1 on rejected answers), `--transform` turns an answer's scores
  into weights:
  - `exp` (default, the paper's form): w_t = k·exp(clip(s_t, L, U)); L, U, k are flags (−1, 1, 1),
    the paper does not fix them.
  - the code's transforms (PhiVanDat123/TIS-DPO, `preference_datasets.py`), on s_t rounded to 2
    decimals as its estimation script writes them: `origin` (s_t itself), `binary` (1 on the
    `--top-percent` highest of the answer, else 0; its default 100 makes every weight 1),
    `threshold` (clip to [L, U], default ±1), `threshold_and_scale` (clip to [L, U], default ±1.5,
    then map linearly onto [--scale-min, --scale-max], default [0.7, 1.3]), `rank_based` (the
    answer's ranks spread evenly over [0.7, 1.3]) and `random` (uniform on [0.7, 1.3], seeded).
- Mask-DPO (arXiv 2503.02846): a chosen answer keeps the tokens of its correct sentences, a rejected
  answer those of its wrong ones (w = 1 kept, 0 dropped). `chosen_labels` / `rejected_labels` hold one
  0/1 (1 = correct) per sentence of the answer as `--split` cuts it. A token belongs to the sentence
  that holds its last character; tokens in none (separators, the end-of-turn token) keep weight 1.
- D²PO (arXiv 2502.14340): w = γ^k on the k-th answer token, k from 1.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import jax
import numpy as np

from apo_jax import cli, losses, models, outputs, sharding
from apo_jax.data import layouts
from apo_jax.data.jsonl import read_jsonl
from apo_jax.data.tfrecords import read_records, rewrite_records
from apo_jax.models import load_tokenizer

TOOL = "apo_jax.data.token_weights"
SPLITS = {  # what a sentence is: a non-blank line, or text up to . ! ? or a line end
    "lines": re.compile(r"[^\n]*\S[^\n]*"),
    "sentences": re.compile(r"[^\s][^.!?\n]*(?:[.!?]+|$)", re.M),
}


def sentence_spans(text: str, split: str) -> list[tuple[int, int]]:
    return [m.span() for m in SPLITS[split].finditer(text)]


def token_ends(ids, tokenizer, window: int = 6) -> list[int]:
    """For each token, where its text ends in `decode(ids)` (exclusive character offset).

    Decoded incrementally, each new token against the few before it (a tokenizer may merge or
    strip characters at a token's edge, so a token is never decoded alone). A token that ends
    inside a multi-byte character ends where that character does. If the pieces do not add up
    to the whole decode, every prefix is decoded instead (exact, but quadratic in the length).
    """
    ids = [int(i) for i in ids]

    def dec(x):
        return tokenizer.decode(x, skip_special_tokens=True)

    ends, text, read = [], "", 0
    for j in range(len(ids)):
        start = max(0, read - window)
        before, now = dec(ids[start:read]), dec(ids[start : j + 1])
        if now.endswith("\ufffd") or not now.startswith(before):
            continue  # an unfinished character (or an unsettled edge): wait for the next token
        text += now[len(before) :]
        ends += [len(text)] * (j + 1 - len(ends))
        read = j + 1
    if text != dec(ids) or len(ends) != len(ids):
        return [len(dec(ids[: j + 1])) for j in range(len(ids))]
    return ends


TIS_TRANSFORMS = ("exp", "origin", "binary", "threshold", "threshold_and_scale", "rank_based", "random")
_BOUNDS = {"exp": (-1.0, 1.0), "threshold": (-1.0, 1.0), "threshold_and_scale": (-1.5, 1.5)}


def tis_bounds(transform: str, lower=None, upper=None) -> tuple[float | None, float | None]:
    """A TIS transform's clip bounds (L, U): those given, else its defaults (None where it has none)."""
    if transform not in TIS_TRANSFORMS:
        raise ValueError(f"unknown TIS transform {transform!r}: use one of {list(TIS_TRANSFORMS)}")
    lo, hi = _BOUNDS.get(transform, (None, None))
    return (lo if lower is None else lower), (hi if upper is None else upper)


def tis_weights(
    d,
    *,
    chosen: bool,
    transform: str = "exp",
    lower=None,
    upper=None,
    k: float = 1.0,
    top_percent: float = 100.0,
    scale=(0.7, 1.3),
    rng=None,
) -> np.ndarray:
    """TIS-DPO weights of one answer's tokens from d = log π⁺ − log π⁻ (see the module's docstring)."""
    lo, hi = tis_bounds(transform, lower, upper)
    if transform == "exp":
        d = np.asarray(d, np.float32)
        return np.asarray(losses.tis_dpo_weights(d, np.ones_like(d), chosen=chosen, lower=lo, upper=hi, k=k))
    s = [(1.0 if chosen else -1.0) * round(float(x), 2) for x in d]  # as the code's estimation writes them
    a, b = scale
    if transform == "origin":
        w = s
    elif transform == "binary":  # the code's rule, ties included: a value takes its last place's label
        cut = int(len(s) * top_percent / 100)
        label = {x: int(i < cut) for i, x in enumerate(sorted(s, reverse=True))}
        w = [label[x] for x in s]
    elif transform == "threshold":
        w = [min(max(x, lo), hi) for x in s]
    elif transform == "threshold_and_scale":
        w = [a + (min(max(x, lo), hi) - lo) * (b - a) / (hi - lo) for x in s]
    elif transform == "rank_based":
        order = sorted(range(len(s)), key=lambda i: s[i])
        w = [0.0] * len(s)
        for r, i in enumerate(order):
            w[i] = 1.0 if len(s) == 1 else a + r / (len(s) - 1) * (b - a)
    else:  # random
        w = (rng or np.random.default_rng(0)).uniform(a, b, len(s))
    return np.asarray(w, np.float32)


def mask_weights(ids, labels, text: str, tokenizer, *, chosen: bool, split: str, where: str) -> np.ndarray:
    """Mask-DPO's 0/1 weights of one answer's token ids from its per-sentence labels (1 = correct).
    `text` is the answer as written in the pair file; the ids may hold only its start (truncation)."""
    spans = sentence_spans(text, split)
    if len(spans) != len(labels):
        raise ValueError(
            f"{where}: {len(labels)} sentence labels, but the answer has {len(spans)} sentences when cut "
            f"by --split {split}: {[text[a:b] for a, b in spans]}"
        )
    decoded = tokenizer.decode(list(ids), skip_special_tokens=True)
    if not text.lstrip().startswith(decoded.strip()):
        raise ValueError(f"{where}: the record's tokens decode to {decoded!r}, not the start of the answer")
    # leading whitespace may differ (templates strip it, tokenizers merge it): align the first characters
    shift = (len(decoded) - len(decoded.lstrip())) - (len(text) - len(text.lstrip()))
    w = np.ones(len(ids), np.float32)
    for j, end in enumerate(token_ends(ids, tokenizer)):
        end -= shift
        for (a, b), label in zip(spans, labels, strict=True):
            if a < end <= b:  # the token's last character lies in this sentence
                w[j] = float(bool(label) == chosen)
                break
    return w


def answer_token_logps(model_dir, records, batch_size: int = 8, sides=("chosen", "rejected")):
    """{side: per record, its answer tokens' log-probs} under a Hugging Face Llama, for each of `sides`."""
    model, params = models.from_hf(model_dir)

    def token_logps(p, ids, attn, mask):
        return models.token_logps(model, p, ids, attn, mask, with_entropy=False)["token_logps"]

    score = jax.jit(sharding.on_mesh(token_logps, sharding.mesh_of(params)))
    out = {side: [] for side in sides}
    for batch, n in layouts.padded_batches(records, batch_size, multiple=16):
        for side in out:
            tok = np.asarray(
                score(params, *(batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")))
            )
            for row in range(n):
                out[side].append(tok[row][batch[f"{side}_loss_mask"][row] > 0])
    return out


def _tis_side_weights(
    records, plus_model, minus_model, *, transform, lower, upper, k, top_percent, scale, seed, batch_size
) -> tuple[dict, dict]:
    """TIS-DPO's weights of both sides from the two contrastive models, and how they were made."""
    if not (plus_model and minus_model):
        raise ValueError("--method tis needs --plus-model and --minus-model (the two contrastive models)")
    lower, upper = tis_bounds(transform, lower, upper)
    if lower is not None and not lower < upper:
        raise ValueError(f"--lower {lower} must be below --upper {upper}")
    if not scale[0] <= scale[1] or not 0 <= top_percent <= 100:
        raise ValueError(f"--scale-min/--scale-max {scale} must be ordered, --top-percent in [0, 100]")
    plus, minus = (answer_token_logps(m, records, batch_size) for m in (plus_model, minus_model))
    rng = np.random.default_rng(seed)
    settings = {"transform": transform, "lower": lower, "upper": upper, "k": k, "top_percent": top_percent}
    weights = {
        side: [
            tis_weights(p - q, chosen=side == "chosen", scale=scale, rng=rng, **settings)
            for p, q in zip(plus[side], minus[side], strict=True)
        ]
        for side in ("chosen", "rejected")
    }
    models_used = {"plus_model": str(plus_model), "minus_model": str(minus_model)}
    return weights, models_used | settings | {"scale": list(scale), "seed": seed}


def _mask_side_weights(records, pairs, tokenizer, split) -> tuple[dict, dict]:
    """Mask-DPO's 0/1 weights from the pair file's per-sentence labels, and how they were made."""
    if not (pairs and tokenizer is not None):
        raise ValueError(
            "--method mask needs --pairs (rows with chosen_labels/rejected_labels) and --tokenizer"
        )
    rows = read_jsonl(pairs)
    weights = {"chosen": [], "rejected": []}
    for r in records:
        i = int(r["source_index"])
        for side in weights:
            labels = rows[i].get(f"{side}_labels")
            if labels is None:
                raise ValueError(f"{pairs}: row {i} has no {side}_labels (one 0/1 per sentence)")
            where = f"{pairs}: row {i} ({side})"
            weights[side].append(
                mask_weights(
                    r[f"{side}_ids"],
                    labels,
                    rows[i][side],
                    tokenizer,
                    chosen=side == "chosen",
                    split=split,
                    where=where,
                )
            )
    return weights, {"pairs": str(pairs), "split": split}


def add_weights(
    records_dir,
    output,
    *,
    method: str,
    plus_model=None,
    minus_model=None,
    transform="exp",
    lower=None,
    upper=None,
    k=1.0,
    top_percent=100.0,
    scale=(0.7, 1.3),
    seed=0,
    pairs=None,
    tokenizer=None,
    split="lines",
    gamma=0.98,
    batch_size=8,
    overwrite=False,
) -> pathlib.Path:
    """Writes `output`: the records of `records_dir` with chosen_weights / rejected_weights added
    (over an earlier output of this tool only, unless `overwrite`: apo_jax.outputs)."""
    if method == "d2po" and not 0 < gamma <= 1:  # above 1, γ^k grows without bound (inf in float32)
        raise ValueError(f"--gamma {gamma}: D²PO's decay must lie in (0, 1]")
    outputs.check_output(output, TOOL, overwrite=overwrite, inputs=[records_dir])  # before the work
    records, meta = read_records(records_dir)
    if meta.get("kind") != "paired":
        raise ValueError(f"{records_dir}: token weights are for paired records, these are {meta.get('kind')}")
    if method == "tis":
        weights, how = _tis_side_weights(
            records,
            plus_model,
            minus_model,
            transform=transform,
            lower=lower,
            upper=upper,
            k=k,
            top_percent=top_percent,
            scale=scale,
            seed=seed,
            batch_size=batch_size,
        )
    elif method == "mask":
        weights, how = _mask_side_weights(records, pairs, tokenizer, split)
    elif method == "d2po":
        weights = {
            s: [
                np.asarray(losses.d2po_weights(np.ones(len(r[f"{s}_ids"]), np.float32), gamma))
                for r in records
            ]
            for s in ("chosen", "rejected")
        }
        how = {"gamma": gamma}
    else:
        raise ValueError(f"unknown --method {method!r}: use tis, mask or d2po")
    how = {"method": method, "source": str(records_dir)} | how
    _check_finite(records, weights, records_dir, how)
    new = [
        dict(r, chosen_weights=c, rejected_weights=j)
        for r, c, j in zip(records, weights["chosen"], weights["rejected"], strict=True)
    ]
    return rewrite_records(
        new, meta, output, {"token_weights": how}, tool=TOOL, overwrite=overwrite, inputs=[records_dir]
    )


def _check_finite(records, weights: dict, records_dir, how: dict) -> None:
    """Refuses weights that are inf or nan (a loss over them is nan), naming the first record."""
    for side, per_record in weights.items():
        for record, w in zip(records, per_record, strict=True):
            if not np.all(np.isfinite(w)):
                raise ValueError(
                    f"{records_dir}: the record of source row {record['source_index']} gets non-finite "
                    f"{side} weights with {how}; nothing written, choose other settings"
                )


@cli.command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m apo_jax.data.token_weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--records", required=True, help="a record directory (apo_jax.data.preprocess)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--method", required=True, choices=("tis", "mask", "d2po"))
    ap.add_argument("--plus-model", help="tis: the model that prefers chosen answers (HF directory)")
    ap.add_argument("--minus-model", help="tis: the model that prefers rejected answers")
    ap.add_argument("--transform", default="exp", choices=TIS_TRANSFORMS, help="tis: scores -> weights")
    ap.add_argument("--lower", type=float, help="tis: clip bound L (-1; threshold_and_scale -1.5)")
    ap.add_argument("--upper", type=float, help="tis: clip bound U (1; threshold_and_scale 1.5)")
    ap.add_argument("--k", type=float, default=1.0, help="tis exp: scale k")
    ap.add_argument("--top-percent", type=float, default=100.0, help="tis binary: the share set to 1")
    ap.add_argument("--scale-min", type=float, default=0.7, help="tis: the scaled transforms' range")
    ap.add_argument("--scale-max", type=float, default=1.3)
    ap.add_argument("--seed", type=int, default=0, help="tis random")
    ap.add_argument("--pairs", help="mask: the pair file the records came from, with *_labels")
    ap.add_argument("--tokenizer", help="mask: the tokenizer the records were made with")
    ap.add_argument("--split", default="lines", choices=tuple(SPLITS), help="mask: what a sentence is")
    ap.add_argument("--gamma", type=float, default=0.98, help="d2po: the decay")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--overwrite", action="store_true", help="replace --output even if another tool wrote it")
    a = ap.parse_args(argv)
    tok = None
    if a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    out = add_weights(
        a.records,
        a.output,
        method=a.method,
        plus_model=a.plus_model,
        minus_model=a.minus_model,
        transform=a.transform,
        lower=a.lower,
        upper=a.upper,
        k=a.k,
        top_percent=a.top_percent,
        scale=(a.scale_min, a.scale_max),
        seed=a.seed,
        pairs=a.pairs,
        tokenizer=tok,
        split=a.split,
        gamma=a.gamma,
        batch_size=a.batch_size,
        overwrite=a.overwrite,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch layouts: records -> fixed-shape host arrays, every mask aligned with the input ids.

- `padded`: one sequence per row, [b, T] each for chosen and rejected (TRL's layout).
- `packed`: chosen and rejected sequences placed first-fit into `rows` rows of length T, each
  its own segment (ids 1, 2, ... within a row) with positions restarting at 0.
- `prompt_shared`: one row per pair. Segment 1 holds the prompt without its last token;
  segments 2 and 3 each start with that last prompt token (at its own position, loss mask 0)
  followed by the chosen / rejected answer. Each answer sees the prompt and itself, never the
  other answer, and the prompt is computed once.
All three give the same per-sequence log-probs (tests/test_data.py checks it through the model);
`sequence_logps` sums token log-probs per sequence for any of them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LAYOUTS = PADDED, PACKED, PROMPT_SHARED = ("padded", "packed", "prompt_shared")
# records column -> batch key (DESIGN.md, "Field names across stages"); the step and the config read it
EXTRA_KEYS = {"is_tie": "is_tie", "timestamp": "timestamps", "score": "scores", "label": "label"}
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _extras(records) -> dict[str, np.ndarray]:
    out = {}
    for key, batch_key in EXTRA_KEYS.items():
        if key in records[0]:
            dtype = {"is_tie": bool, "label": bool, "timestamp": np.int32, "score": np.float32}[key]
            out[batch_key] = np.asarray([r[key] for r in records], dtype)
    for key in REF_KEYS:
        if key in records[0]:
            out[key] = np.asarray([r[key] for r in records], np.float32)
    return out


def _too_long(what, n, length):
    return ValueError(f"{what} has {n} tokens, more than the layout's row length {length}: raise it")


def padded(records, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """chosen_/rejected_ input_ids, attention_mask, loss_mask [b, T], right-padded, plus extras."""
    b = len(records)
    out = {}
    for side in ("chosen", "rejected"):
        ids = np.full((b, length), pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        loss = np.zeros((b, length), np.float32)
        weights = np.zeros((b, length), np.float32) if f"{side}_weights" in records[0] else None
        for i, r in enumerate(records):
            p, c = r["prompt_ids"], r[f"{side}_ids"]
            n = len(p) + len(c)
            if n > length:
                raise _too_long(f"record {r.get('source_index', i)} ({side})", n, length)
            ids[i, :n] = np.concatenate([p, c])
            attn[i, :n] = 1
            loss[i, len(p) : n] = 1
            if weights is not None:  # token weights (apo_jax.data.token_weights), aligned like the mask
                weights[i, len(p) : n] = r[f"{side}_weights"]
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_loss_mask": loss}
        if weights is not None:
            out[f"{side}_weights"] = weights
    return out | _extras(records)


def padded_batches(
    records, batch_size: int, length: int | None = None, *, pad_id: int = 0, multiple: int = 1
):
    """Yields (padded batch, number of real rows) over `records` in order, every batch `batch_size` rows
    (the last filled by repeating its last record): one compiled program scores them all. `length`
    defaults to the longest prompt + answer, rounded up to `multiple`."""
    if length is None:
        longest = max(
            len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in records
        )
        length = -(-longest // multiple) * multiple
    for start in range(0, len(records), batch_size):
        part = list(records[start : start + batch_size])
        n = len(part)
        yield padded(part + [part[-1]] * (batch_size - n), length, pad_id), n


def unpaired(records, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """KTO batches: input_ids/attention_mask/loss_mask [b, T] for prompt+completion, the same
    under `kl_` for prompt + the block-neighbour's completion (KTO's reference point), and label."""
    b = len(records)
    out = {}
    for prefix, key in (("", "completion_ids"), ("kl_", "kl_completion_ids")):
        ids = np.full((b, length), pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        loss = np.zeros((b, length), np.float32)
        for i, r in enumerate(records):
            p, c = r["prompt_ids"], r[key][: max(0, length - len(r["prompt_ids"]))]
            n = len(p) + len(c)
            if len(p) >= length:
                raise _too_long(f"record {r.get('source_index', i)} (prompt)", len(p), length)
            ids[i, :n] = np.concatenate([p, c])
            attn[i, :n] = 1
            loss[i, len(p) : n] = 1
        out |= {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attn, f"{prefix}loss_mask": loss}
    return out | _extras(records)


def _empty_rows(rows: int, length: int, pad_id: int):
    """(input_ids, segment_ids, positions, loss_mask) of `rows` empty rows."""
    return (
        np.full((rows, length), pad_id, np.int32),
        np.zeros((rows, length), np.int32),
        np.zeros((rows, length), np.int32),
        np.zeros((rows, length), np.float32),
    )


def _rows_batch(ids, seg, pos, loss, chosen_index, rejected_index, records) -> dict[str, np.ndarray]:
    return {
        "input_ids": ids,
        "segment_ids": seg,
        "positions": pos,
        "attention_mask": (seg != 0).astype(np.int32),
        "loss_mask": loss,
        "chosen_index": chosen_index,
        "rejected_index": rejected_index,
    } | _extras(records)


def packed(records, length: int, rows: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """First-fit packing of the 2b sequences into `rows` (default 2b) rows of `length`.

    Returns input_ids, segment_ids, positions, attention_mask, loss_mask [rows, T] and
    chosen_index, rejected_index [b, 2] = (row, segment id) of each pair's sequences.
    """
    b = len(records)
    rows = 2 * b if rows is None else rows
    ids, seg, pos, loss = _empty_rows(rows, length, pad_id)
    used = np.zeros(rows, np.int64)
    count = np.zeros(rows, np.int32)
    index = {"chosen": np.zeros((b, 2), np.int32), "rejected": np.zeros((b, 2), np.int32)}
    for i, r in enumerate(records):
        for side in ("chosen", "rejected"):
            p, c = r["prompt_ids"], r[f"{side}_ids"]
            n = len(p) + len(c)
            fits = np.nonzero(used + n <= length)[0]
            if not len(fits):
                raise ValueError(
                    f"packing: record {r.get('source_index', i)} ({side}, {n} tokens) fits in none of "
                    f"{rows} rows of {length}; raise the row count or length"
                )
            row, start = fits[0], used[fits[0]]
            count[row] += 1
            ids[row, start : start + n] = np.concatenate([p, c])
            seg[row, start : start + n] = count[row]
            pos[row, start : start + n] = np.arange(n)
            loss[row, start + len(p) : start + n] = 1
            used[row] += n
            index[side][i] = (row, count[row])
    return _rows_batch(ids, seg, pos, loss, index["chosen"], index["rejected"], records)


def prompt_shared(records, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row per pair (see the module docstring); chosen_index/rejected_index = (i, 2) and (i, 3)."""
    b = len(records)
    ids, seg, pos, loss = _empty_rows(b, length, pad_id)
    for i, r in enumerate(records):
        p, c, rj = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]
        P = len(p)
        if P == 0:
            raise ValueError(f"prompt_shared: record {r.get('source_index', i)} has an empty prompt")
        n = P + len(c) + 1 + len(rj)
        if n > length:
            raise _too_long(f"record {r.get('source_index', i)} (prompt + both answers)", n, length)
        parts = [
            (p[:-1], 1, 0, 0),
            (np.concatenate([p[-1:], c]), 2, P - 1, 1),
            (np.concatenate([p[-1:], rj]), 3, P - 1, 1),
        ]
        start = 0
        for tokens, segment, first_pos, first_loss in parts:
            m = len(tokens)
            ids[i, start : start + m] = tokens
            seg[i, start : start + m] = segment
            pos[i, start : start + m] = first_pos + np.arange(m)
            if segment > 1:
                loss[i, start + first_loss : start + m] = 1
            start += m
    rows = np.arange(b, dtype=np.int32)
    chosen, rejected = (np.stack([rows, np.full(b, k, np.int32)], 1) for k in (2, 3))
    return _rows_batch(ids, seg, pos, loss, chosen, rejected, records)


def sequence_logps(token_logps, loss_mask, segment_ids, index):
    """[b] sums of token log-probs over the loss mask of the sequences at `index` [b, 2] = (row, segment)."""
    rows, segments = index[:, 0], index[:, 1]
    mask = (segment_ids[rows] == segments[:, None]) * loss_mask[rows]
    return jnp.sum(token_logps[rows] * mask, axis=-1)


def build(layout: str, records, length: int, *, pad_id: int = 0, rows: int | None = None):
    if "completion_ids" in records[0]:
        if layout != "padded":
            raise ValueError(f"unpaired (KTO) records use the padded layout, not {layout!r}")
        return unpaired(records, length, pad_id)
    builders = {
        PADDED: lambda: padded(records, length, pad_id),
        PACKED: lambda: packed(records, length, rows, pad_id),
        PROMPT_SHARED: lambda: prompt_shared(records, length, pad_id),
    }
    if layout in builders:
        return builders[layout]()
    raise ValueError(f"unknown batch layout {layout!r}; use one of {LAYOUTS}")

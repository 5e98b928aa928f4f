"""The record schema, TFRecord shards and `metadata.json`: written once offline, read by the reader.

Schema version 1, one `tf.train.Example` per example (all ids int64 lists, unpadded):
  paired:   prompt_ids, chosen_ids, rejected_ids (completion ids after truncation), source_index,
            optional is_tie (int64 0/1), timestamp (int64), score (float)
  unpaired: prompt_ids, completion_ids, label (int64 0/1), kl_completion_ids (the completion of
            the next example within its block of `kl_block`, for KTO's reference point), source_index
  reference log-probs, added by the trainer's precompute pass: ref_chosen_logps, ref_rejected_logps
            (float, per sequence) or ref_chosen_token_logps, ref_rejected_token_logps (float lists
            aligned with prompt+completion ids); `metadata.json["reference"]` then holds the
            fingerprint (weights, tokenizer, data, max_length, ld_alpha, dtype, granularity) that
            ties them to one reference model, and a stale cache is refused.
  token weights, added by `python -m apo_jax.data.token_weights` (TIS-DPO, Mask-DPO, D²PO):
            chosen_weights, rejected_weights (float lists aligned with chosen_ids / rejected_ids)
Loss masks are not stored: with keep-start truncation they are 0 on the prompt, 1 on the
completion, and the batch layouts (apo_jax.data.layouts) build them aligned with the input ids.
TensorFlow is imported only here, lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from apo_jax import outputs
from apo_jax.models.hf import checkpoint_fingerprint

SCHEMA_VERSION = 1
INT_FIELDS = (
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion_ids",
    "kl_completion_ids",
    "source_index",
    "is_tie",
    "timestamp",
    "label",
)
FLOAT_FIELDS = (
    "score",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_token_logps",
    "ref_rejected_token_logps",
    "chosen_weights",
    "rejected_weights",
)
LIST_FIELDS = {
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion_ids",
    "kl_completion_ids",
    "ref_chosen_token_logps",
    "ref_rejected_token_logps",
    "chosen_weights",
    "rejected_weights",
}
PAIRED_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "source_index")
UNPAIRED_FIELDS = ("prompt_ids", "completion_ids", "label", "kl_completion_ids", "source_index")


def _tf():
    """TensorFlow, imported quietly: a command's stderr holds its own lines, and TensorFlow only
    reads and writes records here (its oneDNN kernels, which announce themselves, do no math)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    return tf


def _example(tf, record: dict):
    feature = {}
    for key, value in record.items():
        values = list(value) if key in LIST_FIELDS else [value]
        if key in INT_FIELDS:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        elif key in FLOAT_FIELDS:
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        else:
            raise ValueError(f"field {key!r} is not in record schema v{SCHEMA_VERSION}")
    return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_names(num_shards: int, prefix: str = "records") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def write_shards(records: list[dict], out_dir: pathlib.Path, num_shards: int) -> list[dict]:
    """Contiguous runs of records into `num_shards` files, in order; returns [{file, rows}]."""
    tf = _tf()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = shard_names(num_shards)
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    shards = []
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
        with tf.io.TFRecordWriter(str(out_dir / name)) as w:
            for record in records[lo:hi]:
                w.write(_example(tf, record).SerializeToString())
        shards.append({"file": name, "rows": int(hi - lo)})
    return shards


def rewrite_records(
    records: list[dict],
    meta: dict,
    out_dir,
    extra_meta: dict,
    *,
    tool: str,
    overwrite: bool = False,
    inputs=(),
    flag: str = "--output",
) -> pathlib.Path:
    """Writes `records` (read from a directory with metadata `meta`, fields added) to `out_dir`, as
    many shards as before, with `extra_meta` merged into its metadata.json and `tool` named as its
    writer: into a temporary sibling first, moved into place when complete (a killed job never leaves
    half a directory), and only over an earlier output of `tool` unless `overwrite`
    (apo_jax.outputs.replacing)."""
    with outputs.replacing(out_dir, tool, overwrite=overwrite, inputs=inputs, flag=flag) as tmp:
        meta = dict(meta)
        meta["shards"] = write_shards(records, tmp, len(meta["shards"]))
        meta["fields"] = sorted(set(meta["fields"]) | set(records[0] if records else ()))
        meta |= extra_meta | {"written_by": tool, "max_token_id": max_token_id(records)}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return pathlib.Path(out_dir)


def read_metadata(data_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir}: no metadata.json; make it with `python -m apo_jax.data.preprocess`"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); preprocess the data again") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: record schema v{version}, this reader reads v{SCHEMA_VERSION}; preprocess again"
        )
    return meta


def read_records(data_dir: str | pathlib.Path) -> tuple[list[dict], dict]:
    """(records in source order as dicts of numpy arrays / scalars, metadata).

    All records are held in memory: 32K pairs at 1024 tokens are about 0.4 GB of int32 ids.
    """
    tf = _tf()
    data_dir = pathlib.Path(data_dir)
    meta = read_metadata(data_dir)
    records = []
    for shard in meta["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir}: shard {shard['file']} named in metadata.json is missing")
        n = 0
        try:
            for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                records.append(_record(tf.train.Example.FromString(raw).features.feature))
                n += 1
        except tf.errors.OpError as e:  # DataLossError: a truncated or corrupted shard
            raise ValueError(
                f"{path}: a truncated or corrupt shard after {n} records ({e.message})"
            ) from None
        if n != shard["rows"]:
            raise ValueError(
                f"{path}: {n} records, metadata.json says {shard['rows']} (a truncated or stale shard)"
            )
    return records, meta


def _record(features) -> dict:
    record = {}
    for key, feat in features.items():
        kind = feat.WhichOneof("kind")
        values = np.asarray(getattr(feat, kind).value, np.int32 if kind == "int64_list" else np.float32)
        record[key] = values if key in LIST_FIELDS else values[0]
    return record


def max_token_id(records: list[dict]) -> int:
    """The largest token id in any id field of `records` (-1 if there are none)."""
    return max(
        (int(np.max(v)) for r in records for k, v in r.items() if k.endswith("_ids") and len(v)), default=-1
    )


def reference_fingerprint(
    checkpoint_dir,
    *,
    tokenizer_fingerprint: str,
    data_fingerprint: str,
    max_length: int | None,
    ld_alpha: float | None,
    dtype: str,
    granularity: str,
) -> str:
    """What ties precomputed reference log-probs to one reference: sha256 over the checkpoint's
    fingerprint (`models.hf.checkpoint_fingerprint`: sampled bytes of its weights, not 16 GB read,
    and not the safetensors headers alone, which two checkpoints of one architecture share), the
    tokenizer and data fingerprints, max_length, ld_alpha, the compute dtype and the granularity
    ("sequence" or "token"). Stored as metadata.json["reference"]["fingerprint"]; a mismatch means a
    stale cache."""
    path = pathlib.Path(checkpoint_dir)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors to fingerprint the reference by")
    h = hashlib.sha256(checkpoint_fingerprint(path).encode())
    settings = {
        "tokenizer": tokenizer_fingerprint,
        "data": data_fingerprint,
        "max_length": max_length,
        "ld_alpha": ld_alpha,
        "dtype": dtype,
        "granularity": granularity,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()

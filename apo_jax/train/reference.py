"""Precomputed reference log-probs: one resumable pass that adds them to the records.

    python -m apo_jax.train.reference --config=... (through experiments.run) or
    precompute(config, out_dir)

The reference model (the config's `model`) scores every record once, in order, in batches;
progress is saved every few batches, so a killed pass resumes where it stopped. The result is a
copy of the record directory with `ref_chosen_logps` / `ref_rejected_logps` (per sequence) and a
`metadata.json["reference"]` fingerprint (`reference_id`); training with reference.mode =
'precomputed' refuses records whose fingerprint does not match its own reference.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from apo_jax import outputs, sharding
from apo_jax.data import layouts
from apo_jax.data.tfrecords import read_records, reference_fingerprint, rewrite_records
from apo_jax.sharding import to_global
from apo_jax.train import config as config_lib
from apo_jax.train.state import build_model
from apo_jax.train.step import StepConfig, sequence_sums

TOOL = "apo_jax.train.reference"


def reference_id(cfg, metadata: dict) -> str:
    """The fingerprint tying reference log-probs to the reference weights and the data settings."""
    settings = {
        "tokenizer_fingerprint": metadata.get("tokenizer", {}).get("fingerprint", ""),
        "data_fingerprint": metadata.get("source", {}).get("fingerprint", ""),
        "max_length": metadata.get("max_length"),
        "ld_alpha": cfg.loss.get("ld_alpha", None),
        "dtype": cfg.model.dtype,
        "granularity": "sequence",
    }
    if cfg.model.path:
        return reference_fingerprint(cfg.model.path, **settings)
    preset = {"preset": cfg.model.preset, "seed": cfg.model.seed, "vocab": cfg.model.vocab_size, **settings}
    return hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest()


def check_precomputed(cfg, metadata: dict) -> None:
    """reference.mode='precomputed' needs records whose reference log-probs were made for this run's
    reference (`reference_id`)."""
    saved = metadata.get("reference", {}).get("fingerprint")
    if saved is None:
        raise config_lib.ConfigError(
            f"reference.mode='precomputed' but {cfg.data.train} has no reference log-probs: "
            "run apo_jax.train.reference.precompute first"
        )
    if saved != reference_id(cfg, metadata):
        raise config_lib.ConfigError(
            f"data.train={cfg.data.train}: its reference log-probs were computed for another "
            "reference model or other settings (fingerprint mismatch); precompute them again"
        )


def precompute(cfg, out_dir: str | pathlib.Path, *, save_every: int = 8) -> pathlib.Path:
    """Writes `out_dir`: the records of `cfg.data.train` with reference log-probs added."""
    out_dir = pathlib.Path(out_dir)
    outputs.check_output(out_dir, TOOL, inputs=[cfg.data.train], flag="--precompute_reference")
    records, meta = read_records(cfg.data.train)
    if meta.get("kind") != "paired":
        raise config_lib.ConfigError(f"{cfg.data.train}: precomputed references are for paired records")
    if cfg.loss.get("ld_alpha", None) is not None:
        raise config_lib.ConfigError(
            "loss.ld_alpha with precomputed references needs per-token log-probs: use frozen"
        )
    mesh = sharding.make_mesh(**dict(cfg.mesh))
    model, params = build_model(cfg, mesh, adapters=False)  # a LoRA run's reference: the base
    length = cfg.data.length or meta["max_length"]
    step_cfg = StepConfig(layout="padded")
    score = jax.jit(sharding.on_mesh(lambda p, b: sequence_sums(model, p, b, step_cfg), mesh))
    bs = cfg.reference.precompute_batch_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = -(-bs // shards) * shards
    progress = out_dir.with_name(out_dir.name + ".progress.npz")
    done, chosen, rejected = 0, np.zeros(len(records), np.float32), np.zeros(len(records), np.float32)
    if progress.exists():
        saved = np.load(progress)
        done, chosen, rejected = int(saved["done"]), saved["chosen"], saved["rejected"]
    n_batches = 0
    for batch, n in layouts.padded_batches(records[done:], bs, length, pad_id=cfg.data.pad_id):
        batch = {k: v for k, v in batch.items() if k.endswith(("input_ids", "attention_mask", "loss_mask"))}
        out = score(params, to_global(batch, mesh))
        chosen[done : done + n] = np.asarray(out.policy.chosen)[:n]
        rejected[done : done + n] = np.asarray(out.policy.rejected)[:n]
        done += n
        n_batches += 1
        if n_batches % save_every == 0 and jax.process_index() == 0:
            np.savez(progress, done=done, chosen=chosen, rejected=rejected)
    new = [
        dict(r, ref_chosen_logps=float(c), ref_rejected_logps=float(j))
        for r, c, j in zip(records, chosen, rejected, strict=True)
    ]
    reference = {"fingerprint": reference_id(cfg, meta), "granularity": "sequence", "source": cfg.data.train}
    rewrite_records(
        new,
        meta,
        out_dir,
        {"reference": reference},
        tool=TOOL,
        inputs=[cfg.data.train],
        flag="--precompute_reference",
    )
    progress.unlink(missing_ok=True)
    return out_dir

"""The run's record in its workdir, and the check that a resume continues the same run.

- config.json: the config the run started with (a resume that changes only `FREE` keys, such as
  the run's length, rewrites it with them while there is no history);
- sources.json: fingerprints of what the config names but does not hold: the weights of model.path,
  reference.path and lora.path (`models.hf.checkpoint_fingerprint`), and the data of data.train;
- config_history.jsonl: one line per resume that was told to accept a change
  (`--config.train.resume_changed=true`): the step, each changed key's old and new value, and the
  whole config from then on. While it exists, config.json stays as the run started.

A resume compares its config and sources with the record before anything is written, and refuses
in one line naming every changed key: checkpoints continued with another loss, learning rate,
batch size or model would be a run no config describes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib

from apo_jax.data.jsonl import write_atomic
from apo_jax.models.hf import checkpoint_fingerprint
from apo_jax.train.config import ConfigError, config_text

RECORD, SOURCES, HISTORY = "config.json", "sources.json", "config_history.jsonl"

# What a resume may change without `train.resume_changed`: the run's length, and keys that cannot
# change the trained weights (logging, progress, trackers, evaluation, checkpoint cadence, export),
# the groups the trainer does not read (a recipe's `experiment`, the online loop's `online`), and
# where the workdir lies. A key ending in "." names a group.
FREE = (
    "workdir",
    "train.steps",
    "train.log_every",
    "train.progress",
    "train.trackers",
    "train.wandb_project",
    "train.wandb_entity",
    "train.peak_flops",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite",
    "train.export_hf",
    "train.resume_changed",
    "data.eval",
    "data.probes",
    "experiment.",
    "online.",
)


def flat(tree, prefix: str = "") -> dict:
    """A config (ConfigDict or its JSON) as {"group.key": value}, lists as lists."""
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple | list) else value
    return out


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def sources(cfg, metadata: dict, rows: int) -> dict:
    """The fingerprints the record keeps beside the config (see the module docstring)."""
    out = {}
    for key in ("model.path", "reference.path", "lora.path"):
        group, name = key.split(".")
        if cfg[group][name]:
            out[key] = checkpoint_fingerprint(cfg[group][name])
    data = {
        "source": metadata.get("source", {}).get("fingerprint"),
        "tokenizer": metadata.get("tokenizer", {}).get("fingerprint"),
        "max_length": metadata.get("max_length"),
        "rows": rows,
    }
    out["data.train"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return out


@dataclasses.dataclass
class Start:
    """What a start writes once its checkpoint restored (`write`), from `check`."""

    workdir: pathlib.Path
    config_text: str
    sources: dict
    resuming: bool
    changed: dict  # key -> (old, new): what this resume changes
    history: bool  # whether the record already has a history

    def write(self, step: int) -> None:
        """The record after a start: a fresh run's config and sources; a resume's accepted changes.
        Nothing is written for a resume that changes nothing."""
        w = self.workdir
        if not self.resuming:
            write_atomic(w / RECORD, self.config_text)
            write_atomic(w / SOURCES, json.dumps(self.sources, indent=2, sort_keys=True) + "\n")
            (w / HISTORY).unlink(missing_ok=True)  # a history of an earlier run that never saved
            return
        if all(_free(k) for k in self.changed):  # the same run, longer or logged otherwise
            if self.changed and not self.history:
                write_atomic(w / RECORD, self.config_text)
            return
        line = {
            "step": step,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "changed": {k: {"old": old, "new": new} for k, (old, new) in sorted(self.changed.items())},
            "config": json.loads(self.config_text),
        }
        with open(w / HISTORY, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: the record of the run being resumed cannot be read ({type(e).__name__}: {e}); "
            "restore it, or move the checkpoints away to start afresh"
        ) from None


def _last_config(workdir: pathlib.Path) -> tuple[dict, bool]:
    """The config the run has trained with since its last start, and whether it has a history."""
    history = workdir / HISTORY
    if history.exists():
        lines = [x for x in history.read_text().splitlines() if x.strip()]
        try:
            return json.loads(lines[-1])["config"], True
        except (IndexError, KeyError, ValueError):
            raise ConfigError(f"{history}: its last line is not a resume record; restore it") from None
    return _read_json(workdir / RECORD), False


def check(cfg, workdir, resuming: bool, found: dict) -> Start:
    """Compares a start with the workdir's record. A fresh start (`resuming` false) always passes.
    A resume passes when it changes only `FREE` keys, or when `train.resume_changed` says to accept
    the change; otherwise ConfigError names each changed key, before anything is written."""
    workdir = pathlib.Path(workdir)
    text = config_text(cfg)
    if not resuming:
        return Start(workdir, text, found, False, {}, False)
    old_cfg, history = _last_config(workdir)
    old, new = flat(old_cfg), flat(json.loads(text))
    keys = sorted(old.keys() | new.keys())
    changed = {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
    saved_sources = _read_json(workdir / SOURCES) if (workdir / SOURCES).exists() else {}
    for key in sorted(saved_sources.keys() | found.keys()):
        if saved_sources.get(key) != found.get(key) and key not in changed and saved_sources:
            changed[f"{key} (its contents)"] = (saved_sources.get(key), found.get(key))
    refused = [k for k in changed if not _free(k)]
    if refused and not cfg.train.get("resume_changed", False):
        listed = ", ".join(f"{k}: {_short(changed[k][0])} -> {_short(changed[k][1])}" for k in refused)
        raise ConfigError(
            f"{workdir} holds checkpoints of another run: {listed}. Resume with the config in "
            f"{workdir / (HISTORY if history else RECORD)}, use another workdir, or set "
            "--config.train.resume_changed=true to continue with the change (recorded in "
            f"{HISTORY})"
        )
    return Start(workdir, text, found, True, changed, history)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]

"""Where a run's metrics go: `train.trackers`, any of jsonl (always), tensorboard, wandb, trackio.

Every tracker gets the same metric names at the same steps. metrics.jsonl is the run's own record
(experiments and the sweep read it); TensorBoard events are written with TensorFlow (viewing them
takes `pip install tensorboard`); Weights & Biases (`pip install -e ".[wandb]"`) and Trackio
(`.[trackio]`) are imported only when asked for. W&B's run gets the resolved config, and its id is
kept in `<workdir>/trackers.json`, so a resumed run (a restart after SIGTERM, a crash) continues the
same W&B run rather than starting another; the step is logged as the `step` metric, W&B's x-axis for
every other metric, so the steps a resumed run redoes after its checkpoint are accepted.
`WANDB_MODE=offline` writes the run locally (`<workdir>/wandb/offline-run-*`) for `wandb sync` later.
"""

from __future__ import annotations

import json
import pathlib
import secrets
import sys

import jax

from apo_jax.cli import UserError
from apo_jax.data.jsonl import write_atomic

TRACKERS = ("jsonl", "tensorboard", "wandb", "trackio")


class TrackerError(UserError, RuntimeError):
    """A tracker that was asked for but cannot start; the message says what to do."""


class Jsonl:
    """metrics.jsonl: one JSON object per logged step. A resumed run first drops the lines past the
    checkpoint it resumes from (they will be redone)."""

    def __init__(self, workdir: pathlib.Path, resume_step: int, **_):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoard:
    """TensorBoard event files in <workdir>/tensorboard, written by TensorFlow alone: the scalars in
    the form `tensorboard` reads (`tf.summary.scalar` and flax's writer need the `tensorboard` package
    installed, the viewer; it is not needed to write them)."""

    def __init__(self, workdir: pathlib.Path, **_):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self.tf = tf
        self.writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        self.metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        tf = self.tf
        with self.writer.as_default():
            for k, v in metrics.items():
                tf.summary.write(k, tf.constant(v, tf.float32), step=step, metadata=self.metadata)

    def close(self) -> None:
        self.writer.close()


def _run_ids(workdir: pathlib.Path) -> dict:
    path = workdir / "trackers.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _keep_run_id(workdir: pathlib.Path, name: str, run_id: str) -> None:
    ids = _run_ids(workdir)
    if ids.get(name) != run_id:
        write_atomic(workdir / "trackers.json", json.dumps(ids | {name: run_id}, indent=2) + "\n")


class Wandb:
    """A Weights & Biases run: the resolved config attached, the same run on every resume."""

    def __init__(self, workdir: pathlib.Path, config: dict, t, **_):
        import wandb

        run_id = _run_ids(workdir).get("wandb") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        _keep_run_id(workdir, "wandb", run_id)
        try:
            self.run = wandb.init(
                project=t.get("wandb_project", "") or "apo_jax",
                entity=t.get("wandb_entity", "") or None,
                name=workdir.name,
                id=run_id,
                resume="allow",
                dir=str(workdir),
                config=config,
            )
        except Exception as e:  # no login on a batch node, a network error: one line, not a traceback
            raise TrackerError(
                f"W&B did not start ({' '.join(str(e).split())[:200]}): log in (WANDB_API_KEY), or set "
                "WANDB_MODE=offline to write the run locally and `wandb sync` it later"
            ) from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A Trackio run (Hugging Face's local-first tracker, W&B's API): the same run on every resume."""

    def __init__(self, workdir: pathlib.Path, config: dict, t, **_):
        import trackio

        self.trackio = trackio
        trackio.init(
            project=t.get("wandb_project", "") or "apo_jax", name=workdir.name, config=config, resume="allow"
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio}


def check(names) -> None:
    """Raises ValueError naming what is wrong with `train.trackers` (unknown, no jsonl, not installed)."""
    import importlib.util

    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in _CLASSES]
    if unknown:
        raise ValueError(f"train.trackers: unknown {unknown}; use some of {list(TRACKERS)}")
    if "jsonl" not in names:
        raise ValueError("train.trackers must keep 'jsonl': metrics.jsonl is the run's own record")
    for name in ("wandb", "trackio"):
        if name in names and importlib.util.find_spec(name) is None:
            raise ValueError(
                f'train.trackers has {name!r} but {name} is not installed: pip install -e ".[{name}]"'
            )


class Trackers:
    """The configured trackers of one run (first process only); `write(step, metrics)` to all."""

    def __init__(self, workdir: pathlib.Path, resume_step: int, config):
        self.main = jax.process_index() == 0
        self.trackers = []
        if not self.main:
            return
        t = config.train
        names = tuple(t.get("trackers", ("jsonl", "tensorboard")))
        resolved = json.loads(config.to_json_best_effort())
        for name in names:
            try:
                tracker = _CLASSES[name](workdir=workdir, resume_step=resume_step, config=resolved, t=t)
            except ImportError as e:
                if name != "tensorboard":
                    raise
                print(
                    f"train.trackers: no TensorBoard events: {e.name or 'tensorflow'} is not installed "
                    "(metrics.jsonl has the metrics; pip install tensorflow-cpu, or drop 'tensorboard')",
                    file=sys.stderr,
                )
                continue
            self.trackers.append(tracker)

    def write(self, step: int, metrics: dict) -> None:
        if self.main:
            values = {k: float(v) for k, v in metrics.items()}
            for tracker in self.trackers:
                tracker.write(step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # a tracker's failure to flush must not lose the run's own files
                print(f"tracker {type(tracker).__name__} did not close cleanly: {e}", file=sys.stderr)

"""`run(config)`: the training loop, from named parts (mesh, model, data, state, step, checkpoints).

Everything it writes lives in `config.workdir`: config.json (the run's whole config) with
sources.json and config_history.jsonl (apo_jax.train.record: a resume must continue the same run),
metrics.jsonl (one JSON object per logged step) and the other `train.trackers`
(apo_jax.train.trackers: TensorBoard events, W&B's offline files), checkpoints/ (orbax, asynchronous, the
reader's cursor beside the state) and hf/ (the final policy). A restarted run resumes from the
latest checkpoint; SIGTERM/SIGINT save and exit cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from apo_jax import models, outputs, sharding
from apo_jax.cli import UserError, expected_errors, one_line
from apo_jax.data.jsonl import parse_lines
from apo_jax.data.reader import PreferenceReader, check_records
from apo_jax.models import lora
from apo_jax.models.flops import flops_per_token, peak_flops
from apo_jax.sharding import prefetch_to_mesh, to_global
from apo_jax.train import config as config_lib
from apo_jax.train import record
from apo_jax.train.setup import BASE, FROZEN, SYNC, make_reader, setup
from apo_jax.train.step import make_eval_step, make_train_step
from apo_jax.train.trackers import Trackers


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is left intact."""


# --- parts ------------------------------------------------------------------------------------


def _checkpoint_manager(workdir: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a read-only folder): the message names the
    folder and the newest complete checkpoint, which is intact."""


@contextlib.contextmanager
def _writing(mngr, workdir: pathlib.Path, step: int):
    """Turns orbax's failure to write a checkpoint (raised by this save, or by an earlier asynchronous
    one when this call checks on it) into one line naming the folder."""
    try:
        yield
    except expected_errors() as e:
        if isinstance(e, UserError):
            raise
        done = [s for s in mngr.all_steps() if s != step]
        with contextlib.suppress(Exception):  # its threads would log the failure again at exit
            mngr.close()
        kept = f"the newest complete one is step {max(done)}" if done else "no complete checkpoint exists"
        reason = "no space left on the device" if "No space left" in str(e) else one_line(e)[:240]
        raise CheckpointWriteError(
            f"{workdir / 'checkpoints'}: the checkpoint of step {step} could not be written ({reason}); "
            f"{kept}"
        ) from e


def _save(mngr, step: int, state, reader: PreferenceReader, workdir: pathlib.Path):
    import orbax.checkpoint as ocp

    cursor = dataclasses.asdict(reader.cursor(step))  # the next row to read
    with _writing(mngr, workdir, step):
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), reader=ocp.args.JsonSave(cursor)),
            force=True,
        )


def _restore(mngr, state, reader: PreferenceReader, workdir: pathlib.Path):
    """The newest checkpoint that restores, with the reader resumed at its data cursor (in rows, so
    a resume at another batch size neither replays nor skips rows). One that does not (a truncated
    array file, an empty `_METADATA`) while an older one does is damaged: it is moved to
    `checkpoints.damaged/` (kept, not deleted) and the run says so. When none restores, nothing is
    moved and the run stops naming each checkpoint's error (a changed config fails them all alike)."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), reader=ocp.args.JsonRestore())
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=args)
        except Exception as e:
            failed.append((step, " ".join(str(e).split())[:300] or type(e).__name__))
            continue
        for bad, why in failed:
            _set_aside(mngr, workdir, bad, why)
        if failed:
            print(f"resuming from checkpoint {step}, the newest that restores", file=sys.stderr)
        break
    else:
        if failed:
            listed = "; ".join(f"{step}: {why}" for step, why in failed)
            raise config_lib.ConfigError(
                f"no checkpoint in {workdir / 'checkpoints'} restores ({listed}). If the config changed "
                "since they were written, restore it; if they are damaged, move that folder away to "
                "start afresh"
            )
        return state
    state = restored["state"]
    reader.resume(int(_host(state.step)), restored["reader"])  # the saved cursor counts rows
    return state


def _has_checkpoints(workdir: pathlib.Path) -> bool:
    """Whether the workdir holds a saved step (orbax's unfinished saves have other names)."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _set_aside(mngr, workdir: pathlib.Path, step: int, why: str) -> None:
    """Moves a damaged checkpoint out of orbax's folder (so that its step can be saved again)."""
    if jax.process_index() == 0:
        aside = workdir / "checkpoints.damaged" / str(step)
        aside.parent.mkdir(exist_ok=True)
        if aside.exists():
            aside = aside.with_name(f"{step}-{time.time_ns()}")
        (workdir / "checkpoints" / str(step)).rename(aside)
        print(f"checkpoint {step} does not restore ({why}); moved to {aside}", file=sys.stderr)
    mngr.reload()


def _host(x):
    """A replicated (or fully addressable) array as numpy, on any number of processes."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def anywhere(self) -> bool:
        """Whether any process was asked to stop. Every process must leave at the same step (the
        checkpoint is written by all of them together), so with several processes they agree on
        it after every step: a one-integer all-gather on the hosts, while the devices run on."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --- the loop ---------------------------------------------------------------------------------


def run(cfg) -> dict:
    """Trains as `cfg` says; returns {"status", "step", "metrics", "state"}. The workdir is locked
    while it runs (apo_jax.outputs.WorkdirLock): a second run on it is refused."""
    config_lib.validate(cfg)
    workdir = pathlib.Path(cfg.workdir).absolute()  # orbax refuses relative checkpoint paths
    with outputs.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _run(cfg, workdir)


class _StepLog:
    """Reads each step's metrics to the host one step late (the device never waits for the host),
    writes them every `train.log_every` steps with throughput and MFU, and counts the consecutive
    skipped updates (`skipped_run`, ending at step `flushed`) for `_stop_if_diverging`."""

    def __init__(self, t, writer, start: int, skipped_run: int, per_token: float, peak: float):
        self.t, self.writer, self.start = t, writer, start
        self.per_token, self.peak = per_token, peak
        self.bar = _progress(t, start)
        self.pending = None  # the last dispatched step's (step, metrics)
        self.last: dict = {}
        self.clock = time.perf_counter()
        self.skipped_run = skipped_run  # consecutive skipped updates, counted on the host
        self.flushed = start  # the last step whose metrics were read

    def dispatched(self, step: int, metrics) -> None:
        """Called after step `step` is dispatched: reads the previous step's metrics meanwhile."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Reads the pending step's metrics; `step_time` is the time between completions."""
        if self.pending is None:
            return
        (done, metrics), self.pending = self.pending, None
        t = self.t
        values = {k: float(_host(v)) for k, v in metrics.items()}
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        if done % t.log_every == 0 or done == t.steps:
            last = values | {"step_time": seconds, "tokens_per_second": values["tokens"] / seconds}
            if self.peak:
                last["mfu"] = last["tokens"] * self.per_token / seconds / (self.peak * jax.device_count())
            self.last = last
            self.writer.write(done, last)
            if self.bar is not None:
                self.bar.update(done - self.bar.n)
                self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_second']:.0f}")
        self.skipped_run = self.skipped_run + 1 if values["skipped"] else 0
        self.flushed = done

    def close(self) -> None:
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _stop_if_diverging(log: _StepLog, t, mngr, workdir: pathlib.Path) -> None:
    """Stops the run after `train.max_nonfinite` consecutive skipped updates (a non-finite loss or
    gradient), naming the last good checkpoint, which the skipped steps never overwrote. Checked once
    a step of this run has been read."""
    if log.flushed == log.start or log.skipped_run < t.max_nonfinite:
        return
    mngr.wait_until_finished()
    good = mngr.latest_step()
    kept = (
        f"The last good checkpoint, step {good} in {workdir / 'checkpoints'}, is intact."
        if good is not None
        else "No checkpoint was written before; nothing was exported."
    )
    raise NonFiniteError(
        f"step {log.flushed}: {t.max_nonfinite} consecutive updates had a non-finite loss or gradient "
        f"and were skipped; stopping. {kept}"
    )


def _run(cfg, workdir: pathlib.Path) -> dict:
    t = cfg.train
    run = setup(cfg)
    mesh, model, loss, reader, reference = run.mesh, run.model, run.loss, run.reader, run.reference
    found = record.sources(cfg, reader.metadata, len(reader.records))
    start_record = record.check(cfg, workdir, _has_checkpoints(workdir), found)  # before any write
    state = run.init_state()
    run.params = None  # the state holds them (donated to the first step)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(
        sharding.on_mesh(make_train_step(model, loss, run.tx, run.lr, run.step_cfg), mesh),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    mngr = _checkpoint_manager(workdir, t.keep_checkpoints)
    state = _restore(mngr, state, reader, workdir)
    start = int(_host(state.step))
    if jax.process_index() == 0:
        start_record.write(start)
    writer = Trackers(workdir, start, cfg)
    evaluate = _eval_fn(cfg, model, loss, run.step_cfg, mesh)
    per_token = flops_per_token(model.config, reader.length) * (3 + (reference in (FROZEN, BASE, SYNC)))
    peak = t.peak_flops or peak_flops(jax.devices()[0].device_kind)
    log = _StepLog(t, writer, start, int(_host(state.nonfinite_run)), per_token, peak)
    status = "done"
    batches = prefetch_to_mesh(reader.batches_from(start), mesh)
    if evaluate is not None and t.eval_every and start == 0:
        writer.write(0, evaluate(state))  # the start of Figure 4: policy = reference, rewards 0
    with _Preemption() as preempt:
        step = start
        while step < t.steps:
            state, metrics = train_step(state, next(batches))
            step += 1
            log.dispatched(step, metrics)  # the previous step's metrics, while this one runs
            _stop_if_diverging(log, t, mngr, workdir)
            evaluating = evaluate is not None and t.eval_every and step % t.eval_every == 0
            saving = t.checkpoint_every and step % t.checkpoint_every == 0
            stopping = preempt.anywhere()
            if evaluating or saving or stopping:
                log.flush()
                _stop_if_diverging(log, t, mngr, workdir)
            if evaluating:
                writer.write(step, evaluate(state))
            if saving:
                _save(mngr, step, state, reader, workdir)
            if stopping:
                status = "preempted"
                break
        log.flush()
        _stop_if_diverging(log, t, mngr, workdir)
    if mngr.latest_step() != step:
        _save(mngr, step, state, reader, workdir)
    with _writing(mngr, workdir, step):
        mngr.wait_until_finished()
    log.close()
    if status == "done" and step > start and log.skipped_run >= step - start:  # no update took effect
        raise NonFiniteError(
            f"every update of steps {start + 1}..{step} had a non-finite loss or gradient and was skipped; "
            "the model did not change and was not exported"
        )
    if status == "done" and t.export_hf:
        export(cfg, model, state.params, workdir)
    metrics = log.last if step > start else _last_logged(workdir)  # a finished run, started again
    return {"status": status, "step": step, "metrics": metrics, "state": state}


def _last_logged(workdir: pathlib.Path) -> dict:
    """The last training step's metrics in metrics.jsonl ({} if none): what a run reports when it was
    started again with no step left to train (killed after its last step, before its caller booked it)."""
    path = workdir / "metrics.jsonl"
    rows = [r for r, _ in parse_lines(path) if isinstance(r, dict) and "loss" in r] if path.exists() else []
    return max(rows, key=lambda r: r.get("step", 0)) if rows else {}


def export(cfg, model, params, workdir: pathlib.Path) -> None:
    """hf/: the policy as a Hugging Face checkpoint; for a LoRA run, the adapters merged into the
    base there, and adapter/: the adapters alone as a PEFT folder (on the base `model.path`).

    Each folder is written beside its place and moved there when complete (apo_jax.outputs.replacing):
    a full disk leaves the previous export as it was, in one line naming the folder. Every process
    gathers the weights; only the first writes."""
    import tempfile

    from safetensors import SafetensorError

    def folder(name: str):
        if jax.process_index() != 0:  # they write nothing: a scratch folder of their own
            return tempfile.TemporaryDirectory()
        # the workdir is this run's (it holds the lock): its own earlier export is replaced
        return outputs.replacing(
            workdir / name, "apo_jax.train", overwrite=True, write_errors=(SafetensorError,)
        )

    if lora.has_adapters(params):
        with folder("adapter") as tmp:
            lora.save_peft(model, params, tmp, base_model=cfg.model.path)
        model, params = lora.merge(model, params)
    with folder("hf") as tmp:
        models.to_hf(model, params, tmp)


def _progress(t, start):
    if not t.progress or jax.process_index() != 0:
        return None
    from apo_jax.cli import progress_bar

    return progress_bar(total=t.steps, initial=start, desc="train", dynamic_ncols=True)


def _eval_fn(cfg, model, loss, step_cfg, mesh):
    """Held-out metrics (`eval/...`, the first `train.eval_batches` batches of data.eval) and the
    learning-dynamics probes (`probe/<name>/...`: every full batch of each data.probes set, the log-probs
    of fixed responses over training, "Learning Dynamics of LLM Finetuning")."""
    if cfg.train.mode != "preference":
        return None
    sets = ([("eval/", cfg.data.eval, cfg.train.eval_batches)] if cfg.data.eval else []) + [
        (f"probe/{name}/", path, None)
        for name, path in config_lib.probe_sets(cfg.data.get("probes", "")).items()
    ]
    if not sets:
        return None
    step = jax.jit(sharding.on_mesh(make_eval_step(model, loss, step_cfg), mesh))
    loaded = []
    for prefix, path, limit in sets:
        reader = make_reader(path, cfg, cfg.train.batch_size // cfg.train.grad_accum, seed=0)
        vocab = model.config.vocab_size
        check_records(path, reader.records, reader.metadata, vocab_size=vocab, loss=loss, signal=False)
        n = reader.steps_per_epoch if limit is None else min(limit, reader.steps_per_epoch)
        if n == 0:
            raise config_lib.ConfigError(
                f"{prefix.rstrip('/')} ({path}) holds fewer records than one evaluation batch "
                f"(train.batch_size / train.grad_accum = {cfg.train.batch_size // cfg.train.grad_accum})"
            )
        loaded.append((prefix, [to_global(reader.batch(0, k), mesh) for k in range(n)]))

    def evaluate(state):
        metrics = {}
        for prefix, batches in loaded:
            outs = [step(state, b) for b in batches]
            metrics |= {prefix + k[5:]: float(np.mean([_host(o[k]) for o in outs])) for k in outs[0]}
        return metrics

    return evaluate

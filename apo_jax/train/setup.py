"""The run, built once: `setup(cfg)` returns what a training loop composes (MaxText's
`setup_train_loop`): the mesh, the model and its placed parameters, the bound loss, the reader, the
optimizer and its schedule, the step's static config and where the reference comes from, decided
here and nowhere else. `train.run` is `setup` + `make_train_step` + its loop; the benchmarks and the
experiments build their steps from the same parts.

Reference sources (`REFERENCES`):
  - `none`: the loss uses no reference (SimPO, ORPO, SFT);
  - `precomputed`: log-probs stored in the records by apo_jax.train.reference;
  - `frozen`: a frozen copy of the starting policy (or of `reference.path`), in the compute dtype;
  - `base`: a LoRA run's base, the adapters off: no copy, read out of the policy's own parameters;
  - `sync`: TR-DPO's reference, mixed towards the policy every `reference.sync_steps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from apo_jax import sharding
from apo_jax.data.reader import PreferenceReader, check_records
from apo_jax.models import lora
from apo_jax.train import config as config_lib
from apo_jax.train.reference import check_precomputed
from apo_jax.train.state import build_model, initial_state, make_optimizer, model_vocab_size
from apo_jax.train.step import REFERENCES, StepConfig

NONE, PRECOMPUTED, FROZEN, BASE, SYNC = REFERENCES


def reference_source(cfg, loss) -> str:
    """Where the reference log-probs of a run of `cfg` with `loss` come from (one of REFERENCES)."""
    if loss is None or not loss.uses_reference:
        return NONE
    if cfg.reference.mode == FROZEN and cfg.lora.rank and not cfg.reference.path:
        return BASE
    return cfg.reference.mode


def make_reader(path, cfg, batch_size: int, seed: int, grad_accum: int = 1) -> PreferenceReader:
    """The records at `path` batched as the config's data group says (train, eval and probe sets)."""
    d = cfg.data
    return PreferenceReader(
        path,
        global_batch_size=batch_size,
        seed=seed,
        layout=d.layout,
        length=d.length or None,
        pad_id=d.pad_id,
        packed_rows=d.packed_rows or None,
        grad_accum=grad_accum,
        bucket=d.bucket,
    )


def step_config(cfg, reference: str) -> StepConfig:
    """The step's static settings from the run config and the resolved reference source."""
    t = cfg.train
    return StepConfig(
        mode=t.mode,
        layout=cfg.data.layout,
        grad_accum=t.grad_accum,
        reference=reference,
        sync_steps=cfg.reference.sync_steps,
        mixup_alpha=cfg.reference.mixup_alpha,
        ld_alpha=cfg.loss.get("ld_alpha", None),
        use_weighting=bool(cfg.loss.get("use_weighting", False)),
    )


@dataclasses.dataclass
class Run:
    """The parts of a run (`setup`); `init_state(params)` builds its first TrainState."""

    cfg: Any
    mesh: jax.sharding.Mesh
    model: Any
    params: Any
    loss: Any  # bound hyperparameters; None for SFT
    reference: str  # one of REFERENCES
    tx: Any
    lr: Any  # the optax schedule
    step_cfg: StepConfig
    reader: PreferenceReader | None

    def init_fn(self):
        """The traceable (params, ref_loaded) -> first TrainState (jit it; `initial_state`)."""
        loss_state = self.loss.init_state() if self.loss is not None and self.loss.stateful else None

        def init(params, ref_loaded):
            return initial_state(
                self.model,
                self.tx,
                params,
                self.reference,
                seed=self.cfg.train.seed,
                mesh=self.mesh,
                loss_state=loss_state,
                ref_loaded=ref_loaded,
            )

        return init

    def init_state(self):
        """The first TrainState from `params`, with the reference loaded from `reference.path` when
        the config names one (its architecture must be the policy's)."""
        ref_loaded = None
        if self.reference in (FROZEN, SYNC) and self.cfg.reference.path:
            ref_cfg = self.cfg.copy_and_resolve_references()
            ref_cfg.model.path = self.cfg.reference.path
            ref_model, ref_loaded = build_model(ref_cfg, self.mesh, adapters=False)
            if ref_model.config != lora.plain(self.model.config):
                raise config_lib.ConfigError(
                    f"reference.path={self.cfg.reference.path}: its architecture differs from the policy's"
                )
        return jax.jit(self.init_fn())(self.params, ref_loaded)


def setup(cfg, *, mesh=None, model=None, params=None, data: bool = True) -> Run:
    """Builds the run `cfg` describes (validated: `config.validate`). `mesh`, `model` and `params`
    replace the config's (a topology's abstract devices, a preset's abstract shapes); `data=False`
    opens no records (no reader, no data checks). The checks that need the mesh, the records and the
    model's vocabulary (each beside its owner: the records' in the reader, the precomputed
    reference's in apo_jax.train.reference) run before any weight is read."""
    t = cfg.train
    mesh = mesh if mesh is not None else sharding.make_mesh(**dict(cfg.mesh))
    loss = config_lib.build_loss(cfg) if t.mode == "preference" else None
    config_lib.check_mesh(cfg, mesh)
    reader = None
    if data:
        reader = make_reader(cfg.data.train, cfg, t.batch_size, t.seed, t.grad_accum)
        vocab = model.config.vocab_size if model is not None else model_vocab_size(cfg.model)
        check_records(
            cfg.data.train,
            reader.records,
            reader.metadata,
            vocab_size=vocab,
            loss=loss,
            preference=t.mode == "preference",
        )
    reference = reference_source(cfg, loss)
    if data and reference == PRECOMPUTED:
        check_precomputed(cfg, reader.metadata)
    if model is None:
        model, params = build_model(cfg, mesh)
    tx, lr = make_optimizer(cfg.optimizer, t.steps)
    return Run(cfg, mesh, model, params, loss, reference, tx, lr, step_config(cfg, reference), reader)

"""Training: the config schema, the jitted step, the loop with checkpoints and preemption."""

from apo_jax.train.config import ConfigError, default_config, validate
from apo_jax.train.loop import NonFiniteError, run
from apo_jax.train.state import TrainState, make_optimizer
from apo_jax.train.step import StepConfig, make_eval_step, make_train_step

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "StepConfig",
    "TrainState",
    "default_config",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "run",
    "validate",
]

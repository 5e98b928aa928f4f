"""A tiny APO-zero run on CPU: the trainer end to end in about a minute.

    python -c "from apo_jax.data.tiny import *; tiny_preference_records('/tmp/apo/train', tiny_tokenizer())"
    python -m experiments.run --config=experiments/configs/tiny_preference.py \\
        --config.data.train=/tmp/apo/train --config.workdir=/tmp/apo/run

Hardware: any CPU. Expected: loss falls from 1.0 (APO-zero at policy = reference), the chosen
log-likelihood rises and the rejected falls; metrics.jsonl, checkpoints/ and hf/ in the workdir.
"""

from apo_jax.train.config import default_config, fill_loss


def get_config(arg=None):
    del arg
    config = default_config()
    # Model
    config.model.preset = "tiny"
    # Data
    config.data.train = "/tmp/apo/train"
    # Loss
    config.loss.name = "apo_zero"
    config.loss.beta = 0.1  # APO paper, Section 5.2
    # Optimizer: a tiny random model needs a far larger step than the paper's 2e-7
    config.optimizer.lr = 1e-3
    config.optimizer.schedule = "constant"
    # Train
    config.train.steps = 50
    config.train.batch_size = 8
    config.train.checkpoint_every = 25
    config.workdir = "/tmp/apo/run"
    return fill_loss(config)

"""On-policy CLAIR in the online loop: each round the policy answers, the reviser (the miniature's
minimal reviser, served over loopback HTTP like an OpenAI-compatible endpoint) revises the first answer,
and (revision, answer) is the pair; APO-zero, the paper's objective for CLAIR data.

    python -m experiments.run --config=online_clair
"""

from apo_jax.train.config import fill_loss
from experiments.configs import online_dpo


def get_config(arg: str = ""):
    config = online_dpo.get_config(arg, name="online_clair")
    config.online.labeler = "clair"
    config.loss.name = "apo_zero"
    return fill_loss(config)

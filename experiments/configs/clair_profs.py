"""ProFS on the miniature: M edited, not trained, with the CLAIR pairs (a training-free baseline).

    python -m experiments.run --config=clair_profs          # variants as in the grid: :tiny for CI

The preference subspace of M's mean answer embeddings (revised vs original answers) is projected out
of the MLP output of the upper layer (apo_jax.train.edit); accuracy before and after as in every cell.
"""

from __future__ import annotations

from experiments.configs import grid


def get_config(arg: str = ""):
    config = grid.miniature_only(
        "clair_profs", "clair_apo_zero", arg, at_scale="use python -m apo_jax.train.edit"
    )
    config.experiment.update({"method": "profs", "profs_layers": "1:2", "profs_rank": 2})  # M has 2 layers
    return config

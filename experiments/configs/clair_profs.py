"""ProFS on the miniature: M edited, not trained, with the CLAIR pairs (a training-free baseline).

    python -m experiments.run --config=clair_profs          # variants as in the grid: :tiny for CI

The preference subspace of M's mean answer embeddings (revised vs original answers) is projected out
of the MLP output of the upper layer (apo_jax.models.edit); accuracy before and after as in every cell.
"""

from __future__ import annotations

from experiments.configs import grid


def get_config(arg: str = ""):
    variant = arg or "mini"
    if variant == "paper":
        raise ValueError("clair_profs runs on the miniature; at full scale use python -m apo_jax.models.edit")
    config = grid.get_config(f"clair_apo_zero:{variant}")
    config.workdir = "workdirs/clair_profs" + ("" if variant == "mini" else f"_{variant}")
    config.experiment.update({"method": "profs", "profs_layers": "1:2", "profs_rank": 2})  # M has 2 layers
    return config

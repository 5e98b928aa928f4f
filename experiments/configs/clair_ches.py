"""Likelihood displacement on the miniature ("Unintentional Unalignment", arXiv 2410.08847): the CHES
of every dataset's pairs under M, side by side (results.md), and DPO on the CLAIR pairs after the 10%
with the highest CHES (the most alike to M, the likeliest to drag the chosen answer down) are left out.

    python -m experiments.run --config=clair_ches          # :tiny for CI
"""

from __future__ import annotations

from experiments.configs import grid


def get_config(arg: str = ""):
    config = grid.miniature_only("clair_ches", "clair_dpo", arg, at_scale="use preprocess --ches-drop 0.1")
    config.experiment.ches_drop = 0.1
    return config

"""Likelihood displacement on the miniature ("Unintentional Unalignment", arXiv 2410.08847): the CHES
of every dataset's pairs under M, side by side (results.md), and DPO on the CLAIR pairs after the 10%
with the highest CHES (the most alike to M, the likeliest to drag the chosen answer down) are left out.

    python -m experiments.run --config=clair_ches          # :tiny for CI
"""

from __future__ import annotations

from experiments.configs import grid


def get_config(arg: str = ""):
    variant = arg or "mini"
    if variant == "paper":
        raise ValueError("clair_ches is a miniature; at full scale: preprocess --ches-drop 0.1")
    config = grid.get_config(f"clair_dpo:{variant}")
    config.workdir = "workdirs/clair_ches" + ("" if variant == "mini" else f"_{variant}")
    config.experiment.ches_drop = 0.1
    return config

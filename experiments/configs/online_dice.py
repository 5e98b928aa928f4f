"""DICE ("Bootstrapping Language Models with DPO Implicit Rewards"): M trained with DPO on offline CLAIR
pairs, then rounds labeled by its own implicit reward log π − log π_M with DICE's length-regularized
shaping (α_lc by grid search), half the pairs replayed from the offline data, the reference fixed.

    python -m experiments.run --config=online_dice
"""

from experiments.configs import online_dpo


def get_config(arg: str = ""):
    config = online_dpo.get_config(arg, name="online_dice")
    config.online.update({"labeler": "dice", "replay": 0.5, "reference": "initial"})
    return config

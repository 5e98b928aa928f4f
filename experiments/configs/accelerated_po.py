"""Accelerated Preference Optimization (He, Yuan, Gu 2024): online_dpo's rounds with Nesterov
extrapolation of the policy, θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t). α = 0.5 here (unverified: not
checked against the paper). Named apart from Anchored PO (APO-zero, APO-down).

    python -m experiments.run --config=accelerated_po
"""

from experiments.configs import online_dpo


def get_config(arg: str = ""):
    config = online_dpo.get_config(arg, name="accelerated_po")
    config.online.accelerate_alpha = 0.5
    return config

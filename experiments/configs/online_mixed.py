"""online_dpo with the logit-mixing sampler of "The Crucial Role of Samplers in Online DPO": half the
samples from 1.5·ℓ_θ − 0.5·ℓ_ref, half from 0.5·ℓ_θ + 0.5·ℓ_ref, with M as the fixed reference (as in
the paper; each round's own start would make both mixtures the policy itself).

    python -m experiments.run --config=online_mixed
"""

from experiments.configs import online_dpo


def get_config(arg: str = ""):
    config = online_dpo.get_config(arg, name="online_mixed")
    config.online.update({"sampler": "mixed", "reference": "initial"})
    return config

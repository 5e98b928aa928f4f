"""Online iterative DPO on the miniature (apo_jax.train.online): each round M's current policy samples
4 answers per problem, the task's scorer labels them (right over wrong), DPO trains on the pairs with
the round's starting policy as reference, and the next round samples the new policy.

    python -m experiments.run --config=online_dpo          # :tiny for CI
    python -m experiments.run --config=online_dpo:paper    # a policy directory, prompts and a judge

The other online experiments change one thing each: online_mixed (the sampler), online_dice (the
labeler), accelerated_po (Nesterov extrapolation across rounds).
"""

from __future__ import annotations

from experiments.configs import grid


def get_config(arg: str = "", name: str = "online_dpo"):
    variant = arg or "mini"
    if variant == "paper":
        return _paper(name)
    config = grid.get_config(f"clair_dpo:{variant}")  # the miniature's M, β and optimizer
    small = variant == "tiny"
    config.workdir = grid.workdir(name, variant)
    config.experiment.update({"kind": "mini_online", "name": name, "offline_steps": 4 if small else 100})
    config.experiment.train_prompts = 16 if small else 512
    config.online.update(
        {
            "rounds": 2 if small else 3,
            "samples": 2 if small else 4,
            "max_tokens": 40,
            "max_length": 96,
            "temperature": config.experiment.temperature,  # M's own sampling temperature
            "labeler": "scorer",
            "sample_batch_size": 32 if small else 256,
        }
    )
    config.train.steps = 2 if small else 60
    config.train.eval_every = 0
    return config


def _paper(name: str):
    """Full scale, same code: Llama-3-8B-Instruct samples UltraFeedback prompts, a judge grades (the
    Samplers paper: K = 8 at temperature 0.7; DICE: replay 0.5). Paths are to be filled in."""
    config = grid.get_config("clair_dpo:paper")
    config.workdir = grid.workdir(name, "paper")
    config.experiment.update({"kind": "online", "name": name})
    config.reference.mode = "frozen"  # each round has a new reference: nothing to precompute
    config.data.train = ""
    config.online.update(
        {
            "prompts": "data/ultrafeedback_prompts.jsonl",
            "rounds": 3,
            "samples": 8,
            "temperature": 0.7,
            "labeler": "judge",
            "base_url": "http://localhost:8000/v1",
            "api_model": "judge",
            "max_length": 1024,
            "max_tokens": 512,
        }
    )
    config.train.steps = 250
    return config

"""A tiny preference run for tests: `--config=tests/configs/tiny_train.py:OVERRIDES.json`.

The argument is a JSON file of dotted overrides ({"workdir": ..., "data.train": ..., ...}).
"""

import json

from apo_jax.train.config import default_config, fill_loss


def get_config(arg=None):
    config = default_config()
    config.model.preset = "tiny"
    config.train.progress = False
    config.train.export_hf = False
    if arg:
        with open(arg) as f:
            for key, value in json.load(f).items():
                group, _, name = key.rpartition(".")
                target = config[group] if group else config
                target[name] = value
    return fill_loss(config)

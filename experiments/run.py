"""The one entry point with config flags: python -m experiments.run --config=PATH[:ARG] [--config.a.b=v].

`--config` takes an ml_collections config file (`get_config(arg)`); named experiments and the
grid (`--config=clair_apo_zero`) arrive with the experiments. Multi-host CPU/GPU runs pass
`--coordinator_address`, `--num_processes` and `--process_id` (TPU pods find them alone).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=False)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")
_PRECOMPUTE = flags.DEFINE_string(
    "precompute_reference", None, "write records with reference log-probs here, then exit"
)


def main(argv):
    del argv
    import jax

    if _COORDINATOR.value:
        if (
            jax.devices()[0].platform == "cpu"
            if not jax.config.jax_platforms
            else "cpu" in jax.config.jax_platforms
        ):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from apo_jax.train import run
    from apo_jax.train.config import ConfigError
    from apo_jax.train.loop import NonFiniteError

    config = _CONFIG.value
    try:
        if _PRECOMPUTE.value:
            from apo_jax.train.reference import precompute

            print(f"reference log-probs written to {precompute(config, _PRECOMPUTE.value)}")
            return 0
        result = run(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(
            json.dumps(
                {"status": result["status"], "step": result["step"], "loss": result["metrics"].get("loss")}
            )
        )
    return 0


if __name__ == "__main__":
    app.run(main)

"""The one entry point with config flags:

    python -m experiments.run --config=NAME[:VARIANT] [--config.a.b=v ...]

`--config.loss.<hyperparameter>=v` sets any hyperparameter of the configured loss, typed by its
default (e.g. `--config=clair_tdpo --config.loss.alpha=0.3 --config.loss.tdpo2=false`).

NAME is `experiments/configs/NAME.py` when that file exists, otherwise a grid cell
`<data>_<loss>` built by experiments/configs/grid.py (e.g. `clair_apo_zero`, `on_policy_judge_todo`);
a path to a config file works too. VARIANT: the default CPU miniature (`mini`), `tiny` (CI-sized),
`paper`, or `smollm2` (SmolLM2-135M-Instruct on this CPU; `smollm2_tiny` its CI cut). Multi-host
runs pass `--coordinator_address`, `--num_processes` and `--process_id`, or
`--distributed` where JAX finds them itself (Cloud TPU VM slices, SLURM); `python -m
experiments.launch` starts the same command on every worker (docs/multihost.md).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import sys

from absl import app, flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def resolve(value: str) -> str:
    """`--config` value -> a config file path with its argument (ml_collections takes only paths)."""
    if value.split(":", 1)[0].endswith(".py"):
        if not pathlib.Path(value.split(":", 1)[0]).is_file():
            raise ValueError(f"--config={value}: no such config file")
        return value
    name, _, variant = value.partition(":")
    if (CONFIGS / f"{name}.py").is_file() and name != "grid":
        return f"{CONFIGS / name}.py" + (f":{variant}" if variant else "")
    sys.path.insert(0, str(CONFIGS.parent.parent))
    from experiments.configs import grid

    grid.parse(name)  # ValueError listing what exists
    return f"{CONFIGS / 'grid.py'}:{value}"


def compilation_cache(workdir) -> str:
    """JAX's persistent compilation cache in `<workdir>/../jax_cache` (shared by the cells of a grid),
    unless JAX_COMPILATION_CACHE_DIR names one: a second run compiles nothing it compiled before."""
    import os

    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        pathlib.Path(workdir).absolute().parent / "jax_cache"
    )
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _rewrite_argv(argv: list[str]) -> list[str]:
    """`--config=NAME` (or `--config NAME`) -> the config file ml_collections loads."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config="):
            arg = "--config=" + resolve(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            out.append(arg)
            arg, i = resolve(argv[i + 1]), i + 1
        out.append(arg)
        i += 1
    return out


_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=False)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-host, with the coordinator found by JAX (Cloud TPU VM slices, SLURM)"
)
_PRECOMPUTE = flags.DEFINE_string(
    "precompute_reference", None, "write records with reference log-probs here, then exit"
)
_DEBUG = flags.DEFINE_bool(
    "debug", False, "tracebacks for errors reported in one line, and orbax's logs of its failures"
)


def _quiet_orbax() -> None:
    """Leaves out orbax's logged failures (each with a traceback from a background thread, hundreds
    of lines for one full disk): the run reports the same failure itself, in one line."""

    import logging as std_logging

    from absl import logging

    def keep(record) -> bool:  # orbax's own, and asyncio's about orbax's tasks at exit
        about_orbax = "orbax" in record.pathname or "orbax" in record.getMessage()
        return not (about_orbax and record.levelno >= std_logging.ERROR)

    logging.get_absl_logger().addFilter(keep)
    std_logging.getLogger("asyncio").addFilter(keep)
    # After a failed save, tensorstore's threads still call back into orbax's closed event loops; each
    # call's RuntimeError is "unraisable" (a traceback apiece, hundreds) while the run reports it once
    plain = sys.unraisablehook

    def unraisable(info):
        if not (info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"):
            plain(info)

    sys.unraisablehook = unraisable


def _run(config) -> dict | None:
    """The run `config` describes; the trainer's result, or None for the kinds that print their own."""
    from apo_jax.train import run

    if _PRECOMPUTE.value:
        from apo_jax.train.reference import precompute

        print(f"reference log-probs written to {precompute(config, _PRECOMPUTE.value)}")
        return None
    kind = config.experiment.get("kind", "")
    if kind in ("mini", "instruct"):
        from experiments.mini.model import Stopped

        if kind == "mini":
            from experiments.mini.pipeline import run as run_recipe
        else:
            from experiments.instruct.pipeline import run as run_recipe
        try:
            run_recipe(config)
        except Stopped as e:  # preempted: a clean stop, resumed by the same command
            print(json.dumps({"status": "preempted", "message": str(e)}))
        return None
    if kind in ("mini_online", "online"):
        from apo_jax.train.online import run_online
        from experiments.mini.online import run as run_mini_online

        result = (run_mini_online if kind == "mini_online" else run_online)(config)
        print(json.dumps({"status": result["status"], "rounds": len(result["rounds"])}))
        return None
    return run(config)


def _unknown_key(error: BaseException, argv: list[str]) -> str | None:
    """ml_collections' "'stepz' / Did you mean "steps"" as one line naming the flag, or None."""
    text = str(error).replace("\\'", "'").replace("\\n", " ")
    key = re.search(r"'(\w+)'", text)
    if key is None:
        return None
    flag = next(
        (a.split("=", 1)[0] for a in argv if re.search(rf"\.{key[1]}(=|$)", a)), f"config key {key[1]!r}"
    )
    hint = re.search(r'Did you mean "(\w+)"', text)
    return f"{flag}: no such config key" + (f" (did you mean {hint[1]!r}?)" if hint else "")


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if not _DEBUG.value:
        _quiet_orbax()

    if _COORDINATOR.value or _DISTRIBUTED.value:
        # Before anything touches a backend (jax.devices() would): initialize() must come first.
        # gloo carries the CPU backend's cross-process collectives; accelerators ignore the setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from apo_jax.cli import expected_errors, one_line
    from apo_jax.outputs import WorkdirLock
    from apo_jax.train.config import ConfigError, check_ranges
    from apo_jax.train.loop import NonFiniteError

    config = _CONFIG.value
    if config.workdir:
        compilation_cache(config.workdir)
    lock = WorkdirLock(config.workdir) if config.workdir and jax.process_index() == 0 else None
    try:
        check_ranges(config)  # before the data work of a recipe, not at its training
        with lock or contextlib.nullcontext():
            result = _run(config)
    except ConfigError as e:
        if _DEBUG.value:
            raise
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except expected_errors() as e:
        if _DEBUG.value:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    if jax.process_index() == 0:
        print(
            json.dumps(
                {"status": result["status"], "step": result["step"], "loss": result["metrics"].get("loss")}
            )
        )
    return 0


if __name__ == "__main__":
    try:
        argv = _rewrite_argv(sys.argv)
        sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv itself
        rest = flags.FLAGS(argv)  # parsed here, so that a bad flag or config key is one line
    except (AttributeError, KeyError) as e:
        print(f"error: {_unknown_key(e, sys.argv) or e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError, flags.Error) as e:
        from apo_jax.cli import one_line

        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv, flags_parser=lambda _: rest)

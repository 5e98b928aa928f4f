"""Experiment configs resolve; the paper variant's shapes are Llama-3-8B's; the miniature runs."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import pytest

from experiments.configs import grid
from experiments.run import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", grid.DATA)
@pytest.mark.parametrize("loss", [*grid.PAPER_LOSSES, "todo", "simpo"])
def test_every_grid_cell_resolves(data, loss):
    for variant in grid.VARIANTS:
        config = grid.get_config(f"{data}_{loss}:{variant}")
        assert config.experiment.data == data and config.loss.name == loss
        assert config.loss.beta == (0.01 if loss == "todo" else 0.1)
    path = resolve(f"{data}_{loss}:paper")
    assert path.endswith(f"experiments/configs/grid.py:{data}_{loss}:paper")


def test_names_paths_and_unknown_names():
    assert resolve("tiny_preference").endswith("experiments/configs/tiny_preference.py")
    assert resolve("some/path.py:arg") == "some/path.py:arg"
    with pytest.raises(ValueError, match="unknown experiment 'clair_nope'.*clair_apo_zero"):
        resolve("clair_nope")
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        grid.get_config("clair_apo_zero:huge")


def test_paper_variant_has_llama3_8b_shapes():
    from apo_jax import models

    config = grid.get_config("clair_apo_zero:paper")
    assert (config.optimizer.lr, config.train.batch_size, config.loss.beta) == (2e-7, 64, 0.1)
    assert config.reference.mode == "precomputed" and config.mesh.fsdp == -1
    llama = models.Llama(models.LlamaConfig.llama3_8b(param_dtype=config.model.param_dtype))
    shapes = jax.tree.leaves(models.abstract_params(llama))
    n = sum(math.prod(x.shape) for x in shapes)
    assert n == 8_030_261_248  # Meta-Llama-3-8B's published parameter count
    assert all(x.dtype == jax.numpy.bfloat16 for x in shapes)


def test_the_tiny_miniature_runs_end_to_end(tmp_path):
    from experiments.mini.pipeline import run as run_mini

    config = grid.get_config("clair_apo_zero:tiny")
    config.workdir = str(tmp_path / "run")
    config.train.progress = False
    summary = run_mini(config)
    run = pathlib.Path(config.workdir)
    for name in ("results.md", "results.json", "figure4.png", "hf/config.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)  # APO-zero at policy = reference
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and summary["contrastiveness"]["clair"]["pairs"] > 0
    text = (run / "results.md").read_text()
    assert "Held-out accuracy" in text and "jaccard_mean" in text

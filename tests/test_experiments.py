"""Experiment configs resolve; the paper variant's shapes are Llama-3-8B's; the miniature runs."""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys

import jax
import numpy as np
import pytest
from conftest import first_step

from experiments.configs import grid
from experiments.run import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", grid.DATA)
@pytest.mark.parametrize("loss", [*grid.PAPER_LOSSES, "todo", "simpo"])
def test_every_grid_cell_resolves(data, loss):
    for variant in grid.VARIANTS:
        if variant.startswith("smollm2") and data not in grid.SMOLLM2_DATA:
            with pytest.raises(ValueError, match="pairs are not built for SmolLM2"):
                grid.get_config(f"{data}_{loss}:{variant}")
            continue
        config = grid.get_config(f"{data}_{loss}:{variant}")
        assert config.experiment.data == data and config.loss.name == loss
        paper_beta = 0.01 if loss == "todo" else 0.1  # TODO's README; the APO paper, Section 5.2
        assert config.loss.beta == pytest.approx(paper_beta)  # the miniature too
    path = resolve(f"{data}_{loss}:paper")
    assert path.endswith(f"experiments/configs/grid.py:{data}_{loss}:paper")


@pytest.mark.parametrize("loss", ["tdpo", "tis_dpo", "d2po"])
def test_token_level_cells_validate_at_paper_scale_with_a_frozen_reference(loss):
    from apo_jax import train

    config = grid.get_config(f"clair_{loss}:paper")
    assert config.reference.mode == "frozen" and config.data.train == "data/clair"
    train.validate(config)


def _parse(*args):
    """The config experiments.run would get from these flags (absl + ml_collections, as it parses)."""
    from absl import flags
    from ml_collections import config_flags

    from experiments.run import _rewrite_argv

    argv, saved = _rewrite_argv(["run", *args]), sys.argv
    sys.argv = argv  # ml_collections finds the --config.* overrides in sys.argv, as in experiments.run
    try:
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False)
        values(argv)
        return values.config
    finally:
        sys.argv = saved


# ml_collections loads config files with importlib's deprecated load_module
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_loss_hyperparameters_are_config_keys():
    """`--config.loss.<key>=v` for any hyperparameter of the configured loss: config.loss holds them all
    at the registry's defaults, so ml_collections types the override; unknown keys and bad values are
    refused by it."""
    from apo_jax import losses, train
    from apo_jax.train.config import loss_hparams

    config = _parse(
        "--config=clair_tdpo:tiny",
        "--config.loss.alpha=0.3",
        "--config.loss.tdpo2=false",
        "--config.loss.beta=0.2",
    )
    config.data.train = "data/clair"  # the miniature's pipeline fills it in; validation does not open it
    train.validate(config)
    assert loss_hparams(config) == {"alpha": 0.3, "tdpo2": False, "beta": 0.2}
    assert set(loss_hparams(config)) == set(losses.get("tdpo").hparams)
    ns = _parse(
        "--config=clair_ns_dpo:tiny",
        "--config.loss.current_time=120",
        "--config.loss.normalize=True",
        "--config.loss.ld_alpha=0.5",
    )
    assert (ns.loss.current_time, ns.loss.normalize, ns.loss.ld_alpha) == (120, True, 0.5)
    assert _parse("--config=clair_dpo:tiny").loss.ld_alpha is None  # off unless set; a float when set
    for flag in ("--config.loss.gamma=1", "--config.loss.alpha=x"):
        with pytest.raises(Exception, match="gamma|alpha"):
            _parse("--config=clair_tdpo:tiny", flag)


def test_names_paths_and_unknown_names():
    assert resolve("tiny_preference").endswith("experiments/configs/tiny_preference.py")
    path = resolve("tiny_preference")
    assert resolve(f"{path}:arg") == f"{path}:arg"
    with pytest.raises(ValueError, match="--config=some/path.py:arg: no such config file"):
        resolve("some/path.py:arg")
    with pytest.raises(ValueError, match="unknown experiment 'clair_nope'.*clair_apo_zero"):
        resolve("clair_nope")
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        grid.get_config("clair_apo_zero:huge")
    assert grid.get_config("clair_steps_dpo:tiny").experiment.data == "clair_steps"  # Step-DPO pairs
    assert grid.get_config("anchor_dpo").experiment.data == "anchor"  # anchor preference pairs
    with pytest.raises(ValueError, match="in the miniature only"):
        grid.get_config("clair_steps_dpo:paper")


def test_paper_variant_has_llama3_8b_shapes_and_fits_a_v5e_8():
    from apo_jax import models, train
    from apo_jax.train.state import make_optimizer

    config = grid.get_config("clair_apo_zero:paper")
    assert (config.optimizer.lr, config.train.batch_size, config.loss.beta) == (2e-7, 64, 0.1)
    assert config.reference.mode == "precomputed" and config.mesh.fsdp == -1
    config.data.train = "data/clair"  # validation does not open it
    train.validate(config)
    llama = models.Llama(models.preset("8b", param_dtype=config.model.param_dtype))
    params = models.abstract_params(llama)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert n == 8_030_261_248  # Meta-Llama-3-8B's published parameter count
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    state = jax.eval_shape(tx.init, params)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, state)))
    # f32 master weights + bf16 first moment + f32 second moment (+ a step counter)
    assert nbytes - n * (4 + 2 + 4) < 1024
    assert nbytes + n * 4 < 128e9  # with the f32 gradients: under a v5e-8's 8 x 16 GB of HBM


def test_bfloat16_master_weights_at_the_papers_lr_are_refused():
    import jax.numpy as jnp

    from apo_jax import train

    # the reason, worked by hand: 0.01 in bfloat16 moves in steps of 2**-14 = 6.1e-5 > 2e-7
    w = jnp.asarray(0.01, jnp.bfloat16)
    assert w + jnp.asarray(2e-7, jnp.bfloat16) == w
    config = grid.get_config("clair_apo_zero:paper")
    config.data.train = "data/clair"
    config.model.param_dtype = "bfloat16"
    with pytest.raises(train.ConfigError, match="model.param_dtype='bfloat16' with optimizer.lr=2e-07"):
        train.validate(config)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """One folder for the tiny miniature and the sweep: the sweep reuses the finished cell and M."""
    return tmp_path_factory.mktemp("mini")


def test_the_tiny_miniature_runs_end_to_end(mini_root):
    from experiments.mini.pipeline import run as run_mini

    config = grid.get_config("clair_apo_zero:tiny")
    config.workdir = str(mini_root / "clair_apo_zero_seed0")  # the sweep test reuses this run
    config.train.progress = False
    summary = run_mini(config)
    run = pathlib.Path(config.workdir)
    for name in ("results.md", "results.json", "figure4.png", "hf/config.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    first = first_step(run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe/rephrased/logps/chosen" in r]  # learning-dynamics probes
    assert [r["step"] for r in probes] == [0, 2, 4] and "probe/train_pairs/logps/rejected" in probes[0]
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)  # APO-zero at policy = reference
    assert summary["contrastiveness"]["clair"]["pairs"] > 0
    text = (run / "results.md").read_text()
    assert "Held-out accuracy" in text and "jaccard_mean" in text and "positive control" in text
    for who in ("before", "after", "control"):  # accuracy ± its standard error, recomputed from the answers
        acc = summary["accuracy"][who]
        assert f"{acc['greedy']:.3f} ± {acc['greedy_se']:.3f}" in text
    answers = [json.loads(x) for x in (run / "acc_after.jsonl").read_text().splitlines()]
    from experiments.mini import model, task

    _, held_out = model.problem_sets(config.experiment)

    def right_answer(problem, text):  # exact match: the answer's last number is the solution's result
        numbers = re.findall(r"-?\d+", text)
        return float(bool(numbers) and int(numbers[-1]) == task.solve(problem)[-1][3])

    right = [right_answer(held_out[a["index"]], a["response"]) for a in answers]
    n = len(right)
    mean = sum(right) / n
    se = (sum((x - mean) ** 2 for x in right) / (n - 1)) ** 0.5 / n**0.5
    assert summary["accuracy"]["after"]["greedy"] == pytest.approx(mean)
    assert summary["accuracy"]["after"]["greedy_se"] == pytest.approx(se)


def test_the_sweep_tabulates_each_cell_over_seeds_and_marks_the_claims(mini_root):
    """Two seeds of two cells: each seed has its own M and the same scored problems; the table holds
    each cell's mean and 95% t interval over its seeds (recomputed here from the runs' results.json),
    M and the positive control, and the claims; a run by other code stops the sweep."""
    import statistics

    from safetensors.numpy import load_file

    from experiments import sweep

    root = mini_root
    args = ["--variant", "tiny", "--workdir", str(root), "--losses", "apo_zero"]
    args += ["--data", "clair,stronger_preferred", "--seeds", "0,1"]
    assert sweep.main(args) == 0
    text = (root / "comparison.md").read_text()
    rows = {}
    for line in (x for x in text.splitlines() if x.startswith("| ")):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    t_1 = 12.706204736174707  # Student's t, 97.5% quantile, 1 degree of freedom (a t table)
    for cell in ("clair_apo_zero", "stronger_preferred_apo_zero"):
        runs = [json.loads((root / f"{cell}_seed{s}" / "results.json").read_text()) for s in (0, 1)]
        assert [r["seed"] for r in runs] == [0, 1]
        greedy = [r["accuracy"]["after"]["greedy"] for r in runs]
        mean, half = statistics.fmean(greedy), t_1 * statistics.stdev(greedy) / math.sqrt(2)
        assert rows[cell][6] == f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"
        pairs = statistics.fmean(r["contrastiveness"][r["data"]]["pairs"] for r in runs)
        assert rows[cell][2] == f"{pairs:.0f}"
        assert float(rows[cell][3]) == pytest.approx(4 * 8 / pairs, abs=0.01)  # steps × batch / pairs
    # the seeds vary M (its weights differ), never the scored problems
    assert runs[0]["problems"] == runs[1]["problems"] and runs[0]["m"] != runs[1]["m"]
    w0, w1 = (load_file(pathlib.Path(r["m"]) / "model.safetensors") for r in runs)
    assert any(not np.array_equal(w0[k], w1[k]) for k in w0)
    assert "positive control (SFT on the CLAIR revisions)" in rows and "M (before)" in rows
    # stronger-preferred chosen answers are written from scratch: far less word overlap than CLAIR's
    assert float(rows["clair_apo_zero"][4]) > float(rows["stronger_preferred_apo_zero"][4])
    assert "1. **CLAIR's pairs are the most contrastive** (Table 1): **held**" in text
    assert (root / "grid.png").stat().st_size > 10_000 and (root / "accuracy.png").stat().st_size > 10_000
    stamp = (root / "clair_apo_zero_seed0" / "results.json").stat().st_mtime_ns
    assert sweep.main(args) == 0  # finished runs are not run again
    assert (root / "clair_apo_zero_seed0" / "results.json").stat().st_mtime_ns == stamp
    done = root / "stronger_preferred_apo_zero_seed1" / "results.json"
    done.write_text(json.dumps(json.loads(done.read_text()) | {"code": "0123456789ab"}))
    assert sweep.main(args) == 2  # written by other code: refused, in one line


def _run(data, loss, seed, right, contrast=None):
    """A hand-made results.json: greedy correctness over 40 problems, the first `right` of them right."""
    correct = "1" * right + "0" * (40 - right)
    acc = {"greedy_correct": correct, "sampled_correct": list(correct), "greedy_2_steps": 0.0}
    return {
        "data": data,
        "loss": loss,
        "seed": seed,
        "contrastiveness": contrast or {},
        "accuracy": {"after": acc, "before": acc},
    }


def test_claims_are_marked_from_paired_intervals():
    """The three claims on hand-made runs (3 seeds × 40 problems) whose differences are worked by hand."""
    from experiments.sweep import claims

    c = {"clair": {"jaccard_mean": 0.9, "levenshtein_mean": 2.0}}
    c["on_policy_judge"] = {"jaccard_mean": 0.6, "levenshtein_mean": 8.0}
    base = (10, 20, 30)  # M's level at each seed moves every cell together

    def grid_of(apo, dpo, judge):
        return {
            "clair_apo_zero": [_run("clair", "apo_zero", s, b + apo[s], c) for s, b in enumerate(base)],
            "clair_dpo": [_run("clair", "dpo", s, b + dpo[s], c) for s, b in enumerate(base)],
            "on_policy_judge_dpo": [
                _run("on_policy_judge", "dpo", s, b + judge[s], c) for s, b in enumerate(base)
            ],
        }

    # APO-zero right on 8 more problems than DPO at every seed (+0.2), 9 to 10 more than the judge's cell
    text = "\n".join(claims(grid_of((8, 8, 8), (0, 0, 0), (-1, -2, -1))))
    assert (
        "contrastive** (Table 1): **held** (highest Jaccard and lowest Levenshtein at 3 of 3 seeds)" in text
    )
    assert "DPO on CLAIR pairs**: **held**" in text and "clair_apo_zero beats clair_dpo" in text
    assert "greedy: +0.200 (95%: t, 2 dof [+0.200, +0.200]" in text  # no spread over seeds
    assert "best cell**: **held**. Against the closest cell, clair_apo_zero − clair_dpo" in text
    # DPO right on 8 more than APO-zero at every seed: APO-zero is worse by 0.2, beyond the margin
    text = "\n".join(claims(grid_of((0, 0, 0), (8, 8, 8), (-1, -2, -1))))
    assert "DPO on CLAIR pairs**: **not held**" in text and "clair_dpo beats clair_apo_zero" in text
    assert "best cell**: **not held** (clair_dpo beats it)" in text
    # DPO one problem ahead at one seed (-1/120 on average, t interval [-0.044, +0.027]): no difference
    # shown, and not within the 0.02 margin either; the judge's cell one problem behind at one seed
    text = "\n".join(claims(grid_of((0, 0, 0), (1, 0, 0), (-1, 0, 0))))
    assert "DPO on CLAIR pairs**: **not held**" in text and "no difference shown." in text
    assert "best cell**: **not shown** (no difference shown against clair_dpo, on_policy_judge_dpo)" in text
    c["on_policy_judge"]["levenshtein_mean"] = 1.0  # the judge's pairs now closer by edit distance
    assert (
        "contrastive** (Table 1): **not held** (highest Jaccard and lowest Levenshtein at 0 of 3"
        in claims(grid_of((8, 8, 8), (0, 0, 0), (0, 0, 0)))[0]
    )


def test_the_grid_reads_the_selected_learning_rates_and_selection_scores_validation(mini_root):
    """Each objective trains at its own rate from experiments/configs/selected_lr.json (the shared
    rate for an objective the selection did not try); experiments.select trains on the training
    problems and scores the validation ones, never the test set."""
    from experiments import select
    from experiments.mini import model

    table = json.loads((ROOT / "experiments" / "configs" / "selected_lr.json").read_text())
    for loss in grid.PAPER_LOSSES:
        assert grid.get_config(f"clair_{loss}").optimizer.lr == table["per_objective"][loss]
    assert grid.get_config("clair_simpo").optimizer.lr == table["shared"]
    assert grid.selected_lr("dpo", "shared") == table["shared"]
    # the choice: the best mean over datasets, a tie to the smaller rate
    best, shared = select.choose(
        {
            "dpo": {"1e-05": {"a": 0.5, "b": 0.7}, "3e-05": {"a": 0.7, "b": 0.6}},
            "apo_zero": {"1e-05": {"a": 0.6, "b": 0.6}, "3e-05": {"a": 0.7, "b": 0.5}},
        }
    )
    assert best == {"dpo": 3e-05, "apo_zero": 1e-05} and shared == 3e-05  # 0.6 vs 0.625
    out = mini_root / "selected.json"
    args = ["--variant", "tiny", "--workdir", str(mini_root / "select"), "--output", str(out)]
    assert select.main([*args, "--losses", "apo_zero", "--data", "clair", "--lrs", "1e-4"]) == 0
    written = json.loads(out.read_text())
    assert written["per_objective"] == {"apo_zero": 1e-4} and written["shared"] == 1e-4
    run = json.loads((mini_root / "select" / "clair_apo_zero_lr0.0001" / "results.json").read_text())
    mini = grid.get_config("clair_apo_zero:tiny").experiment
    mini.eval_set, mini.eval_prompts = "validation", select.VALIDATION_PROBLEMS["tiny"]
    _, validation = model.problem_sets(mini)
    assert run["eval_set"] == "validation" and run["problems"] == model.key([p["prompt"] for p in validation])
    assert written["validation_greedy"]["apo_zero"]["0.0001"]["clair"] == run["accuracy"]["after"]["greedy"]


def test_profs_edits_m_instead_of_training_it(mini_root):
    from experiments.mini.pipeline import run as run_mini
    from experiments.run import resolve

    assert resolve("clair_profs:tiny").endswith("experiments/configs/clair_profs.py:tiny")
    from experiments.configs import clair_profs

    config = clair_profs.get_config("tiny")
    config.workdir = str(mini_root / "clair_profs")
    config.train.progress = False
    summary = run_mini(config)
    run = pathlib.Path(config.workdir)
    assert summary["status"] == "edited" and not (run / "metrics.jsonl").exists()
    assert (run / "hf" / "config.json").exists() and "Held-out accuracy" in (run / "results.md").read_text()
    with pytest.raises(ValueError, match="miniature"):
        clair_profs.get_config("paper")


@pytest.mark.parametrize("loss", ["mask_dpo", "tis_dpo"])
def test_token_weighted_cells_train_on_records_with_token_weights(mini_root, loss):
    """clair_mask_dpo: the scorer's line labels become 0/1 token weights; clair_tis_dpo: two contrastive
    models (DPO on the pairs and on the reversed pairs) give TIS weights. Both then train token-level."""
    from apo_jax.data.tfrecords import read_records
    from experiments.mini.pipeline import run as run_mini

    config = grid.get_config(f"clair_{loss}:tiny")
    config.workdir = str(mini_root / f"clair_{loss}")
    config.train.progress = False
    run_mini(config)  # the records the run trained on, as its config.json says
    trained_on = json.loads((pathlib.Path(config.workdir) / "config.json").read_text())["data"]["train"]
    records, meta = read_records(trained_on)
    assert meta["token_weights"]["method"] == {"mask_dpo": "mask", "tis_dpo": "tis"}[loss]
    assert all(len(r["chosen_weights"]) == len(r["chosen_ids"]) for r in records)
    if loss == "mask_dpo":  # CLAIR's revision is right everywhere; the answer keeps only its wrong lines
        assert all(np.all(r["chosen_weights"] == 1) for r in records)
        assert any(np.any(r["rejected_weights"] == 0) for r in records)
    else:  # k·exp(±clip(d, -1, 1)) lies in [e^-1, e]
        w = np.concatenate([r["rejected_weights"] for r in records])
        assert np.all((w >= np.exp(-1) - 1e-6) & (w <= np.exp(1) + 1e-6)) and np.ptp(w) > 0
    assert first_step(config.workdir)["loss"] == pytest.approx(np.log(2), abs=1e-6)


def test_online_clair_runs_rounds_through_the_loopback_reviser(mini_root):
    """online_clair:tiny: each round's pairs are the reviser's (HTTP) revisions of that round's samples."""
    from apo_jax.data.jsonl import read_jsonl
    from experiments.mini import online, task
    from experiments.mini.server import problem_of

    for name in ("online_dpo", "online_mixed", "online_dice", "accelerated_po", "online_judge"):
        assert resolve(f"{name}:tiny").endswith(f"experiments/configs/{name}.py:tiny")
    from experiments.configs import online_clair

    config = online_clair.get_config("tiny")
    config.workdir = str(mini_root / "online_clair")
    config.train.progress = False
    summary = online.run(config)
    assert summary["status"] == "done"  # experiments.run prints it
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and len(summary["accuracy"]) == 3
    run = pathlib.Path(config.workdir)
    for t in (0, 1):
        first = {
            s["prompt"]: s["response"]
            for s in read_jsonl(run / f"round_{t}" / "samples.jsonl")
            if s["sample"] == 0
        }
        pairs = read_jsonl(run / f"round_{t}" / "pairs.jsonl")
        assert pairs and all(p["rejected"] == first[p["prompt"]] for p in pairs)
        assert all(p["chosen"] == task.revise(problem_of(p["prompt"]), p["rejected"]).strip() for p in pairs)
    assert "| after round 1 |" in (run / "results.md").read_text()

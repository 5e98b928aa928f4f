"""The real-model path's CI cut (`clair_apo_zero:smollm2_tiny`): SmolLM2-135M-Instruct's own answers,
CLAIR revisions through `clair revise` over HTTP, preprocess with its tokenizer, LoRA APO-zero, and
the scoring, checked against values recomputed here from the files each stage wrote."""

from __future__ import annotations

import json
import pathlib

import pytest

from experiments.configs import grid


def test_the_smollm2_cut_runs_the_whole_real_model_pipeline(tmp_path, smollm2_hf):
    from experiments.instruct import pipeline, task

    config = grid.get_config("clair_apo_zero:smollm2_tiny")
    config.workdir = str(tmp_path / "clair_apo_zero")
    config.train.progress = False
    (tmp_path / "smollm2_cache").mkdir()
    (tmp_path / "smollm2_cache" / "m").symlink_to(smollm2_hf)  # M, converted once per session
    summary = pipeline.run(config)
    run = pathlib.Path(config.workdir)
    cache = next(p for p in (tmp_path / "smollm2_cache").iterdir() if (p / "answers.jsonl").exists())

    # M's answers: two per training prompt, sampled from the real model
    rows, scored = pipeline.prompt_sets(config.experiment)
    by_prompt = {r["prompt"]: r for r in rows}
    answers = [json.loads(x) for x in (cache / "answers.jsonl").read_text().splitlines()]
    assert sorted((a["prompt"], a["sample"]) for a in answers) == sorted(
        (r["prompt"], s) for r in rows for s in (0, 1)
    )
    # CLAIR: each first answer against the task's own minimal fix of it, unchanged answers left out
    first = {a["prompt"]: a["response"] for a in answers if a["sample"] == 0}
    expected = [
        (p, task.revise(by_prompt[p], a), a) for p, a in first.items() if task.revise(by_prompt[p], a) != a
    ]
    pairs = [json.loads(x) for x in (cache / "pairs_clair.jsonl").read_text().splitlines()]
    assert sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs) == sorted(expected)
    assert summary["pairs"] == len(expected) > 0

    # training: APO-zero at policy = reference is 1.0 at the first step
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert next(m for m in metrics if "loss" in m)["loss"] == pytest.approx(1.0, abs=1e-5)

    # scoring: strict accuracy and per-prompt correctness recomputed from the answers' files
    after = {a["index"]: a["response"] for a in map(json.loads, (run / "answers_after.jsonl").open())}
    correct = [int(task.follows(r, after[i])) for i, r in enumerate(scored)]
    acc = summary["accuracy"]
    assert acc["after"]["greedy_correct"] == "".join(map(str, correct))
    assert acc["after"]["greedy"] == pytest.approx(sum(correct) / len(correct))
    assert acc["before"]["kl_to_m_per_token"] == pytest.approx(0.0, abs=1e-6)  # M against itself
    assert acc["after"]["kl_to_m_per_token"] > 0 and acc["control"]["kl_to_m_per_token"] > 0
    text = (run / "results.md").read_text()
    for who in ("before", "after", "control"):
        assert f"{acc[who]['greedy']:.3f} ± {acc[who]['greedy_se']:.3f}" in text


def test_a_preempted_training_stops_the_pipeline_instead_of_scoring(tmp_path, records):
    """A real SIGTERM in a stage's training (the handler saves and returns "preempted") stops the
    pipeline with the step and the way to resume; scoring a half-trained model as the cell's result,
    or the sweep moving on to the next cell, was the bug. The same call then finishes the run."""
    from conftest import SigtermAt
    from test_train import make_config

    from experiments.mini.model import Stopped, train_to_the_end

    cfg = make_config(tmp_path / "run", records, train__checkpoint_every=2)
    with (
        SigtermAt(3),
        pytest.raises(Stopped, match=r"run: training preempted at step 3 .*again to resume"),
    ):
        train_to_the_end(cfg)
    assert train_to_the_end(cfg)["step"] == 6


def test_grid_runs_saved_and_restored_without_overwriting(tmp_path, monkeypatch):
    """experiments.instruct.runs: finished runs go to runs/<code>/<run>.json byte for byte and come back
    as <workdir>/<run>/results.json; a run the workdir already holds is never overwritten."""
    from experiments.instruct import runs

    monkeypatch.setattr(runs, "RUNS", tmp_path / "kept")
    old = tmp_path / "old"
    for name, code in (("clair_dpo_seed0", "abc"), ("clair_apo_zero_seed1", "abc")):
        (old / name).mkdir(parents=True)
        (old / name / "results.json").write_text(json.dumps({"code": code, "name": name}))
    (old / "unfinished").mkdir()  # no results.json: nothing to keep
    assert sorted(p.name for p in runs.save(old)) == ["clair_apo_zero_seed1.json", "clair_dpo_seed0.json"]
    assert (tmp_path / "kept/abc/clair_dpo_seed0.json").read_bytes() == (
        old / "clair_dpo_seed0/results.json"
    ).read_bytes()
    new = tmp_path / "new"
    (new / "clair_dpo_seed0").mkdir(parents=True)
    (new / "clair_dpo_seed0/results.json").write_text("mine")
    assert [p.parent.name for p in runs.restore(new)] == ["clair_apo_zero_seed1"]
    assert (new / "clair_dpo_seed0/results.json").read_text() == "mine"
    assert (
        json.loads((new / "clair_apo_zero_seed1/results.json").read_text())["name"] == "clair_apo_zero_seed1"
    )


def test_the_grid_table_is_recomputed_from_the_kept_runs(tmp_path):
    """`experiments.instruct.sweep --from-runs CODE` trains nothing: the README's table comes from the
    runs committed in experiments/instruct/runs/CODE/. Its accuracies and paired gains are checked
    against numpy and scipy over the per-prompt pass strings of those files (seeds 0 and 1)."""
    import numpy as np
    from scipy import stats as sps

    from experiments.instruct import runs, sweep

    code, seeds, cells = "057ebadd8861", (0, 1), ("clair_apo_zero", "on_policy_judge_dpo")
    out = tmp_path / "report"
    argv = ["--from-runs", code, "--seeds", "0,1", "--data", "clair,on_policy_judge", "--workdir", str(out)]
    assert sweep.main([*argv, "--losses", "apo_zero,dpo"]) == 0
    text = (out / "comparison.md").read_text()

    def passes(cell, seed, who):
        kept = json.loads((runs.RUNS / code / f"{cell}_seed{seed}.json").read_text())
        return np.array([int(c) for c in kept["accuracy"][who]["greedy_correct"]])

    half = sps.t.ppf(0.975, 1) / np.sqrt(2)  # 95%, two seeds: one degree of freedom
    for cell in cells:
        acc = np.array([passes(cell, s, "after").mean() for s in seeds])
        gain = acc - np.array([passes(cell, s, "before").mean() for s in seeds])
        row = next(line for line in text.splitlines() if line.startswith(f"| {cell} |"))
        a, g = acc.std(ddof=1) * half, gain.std(ddof=1) * half
        assert f"| {acc.mean():.3f} [{acc.mean() - a:.3f}, {acc.mean() + a:.3f}] |" in row
        assert f"| {gain.mean():+.3f} [{gain.mean() - g:+.3f}, {gain.mean() + g:+.3f}] |" in row
    # a cell not kept at every asked seed is left out, as in a sweep; an unknown code is one line
    assert sweep.main([*argv, "--losses", "apo_down"]) == 1
    assert sweep.main(["--from-runs", "nope", "--workdir", str(out)]) == 2

"""The miniature's online loop (apo_jax.train.online): M samples the task's problems, a labeler makes
pairs, a round of preference training, repeat; accuracy of every round's policy on held-out problems.

    python -m experiments.run --config=online_dpo        # the task's scorer labels, uniform sampler
    python -m experiments.run --config=online_mixed      # the same with logit-mixed samples
    python -m experiments.run --config=online_dice       # DICE: DPO first, then its implicit rewards
    python -m experiments.run --config=accelerated_po    # the scorer loop with Nesterov extrapolation
    python -m experiments.run --config=online_clair      # on-policy CLAIR: the reviser over HTTP
    python -m experiments.run --config=online_judge      # a judge's 1-10 grades over HTTP

M is the same cached SFT model as in every grid cell (experiments/mini/pipeline.py).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

from apo_jax import train
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.train.online import run_online
from experiments.mini import model, pipeline, task
from experiments.mini.server import server


def _sample_score(path) -> float:
    """The task's mean score (with partial credit) of a round's samples: how good the sampled policy was."""
    return statistics.fmean(task.score(row, row["response"]) for row in read_jsonl(path))


def _offline_dpo(config, m_dir, tok, prompts, workdir) -> tuple[pathlib.Path, pathlib.Path]:
    """DICE starts from a DPO model: M trained on offline CLAIR pairs of its own answers. Returns
    (that model, the offline pairs file)."""
    mini = config.experiment
    answers = model.sample(workdir, m_dir, prompts, "answers_offline", 2, mini.temperature, mini.seed)
    pairs = write_jsonl(
        workdir / "offline_pairs.jsonl",
        pipeline.build_pairs("clair", prompts, answers, config.experiment.seed, False),
    )
    preprocess(str(pairs), workdir / "offline_records", tok, max_length=pipeline.PAIR_LENGTH, as_chat=True)
    cfg = config.copy_and_resolve_references()
    cfg.workdir, cfg.model.path, cfg.data.train = (
        str(workdir / "offline_dpo"),
        str(m_dir),
        str(workdir / "offline_records"),
    )
    cfg.train.steps = config.experiment.offline_steps
    model.say(f"DICE: DPO on {pairs.name} for {cfg.train.steps} steps gives the starting policy")
    train.run(cfg)
    tok.save_pretrained(workdir / "offline_dpo" / "hf")
    return workdir / "offline_dpo" / "hf", pairs


def _write_table(workdir, config, rows, rounds) -> None:
    """results.md: per policy, the mean score of the samples it was trained on and its accuracies."""
    mini, o = config.experiment, config.online
    md = [
        f"# Miniature online loop: {mini.name}\n",
        f"labeler {o.labeler}, sampler {o.sampler}, accelerate_alpha {o.accelerate_alpha}, "
        f"{o.samples} samples per prompt, {config.train.steps} steps per round\n",
        "| policy | mean score of the samples it was trained on | pairs | replayed | greedy accuracy "
        "| sampled accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for acc, r in zip(rows, [{}] + rounds, strict=True):
        mean = _sample_score(workdir / f"round_{r['round']}" / "samples.jsonl") if r else None
        md.append(
            f"| {acc['policy']} | {'' if mean is None else f'{mean:.3f}'} | {r.get('pairs', '')} | "
            f"{r.get('replayed', '')} | {acc['accuracy']:.3f} ± {acc['accuracy_se']:.3f} | "
            f"{acc['sampled_accuracy']:.3f} ± {acc['sampled_accuracy_se']:.3f} |"
        )
    (workdir / "results.md").write_text("\n".join(md) + "\n")


def run(config) -> dict:
    started = time.time()
    mini, o = config.experiment, config.online
    workdir = pathlib.Path(config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    m_cache, _ = model.caches(workdir, mini)
    tok = model.tokenizer(m_cache, mini.seed)
    m_dir = model.sft_model(m_cache, tok, mini, config)
    prompts, eval_prompts = model.problem_sets(mini)
    changes = {  # the online run starts from M, on the task's prompts; the caller's config stays as it was
        "online.prompts": str(write_jsonl(workdir / "prompts.jsonl", prompts)),
        "model.path": str(m_dir),
        "model.preset": "",
        "data.eval": "",
        "data.probes": "",
    }
    if o.labeler == "dice":
        start, offline = _offline_dpo(model.overridden(config, changes), m_dir, tok, prompts, workdir)
        changes |= {"model.path": str(start), "reference.path": str(m_dir), "online.offline": str(offline)}
    elif o.labeler == "scorer":
        changes["online.scorer"] = "experiments.mini.task:score"
    config = model.overridden(config, changes)
    o = config.online
    model.say(
        f"online: {o.rounds} rounds, {o.labeler} labeler, {o.sampler} sampler, "
        f"α = {o.accelerate_alpha}, {o.samples} samples of {o.prompts_per_round or len(prompts)} prompts"
    )
    if o.labeler in ("clair", "judge"):  # the stand-in reviser and judge, over loopback HTTP
        with server() as endpoint:
            o.base_url, o.api_model = endpoint.url, f"mini-{o.labeler}"
            result = run_online(config)
    else:
        result = run_online(config)
    if result["status"] != "done":
        model.say(f"{result['status']} in round {result['round']}: run the same command again to resume")
        return result
    model.say(
        f"scoring held-out accuracy of each round's policy (greedy, and {mini.eval_samples} "
        f"samples at temperature {mini.temperature})"
    )
    policies = [("start", pathlib.Path(config.model.path))] + [
        (f"after round {r['round']}", pathlib.Path(r["policy"])) for r in result["rounds"]
    ]
    rows = []
    for i, (name, path) in enumerate(policies):
        acc = model.evaluate(path, eval_prompts, workdir, f"acc_{i}", mini)
        rows.append(
            {
                "policy": name,
                "accuracy": acc["greedy"],
                "sampled_accuracy": acc["sampled"],
                "accuracy_se": acc["greedy_se"],
                "sampled_accuracy_se": acc["sampled_se"],
            }
        )
    summary = {
        "name": mini.name,
        "status": result["status"],
        "labeler": o.labeler,
        "sampler": o.sampler,
        "alpha": o.accelerate_alpha,
        "rounds": result["rounds"],
        "accuracy": rows,
        "seconds": round(time.time() - started, 1),
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    _write_table(workdir, config, rows, result["rounds"])
    model.say(
        f"done in {summary['seconds']}s: " + ", ".join(f"{r['policy']} {r['accuracy']:.3f}" for r in rows)
    )
    return summary

"""Online labelers: pairs from each prompt's sampled answers, one function per `online.labeler`
in the LABELERS table (apo_jax.train.online calls it each round).

  - `scorer`: a function (prompt row, response) -> score, e.g. a verifiable task's checker; the best
    and the worst scored sample of a prompt form its pair (no pair when all score alike).
  - `judge`: an LLM judge grades every sample 1-10 through the CLAIR client (apo_jax.eval.judge's
    grading prompt); best over worst.
  - `clair`: on-policy CLAIR: the reviser minimally revises the policy's first sample; revision over sample.
  - `dice`: DICE ("Bootstrapping Language Models with DPO Implicit Rewards", arXiv 2406.09760): the
    policy's own implicit reward r = log π_t(y|x) − log π_ref(y|x) (no β), shaped by the length penalty
    r − α_lc·|y| (characters), α_lc searched on [0, 1) in steps of 0.001 for the smallest mean length gap.

Each labeler takes (the `online` config group, the round's prompt rows, their samples, the round's
folder) and keywords `policy_dir`, `ref_dir`, `tokenizer`, `scorer`, and returns one pair row or None
per prompt; the files it leaves in the folder (scores, grades, revisions) make a resumed round reuse
what was paid for.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np

from apo_jax import outputs
from apo_jax.client import ClientConfig, answer_text, run_requests
from apo_jax.data.clair.baselines import SCORE_TEMPLATE, judge_request, parse_score
from apo_jax.data.clair.revise import revise
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.tfrecords import read_records
from apo_jax.data.token_weights import answer_token_logps


def best_worst(prompt_row: dict, samples: list[str], scores) -> dict | None:
    """The best-scored sample over the worst (the first of equals); None when all score alike."""
    hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[hi] == scores[lo]:
        return None
    return {
        "prompt": prompt_row["prompt"],
        "chosen": samples[hi],
        "rejected": samples[lo],
        "chosen_score": float(scores[hi]),
        "rejected_score": float(scores[lo]),
    }


def dice_alpha(groups: list[tuple[np.ndarray, np.ndarray]], step: float = 0.001) -> float:
    """DICE's α_lc: over α = 0, step, 2·step, ... < 1, the one whose pairs (argmax and argmin of
    r − α·len) have the smallest mean |len(chosen) − len(rejected)|, stopping once the gap grows
    (sail-sg/dice `generate_lc_paired_set.py`). `groups`: per prompt, (rewards, character lengths)."""
    best_alpha, best_gap = 0.0, None
    for alpha in np.arange(0.0, 1.0, step):
        gaps = []
        for r, n in groups:
            shaped = r - alpha * n
            gaps.append(abs(n[int(np.argmax(shaped))] - n[int(np.argmin(shaped))]))
        gap = float(np.mean(gaps))
        if best_gap is not None and gap > best_gap:
            break
        if best_gap is None or gap < best_gap:
            best_alpha, best_gap = float(alpha), gap
    return best_alpha


def _implicit_rewards(prompts, samples, policy_dir, ref_dir, o, tokenizer, workdir):
    """[prompt][sample] r = log π(y|x) − log π_ref(y|x), summed over the answer's tokens."""
    pairs = zip(prompts, samples, strict=True)
    rows = [{"prompt": p["prompt"], "chosen": s, "rejected": s} for p, ss in pairs for s in ss]
    preprocess(
        str(write_jsonl(workdir / "scored.jsonl", rows)),
        workdir / "scored",
        tokenizer,
        max_length=o.max_length,
        as_chat=True,
    )
    records, _ = read_records(workdir / "scored")
    # each row holds the sample as both answers: score one side
    pol = [float(x.sum()) for x in answer_token_logps(policy_dir, records, sides=("chosen",))["chosen"]]
    ref = [float(x.sum()) for x in answer_token_logps(ref_dir, records, sides=("chosen",))["chosen"]]
    r = np.full(len(rows), np.nan)  # samples that preprocessing drops (empty, too long) get no reward
    r[[int(x["source_index"]) for x in records]] = np.asarray(pol) - np.asarray(ref)
    return r.reshape(len(prompts), len(samples[0]))


def scorer_pairs(o, prompts, samples, workdir, *, scorer=None, **_):
    """Best over worst by `scorer` (or the `online.scorer` function), the grades kept in scores.json."""
    score = scorer or _import(o.scorer)
    scores = [[float(score(p, s)) for s in ss] for p, ss in zip(prompts, samples, strict=True)]
    (workdir / "scores.json").write_text(json.dumps(scores))  # the round's sample quality
    return [best_worst(p, ss, x) for p, ss, x in zip(prompts, samples, scores, strict=True)]


def dice_pairs(o, prompts, samples, workdir, *, policy_dir, ref_dir, tokenizer, **_):
    """Best over worst by the length-shaped implicit reward; α_lc and the rewards kept in dice.json."""
    r = _implicit_rewards(prompts, samples, policy_dir, ref_dir, o, tokenizer, workdir)
    groups = []  # per prompt: its scored samples, their rewards and character lengths
    for p, ss, ri in zip(prompts, samples, r, strict=True):
        kept = [(s, x) for s, x in zip(ss, ri, strict=True) if not np.isnan(x)]
        if len(kept) > 1:
            rewards = np.asarray([x for _, x in kept])
            lengths = np.asarray([len(s) for s, _ in kept], np.float64)
            groups.append((p, [s for s, _ in kept], rewards, lengths))
    alpha = o.dice_alpha if o.dice_alpha >= 0 else dice_alpha([(g[2], g[3]) for g in groups])
    rewards = [[None if np.isnan(x) else float(x) for x in ri] for ri in r]
    (workdir / "dice.json").write_text(json.dumps({"alpha_lc": alpha, "rewards": rewards}))
    return [best_worst(p, ss, ri - alpha * n) for p, ss, ri, n in groups]


def _client(o):
    return ClientConfig(
        base_url=o.base_url, model=o.api_model, api_key_env=o.api_key_env, concurrency=o.concurrency
    )


def judge_pairs(o, prompts, samples, workdir, **_):
    """Each sample graded by the judge (responses matched by the request's content, so a resumed
    round reuses only grades of these very samples); best over worst."""
    requests = {
        f"{i}:{j}": judge_request(o.api_model, SCORE_TEMPLATE.format(prompt=p["prompt"], answer=s))
        for i, (p, ss) in enumerate(zip(prompts, samples, strict=True))
        for j, s in enumerate(ss)
    }
    log_path = workdir / "judge.responses.jsonl"
    with outputs.OutputLock(log_path, flag="the online judge's log"):
        done, _, counters = run_requests(_client(o), requests, log_path, progress=False)
    if counters.stop:
        raise counters.stop
    pairs = []
    for i, (p, ss) in enumerate(zip(prompts, samples, strict=True)):
        scores = []
        for j in range(len(ss)):
            row = done.get(f"{i}:{j}")
            try:
                scores.append(parse_score(answer_text(row["response"])) if row else None)
            except ValueError:
                scores.append(None)
        kept = [(s, x) for s, x in zip(ss, scores, strict=True) if x is not None]  # unjudged samples sit out
        pairs.append(best_worst(p, [s for s, _ in kept], [x for _, x in kept]) if len(kept) > 1 else None)
    return pairs


def clair_pairs(o, prompts, samples, workdir, **_):
    """The reviser's revision of each prompt's first sample over the sample (revision = sample: no pair)."""
    first = [{"prompt": p["prompt"], "response": ss[0]} for p, ss in zip(prompts, samples, strict=True)]
    answers = write_jsonl(workdir / "answers.jsonl", first)
    revise(answers, workdir / "clair_pairs.jsonl", _client(o), progress=False)
    return [r for r in read_jsonl(workdir / "clair_pairs.jsonl") if r["chosen"] != r["rejected"]]


def _import(spec: str):
    module, _, name = spec.partition(":")
    if not (module and name):
        raise ValueError(f"online.scorer={spec!r}: use 'module:function'")
    return getattr(importlib.import_module(module), name)


LABELERS = {"scorer": scorer_pairs, "judge": judge_pairs, "clair": clair_pairs, "dice": dice_pairs}


def label(o, prompts, samples, *, policy_dir, ref_dir, tokenizer, workdir, scorer=None) -> list[dict]:
    """Pairs from each prompt's samples with the configured labeler (`o.labeler`)."""
    pairs = LABELERS[o.labeler](
        o,
        prompts,
        samples,
        pathlib.Path(workdir),
        policy_dir=policy_dir,
        ref_dir=ref_dir,
        tokenizer=tokenizer,
        scorer=scorer,
    )
    return [p for p in pairs if p is not None]

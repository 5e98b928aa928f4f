"""Online and iterative preference optimization: sample from the current policy, label pairs, train a
round, repeat. `run_online(config)`, with the settings in `config.online`:

    round t:  π_t ──KV-cache sampler (uniform, or logit-mixed with the reference)──▶ K samples per prompt
              samples ──labeler──▶ pairs (+ a replay share of offline pairs) ──preprocess──▶ records
              records ──train.run (reference π_t, or the initial model)──▶ π̂_{t+1}
              π_{t+1} = π̂_{t+1} + α·(π̂_{t+1} − π̂_t)  (accelerated_po; α = 0: π_{t+1} = π̂_{t+1})

Labelers (`online.labeler`):
  - `scorer`: a function (prompt row, response) -> score, e.g. a verifiable task's checker; the best
    and the worst scored sample of a prompt form its pair (no pair when all score alike).
  - `judge`: an LLM judge grades every sample 1-10 through the CLAIR client (apo_jax.eval.judge's
    grading prompt); best over worst.
  - `clair`: on-policy CLAIR: the reviser minimally revises the policy's first sample; revision over sample.
  - `dice`: DICE ("Bootstrapping Language Models with DPO Implicit Rewards", arXiv 2406.09760): the
    policy's own implicit reward r = log π_t(y|x) − log π_ref(y|x) (no β), shaped by the length penalty
    r − α_lc·|y| (characters), α_lc searched on [0, 1) in steps of 0.001 for the smallest mean length gap.
Samplers (`online.sampler`, "The Crucial Role of Samplers in Online DPO", arXiv 2409.19605):
  `uniform` samples the policy; `mixed` draws half the samples from 1.5·ℓ_θ − 0.5·ℓ_ref and half from
  0.5·ℓ_θ + 0.5·ℓ_ref (temperature `online.temperature`, the paper's 0.7).
Replay (DICE's experience replay): with γ = `online.replay`, n_off = γ·n_gen/(1 − γ) offline pairs from
`online.offline` join the n_gen generated ones.
Accelerated Preference Optimization (He, Yuan, Gu 2024, arXiv 2410.06293), `online.accelerate_alpha`:
Nesterov extrapolation of the policy across rounds, applied to the parameters where the paper writes
log π_{t+1} = (1+α)·log π̂_{t+1} − α·log π̂_t (π̂_0 = π_0); the parameter-space reading is ours, not
checked against the paper's Algorithm 1 (docs/papers.md).

Each round lives in `<workdir>/round_<t>/` (samples, pairs, records, the round's training run, the
policy); `<workdir>/online.json` records finished rounds, so a killed run resumes at the round it was in
(and that round's sampling and training resume too).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import random
import shlex
import signal
import subprocess
import time
import urllib.request

import jax
import numpy as np

from apo_jax import models, outputs
from apo_jax.cli import UserError
from apo_jax.client import ClientConfig, answer_text, run_requests
from apo_jax.data.clair.baselines import SCORE_TEMPLATE, judge_request, parse_score
from apo_jax.data.clair.revise import revise
from apo_jax.data.generate import generate_with_model, generate_with_server, read_prompts
from apo_jax.data.jsonl import read_jsonl, write_atomic, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.tfrecords import read_records
from apo_jax.data.token_weights import answer_token_logps
from apo_jax.train import loop
from apo_jax.train.config import save_config, validate_online

MIXES = ((1.5, -0.5), (0.5, 0.5))  # Shi et al.'s logit mixtures of policy and reference


# --- labelers ------------------------------------------------------------------------------------


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


def label(o, prompts, samples, *, policy_dir, ref_dir, tokenizer, workdir, scorer=None) -> list[dict]:
    """Pairs from each prompt's samples with the configured labeler."""
    workdir = pathlib.Path(workdir)
    if o.labeler == "scorer":
        score = scorer or _import(o.scorer)
        scores = [[float(score(p, s)) for s in ss] for p, ss in zip(prompts, samples, strict=True)]
        (workdir / "scores.json").write_text(json.dumps(scores))  # the round's sample quality
        pairs = [best_worst(p, ss, x) for p, ss, x in zip(prompts, samples, scores, strict=True)]
    elif o.labeler == "dice":
        r = _implicit_rewards(prompts, samples, policy_dir, ref_dir, o, tokenizer, workdir)
        groups = []  # per prompt: its scored samples, their rewards and character lengths
        for p, ss, ri in zip(prompts, samples, r, strict=True):
            kept = [(s, x) for s, x in zip(ss, ri, strict=True) if not np.isnan(x)]
            if len(kept) > 1:
                groups.append(
                    (
                        p,
                        [s for s, _ in kept],
                        np.asarray([x for _, x in kept]),
                        np.asarray([len(s) for s, _ in kept], np.float64),
                    )
                )
        alpha = o.dice_alpha if o.dice_alpha >= 0 else dice_alpha([(g[2], g[3]) for g in groups])
        rewards = [[None if np.isnan(x) else float(x) for x in ri] for ri in r]
        (workdir / "dice.json").write_text(json.dumps({"alpha_lc": alpha, "rewards": rewards}))
        pairs = [best_worst(p, ss, ri - alpha * n) for p, ss, ri, n in groups]
    elif o.labeler == "judge":
        pairs = _judge_pairs(o, prompts, samples, workdir)
    else:
        pairs = _clair_pairs(o, prompts, samples, workdir)
    return [p for p in pairs if p is not None]


def _client(o):
    return ClientConfig(
        base_url=o.base_url, model=o.api_model, api_key_env=o.api_key_env, concurrency=o.concurrency
    )


def _judge_pairs(o, prompts, samples, workdir):
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


def _clair_pairs(o, prompts, samples, workdir):
    first = [{"prompt": p["prompt"], "response": ss[0]} for p, ss in zip(prompts, samples, strict=True)]
    answers = write_jsonl(workdir / "answers.jsonl", first)
    revise(answers, workdir / "clair_pairs.jsonl", _client(o), progress=False)
    return [r for r in read_jsonl(workdir / "clair_pairs.jsonl") if r["chosen"] != r["rejected"]]


def _import(spec: str):
    module, _, name = spec.partition(":")
    if not (module and name):
        raise ValueError(f"online.scorer={spec!r}: use 'module:function'")
    return getattr(importlib.import_module(module), name)


# --- accelerated_po ---------------------------------------------------------------------------------


def extrapolate(new_hat, old_hat, alpha: float):
    """θ = θ̂_new + α·(θ̂_new − θ̂_old), leaf by leaf (accelerated_po's Nesterov step)."""
    return jax.tree.map(lambda a, b: (a + alpha * (a - b)).astype(a.dtype), new_hat, old_hat)


def _write_policy(src_hat: pathlib.Path, old_hat: pathlib.Path, alpha: float, out: pathlib.Path, tokenizer):
    model, new = models.from_hf(src_hat)
    _, old = models.from_hf(old_hat)
    with outputs.replacing(out, "apo_jax.train.online", overwrite=True) as tmp:  # a folder of its own round
        models.to_hf(model, extrapolate(new, old, alpha), tmp)
        tokenizer.save_pretrained(tmp)


# --- the loop ------------------------------------------------------------------------------------


def replay_rows(offline: list[dict], n_gen: int, gamma: float, seed: int) -> list[dict]:
    """DICE's replay share: n_off = round(γ·n_gen/(1 − γ)) offline pairs, drawn without replacement."""
    n_off = min(round(gamma * n_gen / (1 - gamma)), len(offline)) if gamma else 0
    rows = random.Random(seed).sample(offline, n_off)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} | {"source": "offline"} for r in rows]


def _round_prompts(prompts, o, t):
    n = o.prompts_per_round or len(prompts)
    start = (t * n) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(min(n, len(prompts)))]


class ServerError(UserError, RuntimeError):
    """The inference server did not come up, reload, or serve the round's policy; the message says which."""


def _get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict, timeout: float = 600.0):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _check_serves(base: str, policy: pathlib.Path) -> None:
    """The server's /v1/models must name the round's policy as its `root` (vLLM and SGLang report the
    served path there): samples from last round's weights would be mislabeled silently."""
    served = [m.get("root") for m in _get_json(f"{base}/models").get("data", [])]
    if any(served) and str(policy) not in served:
        raise ServerError(f"{base} serves {served}, not this round's policy {policy}")


@contextlib.contextmanager
def serving(o, policy: pathlib.Path):
    """The base URL of a server that serves `policy`: `online.server_url` told to load it (SGLang's
    /update_weights_from_disk) and checked, or `online.server_command` started with it (`{model}`,
    `{port}`) and stopped afterwards."""
    if o.server_url:
        base = o.server_url.rstrip("/")
        if o.server_reload:
            root = base[: -len("/v1")] if base.endswith("/v1") else base
            try:
                answer = _post_json(f"{root}/{o.server_reload}", {"model_path": str(policy)})
            except OSError as e:
                raise ServerError(f"{root}/{o.server_reload}: the reload of {policy} failed: {e}") from None
            if not answer.get("success", True):
                raise ServerError(f"{root}/{o.server_reload} refused {policy}: {answer.get('message')}")
        _check_serves(base, policy)
        yield base
        return
    command = o.server_command.format(model=shlex.quote(str(policy)), port=o.server_port)
    base = f"http://127.0.0.1:{o.server_port}/v1"
    proc = subprocess.Popen(command, shell=True, start_new_session=True)
    try:
        deadline = time.monotonic() + o.server_start_timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"online.server_command exited with {proc.returncode}: {command}")
            try:
                _check_serves(base, policy)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{command}: no answer at {base}/models in {o.server_start_timeout:g} s"
                    ) from None
                time.sleep(1.0)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _sample(cfg, batch, policy, ref, out, t: int) -> list[list[str]]:
    """`online.samples` answers of the policy to each prompt of the round (resumable: generate skips
    the rows it wrote), mixed with the reference's logits for the `mixed` sampler, or from an
    inference server serving the policy for `server` (explicit sampling parameters: vLLM would apply
    the model's generation defaults otherwise)."""
    o, mixing = cfg.online, {}
    rows = [dict(p, index=i) for i, p in enumerate(batch)]
    sampling = {"samples": o.samples, "max_tokens": o.max_tokens, "temperature": o.temperature}
    sampling |= {"seed": cfg.train.seed + t, "progress": cfg.train.progress}
    if o.sampler == "server":
        with serving(o, policy) as base:
            client = ClientConfig(
                base_url=base,
                model=o.server_model or str(policy),
                api_key_env=o.api_key_env,
                concurrency=o.concurrency,
            )
            generate_with_server(rows, out, client, **sampling)
        return _by_index(out, len(batch), o.samples)
    if o.sampler == "mixed":
        _, ref_params = models.from_hf(ref)
        mixing = {"ref_params": ref_params, "mix": [MIXES[int(s >= o.samples / 2)] for s in range(o.samples)]}
    generate_with_model(rows, out, policy, batch_size=o.sample_batch_size, **sampling, **mixing)
    return _by_index(out, len(batch), o.samples)


def _by_index(path, n: int, samples: int) -> list[list[str]]:
    by: dict = {}
    for s in read_jsonl(path):
        by.setdefault(s["index"], {})[s["sample"]] = s["response"]
    return [[by[i][k] for k in range(samples)] for i in range(n)]


def _pairs(cfg, t: int, batch, samples, policy, ref, tok, rd, offline, scorer):
    """(generated, replayed) pair rows of round `t`, labeled and tokenized into `rd/records`; a round
    labeled before a restart keeps its pairs (a judge may not answer the same twice)."""
    o = cfg.online
    if (rd / "records" / "metadata.json").exists():
        held = read_jsonl(rd / "pairs.jsonl")
        generated = [r for r in held if r["source"] == f"round_{t}"]
        return generated, [r for r in held if r["source"] != f"round_{t}"]
    pairs = label(o, batch, samples, policy_dir=policy, ref_dir=ref, tokenizer=tok, workdir=rd, scorer=scorer)
    generated = [dict(p, source=f"round_{t}") for p in pairs]
    replayed = replay_rows(offline, len(generated), o.replay, seed=cfg.train.seed + t)
    if not generated + replayed:
        raise ValueError(
            f"round {t}: the {o.labeler} labeler found no pair among {len(batch)} prompts' samples"
        )
    write_jsonl(rd / "pairs.jsonl", generated + replayed)
    preprocess(str(rd / "pairs.jsonl"), rd / "records", tok, max_length=o.max_length, as_chat=True)
    return generated, replayed


def run_online(cfg, *, scorer=None) -> dict:
    """Runs (or resumes) `cfg.online.rounds` rounds; returns {"rounds": [per-round summary], "policy"}."""
    o = cfg.online
    validate_online(o, cfg.reference.path)
    root = pathlib.Path(cfg.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)  # each round's training writes its own in round_<t>/train
    initial = pathlib.Path(cfg.model.path).absolute()
    tok = models.load_tokenizer(initial)
    prompts = read_prompts(o.prompts)
    offline = read_jsonl(o.offline) if o.replay else []
    book = root / "online.json"
    done = json.loads(book.read_text()) if book.exists() else {"rounds": []}
    policy = pathlib.Path(done["rounds"][-1]["policy"]) if done["rounds"] else initial
    prev_hat = pathlib.Path(done["rounds"][-1]["hat"]) if done["rounds"] else initial
    for t in range(len(done["rounds"]), o.rounds):
        rd = root / f"round_{t}"
        rd.mkdir(exist_ok=True)
        ref = initial if o.reference == "initial" else policy
        if cfg.reference.path:  # a fixed reference other than the start (DICE: the DPO model's own)
            ref = pathlib.Path(cfg.reference.path).absolute()
        batch = _round_prompts(prompts, o, t)
        samples = _sample(cfg, batch, policy, ref, rd / "samples.jsonl", t)
        generated, replayed = _pairs(cfg, t, batch, samples, policy, ref, tok, rd, offline, scorer)
        rc = cfg.copy_and_resolve_references()
        rc.workdir, rc.model.path, rc.model.preset = str(rd / "train"), str(policy), ""
        rc.data.train, rc.train.export_hf = str(rd / "records"), True
        rc.reference.path = "" if ref == policy else str(ref)
        result = loop.run(rc)
        if result["status"] != "done":  # preempted: rerun to resume this round's training
            return {"status": result["status"], "round": t, "rounds": done["rounds"], "policy": str(policy)}
        hat = rd / "train" / "hf"
        tok.save_pretrained(hat)
        if o.accelerate_alpha:
            _write_policy(hat, prev_hat, o.accelerate_alpha, rd / "policy", tok)
            policy = rd / "policy"
        else:
            policy = hat
        scores = rd / "scores.json"  # the scorer's grades of every sample: how good the policy was
        scored = [x for row in json.loads(scores.read_text()) for x in row] if scores.exists() else []
        done["rounds"].append(
            {
                "round": t,
                "prompts": len(batch),
                "samples": len(batch) * o.samples,
                "pairs": len(generated),
                "replayed": len(replayed),
                "final_loss": result["metrics"].get("loss"),
                "mean_sample_score": float(np.mean(scored)) if scored else None,
                "policy": str(policy),
                "hat": str(hat),
                "reference": str(ref),
            }
        )
        prev_hat = hat
        write_atomic(book, json.dumps(done, indent=2))
    return {"status": "done", "rounds": done["rounds"], "policy": str(policy)}

"""Online and iterative preference optimization: sample from the current policy, label pairs, train a
round, repeat. `run_online(config)`, with the settings in `config.online`:

    round t:  π_t ──KV-cache sampler (uniform, or logit-mixed with the reference)──▶ K samples per prompt
              samples ──labeler──▶ pairs (+ a replay share of offline pairs) ──preprocess──▶ records
              records ──train.run (reference π_t, or the initial model)──▶ π̂_{t+1}
              π_{t+1} = π̂_{t+1} + α·(π̂_{t+1} − π̂_t)  (accelerated_po; α = 0: π_{t+1} = π̂_{t+1})

Labelers (`online.labeler`: scorer, judge, clair, dice): apo_jax.data.labelers.
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

import json
import pathlib
import random

import jax
import numpy as np

from apo_jax import models, outputs
from apo_jax.client import ClientConfig
from apo_jax.data import labelers
from apo_jax.data.generate import generate_with_model, generate_with_server, read_prompts
from apo_jax.data.jsonl import read_jsonl, write_atomic, write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.inference_server import RELOADS, serving
from apo_jax.train import loop
from apo_jax.train.config import ConfigError, save_config

SAMPLERS = ("uniform", "mixed", "server")
MIXES = ((1.5, -0.5), (0.5, 0.5))  # Shi et al.'s logit mixtures of policy and reference


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


def validate(o, reference_path: str = "") -> None:
    """Checks the `online` group (the schema: apo_jax.train.config.default_online), before any work."""
    if o.labeler not in labelers.LABELERS:
        raise ConfigError(f"online.labeler={o.labeler!r}: use one of {list(labelers.LABELERS)}")
    if o.sampler not in SAMPLERS:
        raise ConfigError(f"online.sampler={o.sampler!r}: use one of {list(SAMPLERS)}")
    if o.reference not in ("previous", "initial"):
        raise ConfigError(f"online.reference={o.reference!r}: use previous or initial")
    if not 0 <= o.replay < 1:
        raise ConfigError(f"online.replay={o.replay} must lie in [0, 1)")
    if o.replay and not o.offline:
        raise ConfigError("online.replay > 0 needs online.offline: the offline pairs to replay")
    if o.samples < 2:
        raise ConfigError(f"online.samples={o.samples}: a pair needs at least 2 samples per prompt")
    if o.labeler in ("judge", "clair") and not (o.base_url and o.api_model):
        raise ConfigError(f"online.labeler={o.labeler!r} needs online.base_url and online.api_model")
    if o.sampler == "mixed" and o.reference == "previous" and not reference_path:
        raise ConfigError(
            "online.sampler='mixed' mixes the policy's logits with its reference's, but with "
            "online.reference='previous' the reference is the policy itself: set online.reference='initial' "
            "or reference.path"
        )
    if o.rounds < 1:
        raise ConfigError(f"online.rounds={o.rounds} must be >= 1")
    if o.sampler == "server" and bool(o.server_url) == bool(o.server_command):
        raise ConfigError(
            "online.sampler='server' needs exactly one of online.server_url (a running server, reloaded "
            "each round) and online.server_command (started each round with the round's policy)"
        )
    if o.server_reload not in RELOADS:
        raise ConfigError(f"online.server_reload={o.server_reload!r}: use one of {list(RELOADS)}")


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
        served = serving(
            policy,
            url=o.server_url,
            reload=o.server_reload,
            command=o.server_command,
            port=o.server_port,
            start_timeout=o.server_start_timeout,
        )
        with served as base:
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
    pairs = labelers.label(
        o, batch, samples, policy_dir=policy, ref_dir=ref, tokenizer=tok, workdir=rd, scorer=scorer
    )
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
    validate(o, cfg.reference.path)
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

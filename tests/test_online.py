"""The online loop (apo_jax.train.online): on-policy data, replay, accelerated_po, DICE's labels."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import helpers
import numpy as np
import pytest
import torch
import transformers
from conftest import first_step
from safetensors.numpy import load_file

from apo_jax import inference_server, loopback, models, train
from apo_jax.data import labelers, layouts, tiny
from apo_jax.data.generate import generate_with_model
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.data.tfrecords import read_records
from apo_jax.train import online


@pytest.fixture(scope="module")
def start(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("online")
    model = helpers.tiny_hf_llama(
        root / "m0", vocab_size=len(tiny_tokenizer), seed=4, tokenizer=tiny_tokenizer
    )
    prompts = write_jsonl(
        root / "prompts.jsonl",
        [{"prompt": f"Compute {a} + {b}."} for a, b in zip(range(1, 9), range(9, 1, -1), strict=True)],
    )
    offline = write_jsonl(root / "offline.jsonl", tiny.tiny_preference_rows(40, seed=1))
    return root, model, prompts, offline


def _config(workdir, model, prompts, **online_kw):
    cfg = train.default_config()
    cfg.workdir, cfg.model.path = str(workdir), str(model)
    cfg.loss.name, cfg.loss.beta = "sigmoid", 0.5
    cfg.optimizer.lr, cfg.optimizer.schedule = 3e-3, "constant"
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress = 2, 4, False
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.online.update(
        {
            "prompts": str(prompts),
            "rounds": 2,
            "samples": 2,
            "temperature": 1.0,
            "max_tokens": 8,
            "max_length": 64,
            "sample_batch_size": 16,
            **online_kw,
        }
    )
    return cfg


def _responses(path):
    by = {}
    for r in read_jsonl(path):
        by.setdefault(r["prompt"], {})[r["sample"]] = r["response"]
    return by


ALPHA = 0.5  # accelerated_po's α in the run below


def _longest(row, response):  # a scorer that always separates
    return float(len(response))


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, start):
    """Two rounds (mixed sampler with the initial reference, replay γ = 0.5, accelerated_po α = 0.5),
    the job killed while labeling round 1 (after its sampling) and run again: trained once for the
    tests below. Returns (config, the second call's result, round 0's metrics mtime after the first)."""
    root, m0, prompts, offline = start
    run = tmp_path_factory.mktemp("rounds") / "run"
    cfg = _config(
        run,
        m0,
        prompts,
        sampler="mixed",
        reference="initial",
        replay=0.5,
        offline=str(offline),
        accelerate_alpha=ALPHA,
    )
    calls = []

    def crashes_in_round_1(row, response):
        calls.append(1)
        if len(calls) == 8 * 2 + 1:
            raise RuntimeError("killed")
        return _longest(row, response)

    with pytest.raises(RuntimeError, match="killed"):
        online.run_online(cfg, scorer=crashes_in_round_1)
    round0 = (run / "round_0" / "train" / "metrics.jsonl").stat().st_mtime_ns
    return cfg, online.run_online(cfg, scorer=_longest), round0


def test_a_killed_job_resumes_at_its_round(rounds):
    """The run killed in round 1 resumed there: round 0's training was not run again."""
    cfg, _, round0 = rounds
    assert (pathlib.Path(cfg.workdir) / "round_0" / "train" / "metrics.jsonl").stat().st_mtime_ns == round0


def test_round_1_samples_the_new_policy_mixed_with_the_initial_reference(tmp_path, rounds, start):
    """Round 1 sampled π_1 (round 0's extrapolated policy), mixed with the initial reference:
    regenerating with it gives the same samples, regenerating with π_0 does not."""
    cfg, out, _ = rounds
    _, m0, prompts, _ = start
    rows = [{"prompt": p["prompt"], "index": i} for i, p in enumerate(read_jsonl(prompts))]
    _, ref_params = models.from_hf(m0)
    again = {}
    for name, policy in (("pi1", out["rounds"][0]["policy"]), ("pi0", m0)):
        generate_with_model(
            rows,
            tmp_path / f"{name}.jsonl",
            policy,
            samples=2,
            max_tokens=8,
            temperature=1.0,
            seed=cfg.train.seed + 1,
            batch_size=16,
            progress=False,
            ref_params=ref_params,
            mix=[online.MIXES[0], online.MIXES[1]],
        )
        again[name] = _responses(tmp_path / f"{name}.jsonl")
    round1 = _responses(pathlib.Path(cfg.workdir) / "round_1" / "samples.jsonl")
    assert again["pi1"] == round1 and again["pi0"] != round1


def test_a_rounds_pairs_are_its_samples_plus_the_replay_share(rounds):
    """Round 1's pairs are its own samples, longest over shortest, plus n_gen offline pairs (γ = 0.5)."""
    cfg, out, _ = rounds
    run = pathlib.Path(cfg.workdir)
    round1 = _responses(run / "round_1" / "samples.jsonl")
    pairs = read_jsonl(run / "round_1" / "pairs.jsonl")
    generated = [p for p in pairs if p["source"] == "round_1"]
    assert len(generated) == out["rounds"][1]["pairs"] > 0
    assert sum(p["source"] == "offline" for p in pairs) == len(generated)
    for p in generated:
        mine = list(round1[p["prompt"]].values())
        assert p["chosen"] in mine and p["rejected"] in mine
        assert len(p["chosen"]) == max(map(len, mine)) > len(p["rejected"]) == min(map(len, mine))


def test_accelerated_po_extrapolates_every_tensor(rounds, start):
    """θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t), θ̂_0 = θ_0, on every tensor of the checkpoints."""
    _, out, _ = rounds
    r0, r1 = out["rounds"]
    dirs = {"m0": start[1], "h1": r0["hat"], "p1": r0["policy"], "h2": r1["hat"], "p2": r1["policy"]}
    weights = {k: load_file(f"{d}/model.safetensors") for k, d in dirs.items()}
    for key in weights["m0"]:
        for new, old, got in (("h1", "m0", "p1"), ("h2", "h1", "p2")):
            expected = weights[new][key] + ALPHA * (weights[new][key] - weights[old][key])
            np.testing.assert_allclose(weights[got][key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
    assert not np.allclose(weights["h1"][key], weights["m0"][key])


def test_the_fixed_reference_starts_round_0_at_log_2_only(rounds):
    """With the initial model as reference, round 0 starts at policy = reference (DPO's log 2) and
    round 1 does not."""
    run = pathlib.Path(rounds[0].workdir)
    assert first_step(run / "round_0" / "train")["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first_step(run / "round_1" / "train")["loss"] - math.log(2)) > 1e-3


def test_finished_rounds_are_not_run_again(rounds):
    cfg, out, _ = rounds
    book = pathlib.Path(cfg.workdir) / "online.json"
    stamp = book.stat().st_mtime_ns
    assert online.run_online(cfg, scorer=_longest)["rounds"] == out["rounds"]
    assert book.stat().st_mtime_ns == stamp


def test_sigterm_during_a_rounds_training_resumes_that_training(tmp_path, start, monkeypatch):
    """A real SIGTERM while round 1 trains: the loop saves and reports `preempted`, round 1 is not
    booked; the rerun neither samples nor labels round 1 again nor restarts its training (it goes on from the
    checkpoint: every step is logged once), and ends with both rounds. Its pairs and records are
    kept as they were, not labeled again."""
    import signal
    import threading

    from apo_jax.train import loop

    root, m0, prompts, _ = start
    cfg = _config(tmp_path / "run", m0, prompts)
    cfg.train.steps = 3
    longest = lambda row, response: float(len(response))  # noqa: E731
    real_run = loop.run

    def run_with_sigterm(rc):
        if not rc.workdir.endswith("round_1/train") or (tmp_path / "fired").exists():
            return real_run(rc)
        (tmp_path / "fired").touch()
        mine = lambda *_: None  # noqa: E731  holds SIGTERM until the loop installs its own handler
        old = signal.signal(signal.SIGTERM, mine)

        def kill_once_the_loop_listens():
            for _ in range(60_000):
                if signal.getsignal(signal.SIGTERM) is not mine:
                    signal.raise_signal(signal.SIGTERM)
                    return
                threading.Event().wait(0.001)

        threading.Thread(target=kill_once_the_loop_listens, daemon=True).start()
        try:
            return real_run(rc)
        finally:
            signal.signal(signal.SIGTERM, old)

    monkeypatch.setattr(loop, "run", run_with_sigterm)
    run = tmp_path / "run"
    out = online.run_online(cfg, scorer=longest)
    assert out["status"] == "preempted" and out["round"] == 1 and len(out["rounds"]) == 1
    assert len(json.loads((run / "online.json").read_text())["rounds"]) == 1
    kept = (
        "round_0/train/metrics.jsonl",
        "round_1/samples.jsonl",
        "round_1/pairs.jsonl",
        "round_1/records/metadata.json",
    )
    stamps = {f: (run / f).stat().st_mtime_ns for f in kept}
    metrics = run / "round_1" / "train" / "metrics.jsonl"
    done_before = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert 0 < len(done_before) < 3
    out = online.run_online(cfg, scorer=longest)
    assert out["status"] == "done" and len(out["rounds"]) == 2
    assert {f: (run / f).stat().st_mtime_ns for f in stamps} == stamps
    saved = json.loads((run / "config.json").read_text())  # the loop's config, and each round's run's
    assert saved["online"]["rounds"] == 2 and saved["train"]["steps"] == 3
    round1 = json.loads((run / "round_1" / "train" / "config.json").read_text())
    assert round1["model"]["path"] == out["rounds"][0]["policy"]  # round 1 trains π_1
    steps = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == 3 and steps[: len(done_before)] == done_before


def test_dice_alpha_search_stops_once_the_length_gap_grows():
    # rewards (1, 0.5, 0) at lengths (100, 50, 40): r − α·len picks (0, 2) up to α = 0.010 (gap 60),
    # (1, 2) from 0.011 (gap 10), and (1, 0) from 0.017 (gap 50): the search keeps 0.011 and stops there
    groups = [(np.array([1.0, 0.5, 0.0]), np.array([100.0, 50.0, 40.0]))]
    assert labelers.dice_alpha(groups) == pytest.approx(0.011)
    assert labelers.dice_alpha([(np.array([1.0, 0.0]), np.array([5.0, 5.0]))]) == 0.0


def test_dice_labels_by_the_implicit_reward_of_policy_over_reference(tmp_path, start, tiny_tokenizer):
    """DICE's r = log π(y|x) − log π_ref(y|x) (no β) against transformers' log-probs: the pair is the
    argmax over the argmin of r − α_lc·len(y)."""
    root, m0, _, _ = start
    m1 = helpers.tiny_hf_llama(
        tmp_path / "m1", vocab_size=len(tiny_tokenizer), seed=9, tokenizer=tiny_tokenizer
    )
    prompts = [{"prompt": "Compute 1 + 2."}, {"prompt": "Compute 3 - 1."}]
    samples = [["1 + 2 = 3\nAnswer: 3", "Answer: 4", "1 plus 2 is 3"], ["3 - 1 = 2", "2", "Answer: 2"]]
    o = train.default_config().online
    o.update({"labeler": "dice", "dice_alpha": 0.01, "max_length": 64})
    pairs = labelers.label(
        o, prompts, samples, policy_dir=m1, ref_dir=m0, tokenizer=tiny_tokenizer, workdir=tmp_path
    )
    records, _ = read_records(tmp_path / "scored")
    batch = layouts.padded(records, 64)
    r = 0.0
    for sign, d in ((1.0, m1), (-1.0, m0)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ids = torch.tensor(batch["chosen_input_ids"].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(
                hf(input_ids=ids, attention_mask=torch.tensor(batch["chosen_attention_mask"])).logits, -1
            )
        tok = np.take_along_axis(logp[:, :-1].numpy(), batch["chosen_input_ids"][:, 1:, None], -1)[..., 0]
        r = r + sign * (tok * batch["chosen_loss_mask"][:, 1:]).sum(-1)
    shaped = np.asarray(r).reshape(2, 3) - 0.01 * np.array([[len(s) for s in ss] for ss in samples])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (ss[int(np.argmax(x))], ss[int(np.argmin(x))]) for ss, x in zip(samples, shaped, strict=True)
    ]
    np.testing.assert_allclose([p["chosen_score"] for p in pairs], shaped.max(-1), rtol=1e-4, atol=1e-4)
    saved = json.loads((tmp_path / "dice.json").read_text())
    assert saved["alpha_lc"] == 0.01


def test_judge_and_clair_labelers_through_a_loopback_server(tmp_path, tiny_tokenizer):
    """The judge grades each sample over HTTP (best over worst; an unreadable grade sits out); on-policy
    CLAIR sends the first sample to the reviser and prefers its revision."""
    import re

    def respond(body):
        text = body["messages"][-1]["content"]
        if "{student_solution}" in text:  # the CLAIR reviser: upper-cases the answer
            answer = re.search(r"\{student_solution\}: (.*?)\n\n-----", text, re.S).group(1)
            return "{teacher_reasoning}: louder\n{corrected_student_solution}: " + answer.upper()
        answer = re.search(r"\[Response\]\n(.*)\n$", text, re.S).group(1)  # the judge: longer is better
        return "I cannot grade this." if answer == "zz" else f"Fine.\nScore: {min(len(answer), 10)}"

    server = loopback.ChatServer(respond)
    try:
        prompts = [{"prompt": "p0"}, {"prompt": "p1"}, {"prompt": "p2"}]
        samples = [["a", "bbbb", "cc"], ["zz", "y", "xxx"], ["same", "four", "sure"]]
        o = train.default_config().online
        o.update({"labeler": "judge", "base_url": server.url, "api_model": "judge-m", "concurrency": 2})
        pairs = labelers.label(
            o, prompts, samples, policy_dir=None, ref_dir=None, tokenizer=None, workdir=tmp_path
        )
        # p0: 4 over 1; p1: "zz" unreadable, 3 over 1; p2: all graded 4, no pair
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
            ("p0", "bbbb", "a"),
            ("p1", "xxx", "y"),
        ]
        assert len(server.bodies) == 9 and all(b["model"] == "judge-m" for b in server.bodies)
        o.labeler = "clair"
        pairs = labelers.label(
            o, prompts, samples, policy_dir=None, ref_dir=None, tokenizer=None, workdir=tmp_path
        )
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [("A", "a"), ("ZZ", "zz"), ("SAME", "same")]
    finally:
        server.close()


def test_server_sampler_samples_each_rounds_policy_from_an_inference_server(tmp_path, start):
    """online.sampler = "server" against a loopback OpenAI-compatible server on transformers' model:
    each round tells it to load that round's policy (SGLang's /update_weights_from_disk) and checks
    /v1/models before sampling; the round's samples are the server's, with explicit sampling
    parameters; and at temperature 0 the server's samples of round 1's policy equal apo_jax's own
    greedy sampler on it (while π_0's differ: they come from the current round's weights)."""
    root, m0, prompts, _ = start
    longest = lambda row, response: float(len(response))  # noqa: E731
    with helpers.ModelServer(m0) as server:
        cfg = _config(tmp_path / "run", m0, prompts, sampler="server", server_url=server.url)
        cfg.online.server_model = "policy"
        out = online.run_online(cfg, scorer=longest)
        pi1 = pathlib.Path(out["rounds"][0]["policy"])
        assert server.reloads == [str(m0), str(pi1)]
        sent = read_jsonl(tmp_path / "run" / "round_1" / "samples.jsonl.responses.jsonl")
        assert {r["request"]["temperature"] for r in sent} == {1.0} and {
            r["request"]["max_tokens"] for r in sent
        } == {8}
        # temperature 0: the server (torch) and apo_jax's sampler agree on π_1, and π_1 is not π_0
        greedy = _config(
            tmp_path / "greedy", m0, prompts, sampler="server", server_url=server.url, temperature=0.0
        )
        greedy.online.server_model = "policy"
        batch = read_jsonl(prompts)
        served = online._sample(greedy, batch, pi1, pi1, tmp_path / "served.jsonl", 0)
    rows = [dict(p, index=i) for i, p in enumerate(batch)]
    ours = {}
    for name, policy in (("pi1", pi1), ("pi0", m0)):
        out_path = tmp_path / f"{name}.jsonl"
        generate_with_model(
            rows, out_path, policy, max_tokens=8, temperature=0.0, batch_size=16, progress=False
        )
        by = {r["index"]: r["response"] for r in read_jsonl(out_path)}
        ours[name] = [[by[i]] * 2 for i in range(len(batch))]  # greedy: both samples alike
    assert served == ours["pi1"] != ours["pi0"]


def test_server_command_starts_a_server_on_the_policy_and_stops_it(tmp_path, start):
    """online.server_command: a server started with the round's policy ({model}, {port}), waited for
    until /v1/models names that policy, answering as transformers' greedy model does, and stopped
    (its whole process group) when sampling is done."""
    import socket

    root, m0, prompts, _ = start
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(
        tmp_path / "run", m0, prompts, sampler="server", temperature=0.0, samples=2, server_port=port
    )
    helpers_py = pathlib.Path(__file__).with_name("helpers.py")
    cfg.online.server_command = f"{sys.executable} {helpers_py} serve {{model}} {{port}}"
    batch = read_jsonl(prompts)[:2]
    samples = online._sample(cfg, batch, m0, m0, tmp_path / "served.jsonl", 0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(m0).eval()
    tok = transformers.AutoTokenizer.from_pretrained(m0)
    for row, got in zip(batch, samples, strict=True):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        want = tok.decode(
            hf.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :],
            skip_special_tokens=True,
        )
        assert got == [want, want]
    with pytest.raises(OSError):  # stopped
        inference_server.get_json(f"http://127.0.0.1:{port}/v1/models", timeout=2)

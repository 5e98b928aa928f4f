"""CLAIR: the revision prompt and parser on real GPT-4 data, the resumable client against a real
loopback server that misbehaves, and the contrastiveness metrics against hand-worked values."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from helpers import CLAIR_ROWS, DATA, ROOT, RecordedReviser, clair_answers, revise_cmd

from apo_jax.client import ClientConfig
from apo_jax.data.clair import ParseError, jaccard, levenshtein, pair_stats, parse_revision, revision_messages
from apo_jax.data.clair.revise import revise
from apo_jax.loopback import ChatServer

# --- prompt and parser ------------------------------------------------------------------------


def test_revision_request_is_the_papers_exactly():
    for row in CLAIR_ROWS:
        assert revision_messages(row["prompt"], row["rejected"]) == row["reviser_request"]["messages"]


def test_parser_reads_all_ten_gpt4_responses():
    for row in CLAIR_ROWS:
        content = row["reviser_response"]["choices"][0]["message"]["content"]
        reasoning, revision = parse_revision(content, "stop")
        # the revision is what follows the (last) solution marker, with or without its colon
        marker = (
            "{corrected_student_solution}:"
            if "{corrected_student_solution}:" in content
            else "{corrected_student_solution}"
        )
        assert revision == content.rsplit(marker, 1)[1].strip()
        assert (
            reasoning
            and "{teacher_reasoning}" not in reasoning
            and "{corrected_student_solution}" not in reasoning
        )
        assert len(revision) > 500 and revision != row["rejected"]


@pytest.mark.parametrize(
    "content,finish,reason",
    [
        ("", "stop", "empty response"),
        ("{teacher_reasoning}: fine as is.", "stop", "no {corrected_student_solution}"),
        ("{teacher_reasoning}: x\n{corrected_student_solution}:   \n", "stop", "is empty"),
        ("{teacher_reasoning}: x\n{corrected_student_solution}: a long revisi", "length", "max_tokens"),
    ],
)
def test_parser_rejects_malformed_responses(content, finish, reason):
    with pytest.raises(ParseError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        parse_revision(content, finish)


# --- metrics -----------------------------------------------------------------------------------


def test_jaccard_and_levenshtein_by_hand():
    assert jaccard("the cat sat".split(), "the cat ran".split()) == 2 / 4  # {the, cat} / {the, cat, sat, ran}
    assert jaccard("a a b".split(), "b a".split()) == 1.0  # sets: duplicates do not count
    assert jaccard([], []) == 1.0
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("flaw", "lawn") == 2  # -f, +n
    assert levenshtein("", "abc") == 3
    stats = pair_stats([("the cat sat", "the cat ran"), ("kitten", "sitting")])
    assert stats["jaccard_mean"] == pytest.approx((0.5 + 0.0) / 2)
    assert stats["levenshtein_mean"] == pytest.approx((2 + 3) / 2)  # "sat"->"ran": s->r, t->n
    assert stats["chosen_tokens_mean"] == pytest.approx((3 + 1) / 2)


def test_stats_command_on_the_hybrid_pairs(tmp_path, capsys):
    from apo_jax.data.clair.__main__ import main

    out = tmp_path / "stats.json"
    assert main(["stats", "--input", str(DATA / "clair_pairs_hybrid_format.jsonl"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "clair_pairs_hybrid_format" in table and "jaccard_mean" in table
    result = json.loads(out.read_text())["clair_pairs_hybrid_format"]
    pairs = [json.loads(x) for x in (DATA / "clair_pairs_hybrid_format.jsonl").open()]
    first = pairs[0]
    c, r = first["chosen"][1]["content"], first["rejected"][1]["content"]
    assert result["pairs"] == 10
    # one pair by hand: the same definitions, written out again
    words_c, words_r = set(c.split()), set(r.split())
    assert jaccard(c.split(), r.split()) == len(words_c & words_r) / len(words_c | words_r)
    assert 0 < result["jaccard_mean"] < 1 and result["levenshtein_mean"] > 0


# --- the client against a loopback server ------------------------------------------------------


def test_revise_survives_faults_and_never_requests_a_finished_row_twice(tmp_path):
    script = {
        0: ["429"],
        1: ["500"],
        2: ["timeout"],
        3: ["drop"],
        4: ["malformed"],
        5: ["unparsable"],
        6: ["400"],
    }
    server = RecordedReviser(script)
    try:
        cfg = ClientConfig(
            base_url=server.url,
            model="gpt-4-0125-preview",
            concurrency=4,
            max_retries=2,
            timeout=0.5,
            backoff_base=0.01,
        )
        out = tmp_path / "pairs.jsonl"
        summary = revise(clair_answers(tmp_path), out, cfg, progress=False)
        pairs = [json.loads(x) for x in out.read_text().splitlines()]
        failures = {
            json.loads(x)["id"].split(":")[0]: json.loads(x)["reason"]
            for x in (tmp_path / "pairs.jsonl.failures.jsonl").read_text().splitlines()
        }
        assert sorted(p["source"] for p in pairs) == [0, 1, 2, 3, 7, 8, 9]
        for p in pairs:
            content = CLAIR_ROWS[p["source"]]["reviser_response"]["choices"][0]["message"]["content"]
            assert (
                p["chosen"] == parse_revision(content)[1]
                and p["rejected"] == CLAIR_ROWS[p["source"]]["rejected"]
            )
            assert (
                p["usage"]["total_tokens"]
                == CLAIR_ROWS[p["source"]]["reviser_response"]["usage"]["total_tokens"]
            )
        assert set(failures) == {"4", "5", "6"}
        assert "malformed" in failures["4"] and "unparsable" in failures["5"] and "HTTP 400" in failures["6"]
        # each fault cost exactly its retries; permanent errors and parse failures were not retried
        assert server.counts == {0: 2, 1: 2, 2: 2, 3: 2, 4: 3, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1}
        assert summary["possible_double_charges"] == 2 and summary["revised"] == 7 and summary["failed"] == 3
        # a restart asks again only for the rows without a recorded response (4: malformed, 6: 400)
        before = dict(server.counts)
        revise(clair_answers(tmp_path), out, cfg, progress=False)
        assert {i: server.counts[i] - before[i] for i in server.counts if server.counts[i] != before[i]} == {
            4: 3,
            6: 1,
        }
        assert len(out.read_text().splitlines()) == 7
    finally:
        server.close()


def test_killed_revise_job_resumes_without_repeating_finished_rows(tmp_path):
    server = RecordedReviser(delay=0.3)
    try:
        answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
        cmd = revise_cmd(answers, out, server.url, "--concurrency", "1")
        env = {**os.environ, "OPENAI_API_KEY": "test-key"}
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log = tmp_path / "pairs.jsonl.responses.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        recorded = {json.loads(x)["id"].split(":")[0] for x in log.read_text().splitlines()}
        assert 3 <= len(recorded) < 10
        assert (
            subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120).returncode
            == 0
        )
        assert len(out.read_text().splitlines()) == 10
        for i, n in server.counts.items():
            # finished rows were asked once; at most the one row in flight at the kill was asked again
            assert n == 1 or (n == 2 and str(i) not in recorded), server.counts
        assert sum(n == 2 for n in server.counts.values()) <= 1
    finally:
        server.close()


# --- answers and baselines ---------------------------------------------------------------------


def _prompts(tmp_path, n=3):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "topic": i}) + "\n" for i in range(n)))
    return path


def test_generate_through_a_server_sends_sampling_parameters_explicitly(tmp_path):
    from apo_jax.data import generate

    server = ChatServer(lambda body: "answer to " + body["messages"][0]["content"])
    try:
        cfg = ClientConfig(base_url=server.url, model="m", max_retries=0)
        prompts = generate.read_prompts(_prompts(tmp_path))
        out = tmp_path / "answers.jsonl"
        summary = generate.generate_with_server(
            prompts, out, cfg, samples=2, max_tokens=64, temperature=0.9, top_p=0.95, progress=False
        )
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert summary["written"] == 6 and [(r["topic"], r["sample"]) for r in rows] == [
            (i, s) for i in range(3) for s in (0, 1)
        ]
        assert all(r["response"] == "answer to " + r["prompt"] for r in rows)
        assert all(
            b["temperature"] == 0.9 and b["top_p"] == 0.95 and b["max_tokens"] == 64 for b in server.bodies
        )
        generate.generate_with_server(  # the same job resumed: nothing to do
            prompts, out, cfg, samples=2, max_tokens=64, temperature=0.9, top_p=0.95, progress=False
        )
        assert len(server.bodies) == 6
    finally:
        server.close()


def test_generate_with_the_own_sampler_is_resumable_and_greedy_exact(
    tmp_path, tiny_checkpoints, tiny_tokenizer
):
    from apo_jax import models
    from apo_jax.data import generate

    path = tiny_checkpoints["gqa"]
    prompts = generate.read_prompts(_prompts(tmp_path, 3))
    out = tmp_path / "answers.jsonl"
    kw = {"max_tokens": 6, "temperature": 0.0, "batch_size": 2, "progress": False}
    generate.generate_with_model(prompts, out, path, **kw)
    generate.generate_with_model(prompts, out, path, **kw)  # a rerun adds nothing
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0:0", "1:0", "2:0"]
    # greedy: the same tokens as models.generate on the chat-templated prompt alone
    model, params = models.from_hf(path)
    chat = [{"role": "user", "content": "question 1?"}]
    ids = tiny_tokenizer.apply_chat_template(chat, return_dict=True, add_generation_prompt=True)["input_ids"]
    alone = models.generate(model, params, [ids], [[1] * len(ids)], max_new_tokens=6, pad_id=5)
    tokens = [t for t in alone["tokens"][0][: int(alone["lengths"][0])].tolist() if t not in (1, 4)]
    assert rows[1]["response"] == tiny_tokenizer.decode(tokens, skip_special_tokens=True)


def test_on_policy_judge_keeps_ties_and_records_unreadable_verdicts(tmp_path):
    from apo_jax.data.clair import baselines

    verdicts = {
        "q0": "A is more correct.\nVerdict: A",
        "q1": "Verdict: **B**",
        "q2": "Both fine. Verdict: tie",
        "q3": "I cannot decide.",
    }
    server = ChatServer(
        lambda body: next(v for k, v in verdicts.items() if f"\n{k}\n" in body["messages"][0]["content"])
    )
    try:
        answers = tmp_path / "answers.jsonl"
        answers.write_text(
            "".join(
                json.dumps({"prompt": f"q{i}", "response": f"{i}-{s}", "sample": s}) + "\n"
                for i in range(4)
                for s in (0, 1)
            )
        )
        out = tmp_path / "pairs.jsonl"
        summary = baselines.on_policy_judge(
            answers, out, ClientConfig(base_url=server.url, model="judge"), progress=False
        )
        pairs = {p["prompt"]: p for p in map(json.loads, out.read_text().splitlines())}
        assert summary == {"prompts": 4, "pairs": 3, "ties": 1, "failed": 1}
        assert (pairs["q0"]["chosen"], pairs["q0"]["rejected"]) == ("0-0", "0-1")
        assert (pairs["q1"]["chosen"], pairs["q1"]["rejected"]) == ("1-1", "1-0")
        assert pairs["q2"]["is_tie"] and not pairs["q0"]["is_tie"]
        failure = json.loads((tmp_path / "pairs.jsonl.failures.jsonl").read_text())
        assert failure["prompt"] == "q3" and "unreadable verdict" in failure["reason"]
    finally:
        server.close()


def test_stronger_preferred_and_off_policy_judge(tmp_path):
    from apo_jax.data.clair import baselines

    (tmp_path / "m.jsonl").write_text(
        json.dumps({"prompt": "p", "response": "weak", "generator": "M"}) + "\n"
    )
    (tmp_path / "s.jsonl").write_text(
        json.dumps({"prompt": "p", "response": "strong", "generator": "S"}) + "\n"
    )
    baselines.stronger_preferred(tmp_path / "m.jsonl", tmp_path / "s.jsonl", tmp_path / "sp.jsonl")
    pair = json.loads((tmp_path / "sp.jsonl").read_text())
    assert (pair["chosen"], pair["rejected"], pair["chosen_model"]) == ("strong", "weak", "S")
    uf = [
        {
            "instruction": "i0",
            "completions": [
                {"response": "a", "overall_score": 7.0, "model": "x"},
                {"response": "b", "overall_score": 9.0, "model": "y"},
                {"response": "c", "overall_score": 7.0, "model": "z"},
            ],
        },
        {
            "instruction": "i1",
            "completions": [{"response": "a", "overall_score": 5.0}, {"response": "b", "overall_score": 5.0}],
        },
    ]
    (tmp_path / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uf))
    summary = baselines.off_policy_judge(tmp_path / "uf.jsonl", tmp_path / "op.jsonl", seed=0)
    pair = json.loads((tmp_path / "op.jsonl").read_text())
    assert summary == {"pairs": 1, "skipped": 1}  # i1: all answers rated alike, no preference
    assert pair["chosen"] == "b" and pair["rejected"] in ("a", "c")
    assert baselines.parse_verdict("Verdict: a ... final Verdict: B") == "B"


# --- judged evaluation ---------------------------------------------------------------------------


def test_judge_win_rate_both_orders_scores_and_exact_match(tmp_path):
    from apo_jax.eval import judge

    prompts = [{"prompt": f"q{i}", "answer": i} for i in range(3)]
    answers = [
        {"prompt": "q0", "response": "it is 0"},
        {"prompt": "q1", "response": "so 7"},
        {"prompt": "q2", "response": "2"},
    ]
    # scores 1, 0, 1: mean 2/3, sample standard deviation sqrt(1/3), standard error sqrt(1/3)/sqrt(3) = 1/3
    assert judge.exact_match(prompts, answers) == {
        "mode": "exact",
        "n": 3,
        "samples": 3,
        "accuracy": 2 / 3,
        "stderr": pytest.approx(1 / 3),
        "correct": [[1], [0], [1]],
    }
    # sampled accuracy: q0 right in 1 of 2 samples, q1 in 2 of 2, q2 unanswered -> (0.5 + 1 + 0) / 3
    sampled = [
        {"prompt": "q0", "response": "0"},
        {"prompt": "q0", "response": "3"},
        {"prompt": "q1", "response": "1"},
        {"prompt": "q1", "response": "x 1"},
    ]
    assert judge.exact_match(prompts, sampled)["accuracy"] == (0.5 + 1 + 0) / 3
    assert judge.exact_match(prompts, sampled)["correct"] == [[1, 0], [1, 1], []]

    def respond(body):
        text = body["messages"][0]["content"]
        if text.startswith("Grade"):
            return "Fine.\nScore: 8" if "q0" in text else "Score: 4"
        # the evaluated answers always win on q0, always lose on q1, tie on q2 (whatever the order)
        mine_is_a = any(f"[Response A]\n{a['response']}\n" in text for a in answers)
        if "\nq0\n" in text:
            return "Verdict: A" if mine_is_a else "Verdict: B"
        if "\nq1\n" in text:
            return "Verdict: B" if mine_is_a else "Verdict: A"
        return "Verdict: tie"

    server = ChatServer(respond, usage=(3, 2))
    try:
        cfg = ClientConfig(base_url=server.url, model="judge")
        reference = [{"prompt": f"q{i}", "response": f"ref {i}"} for i in range(3)]
        win = judge.judged(
            "winrate", prompts, answers, tmp_path / "w", cfg, reference=reference, progress=False
        )
        assert win["n"] == 6 and win["win_rate"] == pytest.approx((2 * 1 + 2 * 0 + 2 * 0.5) / 6)
        score = judge.judged("score", prompts, answers, tmp_path / "s", cfg, progress=False)
        assert score["n"] == 3 and score["mean_score"] == pytest.approx((8 + 4 + 4) / 3)
        assert score["judge_tokens"] == 3 * 5
        before = len(server.bodies)
        judge.judged("score", prompts, answers, tmp_path / "s", cfg, progress=False)  # resumed: no new calls
        assert len(server.bodies) == before
    finally:
        server.close()

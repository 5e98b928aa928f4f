"""API jobs keep every paid response and never pay twice: the output's folder is made (or refused)
before the first request, a failed append is undone and stops the job, a cut last line is repaired
on start, one job holds an output at a time, an answer with nothing in it is retried and never
recorded, `Retry-After` in any form is survived, and answers are matched to requests by content, so
a rerun with other answers, prompts or models into the same output is never served old answers. The
judge's score and verdict come from its last line alone. Real HTTP on 127.0.0.1; request counts come
from the servers, contents from the files."""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from helpers import CLAIR_ROWS, ROOT, RecordedReviser, clair_answers

from apo_jax.cli import UserError
from apo_jax.client import CircuitOpen, ClientConfig
from apo_jax.data.clair import baselines, parse_revision
from apo_jax.data.clair.__main__ import main as clair_main
from apo_jax.data.clair.revise import read_answers, revise
from apo_jax.data.generate import generate_with_server
from apo_jax.eval import judge
from apo_jax.loopback import ChatServer, LoopbackServer


def _cfg(url, **kw) -> ClientConfig:
    """Fast retries; the breaker far away unless a test wants it."""
    return ClientConfig(base_url=url, model="gpt-4-0125-preview", backoff_base=0.001, backoff_max=0.05, **kw)


def _lines(path) -> list[dict]:
    """Every line of `path` parsed: a line that is not JSON fails the test."""
    return [json.loads(x) for x in path.read_bytes().decode().splitlines()]


def _revision(i: int) -> str:
    return parse_revision(CLAIR_ROWS[i]["reviser_response"]["choices"][0]["message"]["content"])[1]


# --- nothing paid for is lost -------------------------------------------------------------------


def test_a_cut_last_line_of_the_response_log_is_removed_and_only_its_row_bought_again(tmp_path, capfd):
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    log = tmp_path / "pairs.jsonl.responses.jsonl"
    with RecordedReviser() as server:
        revise(answers, out, _cfg(server.url), progress=False)
        raw = log.read_bytes()
        cut = raw[: raw.rindex(b"\n", 0, len(raw) - 1) + 1 + 40]  # the last line, 40 bytes of it
        log.write_bytes(cut)
        capfd.readouterr()
        summary = revise(answers, out, _cfg(server.url), progress=False)
        assert sum(server.counts.values()) == len(CLAIR_ROWS) + 1  # the one cut answer, bought again
    assert len(_lines(log)) == len(CLAIR_ROWS)  # every line whole: none glued onto the cut one
    assert f"{log}: removed its cut last line (40 bytes" in capfd.readouterr().err
    assert summary["revised"] == len(CLAIR_ROWS)
    assert [p["chosen"] for p in _lines(out)] == [_revision(i) for i in range(len(CLAIR_ROWS))]


def test_an_output_in_a_missing_folder_is_made_before_the_first_request(tmp_path):
    with RecordedReviser() as server:
        out = tmp_path / "nodir" / "deeper" / "pairs.jsonl"
        summary = revise(clair_answers(tmp_path), out, _cfg(server.url), progress=False)
        assert summary["revised"] == len(CLAIR_ROWS) and len(_lines(out)) == len(CLAIR_ROWS)
        blocked = tmp_path / "afile"
        blocked.write_text("")
        with pytest.raises(UserError, match=f"{blocked}/pairs.jsonl: cannot create its folder"):
            revise(clair_answers(tmp_path), blocked / "pairs.jsonl", _cfg(server.url), progress=False)
        assert sum(server.counts.values()) == len(CLAIR_ROWS)  # nothing sent for the refused one


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes past `nbytes` fail in this process (EFBIG), as on a full disk."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default would kill pytest
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_response_that_cannot_be_recorded_stops_the_job_at_once_and_leaves_no_partial_line(tmp_path):
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    log = tmp_path / "pairs.jsonl.responses.jsonl"
    with RecordedReviser() as server:
        # room for the lock file (a few hundred bytes), not for one recorded answer (over 5 KB)
        with _file_size_limit(2000), pytest.raises((CircuitOpen, OSError)) as stop:
            revise(answers, out, _cfg(server.url, concurrency=1), progress=False)
        assert sum(server.counts.values()) == 1  # was: all 10 bought, then the error
        assert log.read_bytes() == b""  # the half-written line was undone
        assert str(tmp_path) in str(stop.value)  # the error names the file it could not write
        summary = revise(answers, out, _cfg(server.url), progress=False)  # space again: it resumes
    assert summary["revised"] == len(CLAIR_ROWS) and len(_lines(log)) == len(CLAIR_ROWS)


# --- one job per output -------------------------------------------------------------------------


# Another job holding an output: the real OutputLock, in a process that skips `apo_jax/__init__`
# (and with it the seconds of importing jax).
_HOLDER = """
import sys, types
package = types.ModuleType("apo_jax")
package.__path__ = ["apo_jax"]
sys.modules["apo_jax"] = package
from apo_jax.outputs import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
input()
"""


def test_a_job_holds_its_output_and_a_second_job_on_it_is_refused_before_any_request(tmp_path):
    """A running revise holds `<output>.lock` (apo_jax.outputs.OutputLock; the server sees it naming
    this process mid-job) and frees it; while another process holds an output's lock, revise on it
    is refused in one line naming that process, and proceeds once it is free."""
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    lock = tmp_path / "pairs.jsonl.lock"
    seen = []

    class Watching(RecordedReviser):
        def handle(self, h, body):
            seen.append(json.loads(lock.read_text())["pid"] if lock.exists() else None)
            super().handle(h, body)

    with Watching() as server:
        revise(answers, out, _cfg(server.url), progress=False)
    assert set(seen) == {os.getpid()} and not lock.exists()  # was: no lock, two jobs paid twice
    second = tmp_path / "second.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(second)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with RecordedReviser() as server:
            with pytest.raises(UserError, match=f"--output {second} is in use by pid {holder.pid}"):
                revise(answers, second, _cfg(server.url), progress=False)
            assert server.counts == {}
            holder.communicate("\n", timeout=30)  # the other job ends, releasing its lock
            summary = revise(answers, second, _cfg(server.url), progress=False)
            assert server.counts == {i: 1 for i in range(len(CLAIR_ROWS))} and summary["revised"] == len(
                CLAIR_ROWS
            )
    finally:
        holder.kill()


# --- an answer with nothing in it ----------------------------------------------------------------


class NoChoices(LoopbackServer):
    """HTTP 200 with `{"choices": []}` (and usage, as a billed answer has) to every request."""

    def __init__(self):
        self.hits = 0
        super().__init__()

    def handle(self, h, body):
        with self.lock:
            self.hits += 1
        usage = {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
        self.send(
            h,
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [],
                "usage": usage,
            },
        )


def _judge_answers(tmp_path, tag=""):
    """Two samples for each of three prompts, one "x" and one "xx"; which sample is longer alternates
    with the prompt, and a `tag` flips it (the judge below prefers the longer answer)."""
    path = tmp_path / f"answers{tag}.jsonl"
    rows = [
        {"prompt": f"q{i}{tag}", "response": "x" * (1 + (s ^ i % 2 ^ bool(tag))), "sample": s}
        for i in range(3)
        for s in (0, 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_reply(body) -> str:
    text = body["messages"][-1]["content"]
    if text.startswith("Grade"):
        return "Score: 7"
    if "[Response A]" not in text:  # generate: the prompt alone
        return f"answer to {text}"
    a = text.split("[Response A]\n")[1].split("\n")[0]
    b = text.split("[Response B]\n")[1].split("\n")[0]
    return "Verdict: A" if len(a) > len(b) else "Verdict: B"


def _jobs(tmp_path):
    """{name: job(cfg) -> the number of rows it got a usable answer for}: the three commands that
    crashed on `["choices"][0]`."""
    prompts = [{"prompt": f"q{i}"} for i in range(3)]
    answers = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    return {
        "eval.judge": lambda cfg: judge.judged(
            "score", prompts, answers, tmp_path / "j", cfg, progress=False
        )["n"],
        "generate": lambda cfg: generate_with_server(prompts, tmp_path / "g.jsonl", cfg, progress=False)[
            "written"
        ],
        "clair judge": lambda cfg: baselines.on_policy_judge(
            _judge_answers(tmp_path), tmp_path / "p.jsonl", cfg, progress=False
        )["pairs"],
    }


@pytest.mark.parametrize("name", ["eval.judge", "generate", "clair judge"])
def test_an_answer_without_choices_is_retried_never_recorded_and_the_rerun_asks_again(tmp_path, name):
    job = _jobs(tmp_path)[name]
    with NoChoices() as empty:
        cfg = _cfg(empty.url, max_retries=1, max_consecutive_failures=100)
        assert job(cfg) == 0  # was: IndexError at ["choices"][0]
        assert empty.hits == 3 * 2  # each row: the answer and one retry
    with ChatServer(_judge_reply) as healthy:
        assert job(_cfg(healthy.url)) == 3  # was: 0 requests, the same IndexError
        assert len(healthy.bodies) == 3


# --- answers matched by content, never by row number -------------------------------------------


def test_eval_judge_grades_other_answers_into_the_same_output_afresh(tmp_path):
    prompts = [{"prompt": f"q{i}"} for i in range(3)]
    model_a = [{"prompt": f"q{i}", "response": "good"} for i in range(3)]
    model_b = [{"prompt": f"q{i}", "response": "bad"} for i in range(3)]
    grade = lambda body: "Score: 9" if "[Response]\ngood\n" in body["messages"][-1]["content"] else "Score: 2"  # noqa: E731
    with ChatServer(grade) as server:
        cfg = _cfg(server.url)
        assert judge.judged("score", prompts, model_a, tmp_path / "j", cfg, progress=False)["mean_score"] == 9
        b = judge.judged("score", prompts, model_b, tmp_path / "j", cfg, progress=False)
        assert b["mean_score"] == 2 and b["n"] == 3  # was: 0 requests, mean 9 (A's grades)
        assert len(server.bodies) == 6
        again = judge.judged("score", prompts, model_a, tmp_path / "j", cfg, progress=False)
        assert again["mean_score"] == 9 and len(server.bodies) == 6  # A's own grades are still kept


def test_clair_judge_gives_other_prompts_their_own_verdicts(tmp_path):
    out = tmp_path / "pairs.jsonl"
    with ChatServer(_judge_reply) as server:
        for tag in ("", "_new"):
            summary = baselines.on_policy_judge(
                _judge_answers(tmp_path, tag), out, _cfg(server.url), progress=False
            )
            assert summary["pairs"] == 3
        assert len(server.bodies) == 6  # was: 3 (the new prompts got the old verdicts)
    # the judge prefers the longer answer: with the new prompts, sample 0 of q0 and q2, 1 of q1
    pairs = {p["prompt"]: (p["chosen"], p["rejected"], p["verdict"]) for p in _lines(out)}
    assert pairs == {"q0_new": ("xx", "x", "A"), "q1_new": ("xx", "x", "B"), "q2_new": ("xx", "x", "A")}


def test_generate_with_another_model_into_the_same_output_asks_that_model(tmp_path):
    prompts = [{"prompt": f"q{i}"} for i in range(2)]
    out = tmp_path / "answers.jsonl"
    with ChatServer(lambda body: f"{body['model']} says {body['messages'][-1]['content']}") as server:
        for model in ("m1", "m2"):
            cfg = ClientConfig(base_url=server.url, model=model)
            generate_with_server(prompts, out, cfg, samples=2, progress=False)
        assert len(server.bodies) == 8  # was: 4 (m1's answers kept under m2)
    assert [(r["response"], r["generator"]) for r in _lines(out)] == [
        (f"m2 says q{i}", "m2") for i in range(2) for _ in range(2)
    ]


# --- the own sampler: eval.answers and generate --model-dir --------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_tokenizer):
    """Two tiny checkpoints of one shape (one compiled sampler serves both), different weights."""
    import helpers

    root = tmp_path_factory.mktemp("two_models")
    return [
        helpers.tiny_hf_llama(root / name / "hf", seed=seed, tokenizer=tiny_tokenizer)
        for name, seed in (("seed1", 1), ("seed2", 2))
    ]


def test_eval_answers_under_another_name_are_that_models_answers(tmp_path, two_models):
    from apo_jax.eval import answers

    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps([{"instruction": f"Say {w}."} for w in ("hi", "yes", "no")]))

    def run(model_dir, name, output):
        argv = ["--benchmark", "alpaca_eval", "--questions", str(questions), "--model-dir", str(model_dir)]
        argv += ["--name", name, "--output", str(output), "--max-tokens", "6", "--batch-size", "4"]
        assert answers.main(argv) == 0
        return json.loads(output.read_text())

    a, b = two_models
    run(a, "modelA", tmp_path / "out.json")
    reused = run(b, "modelB", tmp_path / "out.json")
    alone = run(b, "modelB", tmp_path / "fresh.json")  # B's own greedy answers, nothing to reuse
    assert [r["output"] for r in reused] == [r["output"] for r in alone]  # was: model A's, labelled B
    assert {r["generator"] for r in reused} == {"modelB"}


def test_a_cut_last_line_of_generated_answers_is_removed_and_that_row_sampled_again(
    tmp_path, two_models, capfd
):
    from apo_jax.data.generate import generate_with_model

    prompts = [{"prompt": f"Say {w}."} for w in ("hi", "yes", "no")]
    out = tmp_path / "answers.jsonl"
    kw = {"max_tokens": 6, "temperature": 0.0, "batch_size": 4, "progress": False}
    generate_with_model(prompts, out, two_models[0], **kw)
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 25])  # a full disk mid-line
    capfd.readouterr()
    generate_with_model(prompts, out, two_models[0], **kw)
    assert out.read_bytes() == whole  # greedy: the cut row sampled again, nothing glued on
    assert "removed its cut last line" in capfd.readouterr().err
    assert len(read_answers(out)) == 3  # clair revise reads it (was: "row 2: not valid JSON")
    with pytest.raises(UserError, match="answers of another job"):
        generate_with_model(prompts, out, two_models[1], **kw)  # another model: refused, not mixed in


# --- the online loop's record ---------------------------------------------------------------------


# --- Retry-After, failed rows, input files, ties -------------------------------------------------


class RetryAfter(RecordedReviser):
    """The recorded GPT-4 answers, each row's first request refused 429 with its own Retry-After."""

    def __init__(self, values: dict[int, str]):
        self.values = values
        super().__init__()

    def handle(self, h, body):
        i = self.row_of(body)
        with self.lock:
            first = i not in self.counts
            if first:
                self.counts[i] = 1
        if first and i in self.values:
            return self.send(h, 429, {"error": {"message": "slow down"}}, {"Retry-After": self.values[i]})
        with self.lock:
            self.counts[i] = self.counts.get(i, 0) + (not first)
        return self.send(h, 200, CLAIR_ROWS[i]["reviser_response"])


def test_retry_after_in_any_form_is_waited_out_or_ignored(tmp_path):
    soon = email.utils.formatdate(time.time() + 1, usegmt=True)  # an HTTP date, 1 s ahead
    values = {0: "soon", 1: soon, 2: "0.01", 3: "-5", 4: "Wed, 99 Foo 2024 99:99:99 GMT", 5: "inf"}
    with RetryAfter(values) as server:
        summary = revise(clair_answers(tmp_path), tmp_path / "pairs.jsonl", _cfg(server.url), progress=False)
        assert server.counts == {
            i: 2 if i in values else 1 for i in range(len(CLAIR_ROWS))
        }  # was: "Invalid date value"
    assert summary["revised"] == len(CLAIR_ROWS) and summary["retries"] == len(values)


class FailsOnce(RecordedReviser):
    """HTTP 500 to every request for row 3 until `healthy` is set."""

    healthy = False

    def handle(self, h, body):
        if not self.healthy and self.row_of(body) == 3:
            with self.lock:
                self.counts[3] = self.counts.get(3, 0) + 1
            return self.send(h, 500, {"error": {"message": "overloaded"}})
        return super().handle(h, body)


def test_a_failed_row_is_asked_again_by_the_rerun_and_the_summary_says_so(tmp_path, capsys):
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    with FailsOnce() as server:
        argv = ["revise", "--input", str(answers), "--output", str(out), "--base-url", server.url]
        argv += ["--model", "m", "--max-retries", "0", "--max-consecutive-failures", "5"]
        assert clair_main(argv) == 1
        summary = json.loads(capsys.readouterr().out)
        assert summary["failed"] == 1 and "run the same command again" in summary["retry"]
        server.healthy = True
        assert clair_main(argv) == 0
        assert server.counts[3] == 2 and sum(server.counts.values()) == len(CLAIR_ROWS) + 1
    assert "retry" not in json.loads(capsys.readouterr().out)
    assert sorted(p["source"] for p in _lines(out)) == list(range(len(CLAIR_ROWS)))


def test_a_json_array_input_is_read_as_its_rows(tmp_path):
    from apo_jax.data import formats

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2))  # pretty-printed: 17 lines, none a row
    examples, report = formats.read_examples(array)
    assert (report.rows, report.skipped) == (3, 0)  # was: 17 read, 17 malformed
    assert [e.chosen for _, e in examples] == ["good 0", "good 1", "good 2"]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"prompt": "q", "response": "a"}]))
    assert [row for _, row in read_answers(answers)] == [{"prompt": "q", "response": "a"}]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows, indent=2)[:-3])
    with pytest.raises(ValueError, match=f"{broken}: starts with '\\[' but is neither a JSON array nor JSON"):
        read_answers(broken)


def test_clair_judge_flags_ties_in_its_summary_and_leaves_them_out_on_request(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"{i}-{s}", "sample": s} for i in range(3) for s in (0, 1)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdict = lambda body: "Verdict: A" if "\nq0\n" in body["messages"][-1]["content"] else "Verdict: tie"  # noqa: E731
    with ChatServer(verdict) as server:
        argv = ["judge", "--input", str(answers), "--base-url", server.url, "--model", "judge"]
        assert clair_main([*argv, "--output", str(tmp_path / "all.jsonl")]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["ties"] == 2 and "2 of 3 pairs are ties" in summary["warning"]
        assert "--drop-ties" in summary["warning"]
        assert clair_main([*argv, "--output", str(tmp_path / "no_ties.jsonl"), "--drop-ties"]) == 0
        summary = json.loads(capsys.readouterr().out)
    assert summary["ties"] == 0 and summary["ties_left_out"] == 2 and "warning" not in summary
    assert [p["prompt"] for p in _lines(tmp_path / "no_ties.jsonl")] == ["q0"]


@pytest.mark.parametrize(
    "text,score",
    [
        ("I would not give it a score: 9 since it is wrong. Score: 0", None),  # was: 9
        ("Score: 3 at first sight; on reflection\nScore: 8", 8),
        ("Score: 10", 10),
        ("Score: **7**", 7),
        ("Score: 7/10", 7),
        ("Score: 7.5", None),  # not a whole number: not read as 7
        ("Score: 8. Reconsidered, the final Score: none", None),
    ],
)
def test_the_score_is_read_from_the_last_score_line_only(text, score):
    if score is None:
        with pytest.raises(ValueError, match="the last 'Score:' says"):
            baselines.parse_score(text)
    else:
        assert baselines.parse_score(text) == score


def test_the_verdict_is_read_from_the_last_verdict_line_only():
    assert baselines.parse_verdict("Verdict: A at first; on reflection\nVerdict: **B**") == "B"
    with pytest.raises(ValueError, match="the last 'Verdict:' says 'neither'"):
        baselines.parse_verdict("Verdict: A would be tempting. Verdict: neither")  # was: A

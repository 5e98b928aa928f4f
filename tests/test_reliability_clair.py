"""The CLAIR client fails fast and honestly: a dead endpoint or a rejected key stops the job in
seconds with one line and exit status 2, a refused connection is no possible double charge, a
stopped job keeps its answered rows for the rerun, and no keyless request goes to a remote API.
Real HTTP on loopback, the command as a subprocess; counts come from the servers and the files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from helpers import CLAIR_ROWS, ROOT, RecordedReviser, clair_answers, revise_cmd

from apo_jax.cli import UserError
from apo_jax.client import CircuitOpen, ClientConfig, resolve_api_key
from apo_jax.data.clair.revise import revise
from apo_jax.loopback import ChatServer, LoopbackServer

REVISION = "{teacher_reasoning}: clearer.\n{corrected_student_solution}: "


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on leaving: nothing listens there


def _env(**set_vars) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, **set_vars}


def _ids(path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()] if path.exists() else []


def test_dead_endpoint_stops_in_seconds_with_one_line_and_no_double_charges(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    start = time.monotonic()
    proc = subprocess.run(
        revise_cmd(answers, out, url, "--max-consecutive-failures", "3"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert url in lines[0] and "unreachable" in lines[0] and "connection refused" in lines[0]
    assert f"0 of {len(CLAIR_ROWS)} rows done" in lines[0] and "again to resume" in lines[0]
    assert elapsed < 10, elapsed  # was 111 s for 20 rows: 7 attempts per row, with backoff
    summary = json.loads(proc.stdout)
    # 3 consecutive refused requests trip the breaker; none was billable, so no double charge
    assert 1 <= summary["requests_sent"] <= 3 and summary["possible_double_charges"] == 0
    assert _ids(tmp_path / "pairs.jsonl.responses.jsonl") == [] and out.read_text() == ""
    failed = [int(i.split(":")[0]) for i in _ids(tmp_path / "pairs.jsonl.failures.jsonl")]
    assert failed == list(range(len(CLAIR_ROWS)))  # every input row, none written as a pair


class Rejects(LoopbackServer):
    """Answers every request 401, as an API does for a wrong key; counts them."""

    def __init__(self):
        self.hits = 0
        super().__init__()

    def handle(self, h, body):
        with self.lock:
            self.hits += 1
        self.send(h, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})


def test_a_rejected_key_is_sent_once_and_stops_the_job(tmp_path):
    with Rejects() as server:
        answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
        cmd = revise_cmd(answers, out, server.url, "--concurrency", "8")
        env = _env(OPENAI_API_KEY="sk-wrong")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert server.hits == 1  # not retried, and not sent by the seven other workers either
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "authentication" in lines[0] and server.url in lines[0] and "401" in lines[0]
    assert _ids(tmp_path / "pairs.jsonl.responses.jsonl") == []


class Dies(RecordedReviser):
    """The recorded GPT-4 answers, one connection per request, until the `n`-th: then it stops
    listening (a server that went away mid-job). `answered`: the rows it sent a 200 for."""

    def __init__(self, n: int):
        self.n, self.answered = n, []
        super().__init__()

    def handle(self, h, body):
        i = self.row_of(body)
        with self.lock:
            self.counts[i] = self.counts.get(i, 0) + 1
            self.answered.append(i)
            last = len(self.answered) == self.n
        if last:
            self.close()  # from now on connections are refused
        self.send(h, 200, CLAIR_ROWS[i]["reviser_response"], {"Connection": "close"})


def test_a_stopped_job_keeps_its_rows_and_the_rerun_asks_only_for_the_rest(tmp_path):
    answers, out = clair_answers(tmp_path), tmp_path / "pairs.jsonl"
    dying = Dies(4)
    cfg = ClientConfig(
        base_url=dying.url,
        model="gpt-4-0125-preview",
        concurrency=1,
        backoff_base=0.01,
        max_consecutive_failures=2,
    )
    try:
        with pytest.raises(CircuitOpen) as stop:
            revise(answers, out, cfg, progress=False)
    finally:
        dying.close()
    assert dying.answered == [0, 1, 2, 3]  # one worker: the rows in order
    message = str(stop.value)
    assert (
        dying.url in message and "unreachable" in message and f"4 of {len(CLAIR_ROWS)} rows done" in message
    )
    assert stop.value.summary["possible_double_charges"] == 0
    log = tmp_path / "pairs.jsonl.responses.jsonl"
    assert sorted(int(i.split(":")[0]) for i in _ids(log)) == [0, 1, 2, 3]
    assert [json.loads(x)["source"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]
    with RecordedReviser() as healthy:
        cfg.base_url = healthy.url
        summary = revise(answers, out, cfg, progress=False)
        assert healthy.counts == {i: 1 for i in range(4, len(CLAIR_ROWS))}  # only the rows without a response
    assert summary["revised"] == len(CLAIR_ROWS) and summary["failed"] == 0
    assert sorted(json.loads(x)["source"] for x in out.read_text().splitlines()) == list(
        range(len(CLAIR_ROWS))
    )


def test_no_key_for_a_remote_endpoint_is_refused_before_anything_is_read(tmp_path, monkeypatch, capsys):
    from apo_jax.data.clair.__main__ import main

    monkeypatch.delenv("CLAIR_TEST_KEY", raising=False)
    url = "https://api.example.invalid/v1"
    missing = tmp_path / "not-there.jsonl"  # were it read before the key check, it would be the error
    argv = [
        "revise",
        "--input",
        str(missing),
        "--output",
        str(tmp_path / "pairs.jsonl"),
        "--base-url",
        url,
        "--model",
        "m",
        "--api-key-env",
        "CLAIR_TEST_KEY",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CLAIR_TEST_KEY" in err[0] and url in err[0] and "refus" in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing read
    monkeypatch.setenv("CLAIR_TEST_KEY", "sk-set")  # the named variable, once set, is the key
    assert resolve_api_key(ClientConfig(base_url=url, model="m", api_key_env="CLAIR_TEST_KEY")) == "sk-set"
    for remote in ("http://10.0.0.1:8000/v1", "https://localhost.example.com/v1"):
        with pytest.raises(UserError, match="CLAIR_UNSET_KEY is not set"):
            resolve_api_key(ClientConfig(base_url=remote, model="m", api_key_env="CLAIR_UNSET_KEY"))


def test_a_loopback_server_without_a_key_just_works(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(3)))
    with ChatServer(lambda body: REVISION + "better") as server:
        for base_url in (server.url, server.url.replace("127.0.0.1", "localhost")):
            out = tmp_path / f"pairs-{len(server.bodies)}.jsonl"
            summary = revise(answers, out, ClientConfig(base_url=base_url, model="m"), progress=False)
            assert summary["revised"] == 3
            assert [json.loads(x)["chosen"] for x in out.read_text().splitlines()] == ["better"] * 3
        assert len(server.bodies) == 6

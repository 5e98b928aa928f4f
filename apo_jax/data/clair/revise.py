"""CLAIR revisions: the reviser minimally improves each answer; (revision, answer) is a pair.

Input rows have `prompt` and `response` (or `rejected`, the layout of the paper's released
revisions); other fields are carried along. Output rows (TRL's standard format): `prompt`,
`chosen` (the revision), `rejected` (the original answer), `reviser_reasoning`, `reviser_model`,
`usage`, and the carried fields. Rows that fail (a permanent error, retries exhausted, or a
response with no parsable revision) go to `<output>.failures.jsonl` with the reason; they are never
written as empty or unrevised pairs, and the same command asks again for those without a recorded
response. A job the client's circuit breaker stops (a dead endpoint, a wrong key: see `client`)
writes what it has, then raises `client.CircuitOpen` with the summary. Responses are matched to rows
by the request's content (`client.request_key`: the answer, the prompt, the reviser, the settings);
the output's folder is made before the first request, and one job at a time holds the output
(`outputs.OutputLock`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from apo_jax.client import ClientConfig, answer_text, resolve_api_key, run_requests
from apo_jax.data.clair.prompts import ParseError, parse_revision, revision_messages
from apo_jax.data.jsonl import parse_lines, write_jsonl
from apo_jax.outputs import OutputLock


def row_id(index: int, prompt: str, answer: str) -> str:
    """The row's name in the failures file and the response log: its index and a hash of its content
    (responses are matched by the request's content, `client.request_key`)."""
    digest = hashlib.sha256(json.dumps([prompt, answer]).encode()).hexdigest()[:16]
    return f"{index}:{digest}"


def read_answers(path) -> list[tuple[str, dict]]:
    """[(id, row)] from answers JSONL (or one JSON array); a row that is not JSON, or has no prompt or
    answer, is an error naming it."""
    out = []
    for index, (row, problem) in enumerate(parse_lines(path)):
        if problem is not None:
            raise ValueError(problem)
        answer = row.get("response", row.get("rejected")) if isinstance(row, dict) else None
        if not isinstance(answer, str) or not isinstance(row.get("prompt"), str):
            raise ValueError(
                f"{path}: row {index}: needs string fields 'prompt' and 'response' (or 'rejected')"
            )
        out.append((row_id(index, row["prompt"], answer), row))
    return out


def _paths(output) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    output = pathlib.Path(output)
    return (
        output,
        output.with_name(output.name + ".responses.jsonl"),
        output.with_name(output.name + ".failures.jsonl"),
    )


def _pairs(rows, done, request_failures, model) -> tuple[list[dict], list[dict]]:
    """(pairs, failures) from the rows and their recorded responses."""
    pairs, failures = [], []
    for rid, row in rows:
        if rid not in done:
            failures.append(
                {"id": rid, "prompt": row["prompt"], "reason": request_failures.get(rid, "not requested")}
            )
            continue
        response = done[rid]["response"]
        try:
            reasoning, revision = parse_revision(
                answer_text(response), response["choices"][0].get("finish_reason")
            )
        except ParseError as e:
            failures.append({"id": rid, "prompt": row["prompt"], "reason": f"unparsable response: {e}"})
            continue
        answer = row.get("response", row.get("rejected"))
        carried = {k: v for k, v in row.items() if k not in ("prompt", "response", "rejected", "chosen")}
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": revision,
                "rejected": answer,
                "reviser_reasoning": reasoning,
                "reviser_model": response.get("model", model),
                "usage": response.get("usage"),
                **carried,
            }
        )
    return pairs, failures


def revise(
    input_path,
    output,
    cfg: ClientConfig,
    *,
    max_tokens: int = 4096,
    temperature: float = 0.7,
    limit: int | None = None,
    client=None,
    progress: bool = True,
) -> dict:
    """Runs (or resumes) the revision job and rewrites the pairs and failures files; returns a summary.
    Raises `client.CircuitOpen` (its `summary` set) after writing them if the job was stopped, and
    `cli.UserError` before reading anything if there is no API key for a remote endpoint, and before
    any request if the output cannot be written or another job holds it."""
    out_path, log_path, fail_path = _paths(output)
    if client is None:
        resolve_api_key(cfg)
    with OutputLock(out_path):
        rows = read_answers(input_path)[:limit]
        requests = {
            rid: {
                "model": cfg.model,
                "messages": revision_messages(row["prompt"], row.get("response", row.get("rejected"))),
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            for rid, row in rows
        }
        done, request_failures, counters = run_requests(
            cfg, requests, log_path, client=client, progress=progress
        )
        pairs, failures = _pairs(rows, done, request_failures, cfg.model)
        write_jsonl(out_path, pairs)
        write_jsonl(fail_path, failures)
    usage = [p["usage"] or {} for p in pairs]
    stop = counters.stop
    summary = {
        "rows": len(rows),
        "revised": len(pairs),
        "failed": len(failures),
        "requests_sent": counters.requests,
        "retries": counters.retries,
        "requests_unreachable": counters.unreachable,
        "possible_double_charges": counters.possible_double_charges,
        "prompt_tokens": sum(u.get("prompt_tokens") or 0 for u in usage),
        "completion_tokens": sum(u.get("completion_tokens") or 0 for u in usage),
        "stopped": str(stop) if stop else None,
    }
    if stop:
        stop.summary = summary
        raise stop
    return summary

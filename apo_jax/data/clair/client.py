"""A resumable, money-aware job of chat requests to any OpenAI-compatible server.

Built for 32K paid requests: a bounded number in flight; retries with exponential backoff and
full jitter on 429 (honouring Retry-After), 5xx, timeouts and dropped connections; no retry of
permanent errors (400, 401, 403, 404, 422). Every received response is appended, with fsync, to
`<output>.responses.jsonl` before anything else happens, and a row whose response is recorded is
never requested again: a restart skips it. The `openai` client is used with its own retries off
(it retries twice by default and sends no idempotency key), so the bookkeeping here is the only
retry policy. A retry after a timeout or a dropped connection may still be billed by the provider
(the first request may have completed): each such retry is logged as a possible double charge.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import pathlib
import random
import threading
import time

log = logging.getLogger("apo_jax.clair")
PERMANENT = {400, 401, 403, 404, 422}


@dataclasses.dataclass
class ClientConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0


class RequestFailed(RuntimeError):
    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


def make_client(cfg: ClientConfig):
    import openai

    key = os.environ.get(cfg.api_key_env)
    if key is None:
        log.warning(
            "%s is not set: sending the placeholder key 'EMPTY' (fine for a local server)", cfg.api_key_env
        )
        key = "EMPTY"
    return openai.OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout)


def _retry_after(err) -> float | None:
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    if headers.get("retry-after-ms"):
        return float(headers["retry-after-ms"]) / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())


@dataclasses.dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    possible_double_charges: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def request_with_retries(client, cfg: ClientConfig, request: dict, counters: Counters, lock) -> dict:
    """One chat completion as a plain dict, after the retries the module docstring describes."""
    import openai

    last = "no attempt"
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            with lock:
                counters.retries += 1
        with lock:
            counters.requests += 1
        wait = None
        try:
            response = client.chat.completions.create(**request)
            return response.model_dump() if hasattr(response, "model_dump") else dict(response)
        except openai.RateLimitError as e:
            last, wait = f"429 rate limited: {e}", _retry_after(e)
        except openai.APIStatusError as e:
            if e.status_code in PERMANENT:
                raise RequestFailed(f"HTTP {e.status_code}: {e}", permanent=True) from None
            last, wait = f"HTTP {e.status_code}: {e}", _retry_after(e)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            last = f"{type(e).__name__}: {e}"
            with lock:
                counters.possible_double_charges += 1
            log.warning(
                "retrying after %s: the lost request may still be billed (possible double charge)", last
            )
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
            last = f"malformed response: {type(e).__name__}: {e}"
        if attempt == cfg.max_retries:
            break
        backoff = random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2**attempt))
        time.sleep(min(cfg.backoff_max, wait) if wait is not None else backoff)
    raise RequestFailed(f"gave up after {cfg.max_retries + 1} attempts; last error: {last}", permanent=False)


class ResponseLog:
    """The append-only record of received responses: one JSON line per row id, fsync'd."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.lock = threading.Lock()
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: its row is redone
                    continue
                self.done.setdefault(row["id"], row)

    def append(self, row: dict) -> None:
        with self.lock:
            if row["id"] in self.done:
                return
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.done[row["id"]] = row


def run_requests(cfg: ClientConfig, requests: dict[str, dict], log_path: pathlib.Path, *, client=None,
                 progress: bool = True) -> tuple[ResponseLog, dict[str, str], Counters]:  # fmt: skip
    """Sends the requests whose ids have no recorded response; returns (log, {id: failure}, counters)."""
    client = client or make_client(cfg)
    responses = ResponseLog(log_path)
    todo = {k: v for k, v in requests.items() if k not in responses.done}
    counters, lock, failures = Counters(), threading.Lock(), {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(requests), initial=len(requests) - len(todo), desc="requests", dynamic_ncols=True
        )

    def work(row_id: str, request: dict):
        response = request_with_retries(client, cfg, request, counters, lock)
        responses.append({"id": row_id, "request": request, "response": response})
        usage = response.get("usage") or {}
        with lock:
            counters.prompt_tokens += usage.get("prompt_tokens") or 0
            counters.completion_tokens += usage.get("completion_tokens") or 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {pool.submit(work, k, v): k for k, v in todo.items()}
        for future in concurrent.futures.as_completed(futures):
            row_id = futures[future]
            try:
                future.result()
            except RequestFailed as e:
                failures[row_id] = e.reason
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    tokens=counters.prompt_tokens + counters.completion_tokens, failed=len(failures)
                )
    if bar is not None:
        bar.close()
    return responses, failures, counters

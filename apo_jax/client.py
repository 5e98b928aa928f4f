"""A resumable, money-aware job of chat requests to any OpenAI-compatible server.

Built for 32K paid requests: a bounded number in flight; retries with exponential backoff and
full jitter on 429 (honouring Retry-After in seconds or as an HTTP date; any other value is
ignored), 5xx, timeouts, dropped connections and answers with nothing to use (no choices, an empty
content: never recorded as an answer); no retry of permanent errors (400, 401, 403, 404, 422).

What was paid for is kept. Each response is appended, flushed and fsync'd, to
`<output>.responses.jsonl` as it arrives (`ResponseLog`); a request whose response is recorded is
never sent again. Responses are keyed by a hash of the request's content (`request_key`: model,
messages, settings, and a sample number where several answers to one request are wanted), never by
row number, so a rerun with other input, another model or other settings cannot reuse an answer to
another request. The log's folder is created, and the log opened, before the first request; a last
line cut by a crash or a full disk is removed on start (`repair_tail`), and a failed append is
undone and stops the job naming the file. A row that failed has no recorded response, so the same
command asks for it again. Callers hold `outputs.OutputLock` on their output while they run, so two
jobs on one output never pay twice. The `openai` client is used with its own retries off (it
retries twice by default and sends no idempotency key), so the bookkeeping here is the only retry
policy.

Double charges. A request lost to a timeout, or to a connection dropped once it was sent, may
still be billed by the provider (it may have completed): the retry is logged, and each later
attempt of the row that may be billed too (an answer, or another lost request) is counted as a
possible double charge. A request that never reached a server (connection refused, a host name that
does not resolve, a connect timeout, a failed TLS handshake) cannot have been billed: it is not
counted, and it is retried only a few times after short waits.

Failing fast. Until the endpoint has answered once (a 2xx, or a 4xx other than 401, 403 and 404),
requests go one at a time, so a dead endpoint or a wrong key costs a few requests, not one per
worker. A circuit breaker stops the whole job when the failures say every further row would fail
the same way: the endpoint unreachable on `max_consecutive_failures` (N) consecutive requests; a
401 or 403 (the key is wrong for every row: never retried, never sent again); a 404 on N
consecutive requests (a wrong base URL or model); or N consecutive rows that used up their retries.
Requests in flight when it trips may finish (their responses are kept); no new one starts.
`run_requests` reports the stop in `Counters.stop` and lists the rows it left undone among its
failures ("not done: ..."); the jobs raise it (`CircuitOpen`, a `cli.UserError`: one line, exit
status 2) after writing what they have. The rows answered so far stay in the response log, so running
the same command again resumes.

The API key is read from the variable named by `api_key_env` (OPENAI_API_KEY). Without it, a
loopback endpoint (127.0.0.1, localhost, ::1) is sent a placeholder key (a local server without
auth); any other endpoint is refused before any request is made.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import email.utils
import hashlib
import ipaddress
import json
import logging
import math
import os
import pathlib
import random
import socket
import threading
import time
import urllib.parse

from apo_jax.cli import UserError
from apo_jax.outputs import append_lines, check_output_file, repair_tail

log = logging.getLogger("apo_jax.clair")
PERMANENT = {400, 401, 403, 404, 422}
AUTH = {401, 403}
PLACEHOLDER_KEY = "EMPTY"
UNREACHABLE_RETRIES = 2  # retries of one row whose requests never reached a server ...
UNREACHABLE_BACKOFF_MAX = 1.0  # ... after at most this many seconds each


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
    max_consecutive_failures: int = 3  # the circuit breaker's N (a 401/403 stops at once)
    connect_timeout: float = 10.0  # for the TCP and TLS connection alone (at most `timeout`)


class RequestFailed(RuntimeError):
    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class CircuitOpen(UserError):
    """The job stopped because every further request would fail the same way; the message names the
    endpoint, the kind of failure, the progress kept and how to resume. `summary`: set by `revise`."""

    summary: dict | None = None


class _Stopped(Exception):
    """Raised in a worker when the breaker has tripped: its row is not requested (again)."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ClientConfig) -> str:
    """The key to send: `$api_key_env`; without it a placeholder for a loopback endpoint, and for any
    other endpoint a `UserError` (before any request: a keyless request to a paid API is never sent)."""
    url = urllib.parse.urlsplit(cfg.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"base URL {cfg.base_url!r} is not an http(s) URL (e.g. https://api.openai.com/v1)")
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if is_loopback(url.hostname):
        log.debug(
            "%s is not set: sending a placeholder key to the loopback %s", cfg.api_key_env, cfg.base_url
        )
        return PLACEHOLDER_KEY
    raise UserError(
        f"{cfg.api_key_env} is not set: refusing to send requests to {cfg.base_url} without an API key "
        f"(set {cfg.api_key_env}, or name the variable that holds the key with --api-key-env)"
    )


def make_client(cfg: ClientConfig):
    import openai

    timeout = openai.Timeout(cfg.timeout, connect=min(cfg.connect_timeout, cfg.timeout))
    return openai.OpenAI(base_url=cfg.base_url, api_key=resolve_api_key(cfg), max_retries=0, timeout=timeout)


def _seconds(value) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after(err) -> float | None:
    """The wait a 429 or 5xx asks for: `retry-after-ms`, or `Retry-After` in seconds or as an HTTP
    date; None (the usual backoff) for a value that is neither: a server's garbage is no reason to
    stop a job."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    ms = _seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    value = headers.get("retry-after")
    if value is None or _seconds(value) is not None:
        return _seconds(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        log.info("ignoring Retry-After %r: neither seconds nor an HTTP date", value)
        return None
    if when.tzinfo is None:  # "-0000": UTC, by RFC 5322
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


def answer_text(response) -> str | None:
    """The first choice's message content, or None when the response has none to use (no `choices`,
    an empty list, a missing, empty or blank content): such a response is retried, never recorded."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) and content.strip() else None


def request_key(request: dict, sample: int = 0) -> str:
    """The identity of a request's content: a hash of the whole request (model, messages, sampling
    settings) and, for `sample` > 0, of the sample number (several answers wanted to one request)."""
    content = request if not sample else {"request": request, "sample": sample}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def never_sent(err: BaseException) -> str | None:
    """Why `err` (an `openai.APIConnectionError` or `APITimeoutError`) shows the request never
    reached a server, e.g. "connection refused"; None when it may have been sent (a read timeout, a
    connection dropped mid-request): only the failure to connect proves nothing was billed."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and all(e is not c for c in chain) and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"host name not resolved: {_one_line(e, 120)}"
    for e in chain:  # httpx (or httpx2) and httpcore raise these only while opening a connection
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"):
            if type(e).__name__ == "ConnectTimeout":
                return "connect timeout"
            if type(e).__name__ == "ConnectError":
                return f"cannot connect: {_one_line(e, 120)}"
    return None


@dataclasses.dataclass
class Counters:
    requests: int = 0  # attempts, including those that never reached a server
    retries: int = 0
    possible_double_charges: int = 0
    unreachable: int = 0  # attempts that never reached a server (not billed)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop: CircuitOpen | None = None  # set when the circuit breaker stopped the job


class Breaker:
    """The circuit breaker and the one-at-a-time gate of one job (see the module docstring)."""

    def __init__(self, cfg: ClientConfig):
        self.cfg, self.limit = cfg, max(1, cfg.max_consecutive_failures)
        self.lock, self.gate = threading.Lock(), threading.Lock()
        self.tripped, self.verified = threading.Event(), threading.Event()
        self.kind, self.count, self.rows_failed = None, 0, 0
        self.reason: str | None = None

    def check(self) -> None:
        if self.tripped.is_set():
            raise _Stopped

    @contextlib.contextmanager
    def turn(self):
        """One attempt; until the endpoint has answered once, attempts take turns, one at a time."""
        held = False
        while not self.verified.is_set():
            if self.gate.acquire(timeout=0.05):
                held = True
                break
            self.check()
        try:
            self.check()
            yield
        finally:
            if held:
                self.gate.release()

    def _trip(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.tripped.set()

    def halt(self, reason: str) -> None:
        """Stops the job for a reason of our own (its log cannot be written)."""
        with self.lock:
            self._trip(reason)

    def request(self, kind: str | None, detail: str = "", status: int | None = None) -> None:
        """One attempt's outcome: None for an answer or a failure that shows the endpoint and key work,
        "answered" for an HTTP response that does not (a 5xx), else the failure's kind."""
        with self.lock:
            if status is not None and status < 500 and status not in AUTH | {404}:
                self.verified.set()  # the server took the request and the key: workers need not queue
            if kind in (None, "answered", "lost"):
                self.kind, self.count = None, 0
                return
            self.count = self.count + 1 if kind == self.kind else 1
            self.kind = kind
            url, n = self.cfg.base_url, self.count
            if kind == "auth":
                key = os.environ.get(self.cfg.api_key_env)
                sent = (
                    f"the key in {self.cfg.api_key_env}"
                    if key
                    else f"a placeholder key ({self.cfg.api_key_env} is not set)"
                )
                self._trip(f"{url} authentication failed with {sent} ({detail}); not retried, not sent again")
            elif n >= self.limit and kind == "unreachable":
                self._trip(f"{url} unreachable ({detail}) on {n} consecutive requests")
            elif n >= self.limit and kind == "not found":
                self._trip(
                    f"{url} answered HTTP 404 on {n} consecutive requests (check the base URL and "
                    f"the model name {self.cfg.model!r}): {detail}"
                )

    def row(self, failure: str | None) -> None:
        """One row's end: answered (None), or its retries used up (`failure`, its last error)."""
        with self.lock:
            self.rows_failed = 0 if failure is None else self.rows_failed + 1
            if self.rows_failed >= self.limit:
                self._trip(
                    f"{self.cfg.base_url} failing: {self.rows_failed} consecutive rows used up their "
                    f"retries ({failure})"
                )

    def wait(self, seconds: float) -> None:
        """Sleeps `seconds`, or less if the breaker trips meanwhile (then raises _Stopped)."""
        if self.tripped.wait(max(0.0, seconds)):
            raise _Stopped


def _status_kind(code: int) -> str:
    """How the circuit breaker counts an HTTP error status: a wrong key, a wrong URL, or an answer."""
    return "auth" if code in AUTH else "not found" if code == 404 else "answered"


def request_with_retries(
    client, cfg: ClientConfig, request: dict, counters: Counters, lock, breaker: Breaker | None = None
) -> dict:
    """One chat completion as a plain dict, after the retries the module docstring describes. Raises
    `RequestFailed`; with a `breaker` shared by a job, also `_Stopped` once it has tripped."""
    if breaker is None:  # a lone request: the same retries, and a stop is a failure of this row
        breaker = Breaker(cfg)
        try:
            return request_with_retries(client, cfg, request, counters, lock, breaker)
        except _Stopped:
            raise RequestFailed(f"stopped: {breaker.reason}", permanent=False) from None
    import openai

    # `lost`: an earlier attempt was lost after it was sent, or answered with nothing to use, so it may
    # have been billed; every later attempt that may be billed too (an answer, or another lost one) is
    # a possible double charge
    last, lost, unreachable_retries = "no attempt", False, 0

    def maybe_billed_again() -> None:
        if lost:
            with lock:
                counters.possible_double_charges += 1

    for attempt in range(cfg.max_retries + 1):
        breaker.check()
        with breaker.turn():
            with lock:
                counters.requests += 1
                if attempt:
                    counters.retries += 1
            if lost:
                log.warning(
                    "retrying after %s: the earlier attempt may be billed too (possible double charge)", last
                )
            wait, unreachable = None, None
            try:
                response = client.chat.completions.create(**request)
                result = response.model_dump() if hasattr(response, "model_dump") else dict(response)
                maybe_billed_again()
                if answer_text(result) is not None:
                    breaker.request(None, status=200)
                    return result
                empty = "an empty content" if result.get("choices") else "no choices"
                last, lost = f"an answer with nothing to use ({empty})", True
                breaker.request("answered", status=200)
            except openai.RateLimitError as e:
                last, wait = f"429 rate limited: {_one_line(e)}", _retry_after(e)
                breaker.request("answered", status=429)
            except openai.APIStatusError as e:
                detail = f"HTTP {e.status_code}: {_one_line(e)}"
                breaker.request(_status_kind(e.status_code), detail, status=e.status_code)
                if e.status_code in PERMANENT:
                    raise RequestFailed(detail, permanent=True) from None
                last, wait = detail, _retry_after(e)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                unreachable = never_sent(e)
                if unreachable is not None:  # never sent: not billed, whatever came before
                    last = f"{cfg.base_url} unreachable ({unreachable})"
                    with lock:
                        counters.unreachable += 1
                    breaker.request("unreachable", unreachable)
                else:  # sent, and maybe completed and billed
                    maybe_billed_again()
                    last, lost = f"{type(e).__name__}: {_one_line(e)}", True
                    breaker.request("lost")
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
                maybe_billed_again()  # an answer we cannot read may be billed all the same
                last = f"malformed response: {type(e).__name__}: {_one_line(e)}"
                breaker.request("answered", status=200)
        if unreachable is not None:
            if unreachable_retries >= min(UNREACHABLE_RETRIES, cfg.max_retries):
                raise RequestFailed(
                    f"gave up after {attempt + 1} attempts; last error: {last}", permanent=False
                )
            unreachable_retries += 1
            log.info("retrying: %s", last)
            breaker.wait(random.uniform(0, min(UNREACHABLE_BACKOFF_MAX, cfg.backoff_base * 2**attempt)))
            continue
        if attempt == cfg.max_retries:
            break
        backoff = random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2**attempt))
        breaker.wait(min(cfg.backoff_max, wait) if wait is not None else backoff)
    raise RequestFailed(f"gave up after {cfg.max_retries + 1} attempts; last error: {last}", permanent=False)


# --- the append-only record ------------------------------------------------------------------------


class ResponseLog:
    """The append-only record of received responses, one JSON line each ({id, key, request,
    response}): `done` maps a request's content key (`request_key`) to its recorded line. Opening it
    creates its folder and the file (a job that cannot write it stops before its first request) and
    removes a cut last line. Lines with nothing to use (written before such answers were retried)
    are kept in the file but not counted as done."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.lock = threading.Lock()
        self.done: dict[str, dict] = {}
        check_output_file(self.path, flag="the response log")
        repair_tail(self.path)
        with open(self.path, "a"):  # the folder is writable: found now, not after the first answer
            pass
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    key = row.get("key") or request_key(row["request"])
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue  # a line damaged by hand: its request is sent again
                if answer_text(row.get("response")) is not None:
                    self.done.setdefault(key, row)

    def append(self, row_id: str, key: str, request: dict, response: dict) -> None:
        with self.lock:
            if key in self.done:
                return
            row = {"id": row_id, "key": key, "request": request, "response": response}
            append_lines(self.path, [row])
            self.done[key] = row


def rerun_note(failed: int) -> str | None:
    """What a summary says about failed rows: the same command asks again for those without a
    response (a recorded answer, even an unreadable one, is not bought twice)."""
    if not failed:
        return None
    return (
        f"{failed} rows failed; run the same command again to retry those without a recorded response "
        "(the failures file gives each reason)"
    )


def run_requests(
    cfg: ClientConfig,
    requests: dict[str, dict],
    log_path: pathlib.Path,
    *,
    keys: dict[str, str] | None = None,
    client=None,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, str], Counters]:
    """Sends the requests (by row id) whose content has no recorded response; returns ({id: recorded
    line}, {id: failure}, counters). `keys` gives a row's content key where it is not
    `request_key(request)` (several samples of one request); rows with one key share one request. If
    the circuit breaker stopped the job, `counters.stop` says why, and the rows it left undone are
    failures ("not done: the job was stopped ..."); a response that cannot be recorded (a full
    disk) stops the job the same way."""
    responses = ResponseLog(log_path)  # before the client: a log that cannot be written costs nothing
    client = client or make_client(cfg)
    keys = {rid: (keys or {}).get(rid) or request_key(request) for rid, request in requests.items()}
    todo: dict[str, tuple[str, dict]] = {}  # key -> (the first row id with it, its request)
    for rid, request in requests.items():
        if keys[rid] not in responses.done:
            todo.setdefault(keys[rid], (rid, request))
    counters, lock, failed, breaker = Counters(), threading.Lock(), {}, Breaker(cfg)
    bar, distinct = None, len(set(keys.values()))
    if progress:
        from tqdm import tqdm

        # disable=None: a bar only on a terminal (a log file or a pipe gets no lines of \r updates)
        bar = tqdm(
            total=distinct,
            initial=distinct - len(todo),
            desc="requests",
            dynamic_ncols=True,
            disable=None,
        )

    def work(key: str, row_id: str, request: dict):
        breaker.check()
        try:
            response = request_with_retries(client, cfg, request, counters, lock, breaker)
        except RequestFailed as e:
            if not e.permanent:
                breaker.row(e.reason)
            raise
        try:
            responses.append(row_id, key, request, response)
        except OSError as e:  # paid for but not kept: no further request may start
            breaker.halt(f"cannot record responses in {log_path} ({e.strerror or e})")
            raise _Stopped from None
        breaker.row(None)
        usage = response.get("usage") or {}
        with lock:
            counters.prompt_tokens += usage.get("prompt_tokens") or 0
            counters.completion_tokens += usage.get("completion_tokens") or 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {pool.submit(work, k, rid, request): k for k, (rid, request) in todo.items()}
        cancelled = False
        try:
            for future in concurrent.futures.as_completed(futures):
                if breaker.tripped.is_set() and not cancelled:
                    cancelled = True
                    for f in futures:
                        f.cancel()  # those not started; those in flight may finish
                try:
                    future.result()
                except RequestFailed as e:
                    failed[futures[future]] = e.reason
                except (_Stopped, concurrent.futures.CancelledError):
                    continue
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        tokens=counters.prompt_tokens + counters.completion_tokens, failed=len(failed)
                    )
        except BaseException:  # a bug or Ctrl-C: start no further request
            breaker.halt("interrupted")
            for f in futures:
                f.cancel()
            raise
    if bar is not None:
        bar.close()
    if breaker.reason is not None:
        for k in todo:  # as before the breaker: every row is answered or has a failure
            if k not in responses.done and k not in failed:
                failed[k] = f"not done: the job was stopped ({breaker.reason})"
        done = sum(keys[rid] in responses.done for rid in requests)
        counters.stop = CircuitOpen(
            f"{breaker.reason}; stopped. {done} of {len(requests)} rows done, kept in {log_path}; "
            "run the same command again to resume."
        )
    answered = {rid: responses.done[keys[rid]] for rid in requests if keys[rid] in responses.done}
    failures = {rid: failed[keys[rid]] for rid in requests if keys[rid] in failed}
    return answered, failures, counters

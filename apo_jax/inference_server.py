"""An OpenAI-compatible inference server's lifecycle, beside the client that talks to it
(apo_jax.client): `serving(policy, ...)` yields the base URL of a server that serves `policy`, either
one already running, told to load it (SGLang's /update_weights_from_disk) and checked, or one started
with it by a shell command (`vllm serve {model} --port {port}`) and stopped afterwards. The online loop
(apo_jax.train.online, `online.sampler='server'`) samples each round's policy through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import signal
import subprocess
import time
import urllib.request

from apo_jax.cli import UserError

RELOADS = ("", "update_weights_from_disk")  # the reload endpoints known (SGLang's), or none


class ServerError(UserError, RuntimeError):
    """The inference server did not come up, reload, or serve the round's policy; the message says which."""


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 600.0):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def check_serves(base: str, policy: pathlib.Path) -> None:
    """The server's /v1/models must name `policy` as its `root` (vLLM and SGLang report the served
    path there): samples from last round's weights would be mislabeled silently."""
    served = [m.get("root") for m in get_json(f"{base}/models").get("data", [])]
    if any(served) and str(policy) not in served:
        raise ServerError(f"{base} serves {served}, not this round's policy {policy}")


def _reload(base: str, endpoint: str, policy: pathlib.Path) -> None:
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    try:
        answer = post_json(f"{root}/{endpoint}", {"model_path": str(policy)})
    except OSError as e:
        raise ServerError(f"{root}/{endpoint}: the reload of {policy} failed: {e}") from None
    if not answer.get("success", True):
        raise ServerError(f"{root}/{endpoint} refused {policy}: {answer.get('message')}")


def _wait_until_serving(proc, command: str, base: str, policy: pathlib.Path, start_timeout: float) -> None:
    deadline = time.monotonic() + start_timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(f"online.server_command exited with {proc.returncode}: {command}")
        try:
            return check_serves(base, policy)
        except OSError:
            if time.monotonic() > deadline:
                raise ServerError(f"{command}: no answer at {base}/models in {start_timeout:g} s") from None
            time.sleep(1.0)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(
    policy: pathlib.Path,
    *,
    url: str = "",
    reload: str = "update_weights_from_disk",
    command: str = "",
    port: int = 8000,
    start_timeout: float = 900.0,
):
    """The base URL of a server that serves `policy`: the running server at `url`, told to load it
    through `reload` ("" when it needs no telling) and checked, or `command` (with `{model}` and
    `{port}`) started in its own process group and stopped (SIGTERM, then SIGKILL) on exit."""
    if url:
        base = url.rstrip("/")
        if reload:
            _reload(base, reload, policy)
        check_serves(base, policy)
        yield base
        return
    command = command.format(model=shlex.quote(str(policy)), port=port)
    base = f"http://127.0.0.1:{port}/v1"
    proc = subprocess.Popen(command, shell=True, start_new_session=True)
    try:
        _wait_until_serving(proc, command, base, policy, start_timeout)
        yield base
    finally:
        _stop(proc)

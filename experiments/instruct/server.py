"""The instruction-following task's stand-ins for the stronger LLMs, over HTTP on 127.0.0.1 as an
OpenAI-compatible endpoint: the CLAIR reviser applies the constraint's minimal fix (task.revise) and
the judge grades with the constraint's strict checker, so `python -m apo_jax.data.clair revise` and
`judge` run the paper's prompts, parsing and bookkeeping against them.
"""

from __future__ import annotations

from apo_jax.loopback import ChatServer
from experiments.instruct import task
from experiments.mini.server import stand_in


def server(rows: list[dict]):
    """`with server(rows) as s:` the reviser and the judge for the prompts of `rows` at `s.url`."""
    by_prompt = {r["prompt"]: r for r in rows}

    def row(prompt: str) -> dict:
        if prompt not in by_prompt:
            raise ValueError(f"not a prompt of this task: {prompt[:80]!r}")
        return by_prompt[prompt]

    reply = stand_in(
        lambda prompt, answer: task.revise(row(prompt), answer),
        lambda prompt, answer: float(task.follows(row(prompt), answer)),
        "the answer ignores the instruction's format; changed only what it requires.",
    )
    return ChatServer(lambda body: reply(body["messages"][-1]["content"]))

"""The miniature's stand-ins for the stronger LLMs, served over HTTP as an OpenAI-compatible endpoint
on 127.0.0.1: the CLAIR reviser (the task's minimal reviser) and a judge (the task's scorer, as a
1-10 grade), so the online loop's `clair` and `judge` labelers run through the real client.
"""

from __future__ import annotations

import re

from apo_jax.testing import ChatServer
from experiments.mini import task

_PROMPT = re.compile(r"Compute ([-+ 0-9]+)\.")


def problem_of(prompt: str) -> dict:
    """The problem behind a "Compute 7 + 5 - 9." prompt."""
    tokens = _PROMPT.search(prompt).group(1).split()
    return {"prompt": prompt, "numbers": [int(x) for x in tokens[::2]], "ops": tokens[1::2]}


def reply(content: str) -> str:
    """The reviser's or the judge's answer to one request."""
    if "{student_solution}" in content:
        task_text = re.search(r"\{task\}: (.*?)\n\n\{student_solution\}", content, re.S).group(1)
        answer = re.search(r"\{student_solution\}: (.*?)\n\n-----", content, re.S).group(1)
        revised = task.revise(problem_of(task_text), answer)
        return "{teacher_reasoning}: wrong steps recomputed.\n{corrected_student_solution}: " + revised
    prompt = re.search(r"\[Instruction\]\n(.*?)\n\n\[Response\]", content, re.S).group(1)
    answer = re.search(r"\[Response\]\n(.*)\n$", content, re.S).group(1)
    return f"Graded by the task's checker.\nScore: {1 + round(6 * task.score(problem_of(prompt), answer))}"


def server():
    """`with server() as s:` the reviser and the judge at `s.url` until the block ends."""
    return ChatServer(lambda body: reply(body["messages"][-1]["content"]))

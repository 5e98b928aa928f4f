"""The miniature's stand-ins for the stronger LLMs, served over HTTP as an OpenAI-compatible endpoint
on 127.0.0.1: the CLAIR reviser (the task's minimal reviser) and a judge (the task's scorer, as a
1-10 grade), so the online loop's `clair` and `judge` labelers run through the real client.
`stand_in` builds the same pair for any task (experiments/instruct uses it too).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from apo_jax.loopback import ChatServer
from experiments.mini import task

_PROMPT = re.compile(r"Compute ([-+ 0-9]+)\.")


def problem_of(prompt: str) -> dict:
    """The problem behind a "Compute 7 + 5 - 9." prompt."""
    tokens = _PROMPT.search(prompt).group(1).split()
    return {"prompt": prompt, "numbers": [int(x) for x in tokens[::2]], "ops": tokens[1::2]}


def stand_in(revise: Callable[[str, str], str], score: Callable[[str, str], float], why: str) -> Callable:
    """`reply(content) -> str` for one request: to the CLAIR prompt (apo_jax.data.clair.prompts), the
    paper's two sections with `revise(task, answer)` as the corrected solution; to the judge's score
    prompt (apo_jax.data.clair.baselines.SCORE_TEMPLATE), `Score: N` with N = 1 + 6 × `score`; to the
    pairwise judge's (JUDGE_TEMPLATE), `Verdict:` the answer `score` rates higher, or tie."""

    def reply(content: str) -> str:
        if "{student_solution}" in content:
            task_text = re.search(r"\{task\}: (.*?)\n\n\{student_solution\}", content, re.S).group(1)
            answer = re.search(r"\{student_solution\}: (.*?)\n\n-----", content, re.S).group(1)
            return (
                f"{{teacher_reasoning}}: {why}\n{{corrected_student_solution}}: {revise(task_text, answer)}"
            )
        if "[Response A]" in content:  # the pairwise judge (`clair judge`): the higher score wins
            prompt = re.search(r"\[Instruction\]\n(.*?)\n\n\[Response A\]", content, re.S).group(1)
            a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", content, re.S).group(1)
            b = re.search(r"\[Response B\]\n(.*)\n$", content, re.S).group(1)
            sa, sb = score(prompt, a), score(prompt, b)
            return (
                f"Compared by the task's checker.\nVerdict: {'A' if sa > sb else 'B' if sb > sa else 'tie'}"
            )
        prompt = re.search(r"\[Instruction\]\n(.*?)\n\n\[Response\]", content, re.S).group(1)
        answer = re.search(r"\[Response\]\n(.*)\n$", content, re.S).group(1)
        return f"Graded by the task's checker.\nScore: {1 + round(6 * score(prompt, answer))}"

    return reply


reply = stand_in(
    lambda prompt, answer: task.revise(problem_of(prompt), answer),
    lambda prompt, answer: task.score(problem_of(prompt), answer),
    "wrong steps recomputed.",
)


def server():
    """`with server() as s:` the reviser and the judge at `s.url` until the block ends."""
    return ChatServer(lambda body: reply(body["messages"][-1]["content"]))

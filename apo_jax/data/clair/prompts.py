"""The CLAIR revision prompt and the parser of the reviser's answer.

The prompt is the one the APO/CLAIR paper's pipeline sent to GPT-4 (tests/data/
clair_gpt4_revisions.jsonl holds ten real requests and responses): a teacher minimally improves
a student's answer, thinks in a `{teacher_reasoning}` section, then writes the
`{corrected_student_solution}`. Responses mark the sections with or without a colon.
"""

from __future__ import annotations

import re

REVISION_TEMPLATE = (
    "You are a teacher and your task is to minimally improve a student's answer. I will give you a "
    "{{task}} and a {{student_solution}}. Your job is to revise the {{student_solution}} such that "
    "it is clearer, more correct, and more engaging. Copy all non-corrected parts of the student's "
    "answer. Do not allude to the {{corrected_student_solution}} being a revision or a correction "
    "in your final solution.\n\n{{task}}: {task}\n\n{{student_solution}}: "
    "{student_solution}\n\n-----------------\n\nLet's first think step by step with a "
    "{{teacher_reasoning}} to decide how to improve the {{student_solution}}, then give the "
    "{{corrected_student_solution}}. Mention the {{teacher_reasoning}} and "
    "{{corrected_student_solution}} identifiers to structure your answer.\n\n"
)


class ParseError(ValueError):
    """The reviser's response has no usable revision; `reason` says why."""


def revision_messages(prompt: str, answer: str) -> list[dict]:
    """The chat request's messages: an empty system turn and the teacher prompt, as in the paper's runs."""
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": REVISION_TEMPLATE.format(task=prompt, student_solution=answer)},
    ]


_MARK = re.compile(r"\{(teacher_reasoning|corrected_student_solution)\}:?")


def parse_revision(content: str | None, finish_reason: str | None = None) -> tuple[str, str]:
    """(teacher reasoning, corrected solution) from the reviser's text, or ParseError with the reason."""
    if finish_reason == "length":
        raise ParseError("the response was cut at max_tokens (finish_reason 'length')")
    if not content or not content.strip():
        raise ParseError("empty response")
    marks = list(_MARK.finditer(content))
    solutions = [m for m in marks if m.group(1) == "corrected_student_solution"]
    if not solutions:
        raise ParseError("no {corrected_student_solution} section")
    # The solution starts after the last solution marker that is followed by text; the reasoning
    # is what lies between the reasoning marker and the first solution marker.
    last = solutions[-1]
    revision = content[last.end() :].strip()
    if not revision:
        raise ParseError("the {corrected_student_solution} section is empty")
    reasoning_marks = [
        m for m in marks if m.group(1) == "teacher_reasoning" and m.start() < solutions[0].start()
    ]
    start = reasoning_marks[0].end() if reasoning_marks else 0
    reasoning = content[start : solutions[0].start()].strip()
    return reasoning, revision

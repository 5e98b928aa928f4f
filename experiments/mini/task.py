"""A small task with verifiable, step-by-step answers: chained addition and subtraction of
one-digit numbers (two to three steps), hard enough that a tiny model gets a fair share wrong.

    prompt:  "Compute 7 + 5 - 9."
    answer:  "7 + 5 = 12\n12 - 9 = 3\nAnswer: 3"

One step per line, so answers can be checked (and corrected) step by step. The stand-ins for other
LLMs write the same arithmetic in their own style.
"""

from __future__ import annotations

import random
import re

_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def make_problem(rng: random.Random) -> dict:
    n = rng.randint(2, 3)
    numbers = [rng.randint(1, 9) for _ in range(n + 1)]
    ops = [rng.choice("+-") for _ in range(n)]
    text = " ".join(f"{x} {o}" for x, o in zip(numbers, ops, strict=False)) + f" {numbers[-1]}"
    return {"prompt": f"Compute {text}.", "numbers": numbers, "ops": ops}


def problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def solve(problem: dict) -> list[tuple[int, str, int, int]]:
    """The correct steps (left, op, right, result)."""
    steps, acc = [], problem["numbers"][0]
    for op, x in zip(problem["ops"], problem["numbers"][1:], strict=True):
        result = acc + x if op == "+" else acc - x
        steps.append((acc, op, x, result))
        acc = result
    return steps


def gold_answer(problem: dict) -> str:
    steps = solve(problem)
    return "\n".join(f"{a} {o} {b} = {r}" for a, o, b, r in steps) + f"\nAnswer: {steps[-1][3]}"


def final_answer(text: str) -> int | None:
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def is_correct(problem: dict, text: str) -> bool:
    """The scorer: the final answer is right."""
    return final_answer(text) == solve(problem)[-1][3]


def score(row: dict, response: str) -> float:
    """The task's scorer with partial credit (rows carry the problem): 1 for a right final answer, plus
    0.5 × the share of the solution's intermediate results that the answer writes."""
    results = {str(r) for *_, r in solve(row)}
    found = set(re.findall(r"-?\d+", response))
    return float(is_correct(row, response)) + 0.5 * len(results & found) / len(results)


def line_labels(problem: dict, text: str) -> list[int]:
    """The scorer, line by line (Mask-DPO's sentence labels): a step line is right (1) when it is the
    gold solution's step at its place, the answer line when the final answer is right; other lines 1."""
    steps, labels, k = solve(problem), [], 0
    for line in (x for x in text.split("\n") if x.strip()):
        m = _STEP.match(line)
        if m:
            labels.append(int(k < len(steps) and tuple(m.groups()) == tuple(map(str, steps[k]))))
            k += 1
        elif _ANSWER.search(line):
            labels.append(int(final_answer(line) == steps[-1][3]))
        else:
            labels.append(1)
    return labels


def revise(problem: dict, text: str) -> str:
    """The programmatic minimal reviser (CLAIR's stand-in for GPT-4-turbo): keeps every line of M's
    answer that is right, and rewrites only the wrong steps and the final answer, in M's format."""
    steps = solve(problem)
    lines = text.split("\n")
    out, k = [], 0
    for line in lines:
        m = _STEP.match(line)
        if m and k < len(steps):
            a, o, b, r = steps[k]
            out.append(line if tuple(m.groups()) == (str(a), o, str(b), str(r)) else f"{a} {o} {b} = {r}")
            k += 1
        elif _ANSWER.search(line):
            continue
        elif line.strip():
            out.append(line)
    for a, o, b, r in steps[k:]:  # missing steps
        out.append(f"{a} {o} {b} = {r}")
    out.append(f"Answer: {steps[-1][3]}")
    return "\n".join(out)


def other_model_answer(problem: dict, rng: random.Random, error_rate: float = 0.4) -> str:
    """Another LLM's answer in its own words, sometimes wrong (the off-policy data's models)."""
    words = {"+": "plus", "-": "minus"}
    lines, acc = [], problem["numbers"][0]
    for i, (op, b) in enumerate(zip(problem["ops"], problem["numbers"][1:], strict=True)):
        r = acc + b if op == "+" else acc - b
        if rng.random() < error_rate / len(problem["ops"]):
            r += rng.choice([-10, -1, 1, 10])
        lines.append(f"{'First,' if i == 0 else 'Then'} {acc} {words[op]} {b} is {r}.")
        acc = r
    return "\n".join(lines) + f"\nSo the result is {acc}.\nAnswer: {acc}"


def stronger_answer(problem: dict) -> str:
    """A stronger model's answer from scratch, always right, in its own (more verbose) style."""
    steps = solve(problem)
    body = "\n".join(f"Step {i + 1}: {a} {o} {b} = {r}" for i, (a, o, b, r) in enumerate(steps))
    result = steps[-1][3]
    return f"Let's compute step by step.\n{body}\nTherefore the final result is {result}.\nAnswer: {result}"

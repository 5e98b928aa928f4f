"""A small task with verifiable, step-by-step answers, and a teacher whose flaw is a habit.

Chained addition and subtraction of one-digit numbers (two to three steps; running totals stay
between 0 and 19), one step per line:

    prompt:  "Compute 7 + 5 - 9."
    answer:  "7 + 5 = 12\\n12 - 9 = 3\\nAnswer: 3"

M learns the task from a *teacher* that knows the arithmetic but has two traits, as an instruct
model's flaws are behaviours rather than missing knowledge:
- style: each line is phrased one of three ways ("7 + 5 = 12", "7 plus 5 is 12", "7 plus 5 gives
  12"), sometimes after an opening line: two samples of M differ in wording everywhere, not only
  where one of them is wrong;
- a systematic slip: in a share of its answers (`careless`) the teacher forgets every carry: an
  addition whose ones digits sum to ten or more loses its ten ("7 + 5 = 2"), and the following steps
  go on from the wrong total.
So M's errors are a learned habit at one kind of step, which CLAIR's minimal reviser corrects line by
line while keeping M's wording. The stand-ins for other LLMs write the same arithmetic in their own
style.
"""

from __future__ import annotations

import random
import re

# One step line in any of the teacher's phrasings: a, operator, b, connective, result.
_STEP = re.compile(r"^\s*(-?\d+)\s*(\+|-|plus|minus)\s*(-?\d+)\s*(=|is|gives)\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
MAX_TOTAL = 19
PHRASINGS = ("{a} {sym} {b} = {r}", "{a} {word} {b} is {r}", "{a} {word} {b} gives {r}")
OPENINGS = ("", "Let's compute.", "Step by step:")
_WORD = {"+": "plus", "-": "minus"}
_SYMBOL = {"plus": "+", "minus": "-", "+": "+", "-": "-"}


def make_problem(rng: random.Random) -> dict:
    n = rng.randint(2, 3)
    numbers, ops = [rng.randint(1, 9)], []
    acc = numbers[0]
    for _ in range(n):
        x = rng.randint(1, 9)
        # running totals stay in 0..19; an addition where both fit, a subtraction a third of the time
        fits = [o for o, r in (("+", acc + x), ("-", acc - x)) if 0 <= r <= MAX_TOTAL]
        op = fits[0] if len(fits) == 1 else ("-" if rng.random() < 1 / 3 else "+")
        acc = acc + x if op == "+" else acc - x
        numbers.append(x)
        ops.append(op)
    text = " ".join(f"{x} {o}" for x, o in zip(numbers, ops, strict=False)) + f" {numbers[-1]}"
    return {"prompt": f"Compute {text}.", "numbers": numbers, "ops": ops}


def problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def held_out(n: int, seed: int, seen) -> list[dict]:
    """`n` distinct problems whose prompts are not in `seen` (the problems a model trained on)."""
    rng, seen, out = random.Random(seed), set(seen), []
    while len(out) < n:
        p = make_problem(rng)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def has_carry(a: int, op: str, b: int) -> bool:
    """An addition whose ones digits make ten or more (the step the careless teacher gets wrong)."""
    return op == "+" and a >= 0 and a % 10 + b >= 10


def solve(problem: dict, careless: bool = False) -> list[tuple[int, str, int, int]]:
    """The steps (left, op, right, result): right, or as the careless teacher writes them (every
    carry forgotten, later steps going on from the wrong total)."""
    steps, acc = [], problem["numbers"][0]
    for op, x in zip(problem["ops"], problem["numbers"][1:], strict=True):
        result = acc + x if op == "+" else acc - x
        if careless and has_carry(acc, op, x):
            result -= 10
        steps.append((acc, op, x, result))
        acc = result
    return steps


def _line(a: int, op: str, b: int, r: int, phrasing: str) -> str:
    return phrasing.format(a=a, sym=op, word=_WORD[op], b=b, r=r)


def gold_answer(problem: dict) -> str:
    """The right answer in the plain phrasing."""
    steps = solve(problem)
    return "\n".join(_line(*s, PHRASINGS[0]) for s in steps) + f"\nAnswer: {steps[-1][3]}"


def teacher_answer(problem: dict, rng: random.Random, careless_share: float) -> str:
    """The teacher M learns from: a random phrasing per line, an opening line a third of the time
    each, and in `careless_share` of its answers every carry forgotten."""
    careless = rng.random() < careless_share
    steps = solve(problem, careless)
    opening = rng.choice(OPENINGS)
    lines = ([opening] if opening else []) + [_line(*s, rng.choice(PHRASINGS)) for s in steps]
    return "\n".join(lines) + f"\nAnswer: {steps[-1][3]}"


def carries(problem: dict) -> int:
    """How many steps of the right solution carry."""
    return sum(has_carry(a, o, b) for a, o, b, _ in solve(problem))


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


def _step(line: str) -> tuple[str, str, str, str] | None:
    """(a, op as a symbol, b, result) of a step line in any phrasing, or None."""
    m = _STEP.match(line)
    return None if m is None else (m.group(1), _SYMBOL[m.group(2)], m.group(3), m.group(5))


def line_labels(problem: dict, text: str) -> list[int]:
    """The scorer, line by line (Mask-DPO's sentence labels): a step line is right (1) when it is the
    solution's step at its place, the answer line when the final answer is right; other lines 1."""
    steps, labels, k = solve(problem), [], 0
    for line in (x for x in text.split("\n") if x.strip()):
        if (got := _step(line)) is not None:
            labels.append(int(k < len(steps) and got == tuple(map(str, steps[k]))))
            k += 1
        elif _ANSWER.search(line):
            labels.append(int(final_answer(line) == steps[-1][3]))
        else:
            labels.append(1)
    return labels


def revise(problem: dict, text: str) -> str:
    """The programmatic minimal reviser (CLAIR's stand-in for GPT-4-turbo): keeps every line of M's
    answer that is right, and rewrites only the wrong steps and the final answer, each wrong step in
    the phrasing M used on that line."""
    steps = solve(problem)
    out, k = [], 0
    for line in text.split("\n"):
        m = _STEP.match(line)
        if m and k < len(steps):
            a, o, b, r = steps[k]
            if _step(line) != (str(a), o, str(b), str(r)):
                word = m.group(2) in ("plus", "minus")
                line = f"{a} {_WORD[o] if word else o} {b} {m.group(4)} {r}"
            out.append(line)
            k += 1
        elif _ANSWER.search(line):
            continue
        elif line.strip():
            out.append(line)
    for a, o, b, r in steps[k:]:  # missing steps
        out.append(_line(a, o, b, r, PHRASINGS[0]))
    out.append(f"Answer: {steps[-1][3]}")
    return "\n".join(out)


def other_model_answer(problem: dict, rng: random.Random, error_rate: float = 0.4) -> str:
    """Another LLM's answer in its own words, sometimes wrong (the off-policy data's models)."""
    lines, acc = [], problem["numbers"][0]
    for i, (op, b) in enumerate(zip(problem["ops"], problem["numbers"][1:], strict=True)):
        r = acc + b if op == "+" else acc - b
        if rng.random() < error_rate / len(problem["ops"]):
            r += rng.choice([-10, -1, 1, 10])
        lines.append(f"{'First,' if i == 0 else 'Then'} {acc} {_WORD[op]} {b} is {r}.")
        acc = r
    return "\n".join(lines) + f"\nSo the result is {acc}.\nAnswer: {acc}"


def stronger_answer(problem: dict) -> str:
    """A stronger model's answer from scratch, always right, in its own (more verbose) style."""
    steps = solve(problem)
    body = "\n".join(f"Step {i + 1}: {a} {o} {b} = {r}" for i, (a, o, b, r) in enumerate(steps))
    result = steps[-1][3]
    return f"Let's compute step by step.\n{body}\nTherefore the final result is {result}.\nAnswer: {result}"

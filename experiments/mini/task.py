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
line while keeping M's wording. The stand-ins for other LLMs (OTHER_MODELS) write the same arithmetic
each in its own wording, each with its own kind of slip.

Problems fall into four disjoint splits by a hash of their prompt (SPLITS): M's SFT problems, the
training problems, validation problems (hyperparameter selection) and test problems.
"""

from __future__ import annotations

import hashlib
import itertools
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


# Every distinct prompt belongs to one split, by a hash of its text (out of 20 buckets): no problem can
# be in two splits, whatever the seeds that draw them, and each split has the generator's distribution
SPLITS = {"test": range(0, 4), "validation": range(4, 6), "sft": range(6, 13), "train": range(13, 20)}


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 20
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def draw(split: str, n: int, seed: int) -> list[dict]:
    """`n` problems of one split (repeats allowed, as a training set's draws), in the generator's
    distribution restricted to the split."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = make_problem(rng)
        if split_of(p["prompt"]) == split:
            out.append(p)
    return out


def draw_distinct(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct problems of one split, stratified by step count: as many two-step as three-step
    problems (the generator draws each half the time), interleaved; the scored sets."""
    rng, seen, by_steps = random.Random(seed), set(), {2: [], 3: []}
    want = {2: n - n // 2, 3: n // 2}
    for tries in itertools.count():
        if all(len(by_steps[k]) >= want[k] for k in want):
            break
        if tries > 1000 * n:
            raise ValueError(
                f"the {split} split cannot give {want[2]} distinct two-step and {want[3]} three-step problems"
            )
        p = make_problem(rng)
        k = len(p["ops"])
        if p["prompt"] not in seen and split_of(p["prompt"]) == split and len(by_steps[k]) < want[k]:
            seen.add(p["prompt"])
            by_steps[k].append(p)
    return [p for pair in zip(by_steps[2], by_steps[3], strict=False) for p in pair] + by_steps[2][n // 2 :]


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


def _slip(rng: random.Random, a: int, op: str, b: int, r: int, kind: str) -> int:
    """A stand-in model's own kind of mistake at one step (each model has its own)."""
    if kind == "off_by":  # a digit slip: one or ten off
        return r + rng.choice([-10, -1, 1, 10])
    if kind == "sign":  # the operation mixed up
        return a - b if op == "+" else a + b
    if kind == "borrow":  # a subtraction one too low, an addition one too high
        return r - 1 if op == "-" else r + 1
    return r - 10 if has_carry(a, op, b) else r + rng.choice([-1, 1])  # "carry": M's habit, sometimes


# The other LLMs of the off-policy data: each its own wording and its own kind of slips. `error_rate` is
# the share of its answers with a slip (at one step, later steps going on from the wrong total).
OTHER_MODELS = {
    "prose": {"error_rate": 0.4, "slip": "off_by"},
    "terse": {"error_rate": 0.3, "slip": "sign"},
    "verbose": {"error_rate": 0.5, "slip": "borrow"},
    "careful": {"error_rate": 0.2, "slip": "carry"},
}


def _other_lines(name: str, steps: list[tuple[int, str, int, int]]) -> list[str]:
    out = []
    for i, (a, op, b, r) in enumerate(steps):
        if name == "prose":
            out.append(f"{'First,' if i == 0 else 'Then'} {a} {_WORD[op]} {b} is {r}.")
        elif name == "terse":
            out.append(f"{a}{op}{b}={r}")
        elif name == "verbose":
            verb = f"Adding {b} to {a} gives {r}." if op == "+" else f"Taking {b} away from {a} leaves {r}."
            out.append(f"Step {i + 1}. {verb}")
        else:
            out.append(f"({i + 1}) {a} {op} {b} -> {r}")
    return out


def other_model_answer(problem: dict, rng: random.Random, name: str = "prose") -> str:
    """Another LLM's answer (one of OTHER_MODELS) in its own words, with its own kind of slip."""
    spec = OTHER_MODELS[name]
    slip_at = rng.randrange(len(problem["ops"])) if rng.random() < spec["error_rate"] else -1
    steps, acc = [], problem["numbers"][0]
    for i, (op, b) in enumerate(zip(problem["ops"], problem["numbers"][1:], strict=True)):
        r = acc + b if op == "+" else acc - b
        if i == slip_at:
            r = _slip(rng, acc, op, b, r, spec["slip"])
        steps.append((acc, op, b, r))
        acc = r
    lines = _other_lines(name, steps)
    ending = {"prose": f"So the result is {acc}.", "terse": "", "verbose": f"The total is {acc}."}
    return "\n".join(lines + ([ending[name]] if ending.get(name) else [])) + f"\nAnswer: {acc}"


def stronger_answer(problem: dict) -> str:
    """A stronger model's answer from scratch, always right, in its own (more verbose) style."""
    steps = solve(problem)
    body = "\n".join(f"Step {i + 1}: {a} {o} {b} = {r}" for i, (a, o, b, r) in enumerate(steps))
    result = steps[-1][3]
    return f"Let's compute step by step.\n{body}\nTherefore the final result is {result}.\nAnswer: {result}"

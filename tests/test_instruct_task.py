"""The instruction-following task (experiments/instruct/task.py): IFEval-style strict checkers and
minimal fixes, against verdicts and revisions worked out by hand."""

import json

import pytest

from experiments.instruct import task


class Pick:
    """A stand-in for the constraint's rng that picks the given parameter."""

    def __init__(self, value):
        self.value = value

    def choice(self, options):
        assert self.value in options
        return self.value


ROW = {"topic": "the moon", "keyword": "orbit", "reference": "The Moon orbits Earth. It causes tides."}


def make(kind, value=None):
    return task.CONSTRAINTS[kind](Pick(value), ROW)


# kind, parameter, answer, IFEval's strict verdict, the minimal revision (None: unchanged)
CASES = [
    ("lowercase", None, "the moon is bright.", True, None),
    ("lowercase", None, "The Moon is bright.", False, "the moon is bright."),
    ("uppercase", None, "THE MOON, 384,400 KM AWAY.", True, None),
    ("uppercase", None, "The moon.", False, "THE MOON."),
    ("end_phrase", "Any other questions?", "It orbits. Any other questions?  ", True, None),
    ("end_phrase", "Any other questions?", "It orbits.\n", False, "It orbits. Any other questions?"),
    (
        "end_phrase",
        "Any other questions?",
        "Any other questions? Bye.",
        False,
        "Any other questions? Bye. Any other questions?",
    ),
    ("quotation", None, ' "It orbits." ', True, None),
    ("quotation", None, "It orbits.", False, '"It orbits."'),
    ("quotation", None, '"', False, '"""'),
    ("postscript", "P.S.", "It orbits.\n\np.s. look up", True, None),
    ("postscript", "P.S.", "It orbits.", False, "It orbits.\n\nP.S. Orbit is worth reading about."),
    ("bullets", 2, "* one\n* two", True, None),
    ("bullets", 2, "- one\n* two\n**bold** not a bullet", True, None),
    ("bullets", 3, "It is big. It is old. It is far.", False, "* It is big.\n* It is old.\n* It is far."),
    ("bullets", 2, "1. a\n2. b\n3. c", False, "* a\n* b c"),
    ("bullets", 3, "It is big.", False, "* It is big.\n* The Moon orbits Earth.\n* It causes tides."),
    (
        "max_words",
        15,
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
        True,
        None,
    ),
    (
        "max_words",
        15,
        "One two three four five. Six seven eight nine ten eleven. Twelve thirteen fourteen fifteen.",
        False,
        "One two three four five. Six seven eight nine ten eleven.",
    ),
    ("max_words", 15, " ".join(["word"] * 20), False, " ".join(["word"] * 14) + "."),
    ("max_sentences", 1, "It orbits Earth.", True, None),
    ("max_sentences", 1, "It orbits. It is grey! Is it?", False, "It orbits."),
    ("no_commas", None, "It orbits Earth.", True, None),
    ("no_commas", None, "Big, old, far,away.", False, "Big old faraway."),
    ("json", None, '```json\n{"answer": "x"}\n```', True, None),
    ("json", None, 'The answer: {"a": 1}', False, json.dumps({"answer": 'The answer: {"a": 1}'})),
    ("title", None, "<<The Moon>>\nIt orbits.", True, None),
    ("title", None, "<<>> It orbits.", False, "<<The Moon>>\n<<>> It orbits."),
    ("keyword", None, "Its ORBIT is elliptical.", True, None),
    (
        "keyword",
        None,
        "It orbits Earth.",
        False,
        "It orbits Earth. This is about orbit.",
    ),  # "orbits" is not the word
]


@pytest.mark.parametrize(("kind", "value", "answer", "verdict", "revision"), CASES)
def test_checker_and_fix_by_hand(kind, value, answer, verdict, revision):
    c = make(kind, value)
    assert c.kind == kind
    assert c.check(answer) is verdict
    fixed = answer if verdict else c.fix(answer)
    assert fixed == (answer if revision is None else revision)
    assert c.check(fixed)


def test_every_prompt_revisable_and_splits_disjoint():
    """Every prompt of every split: the reference answer meets the constraint, a revision of typical
    answers does, a passing answer is left as it is; topics never cross splits; every kind is in
    every split."""
    answers = [
        "The Moon is bright, and it orbits Earth. It has craters! It is about 4.5 billion years old.",
        "Sure! Here are some facts:\n1. It is big.\n2. It is old, very old.\n3. It is far.",
        '```json\n{"a": 1}\n```',
    ]
    topics = {}
    for split in task.SPLITS:
        rows = task.prompts(split)
        assert {r["kind"] for r in rows} == set(task.CONSTRAINTS)
        topics[split] = {r["topic"] for r in rows}
        for row in rows:
            assert task.follows(row, task.reference_answer(row)), row["prompt"]
            for a in answers:
                fixed = task.revise(row, a)
                assert task.follows(row, fixed), (row["prompt"], fixed)
                assert task.revise(row, fixed) == fixed
            assert row["prompt"].startswith(row["question"] + " ")
    assert not topics["train"] & topics["test"] and not topics["train"] & topics["validation"]
    assert not topics["validation"] & topics["test"]
    assert sum(map(len, topics.values())) == len(task.TOPICS)
    rows = task.prompts("test")
    assert task.strict_accuracy(rows, [task.reference_answer(r) for r in rows]) == 1.0
    assert task.strict_accuracy(rows, [""] * len(rows)) == 0.0


def test_clair_revise_and_judge_commands_against_the_stand_ins(tmp_path):
    """`clair revise` and `clair judge` (the paper's prompts, the real client over HTTP) against the
    task's loopback reviser and judge: each pair's chosen answer is the task's minimal revision of
    the rejected one; the judge prefers the answer that follows the instruction, and calls a tie when
    both or neither do."""
    from apo_jax.data.clair.__main__ import main
    from apo_jax.data.jsonl import read_jsonl, write_jsonl
    from experiments.instruct.server import server

    rows = task.prompts("validation")[:8]
    answers = [{"prompt": r["prompt"], "response": r["reference"]} for r in rows]
    write_jsonl(tmp_path / "answers.jsonl", answers)
    fixed = [task.revise(r, r["reference"]) for r in rows]
    assert fixed != [r["reference"] for r in rows] and any(task.follows(r, r["reference"]) for r in rows)
    two = [
        {"prompt": r["prompt"], "response": a, "sample": s}
        for r, f in zip(rows, fixed, strict=True)
        for s, a in enumerate((r["reference"], f))
    ]
    write_jsonl(tmp_path / "two.jsonl", two)
    with server(rows) as s:
        common = ["--base-url", s.url, "--model", "stand-in"]
        assert (
            main(
                [
                    "revise",
                    "--input",
                    str(tmp_path / "answers.jsonl"),
                    "--output",
                    str(tmp_path / "p.jsonl"),
                    *common,
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "judge",
                    "--input",
                    str(tmp_path / "two.jsonl"),
                    "--output",
                    str(tmp_path / "j.jsonl"),
                    *common,
                ]
            )
            == 0
        )
    pairs = {p["prompt"]: p for p in read_jsonl(tmp_path / "p.jsonl")}
    for r, f in zip(rows, fixed, strict=True):
        assert (pairs[r["prompt"]]["chosen"], pairs[r["prompt"]]["rejected"]) == (f, r["reference"])
    judged = {p["prompt"]: p for p in read_jsonl(tmp_path / "j.jsonl")}
    for r, f in zip(rows, fixed, strict=True):
        p = judged[r["prompt"]]
        if task.follows(r, r["reference"]):  # both answers are the same and follow it: a tie
            assert p.get("is_tie") is True
        else:
            assert (p["chosen"], p["rejected"]) == (f, r["reference"]) and not p.get("is_tie")

"""The miniature's task: the careless teacher's slip, the minimal reviser and the line labels, on
hand-worked answers."""

from __future__ import annotations

import random

import pytest

from experiments.mini import task

PROBLEM = {"prompt": "Compute 8 + 7 + 2 - 7.", "numbers": [8, 7, 2, 7], "ops": ["+", "+", "-"]}


def test_carries_and_the_careless_solution_worked_by_hand():
    assert task.has_carry(7, "+", 5) and task.has_carry(9, "+", 1)
    assert not task.has_carry(12, "+", 5) and not task.has_carry(12, "-", 5) and not task.has_carry(3, "+", 6)
    # right: 8 + 7 = 15, 15 + 2 = 17, 17 - 7 = 10; careless: the carry of 8 + 7 forgotten (5), then on from 5
    assert task.solve(PROBLEM) == [(8, "+", 7, 15), (15, "+", 2, 17), (17, "-", 7, 10)]
    assert task.solve(PROBLEM, careless=True) == [(8, "+", 7, 5), (5, "+", 2, 7), (7, "-", 7, 0)]
    assert task.carries(PROBLEM) == 1
    assert task.gold_answer(PROBLEM) == "8 + 7 = 15\n15 + 2 = 17\n17 - 7 = 10\nAnswer: 10"


def test_the_reviser_rewrites_only_wrong_lines_in_their_own_wording():
    answer = "Step by step:\n8 plus 7 gives 5\n5 + 2 = 7\n7 minus 7 is 0\nAnswer: 0"
    assert task.line_labels(PROBLEM, answer) == [1, 0, 0, 0, 0]
    revised = task.revise(PROBLEM, answer)
    assert revised == "Step by step:\n8 plus 7 gives 15\n15 + 2 = 17\n17 minus 7 is 10\nAnswer: 10"
    assert task.is_correct(PROBLEM, revised) and not task.is_correct(PROBLEM, answer)
    assert task.line_labels(PROBLEM, revised) == [1, 1, 1, 1, 1]
    assert task.revise(PROBLEM, revised) == revised  # a right answer is its own revision
    # a step missing at the end is added in the plain wording
    assert task.revise(PROBLEM, "8 plus 7 is 15\n15 plus 2 is 17") == (
        "8 plus 7 is 15\n15 plus 2 is 17\n17 - 7 = 10\nAnswer: 10"
    )


def test_the_teacher_slips_in_its_careless_share_of_answers():
    rng = random.Random(0)
    problems = [p for p in task.problems(4000, seed=5) if task.carries(p)]
    for share in (0.0, 1.0):
        assert all(
            task.is_correct(p, task.teacher_answer(p, rng, share)) is (share == 0.0) for p in problems[:200]
        )
    wrong = sum(not task.is_correct(p, task.teacher_answer(p, rng, 0.6)) for p in problems)
    n = len(problems)
    assert wrong / n == pytest.approx(0.6, abs=4 * (0.6 * 0.4 / n) ** 0.5)  # within 4 standard errors
    # every wording the teacher uses is a step line the checker reads
    answer = task.teacher_answer(PROBLEM, random.Random(3), 0.0)
    assert task.line_labels(PROBLEM, answer) == [1] * len(answer.split("\n"))


def test_the_splits_are_disjoint_and_the_scored_sets_stratified_and_seed_independent():
    from experiments.mini import model

    # the split of a prompt is a pure function of its text: the same problem never lands in two splits
    drawn = {name: task.draw(name, 2000, seed=7) for name in ("sft", "train")}
    drawn |= {name: task.draw_distinct(name, 200, seed=8) for name in ("test", "validation")}
    prompts = {name: {p["prompt"] for p in rows} for name, rows in drawn.items()}
    names = list(prompts)
    assert all(not prompts[a] & prompts[b] for i, a in enumerate(names) for b in names[i + 1 :])
    test = drawn["test"]
    assert len(prompts["test"]) == 200 and sum(len(p["ops"]) == 2 for p in test) == 100  # half two-step
    assert all(0 <= r <= task.MAX_TOTAL for p in test for *_, r in task.solve(p))
    # the grid's sets: training problems follow the seed, the scored ones do not
    mini = {"seed": 0, "sft_examples": 300, "train_prompts": 200, "eval_prompts": 64}
    train0, test0 = model.problem_sets(mini)
    train1, test1 = model.problem_sets(mini | {"seed": 1})
    assert test0 == test1 and train0 != train1
    _, validation = model.problem_sets(mini | {"eval_set": "validation"})
    assert not {p["prompt"] for p in validation} & {p["prompt"] for p in test0}

"""Anchor preference pairs for verifiable tasks ("Anchored Alignment for Self-Explanations
Enhancement", arXiv 2410.13216).

Sample several answers per prompt from the model, judge each final answer against the gold one,
and sort the prompts by how consistently the model gets them right; each category has its own
rule for the pair (the exact per-category rules are unverified; docs/papers.md cites the paper):

  - consistently correct: the best-scored answer over the worst-scored one (needs `scores`; a prompt
    whose answers all score alike gives no pair);
  - variable: a correct answer over an incorrect one;
  - consistently wrong: the anchor (a reference solution, e.g. the gold one) over an incorrect answer.

    pairs = anchor_pairs(samples_by_prompt)   # [{"prompt", "chosen", "rejected", "category"}, ...]
"""

from __future__ import annotations

from collections.abc import Iterable

CATEGORIES = ("consistently_correct", "variable", "consistently_wrong")


def category(correct: Iterable[bool]) -> str:
    correct = list(correct)
    if not correct:
        raise ValueError("no judged answers")
    return (
        "consistently_correct" if all(correct) else "consistently_wrong" if not any(correct) else "variable"
    )


def anchor_pair(
    prompt: str,
    responses: list[str],
    correct: list[bool],
    *,
    anchor: str | None = None,
    scores: list[float] | None = None,
) -> dict | None:
    """One pair for a prompt from its judged samples (see the module docstring), or None."""
    if len(responses) != len(correct) or (scores is not None and len(scores) != len(responses)):
        raise ValueError(f"prompt {prompt[:40]!r}: responses, correct and scores differ in length")
    kind = category(correct)
    if kind == "consistently_correct":
        if scores is None or max(scores) == min(scores):
            return None
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        chosen, rejected = responses[best], responses[worst]
    elif kind == "variable":
        chosen = responses[correct.index(True)]
        rejected = responses[correct.index(False)]
    else:
        if anchor is None:
            return None
        chosen, rejected = anchor, responses[0]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": kind}


def anchor_pairs(samples: Iterable[dict]) -> list[dict]:
    """Rows {"prompt", "responses", "correct", optional "scores" and "anchor"} -> pairs with their
    category (prompts that give no pair are left out)."""
    out = []
    for row in samples:
        pair = anchor_pair(
            row["prompt"],
            row["responses"],
            row["correct"],
            anchor=row.get("anchor"),
            scores=row.get("scores"),
        )
        if pair is not None:
            out.append(pair)
    return out

"""Step-level preference pairs for multi-step answers written one step per line (Step-DPO).

Step-DPO (Lai et al. 2024, arXiv 2406.18629, Eq. 1) trains on (x, s_1..s_{k-1}, s_win, s_lose): the
prompt is the question plus the correct earlier steps, and the two completions are single steps, so
the loss touches only the first wrong step and never the steps that follow from it. Here the correct
step comes from a revision of the answer (CLAIR's minimal reviser, or any corrected solution): the
first line where revision and answer differ is the first wrong step.

    step_pair("Compute 7 + 5 - 9.", answer="7 + 5 = 12\\n12 - 9 = 4\\nAnswer: 4",
              revision="7 + 5 = 12\\n12 - 9 = 3\\nAnswer: 3")
    -> {"prompt": "Compute 7 + 5 - 9.", "prefix": "7 + 5 = 12\\n", "chosen": "12 - 9 = 3\\n",
        "rejected": "12 - 9 = 4\\n"}

The rows carry `prefix` (apo_jax.data.formats): preprocess frames the question with the chat
template (`--as-chat`), appends the prefix as the start of the assistant's turn, and the chosen and
rejected steps continue it without an end-of-turn token, unless the row says `ends_turn` (the step
is the answer's last line; SCDPO's continuations always finish the answer).
"""

from __future__ import annotations

from collections.abc import Iterable


def first_wrong_step(answer: str, revision: str) -> int | None:
    """Index of the first line where `answer` and `revision` differ (None if they agree)."""
    a, r = answer.split("\n"), revision.split("\n")
    for k in range(max(len(a), len(r))):
        if k >= len(a) or k >= len(r) or a[k] != r[k]:
            return k
    return None


def step_pair(prompt: str, answer: str, revision: str) -> dict | None:
    """One Step-DPO pair from an answer and its revision, or None when they agree or when one of them
    ends before the differing step (nothing to prefer at that step)."""
    k = first_wrong_step(answer, revision)
    if k is None:
        return None
    a, r = answer.split("\n"), revision.split("\n")
    if k >= len(a) or k >= len(r) or not a[k].strip() or not r[k].strip():
        return None
    prefix = "".join(line + "\n" for line in a[:k])
    last = k == len(a) - 1 and k == len(r) - 1  # the final line: the step ends the answer (and the turn)
    end = "" if last else "\n"
    return {
        "prompt": prompt,
        "prefix": prefix,
        "chosen": r[k] + end,
        "rejected": a[k] + end,
        "ends_turn": last,
    }


def step_pairs(rows: Iterable[dict], *, answer_key="rejected", revision_key="chosen") -> list[dict]:
    """Step-DPO pairs from whole-answer pairs (CLAIR's pairs.jsonl: chosen = revision, rejected =
    answer); rows whose answers agree or differ only past one's end are left out. Other fields are
    carried."""
    out = []
    for row in rows:
        pair = step_pair(row["prompt"], row[answer_key], row[revision_key])
        if pair is not None:
            carried = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "prefix")}
            out.append(carried | pair)
    return out


# Step-Controlled DPO (Lu et al. 2024, arXiv 2407.00782; mathllm/Step-Controlled_DPO): negatives that
# start erring at a chosen step. From a correct solution keep the steps before step k, let the model
# continue from there at a temperature that rises with each step it writes (the sampler's
# `temperature_step`: min(1.1 + 0.1·i, 1.4) in the paper's Mistral runs), and keep the continuations
# whose final answer is wrong; the pair is (the solution's own steps from k, that continuation), with
# the shared steps in the prompt, so the loss sees only what comes after step k.
SCDPO_TEMPERATURE = {"temperature": 1.1, "temperature_step": 0.1, "temperature_max": 1.4}  # Mistral


def scdpo_starts(rows: Iterable[dict], rng, *, answer_key: str = "response") -> list[dict]:
    """One controlled start per correct solution: a step k drawn uniformly from its lines, the
    `prefix` (lines before k) and the solution's own rest as `chosen`. Other fields are carried."""
    out = []
    for row in rows:
        lines = row[answer_key].split("\n")
        k = rng.randrange(len(lines))
        carried = {key: v for key, v in row.items() if key not in ("prompt", answer_key, "prefix", "chosen")}
        out.append(
            carried
            | {
                "prompt": row["prompt"],
                "prefix": "".join(x + "\n" for x in lines[:k]),
                "chosen": "\n".join(lines[k:]),
                "step": k,
                "ends_turn": True,
            }
        )
    return out


def scdpo_pairs(starts: list[dict], continuations: Iterable[dict], is_correct) -> list[dict]:
    """Pairs from the starts and the model's continuations of them (rows with `start`, the position in
    `starts`, and `response`): the first continuation of each start whose whole answer (prefix +
    continuation) `is_correct(start, answer)` calls wrong becomes its rejected answer."""
    pairs, seen = [], set()
    for c in continuations:
        i = c["start"]
        start = starts[i]
        wrong = not is_correct(start, start["prefix"] + c["response"])
        if i in seen or not wrong:
            continue
        seen.add(i)
        pairs.append(start | {"rejected": c["response"]})
    return pairs

"""The paper's three baselines for building pairs, named as the experiments name them.

- `stronger_preferred`: y_w = the stronger model's own answer, y_l = M's answer.
- `on_policy_judge`: two answers of M; a judge model (through the same client) picks the better;
  ties are kept as `is_tie` pairs (only tie-aware losses use them; `drop_ties` leaves them out);
  verdicts that cannot be read are recorded failures. Verdicts are matched to pairs by the request's
  content (`client.request_key`), and one job at a time holds the output (`outputs.OutputLock`).
- `off_policy_judge`: UltraFeedback-style judged answers of other models: the best-rated answer
  is chosen and, as in UltraFeedback-binarized, a random lower-rated one is rejected.
All write TRL-standard pair rows (`prompt`, `chosen`, `rejected` and carried fields).
"""

from __future__ import annotations

import pathlib
import random
import re

from apo_jax.client import ClientConfig, answer_text, run_requests
from apo_jax.data.jsonl import read_jsonl, write_jsonl
from apo_jax.outputs import OutputLock

JUDGE_TEMPLATE = (
    "Which response answers the user's instruction better: more helpful, correct and clear? "
    "Compare them carefully, then end with one line 'Verdict: A', 'Verdict: B' or 'Verdict: tie' "
    "when neither is better.\n\n[Instruction]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n"
)
# the word after the LAST "Verdict:" (an earlier one may be quoted, hypothetical or revised)
_VERDICT = re.compile(r"\bverdict\s*:\s*\**\s*([^\s*.,;:!)\]]*)", re.IGNORECASE)


def judge_request(model: str, content: str) -> dict:
    """One deterministic judge call (temperature 0, room to reason) with `content` as the user turn."""
    return {
        "model": model,
        "temperature": 0.0,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": content}],
    }


def parse_verdict(text: str | None) -> str:
    """'A', 'B' or 'tie' from the judge's last 'Verdict:'; ValueError if there is none, or if the last
    one says anything else (an earlier verdict is never read in its place)."""
    found = _VERDICT.findall(text or "")
    if not found:
        raise ValueError("no 'Verdict: A|B|tie' line")
    v = found[-1]
    if v.lower() not in ("a", "b", "tie"):
        raise ValueError(f"the last 'Verdict:' says {v!r}, not A, B or tie")
    return "tie" if v.lower() == "tie" else v.upper()


SCORE_TEMPLATE = (
    "Grade the response to the user's instruction for helpfulness, correctness and clarity on a scale "
    "from 1 (useless) to 10 (excellent). Explain briefly, then end with one line 'Score: N'.\n\n"
    "[Instruction]\n{prompt}\n\n[Response]\n{answer}\n"
)
# what follows the LAST "Score:" (an earlier one may be quoted, hypothetical or revised)
_SCORE = re.compile(r"\bscore\s*:\s*\**\s*([^\s*]*)", re.IGNORECASE)
_SCORE_VALUE = re.compile(r"(\d+)(?:/10)?[.,;!)]*")


def parse_score(text: str | None) -> int:
    """1..10 from the judge's last 'Score: N' (N, or N/10); ValueError if there is none, or if the last
    one is not a whole number from 1 to 10 (an earlier score is never read in its place)."""
    found = _SCORE.findall(text or "")
    if not found:
        raise ValueError("no 'Score: N' line")
    value = _SCORE_VALUE.fullmatch(found[-1])
    if value is None or not 1 <= int(value.group(1)) <= 10:
        raise ValueError(f"the last 'Score:' says {found[-1]!r}, not a whole number from 1 to 10")
    return int(value.group(1))


def first_by_prompt(rows) -> dict[str, dict]:
    """{prompt: its first row}: answers files may hold several samples per prompt."""
    out = {}
    for row in rows:
        out.setdefault(row["prompt"], row)
    return out


def stronger_preferred(answers_path, stronger_path, output) -> dict:
    """Pairs (stronger model's answer, M's answer), matched by prompt (first sample of each)."""
    stronger = first_by_prompt(read_jsonl(stronger_path))
    pairs, missing = [], 0
    for row in first_by_prompt(read_jsonl(answers_path)).values():
        if row["prompt"] not in stronger:
            missing += 1
            continue
        s = stronger[row["prompt"]]
        pair = {"prompt": row["prompt"], "chosen": s["response"], "rejected": row["response"]}
        pairs.append(pair | {"chosen_model": s.get("generator"), "rejected_model": row.get("generator")})
    write_jsonl(output, pairs)
    return {"pairs": len(pairs), "prompts_without_stronger_answer": missing}


def on_policy_judge(
    answers_path, output, cfg: ClientConfig, *, client=None, progress=True, drop_ties: bool = False
) -> dict:
    """Two samples of M per prompt, judged; the better is chosen, ties become `is_tie` pairs (or, with
    `drop_ties`, are left out and counted as `ties_left_out`). Raises `client.CircuitOpen` after
    writing what it has if the job was stopped."""
    output = pathlib.Path(output)
    with OutputLock(output):
        by_prompt: dict[str, dict[int, dict]] = {}
        for row in read_jsonl(answers_path):
            by_prompt.setdefault(row["prompt"], {})[int(row.get("sample", 0))] = row
        items = [(p, s[0], s[1]) for p, s in by_prompt.items() if 0 in s and 1 in s]
        requests = {
            f"{i}": judge_request(
                cfg.model, JUDGE_TEMPLATE.format(prompt=p, a=a["response"], b=b["response"])
            )
            for i, (p, a, b) in enumerate(items)
        }
        log = output.with_name(output.name + ".responses.jsonl")
        done, request_failures, counters = run_requests(cfg, requests, log, client=client, progress=progress)
        pairs, failures, dropped = [], [], 0
        for i, (p, a, b) in enumerate(items):
            rid = f"{i}"
            if rid not in done:
                reason = request_failures.get(rid, "not requested")
                failures.append({"id": rid, "prompt": p, "reason": reason})
                continue
            try:
                verdict = parse_verdict(answer_text(done[rid]["response"]))
            except ValueError as e:
                failures.append({"id": rid, "prompt": p, "reason": f"unreadable verdict: {e}"})
                continue
            if verdict == "tie" and drop_ties:
                dropped += 1
                continue
            chosen, rejected = (b, a) if verdict == "B" else (a, b)
            pairs.append(
                {
                    "prompt": p,
                    "chosen": chosen["response"],
                    "rejected": rejected["response"],
                    "is_tie": verdict == "tie",
                    "judge": cfg.model,
                    "verdict": verdict,
                }
            )
        write_jsonl(output, pairs)
        write_jsonl(output.with_name(output.name + ".failures.jsonl"), failures)
    if counters.stop:
        raise counters.stop
    summary = {"prompts": len(items), "pairs": len(pairs), "ties": sum(p["is_tie"] for p in pairs)}
    return summary | ({"ties_left_out": dropped} if drop_ties else {}) | {"failed": len(failures)}


def off_policy_judge(ultrafeedback_path, output, *, seed: int = 0) -> dict:
    """UltraFeedback-style rows (`instruction` or `prompt`, `completions` with `overall_score`) ->
    pairs: the best-rated answer chosen, a random strictly lower-rated one rejected."""
    rng = random.Random(seed)
    pairs, skipped = [], 0
    for index, row in enumerate(read_jsonl(ultrafeedback_path)):
        prompt = row.get("prompt", row.get("instruction"))
        scored = [
            (c.get("overall_score"), c)
            for c in row.get("completions", [])
            if c.get("overall_score") is not None
        ]
        if not isinstance(prompt, str) or len(scored) < 2:
            skipped += 1
            continue
        best_score = max(s for s, _ in scored)
        best = next(c for s, c in scored if s == best_score)
        lower = [c for s, c in scored if s < best_score]
        if not lower:  # every answer rated the same: no preference
            skipped += 1
            continue
        worse = rng.choice(lower)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": best["response"],
                "rejected": worse["response"],
                "chosen_model": best.get("model"),
                "rejected_model": worse.get("model"),
                "source_index": index,
            }
        )
    write_jsonl(output, pairs)
    return {"pairs": len(pairs), "skipped": skipped}

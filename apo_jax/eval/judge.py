"""Judge-based evaluation: `python -m apo_jax.eval.judge`, resumable and cost-aware.

    python -m apo_jax.eval.judge --prompts prompts.jsonl --answers answers.jsonl --output eval/ \\
        --mode winrate --reference reference_answers.jsonl --base-url URL --judge-model gpt-4-turbo

`answers.jsonl` comes from `python -m apo_jax.data.generate` with the trained model (its `hf/`
export); AlpacaEval's model_outputs.json (`python -m apo_jax.eval.answers`) is read as well, for
the answers and the reference, and then `--prompts` may be left out. Modes:
  - `winrate`: a judge compares each answer with a reference model's answer to the same prompt
    (both orders, to cancel position bias); win = 1, tie = 0.5.
  - `score`: a judge grades each answer from 1 to 10.
  - `exact`: the prompt rows carry `answer`; the last number of the response must equal it (the
    miniature's verifiable task) - no judge, the same interface.
Judge calls go through the CLAIR client: concurrency, retries, one recorded response per request,
a restart asks only for what is missing, and the summary reports the tokens used. Responses are
matched by the request's content (`client.request_key`: the prompt, both answers, the judge), never
by row number, so other answers or another judge into the same --output are judged afresh; one job
at a time holds the output (`outputs.OutputLock`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

from apo_jax import cli
from apo_jax.client import ClientConfig, answer_text, rerun_note, run_requests
from apo_jax.data.clair.baselines import (
    JUDGE_TEMPLATE,
    SCORE_TEMPLATE,
    first_by_prompt,
    judge_request,
    parse_score,
    parse_verdict,
)
from apo_jax.data.jsonl import read_json_rows, read_jsonl
from apo_jax.outputs import OutputLock

_NUMBER = re.compile(r"-?\d+")


def exact_match(prompts, answers) -> dict:
    """Share of answers whose last number equals the prompt row's `answer`. With several samples per
    prompt (`generate --samples K`), each prompt scores the share of its samples that are right
    (sampled accuracy); a prompt without an answer scores 0. `stderr` is the standard error of the
    accuracy over prompts; `correct` holds, per prompt, each answer's 1 (right) or 0 in file order
    (for paired comparisons, apo_jax.eval.stats)."""
    by: dict[str, list[bool]] = {}
    for a in answers:
        numbers = _NUMBER.findall(a.get("response") or "")
        by.setdefault(a["prompt"], []).append(numbers[-1] if numbers else None)
    scores, correct = [], []
    for p in prompts:
        found = [int(x is not None and int(x) == int(p["answer"])) for x in by.get(p["prompt"], [])]
        correct.append(found)
        scores.append(statistics.fmean(found) if found else 0.0)
    return {
        "mode": "exact",
        "n": len(scores),
        "samples": sum(len(by.get(p["prompt"], [])) for p in prompts),
        "accuracy": statistics.fmean(scores) if scores else 0.0,
        # standard error of that mean over prompts (the per-prompt scores' spread / sqrt(n))
        "stderr": statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else 0.0,
        "correct": correct,
    }


def judged(
    mode: str,
    prompts,
    answers,
    output: pathlib.Path,
    cfg: ClientConfig,
    *,
    reference=None,
    client=None,
    progress=True,
) -> dict:
    """Win rate against `reference` answers, or graded scores, through the judge. Raises
    `client.CircuitOpen` if the job was stopped (the responses so far are kept for the rerun)."""
    by = first_by_prompt(answers)
    ref = first_by_prompt(reference or [])
    requests, keys = {}, []
    for i, p in enumerate(prompts):
        prompt, answer = p["prompt"], by.get(p["prompt"], {}).get("response")
        if answer is None:
            continue
        if mode == "winrate":
            if prompt not in ref:
                continue
            other = ref[prompt]["response"]
            for order, (a, b) in (("ab", (answer, other)), ("ba", (other, answer))):
                requests[f"{i}:{order}"] = judge_request(
                    cfg.model, JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)
                )
        else:
            requests[f"{i}:score"] = judge_request(
                cfg.model, SCORE_TEMPLATE.format(prompt=prompt, answer=answer)
            )
        keys.append(i)
    if output.exists() and not output.is_dir():
        raise cli.UserError(f"--output {output}: is a file; give a folder for the judge's responses")
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "judge.responses.jsonl"
    with OutputLock(log_path):
        done, failures, counters = run_requests(cfg, requests, log_path, client=client, progress=progress)
    if counters.stop:
        raise counters.stop
    values, unreadable = [], 0
    for rid, row in done.items():
        text = answer_text(row["response"])
        try:
            if mode == "winrate":
                verdict = parse_verdict(text)
                mine = "A" if rid.endswith(":ab") else "B"
                values.append(0.5 if verdict == "tie" else float(verdict == mine))
            else:
                values.append(float(parse_score(text)))
        except ValueError:
            unreadable += 1
    key = "win_rate" if mode == "winrate" else "mean_score"
    usage = [row["response"].get("usage") or {} for row in done.values()]
    return {
        "mode": mode,
        "n": len(values),
        key: statistics.fmean(values) if values else float("nan"),
        "unreadable": unreadable,
        "failed_requests": len(failures),
        "judge_tokens": sum((u.get("total_tokens") or 0) for u in usage),
    }


def load_answers(path) -> list[dict]:
    """{prompt, response} rows from apo_jax's answers.jsonl or an AlpacaEval outputs file (what
    `apo_jax.eval.judge` compares)."""
    rows = read_json_rows(path)
    if rows and "instruction" in rows[0]:
        return [{"prompt": r["instruction"], "response": r.get("output", "")} for r in rows]
    return rows


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.eval.judge", description=__doc__.split("\n")[0])
    p.add_argument(
        "--prompts", help="JSONL with `prompt` (and `answer` for --mode exact); default: the answers' prompts"
    )
    p.add_argument(
        "--answers",
        required=True,
        help="the evaluated model's answers: apo_jax.data.generate's JSONL or an AlpacaEval outputs file",
    )
    p.add_argument("--output", required=True, help="a directory for the judge's responses and summary.json")
    p.add_argument("--mode", choices=["winrate", "score", "exact"], default="winrate")
    p.add_argument("--reference", help="the reference model's answers (--mode winrate)")
    p.add_argument("--base-url")
    p.add_argument("--judge-model")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    answers = load_answers(args.answers)
    prompts = read_jsonl(args.prompts) if args.prompts else [{"prompt": a["prompt"]} for a in answers]
    if args.mode == "exact":
        summary = exact_match(prompts, answers)
        summary.pop("correct")  # per prompt: for apo_jax.eval.stats, not for the printed summary
    else:
        if not (args.base_url and args.judge_model):
            print("error: --mode winrate/score need --base-url and --judge-model", file=sys.stderr)
            return 2
        if args.mode == "winrate" and not args.reference:
            print("error: --mode winrate needs --reference answers", file=sys.stderr)
            return 2
        cfg = ClientConfig(
            base_url=args.base_url,
            model=args.judge_model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
        )
        reference = load_answers(args.reference) if args.reference else None
        summary = judged(args.mode, prompts, answers, pathlib.Path(args.output), cfg, reference=reference)
    if summary.get("failed_requests"):
        summary["retry"] = rerun_note(summary["failed_requests"])
    pathlib.Path(args.output).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

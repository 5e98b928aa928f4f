"""python -m apo_jax.data.clair {revise, stats, judge, stronger, off-policy} ...

revise --input answers.jsonl --output pairs.jsonl --base-url URL --model NAME
       [--concurrency 8] [--max-tokens 4096] [--temperature 0.7] [--limit N]
       [--max-consecutive-failures 3]
       (the API key comes from the environment variable named by --api-key-env, OPENAI_API_KEY; without
       it only a loopback endpoint is tried, with a placeholder key)
stats  --input pairs.jsonl [--input other.jsonl ...] [--tokenizer DIR] [--json stats.json]
       [--model DIR [--as-chat]]    (adds CHES under that model: apo_jax.data.ches)
judge  --input answers.jsonl --output pairs.jsonl --base-url URL --model JUDGE [--drop-ties]
       (on_policy_judge; answers with samples 0 and 1: `python -m apo_jax.data.generate --samples 2`;
       ties are written as `is_tie` pairs, and the summary warns of them, unless --drop-ties)
stronger --answers answers.jsonl --stronger stronger.jsonl --output pairs.jsonl  (stronger_preferred)
off-policy --input ultrafeedback.jsonl --output pairs.jsonl [--seed 0]           (off_policy_judge)

Exit status: 0 done; 1 some rows failed (listed in <output>.failures.jsonl; the same command asks
again for those without a recorded response, and the summary says so); 2 an error you can fix,
in one line on stderr: bad input, no API key, or a job stopped by the client's circuit breaker (a
dead endpoint, a wrong key: apo_jax.client), whose answered rows are kept, so the same
command resumes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from apo_jax import cli
from apo_jax.client import CircuitOpen, ClientConfig, rerun_note, resolve_api_key
from apo_jax.data.clair import baselines
from apo_jax.data.clair import stats as stats_lib
from apo_jax.data.clair.revise import revise
from apo_jax.data.jsonl import read_jsonl
from apo_jax.models import load_tokenizer


def _pairs(path):
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if "chosen" not in row or "rejected" not in row:
                    raise ValueError(f"{path}: row {index}: needs 'chosen' and 'rejected'")
                yield row["chosen"], row["rejected"]


def _client_args(parser) -> None:
    parser.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="the environment variable that holds the API key"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=3,
        help="stop the job after this many consecutive requests find the endpoint unreachable (or "
        "answering 404), or rows use up their retries; a rejected key (401/403) stops at once",
    )


def _config(args, **kw) -> ClientConfig:
    for name in ("concurrency", "max_consecutive_failures"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return ClientConfig(
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        max_consecutive_failures=args.max_consecutive_failures,
        **kw,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apo_jax.data.clair")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("revise", help="minimal revisions of the model's answers by a reviser LLM")
    r.add_argument("--input", required=True)
    r.add_argument("--output", required=True)
    r.add_argument(
        "--base-url", required=True, help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1"
    )
    r.add_argument("--model", required=True, help="the reviser, e.g. gpt-4-turbo (the paper's)")
    _client_args(r)
    r.add_argument("--max-retries", type=int, default=6)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--max-tokens", type=int, default=4096)
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--limit", type=int, default=None, help="only the first N rows (a trial run)")
    j = sub.add_parser("judge", help="on_policy_judge: a judge picks the better of two answers of M")
    j.add_argument("--input", required=True)
    j.add_argument("--output", required=True)
    j.add_argument("--base-url", required=True)
    j.add_argument("--model", required=True)
    j.add_argument(
        "--drop-ties",
        action="store_true",
        help="leave tie verdicts out (by default they are written as is_tie pairs, which only "
        "tie-aware losses use)",
    )
    _client_args(j)
    st = sub.add_parser("stronger", help="stronger_preferred: the stronger model's answer is chosen")
    st.add_argument("--answers", required=True)
    st.add_argument("--stronger", required=True)
    st.add_argument("--output", required=True)
    o = sub.add_parser("off-policy", help="off_policy_judge: UltraFeedback-style judged answers to pairs")
    o.add_argument("--input", required=True)
    o.add_argument("--output", required=True)
    o.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("stats", help="contrastiveness of pair files: Jaccard and Levenshtein")
    s.add_argument("--input", required=True, action="append")
    s.add_argument("--tokenizer", default=None, help="count tokenizer ids instead of whitespace words")
    s.add_argument("--json", default=None, help="also write the results here")
    s.add_argument("--model", default=None, help="a Hugging Face Llama: also report CHES under it")
    s.add_argument("--as-chat", action="store_true", help="with --model: frame string pairs as chat turns")
    return p


def _revise(args) -> int:
    if args.max_retries < 0:
        raise cli.UserError(f"--max-retries must be at least 0, got {args.max_retries}")
    cfg = _config(args, max_retries=args.max_retries, timeout=args.timeout)
    try:
        summary = revise(
            args.input,
            args.output,
            cfg,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            limit=args.limit,
        )
    except CircuitOpen as e:
        if e.summary is not None:
            print(json.dumps(e.summary))
        raise
    print(json.dumps(_noted(summary)))
    return 0 if summary["failed"] == 0 else 1


def _noted(summary: dict) -> dict:
    """The summary with what the user should know: failed rows are asked again by a rerun; ties are
    pairs that only tie-aware losses can use."""
    if summary.get("failed"):
        summary = summary | {"retry": rerun_note(summary["failed"])}
    if summary.get("ties"):
        summary = summary | {
            "warning": f"{summary['ties']} of {summary['pairs']} pairs are ties (is_tie=true): train on "
            "them only with a tie-aware loss, or run again with --drop-ties to leave them out"
        }
    return summary


def _baseline(args) -> int:
    if args.command == "judge":
        cfg = _config(args)
        resolve_api_key(cfg)  # no key for a remote endpoint: refused before reading the answers
        summary = baselines.on_policy_judge(args.input, args.output, cfg, drop_ties=args.drop_ties)
    elif args.command == "stronger":
        summary = baselines.stronger_preferred(args.answers, args.stronger, args.output)
    else:
        summary = baselines.off_policy_judge(args.input, args.output, seed=args.seed)
    print(json.dumps(_noted(summary)))
    return 0 if not summary.get("failed") else 1


def _stats(args) -> int:
    tokenize = load_tokenizer(args.tokenizer).encode if args.tokenizer else str.split
    results = {pathlib.Path(path).stem: stats_lib.pair_stats(_pairs(path), tokenize) for path in args.input}
    if args.model:
        for path in args.input:
            rows = [(r["chosen"], r["rejected"], r.get("prompt")) for r in read_jsonl(path)]
            results[pathlib.Path(path).stem] |= stats_lib.ches_stats(args.model, rows, as_chat=args.as_chat)
    print(stats_lib.table(results))
    if args.json:
        pathlib.Path(args.json).write_text(stats_lib.to_json(results) + "\n")
    return 0


@cli.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "revise":
        return _revise(args)
    if args.command in ("judge", "stronger", "off-policy"):
        return _baseline(args)
    return _stats(args)


if __name__ == "__main__":
    sys.exit(main())

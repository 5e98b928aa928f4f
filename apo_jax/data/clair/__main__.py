"""python -m apo_jax.data.clair {revise, stats, judge, stronger, off-policy} ...

revise --input answers.jsonl --output pairs.jsonl --base-url URL --model NAME
       [--concurrency 8] [--max-tokens 4096] [--temperature 0.7] [--limit N]
       (the API key comes from the environment variable named by --api-key-env, OPENAI_API_KEY)
stats  --input pairs.jsonl [--input other.jsonl ...] [--tokenizer DIR] [--json stats.json]
       [--model DIR [--as-chat]]    (adds CHES under that model: apo_jax.eval.ches)
judge  --input answers.jsonl --output pairs.jsonl --base-url URL --model JUDGE   (on_policy_judge;
       answers with samples 0 and 1: `python -m apo_jax.data.generate --samples 2`)
stronger --answers answers.jsonl --stronger stronger.jsonl --output pairs.jsonl  (stronger_preferred)
off-policy --input ultrafeedback.jsonl --output pairs.jsonl [--seed 0]           (off_policy_judge)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from apo_jax.data.clair import stats as stats_lib
from apo_jax.data.clair.client import ClientConfig
from apo_jax.data.clair.revise import revise
from apo_jax.data.jsonl import read_jsonl


def _pairs(path):
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if "chosen" not in row or "rejected" not in row:
                    raise ValueError(f"{path}: row {index}: needs 'chosen' and 'rejected'")
                yield row["chosen"], row["rejected"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.data.clair")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("revise", help="minimal revisions of the model's answers by a reviser LLM")
    r.add_argument("--input", required=True)
    r.add_argument("--output", required=True)
    r.add_argument(
        "--base-url", required=True, help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1"
    )
    r.add_argument("--model", required=True, help="the reviser, e.g. gpt-4-turbo (the paper's)")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY")
    r.add_argument("--concurrency", type=int, default=8)
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
    j.add_argument("--api-key-env", default="OPENAI_API_KEY")
    j.add_argument("--concurrency", type=int, default=8)
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
    args = p.parse_args(argv)
    try:
        if args.command == "revise":
            cfg = ClientConfig(
                base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                concurrency=args.concurrency, max_retries=args.max_retries, timeout=args.timeout,
            )  # fmt: skip
            summary = revise(args.input, args.output, cfg, max_tokens=args.max_tokens,
                             temperature=args.temperature, limit=args.limit)  # fmt: skip
            print(json.dumps(summary))
            return 0 if summary["failed"] == 0 else 1
        if args.command in ("judge", "stronger", "off-policy"):
            from apo_jax.data.clair import baselines

            if args.command == "judge":
                cfg = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                                   concurrency=args.concurrency)  # fmt: skip
                summary = baselines.on_policy_judge(args.input, args.output, cfg)
            elif args.command == "stronger":
                summary = baselines.stronger_preferred(args.answers, args.stronger, args.output)
            else:
                summary = baselines.off_policy_judge(args.input, args.output, seed=args.seed)
            print(json.dumps(summary))
            return 0 if not summary.get("failed") else 1
        tokenize = str.split
        if args.tokenizer:
            from apo_jax.models import load_tokenizer

            tok = load_tokenizer(args.tokenizer)
            tokenize = tok.encode
        results = {
            pathlib.Path(path).stem: stats_lib.pair_stats(_pairs(path), tokenize) for path in args.input
        }
        if args.model:
            for path in args.input:
                rows = [(r["chosen"], r["rejected"], r.get("prompt")) for r in read_jsonl(path)]
                results[pathlib.Path(path).stem] |= stats_lib.ches_stats(
                    args.model, rows, as_chat=args.as_chat
                )
        print(stats_lib.table(results))
        if args.json:
            pathlib.Path(args.json).write_text(stats_lib.to_json(results) + "\n")
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

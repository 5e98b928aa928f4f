"""The trained model's answers in the files AlpacaEval 2 and MT-Bench read: `python -m apo_jax.eval.answers`.

    # AlpacaEval 2: its 805 instructions (a JSON list with `instruction`, as alpaca_eval ships them)
    python -m apo_jax.eval.answers --benchmark alpaca_eval --questions alpaca_eval.json \\
        --model-dir workdirs/clair_apo_zero/hf --name clair_apo_zero --output model_outputs.json
    alpaca_eval --model_outputs model_outputs.json          # its own judge (OPENAI_API_BASE works)
    # MT-Bench: FastChat's question.jsonl (two turns each); the answers go where FastChat looks
    python -m apo_jax.eval.answers --benchmark mt_bench --questions question.jsonl \\
        --model-dir workdirs/clair_apo_zero/hf --name clair_apo_zero \\
        --output data/mt_bench/model_answer/clair_apo_zero.jsonl
    python -m fastchat.llm_judge.gen_judgment --model-list clair_apo_zero   # FastChat's judge

Generation is apo_jax's own sampler on the exported checkpoint (`apo_jax.data.generate`): chat-
templated, batched, resumable (a killed job continues from the answers it wrote, kept in
`<output>.work/<job>/`, one folder per checkpoint and sampling settings, so another model's answers
are never reused under this one's name). AlpacaEval's
files are a JSON list of {instruction, output, generator, dataset}; MT-Bench's are JSONL of
{question_id, answer_id, model_id, choices: [{index, turns}], tstamp}, the second turn answered
after the first in one conversation, at FastChat's per-category temperatures (0 for math, coding,
reasoning and extraction, 0.1 for STEM and humanities, 0.7 for writing and roleplay).
`python -m apo_jax.eval.judge --answers model_outputs.json --reference other.json` reads AlpacaEval
files too: a win rate through any OpenAI-compatible judge.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import uuid

from apo_jax import cli
from apo_jax.client import request_key
from apo_jax.data.generate import generate_with_model, model_identity
from apo_jax.data.jsonl import read_json_rows

BENCHMARKS = ("alpaca_eval", "mt_bench")
# FastChat's llm_judge/common.py temperature_config, by category
MT_BENCH_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


class QuestionsError(cli.UserError, ValueError):
    """A questions file that is not the benchmark's layout; the message names the file and row."""


def read_questions(path, benchmark: str) -> list[dict]:
    """AlpacaEval's JSON list (or JSONL) of {instruction, dataset?}; MT-Bench's JSONL of
    {question_id, category, turns}."""
    try:
        rows = read_json_rows(path)
    except ValueError as e:
        raise QuestionsError(str(e)) from None
    need = {"alpaca_eval": ("instruction",), "mt_bench": ("question_id", "turns")}[benchmark]
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise QuestionsError(f"{path}: row {i}: no {missing[0]!r} (a {benchmark} questions file)")
    return rows


def alpaca_eval(questions, model_dir, output, *, name: str, work: pathlib.Path, **sampling) -> list[dict]:
    """AlpacaEval's model_outputs.json for `questions`."""
    prompts = [{"prompt": q["instruction"]} for q in questions]
    generate_with_model(prompts, work / "answers.jsonl", model_dir, **sampling)
    answers = _read(work / "answers.jsonl")
    out = [
        {
            "instruction": q["instruction"],
            "output": a["response"],
            "generator": name,
            "dataset": q.get("dataset", ""),
        }
        for q, a in zip(questions, answers, strict=True)
    ]
    pathlib.Path(output).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out


def mt_bench(questions, model_dir, output, *, name: str, work: pathlib.Path, **sampling) -> list[dict]:
    """FastChat's model_answer JSONL for MT-Bench `questions`: turn k answered with turns < k and their
    answers in the conversation."""
    turns = max(len(q["turns"]) for q in questions)
    answers: list[list[str]] = [[] for _ in questions]
    for k in range(turns):
        by_temperature: dict[float, list[int]] = {}
        for i, q in enumerate(questions):
            if k < len(q["turns"]):
                t = MT_BENCH_TEMPERATURE.get(q.get("category", ""), 0.7)
                by_temperature.setdefault(t, []).append(i)
        for t, members in sorted(by_temperature.items()):
            prompts = []
            for i in members:
                q, messages = questions[i], []
                for turn, answer in zip(q["turns"][:k], answers[i], strict=True):
                    messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
                messages.append({"role": "user", "content": q["turns"][k]})
                prompts.append({"prompt": q["turns"][k], "messages": messages})
            path = work / f"turn{k}_t{t}.jsonl"
            generate_with_model(prompts, path, model_dir, **(sampling | {"temperature": t}))
            for i, row in zip(members, _read(path), strict=True):
                answers[i].append(row["response"])
    out = [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{name}/{q['question_id']}").hex,
            "model_id": name,
            "choices": [{"index": 0, "turns": a}],
            "tstamp": time.time(),
        }
        for q, a in zip(questions, answers, strict=True)
    ]
    pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    return out


def work_dir(output, model_dir, settings: dict) -> pathlib.Path:
    """`<output>.work/<job>`: the answers written so far by this checkpoint (`model_identity`) with
    these settings; another model or other settings get a folder of their own."""
    output = pathlib.Path(output)
    job = request_key({"model": model_identity(model_dir), **settings})[:16]
    return output.with_name(output.name + ".work") / job


def _read(path) -> list[dict]:
    """The answers generate_with_model wrote, in prompt order (it appends batches as they finish)."""
    rows = [json.loads(x) for x in pathlib.Path(path).read_text().splitlines() if x.strip()]
    return sorted(rows, key=lambda r: int(r["id"].split(":")[0]))


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.eval.answers", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=BENCHMARKS, required=True)
    p.add_argument("--questions", required=True, help="the benchmark's questions file")
    p.add_argument("--model-dir", required=True, help="the trained model: an exported run's hf/")
    p.add_argument("--output", required=True)
    p.add_argument("--name", help="the model's name in the files (default: the model folder's parent)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: 2048 (AlpacaEval), 1024 (MT-Bench)")
    p.add_argument("--temperature", type=float, default=0.0, help="AlpacaEval's (MT-Bench: by category)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    questions = read_questions(args.questions, args.benchmark)[: args.limit]
    name = args.name or pathlib.Path(args.model_dir).absolute().parent.name
    default_tokens = 2048 if args.benchmark == "alpaca_eval" else 1024
    sampling = {"max_tokens": args.max_tokens or default_tokens, "batch_size": args.batch_size}
    settings = {"benchmark": args.benchmark, "temperature": args.temperature, **sampling}
    work = work_dir(args.output, args.model_dir, settings)
    work.mkdir(parents=True, exist_ok=True)
    if args.benchmark == "alpaca_eval":
        out = alpaca_eval(
            questions,
            args.model_dir,
            args.output,
            name=name,
            work=work,
            temperature=args.temperature,
            **sampling,
        )
    else:
        out = mt_bench(questions, args.model_dir, args.output, name=name, work=work, **sampling)
    print(json.dumps({"benchmark": args.benchmark, "answers": len(out), "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

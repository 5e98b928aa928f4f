"""Answers of the target model M: `python -m apo_jax.data.generate`, resumable.

    # with apo_jax's own batched sampler, from a Hugging Face directory
    python -m apo_jax.data.generate --input prompts.jsonl --output answers.jsonl \
        --model-dir Meta-Llama-3-8B-Instruct
    # or from any OpenAI-compatible server (vLLM, a hosted API); key from $OPENAI_API_KEY
    python -m apo_jax.data.generate --input prompts.jsonl --output answers.jsonl \\
        --base-url http://localhost:8000/v1 --model meta-llama/Meta-Llama-3-8B-Instruct

Input rows have `prompt` (other fields are carried along); output rows have `prompt`, `response`,
`sample` (0..n-1 with `--samples n`, as the on-policy judge baseline needs two) and `generator`.
Sampling parameters are always sent explicitly (vLLM would otherwise apply the model's own
generation defaults). A finished row is never generated again: rerun the command to resume. What
counts as finished is keyed by content (`client.request_key`: the prompt, the model, the sampling
settings, the sample number), never by row number: with the own sampler the output holds a `key`
per row, and an output holding answers of another job (other prompts, model or settings) is refused
rather than mixed in; through a server the response log is keyed the same way. The output's folder
is made before any work, a cut last line (a crash, a full disk) is removed on start, and one job at a
time writes an output (`outputs.OutputLock`).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import jax
import numpy as np

from apo_jax import cli, models
from apo_jax.client import ClientConfig, answer_text, request_key, rerun_note, run_requests
from apo_jax.data.jsonl import parse_lines, write_jsonl
from apo_jax.data.tokenize import chat_kwargs
from apo_jax.outputs import OutputLock, append_lines, repair_tail


def read_prompts(path) -> list[dict]:
    """Rows with a string `prompt` (JSON Lines, or one JSON array); a bad row is a ValueError naming
    the file and row."""
    rows = []
    for index, (row, problem) in enumerate(parse_lines(path)):
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}: row {index}: needs a string field 'prompt'")
        rows.append(row)
    return rows


def _jobs(contents: list[dict], samples: int) -> list[tuple[str, int, int, str]]:
    """(row id "i:s", prompt index i, sample s, content key) per answer wanted. `contents[i]` is what
    decides prompt i's answer; a repeated prompt's answers are keyed apart (each row gets its own)."""
    seen: collections.Counter = collections.Counter()
    jobs = []
    for i, content in enumerate(contents):
        base = request_key(content)
        n, seen[base] = seen[base], seen[base] + 1
        jobs += [(f"{i}:{s}", i, s, request_key(content, sample=n * samples + s)) for s in range(samples)]
    return jobs


def model_identity(model_dir) -> str:
    """What names a checkpoint in a resume key: its weights' fingerprint
    (`models.hf.checkpoint_fingerprint`), so a folder trained again in place is another model and a
    copy of one is the same."""
    return models.hf.checkpoint_fingerprint(model_dir)


def _row(prompts, i, s, response, generator, row_id):
    carried = {k: v for k, v in prompts[i].items() if k not in ("prompt", "response")}
    return {
        "id": row_id,
        "prompt": prompts[i]["prompt"],
        "response": response,
        "sample": s,
        "generator": generator,
        **carried,
    }


def generate_with_server(
    prompts,
    output,
    cfg,
    *,
    samples=1,
    max_tokens=1024,
    temperature=0.7,
    top_p=1.0,
    client=None,
    progress=True,
    seed=None,
) -> dict:
    """Through an OpenAI-compatible chat endpoint, with the revise job's retries and bookkeeping. With
    `seed`, each request carries seed + its index (vLLM's and SGLang's per-request seed). Raises
    `client.CircuitOpen` after writing what it has if the job was stopped."""
    output = pathlib.Path(output)
    contents = [
        {
            "model": cfg.model,
            "messages": [{"role": "user", "content": p["prompt"]}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "n": 1,
        }
        for p in prompts
    ]
    jobs = _jobs(contents, samples)
    requests = {
        row_id: contents[i] | ({} if seed is None else {"seed": seed + k})
        for k, (row_id, i, _, _) in enumerate(jobs)
    }
    keys = {row_id: key for row_id, _, _, key in jobs} if seed is None else None  # a seed tells them apart
    log_path = output.with_name(output.name + ".responses.jsonl")
    with OutputLock(output):
        done, failures, counters = run_requests(
            cfg, requests, log_path, keys=keys, client=client, progress=progress
        )
        rows = [
            _row(prompts, i, s, answer_text(done[row_id]["response"]), cfg.model, row_id)
            for row_id, i, s, _ in jobs
            if row_id in done
        ]
        write_jsonl(output, rows)
    if counters.stop:
        raise counters.stop
    return {"rows": len(requests), "written": len(rows), "failed": len(failures), "failures": failures}


def prompt_ids(tok, row: dict, kwargs: dict) -> list[int]:
    """The chat-templated prompt of a row, continued by its `prefix` (the answer so far) if it has one,
    tokenized as preprocess tokenizes step-level pairs (apo_jax.data.tokenize). A row with `messages`
    (a conversation ending in a user turn: a later turn of MT-Bench) is templated whole."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    if not row.get("prefix"):
        return tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
        )["input_ids"]
    head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return list(tok(text=head + row["prefix"], add_special_tokens=False)["input_ids"])


def step_end_ids(tok, marker: str = "\n") -> list[int]:
    """Token ids whose text contains `marker`: the end of a reasoning step written one per line."""
    return [i for i in range(len(tok)) if marker in tok.decode([i])]


def _left_padded(ids: list[list[int]], batch_size: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch_size, width] ids and attention mask, left-padded; a fixed batch (one compiled sampler)
    whose filler rows hold one token each, discarded."""
    width = max(map(len, ids))
    out = np.full((batch_size, width), pad, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for r, x in enumerate(ids):
        out[r, width - len(x) :], mask[r, width - len(x) :] = x, 1
    mask[len(ids) :, -1] = 1
    return out, mask


def _own_jobs(prompts, model_dir, samples, settings: dict) -> list[tuple[str, int, int, str]]:
    """`_jobs` for the own sampler: an answer's content is its prompt (or conversation and prefix),
    the checkpoint (`model_identity`) and the sampling settings."""
    common = {"model": model_identity(model_dir), **settings}
    contents = [
        common | {"prompt": p.get("messages") or p["prompt"], "prefix": p.get("prefix")} for p in prompts
    ]
    return _jobs(contents, samples)


def _pending(output: pathlib.Path, jobs) -> tuple[list, int]:
    """(the jobs `output` does not hold yet, how many it holds); an output holding answers of another
    job is a UserError (they would be mixed into this one's)."""
    repair_tail(output)
    wanted, held, foreign = {job[3] for job in jobs}, set(), 0
    if output.exists():
        for row, _ in parse_lines(output):
            key = row.get("key") if isinstance(row, dict) else None
            if key in wanted:
                held.add(key)
            else:
                foreign += 1
    if foreign:
        raise cli.UserError(
            f"--output {output}: {foreign} of its rows are answers of another job (other prompts, another "
            "model or other sampling settings); give another --output, or move that file away"
        )
    return [job for job in jobs if job[3] not in held], len(held)


def generate_with_model(
    prompts,
    output,
    model_dir,
    *,
    samples=1,
    max_tokens=512,
    temperature=0.7,
    top_p=1.0,
    batch_size=8,
    seed=0,
    mesh=None,
    progress=True,
    temperature_step=0.0,
    temperature_max=None,
    ref_params=None,
    mix=None,
) -> dict:
    """With apo_jax's own sampler: chat-templated, left-padded batches, appended as they finish.

    Rows with a `prefix` continue it (the response is the continuation). `temperature_step` raises the
    temperature by that much after each line the row writes, up to `temperature_max` (Step-Controlled
    DPO). `ref_params` with `mix` ([2], or [samples, 2]: one pair per sample index) samples from mixed
    logits (online DPO's samplers; the reference's weights are not part of the resume key)."""
    output = pathlib.Path(output)
    sampling = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    sampling |= {"temperature_step": temperature_step, "temperature_max": temperature_max}
    mixed = None if mix is None else np.broadcast_to(np.asarray(mix, np.float32), (samples, 2))
    settings = sampling | {"seed": seed, "mix": None if mixed is None else mixed.tolist()}
    jobs = _own_jobs(prompts, model_dir, samples, settings)
    with OutputLock(output):
        todo, held = _pending(output, jobs)
        if not todo:
            return {"rows": len(jobs), "written": len(jobs), "failed": 0}
        model, params = models.from_hf(model_dir, mesh=mesh)
        tok = models.load_tokenizer(model_dir)
        if temperature_step:
            sampling["step_end_ids"] = step_end_ids(tok)
        kwargs = chat_kwargs(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = tuple(model.config.eos_token_id) or (
            (tok.eos_token_id,) if tok.eos_token_id is not None else ()
        )
        bar = None
        if progress:
            bar = cli.progress_bar(total=len(todo), desc="generate", dynamic_ncols=True)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            ids_, mask_ = _left_padded(
                [prompt_ids(tok, prompts[i], kwargs) for _, i, _, _ in batch], batch_size, pad
            )
            # one key per batch of the remaining rows: a resumed run samples what is left afresh
            key = jax.random.fold_in(jax.random.key(seed), held + start)
            mixing = {}
            if ref_params is not None:
                m = np.ones((batch_size, 2), np.float32)
                m[: len(batch)] = mixed[[s for _, _, s, _ in batch]]
                mixing = {"ref_params": ref_params, "mix": m}
            out = models.generate(
                model, params, ids_, mask_, eos_ids=eos, pad_id=pad, rng=key, **sampling, **mixing
            )
            tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
            rows = []
            for r, (row_id, i, s, content_key) in enumerate(batch):
                text = tok.decode(
                    [t for t in tokens[r, : lengths[r]] if t not in eos], skip_special_tokens=True
                )
                rows.append(_row(prompts, i, s, text, str(model_dir), row_id) | {"key": content_key})
            append_lines(output, rows)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
    return {"rows": len(jobs), "written": len(jobs), "failed": 0}


@cli.command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_jax.data.generate", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model-dir", help="a Hugging Face Llama directory: apo_jax's own sampler")
    p.add_argument("--base-url", help="an OpenAI-compatible endpoint instead")
    p.add_argument("--model", help="the model name at --base-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    if bool(args.model_dir) == bool(args.base_url):
        print("error: give exactly one of --model-dir and --base-url (with --model)", file=sys.stderr)
        return 2
    prompts = read_prompts(args.input)[: args.limit]
    if args.base_url:
        cfg = ClientConfig(
            base_url=args.base_url,
            model=args.model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
        )
        summary = generate_with_server(
            prompts,
            args.output,
            cfg,
            samples=args.samples,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
    else:
        summary = generate_with_model(
            prompts,
            args.output,
            args.model_dir,
            samples=args.samples,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
        )
    shown = {k: v for k, v in summary.items() if k != "failures"}
    if summary["failed"]:
        shown |= {
            "first_failure": next(iter(summary["failures"].values())),
            "retry": rerun_note(summary["failed"]),
        }
    print(json.dumps(shown))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

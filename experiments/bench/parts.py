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

from apo_jax import models, testing
from apo_jax.data.jsonl import write_jsonl
from apo_jax.data.preprocess import preprocess
from apo_jax.data.reader import PreferenceReader
from apo_jax.logprobs import naive_token_logps, token_logps
from experiments.bench.common import block_until_ready, timed


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


def bench_sampling(args, config, params) -> list[dict]:
    model = models.Llama(config)
    out = []
    new = 16 if args.smoke else 128
    for b in (4,) if args.smoke else (1, 8, 32):
        prompt = np.random.default_rng(0).integers(6, config.vocab_size, (b, 64)).astype(np.int32)
        mask = np.ones_like(prompt)

        def gen(prompt=prompt, mask=mask):
            return models.generate(
                model,
                params,
                prompt,
                mask,
                max_new_tokens=new,
                temperature=1.0,
                rng=jax.random.key(0),
                eos_ids=(),
            )["tokens"]

        t0 = time.perf_counter()
        block_until_ready(gen())
        first = time.perf_counter() - t0
        timing = timed(gen, 2 if args.smoke else 3, 0, block_until_ready)
        out.append(
            {
                "part": "sampling",
                "batch": b,
                "new_tokens": new,
                "first_call_s": first,
                **timing,
                "tokens_per_s": b * new / timing["median_s"],
            }
        )
    return out


def bench_data(args) -> list[dict]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return [{"part": "data", "skipped": "TensorFlow is not installed (the GPU image)"}]
    root = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "clair_pairs_hybrid_format.jsonl"
    rows = (
        [json.loads(x) for x in root.read_text().splitlines()]
        if root.exists()
        else testing.tiny_preference_rows(10)
    )
    n = 40 if args.smoke else 400
    rows = [rows[i % len(rows)] for i in range(n)]
    tok = testing.tiny_tokenizer()
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

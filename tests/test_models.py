"""The Flax Llama against transformers' PyTorch Llama, checkpoints in and out, log-probs, sampling."""

from __future__ import annotations

import json
import shutil

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_CONFIGS
from helpers import padded_batch

from apo_jax import models, sharding
from apo_jax.data import tiny
from apo_jax.logprobs import naive_token_logps
from apo_jax.logprobs import token_logps as chunked_token_logps


def _hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _hf_logits(hf, ids, mask):
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)  # what generate() and left padding need
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    model, params = models.from_hf(path)
    ids, mask = padded_batch()
    expected = _hf_logits(_hf(path), ids, mask)
    got = np.asarray(jax.jit(lambda p, i, m: models.logits(model, p, i, m))(params, ids, mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4
    assert np.abs(expected[real]).max() > 1.0  # the random model is not trivially flat


def test_to_hf_round_trip(tiny_checkpoints, tiny_tokenizer, tmp_path):
    path = tiny_checkpoints["tied_llama3"]
    model, params = models.from_hf(path)
    out = models.to_hf(model, params, tmp_path / "export", tokenizer=tiny_tokenizer, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # small shards: an index and several files
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ids, mask = padded_batch(1)
    np.testing.assert_allclose(
        _hf_logits(_hf(out), ids, mask), _hf_logits(_hf(path), ids, mask), rtol=0, atol=1e-6
    )
    _, again = models.from_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tok = models.load_tokenizer(out)
    chat = [{"role": "user", "content": "revise the answer"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == tiny_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is True


def test_both_rope_config_forms_read_the_same(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["tied_llama3"]
    cfg = json.loads((src / "config.json").read_text())
    rope = dict(cfg.get("rope_parameters") or cfg["rope_scaling"])
    theta = rope.pop("rope_theta", cfg.get("rope_theta"))
    published = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {
        "rope_theta": theta,
        "rope_scaling": rope,
    }
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = rope | {"rope_theta": theta}
    configs = []
    for name, form in (("published", published), ("v5", v5)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(form))
        configs.append(models.read_config(d))
    assert configs[0] == configs[1]
    assert configs[0].rope_type == "llama3" and configs[0].rope_theta == 500000.0


def test_chunked_token_logps_equal_naive_values_and_gradients():
    rng = np.random.default_rng(0)
    B, T, D, V = 3, 37, 16, 301
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)

    def chunked(h, w):
        return chunked_token_logps(h, w, ids, mask, chunk_size=8)["logps"].sum()

    def naive(h, w):
        return jnp.sum(naive_token_logps(h, w, ids) * mask)

    out = chunked_token_logps(hidden, w, ids, mask, chunk_size=8, with_entropy=True, with_sum_sq=True)
    ref = naive_token_logps(hidden, w, ids)
    np.testing.assert_allclose(out["token_logps"], ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out["token_logps"][:, 0]) == 0)
    # entropy and log Σ p² against the full distribution
    logp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", hidden, w)[:, :-1], -1)
    np.testing.assert_allclose(
        out["entropy"][:, 1:], -jnp.sum(jnp.exp(logp) * logp, -1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        out["log_sum_sq_probs"][:, 1:], jnp.log(jnp.sum(jnp.exp(2 * logp), -1)), rtol=1e-5, atol=1e-5
    )
    g_chunked = jax.grad(chunked, argnums=(0, 1))(hidden, w)
    g_naive = jax.grad(naive, argnums=(0, 1))(hidden, w)
    for a, b in zip(g_chunked, g_naive, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
def test_chunked_kl_equals_the_full_vocabulary_kl_and_its_gradient(direction):
    """TDPO's KL(π_ref ‖ π) and TIS-DPO's KL(π ‖ π_ref) at every position, from the chunks, against
    the full [B, T, V] distributions in numpy; gradients (policy only) against the naive jax form."""
    rng = np.random.default_rng(1)
    B, T, D, V = 2, 29, 16, 211
    h, hr = (jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32) for _ in range(2))
    w, wr = (jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32) for _ in range(2))
    ids = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    out = chunked_token_logps(h, w, ids, mask, chunk_size=8, ref_hidden=hr, ref_weight=wr, kl=direction)

    def log_softmax64(hh, ww):
        z = np.einsum("BTD,DV->BTV", np.asarray(hh, np.float64), np.asarray(ww, np.float64))[:, :-1]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lr = log_softmax64(h, w), log_softmax64(hr, wr)
    a, b = (lr, lp) if direction == "ref_policy" else (lp, lr)
    np.testing.assert_allclose(out["kl"][:, 1:], (np.exp(a) * (a - b)).sum(-1), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(out["kl"][:, 0]) == 0)
    picked = np.take_along_axis(lr, np.asarray(ids)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(out["ref_token_logps"][:, 1:], picked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ref_logps"], (picked * np.asarray(mask)[:, 1:]).sum(-1), rtol=1e-5)

    def chunked(h, w, hr, wr):
        o = chunked_token_logps(h, w, ids, mask, chunk_size=8, ref_hidden=hr, ref_weight=wr, kl=direction)
        return jnp.sum(o["kl"] * mask) + jnp.sum(o["ref_token_logps"])

    def naive(h, w, hr, wr):
        p = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w)[:, :-1], -1)
        r = jax.lax.stop_gradient(jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", hr, wr)[:, :-1], -1))
        x, y = (r, p) if direction == "ref_policy" else (p, r)
        return jnp.sum(jnp.sum(jnp.exp(x) * (x - y), -1) * mask[:, 1:])

    g_chunked = jax.grad(chunked, argnums=(0, 1, 2, 3))(h, w, hr, wr)
    g_naive = jax.grad(naive, argnums=(0, 1, 2, 3))(h, w, hr, wr)
    for x, y in zip(g_chunked, g_naive, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(g_chunked[2])) and not np.any(np.asarray(g_chunked[3]))


def test_chunked_log_probs_use_a_quarter_of_the_naive_memory():
    B, T, D, V = 2, 1024, 64, 32768
    hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    mask = jax.ShapeDtypeStruct((B, T), jnp.float32)

    def chunked(h, w, ids, m):
        return chunked_token_logps(h, w, ids, m, chunk_size=256)["logps"].sum()

    def naive(h, w, ids, m):
        return jnp.sum(naive_token_logps(h, w, ids) * m)

    def temp_bytes(fn):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(hidden, w, ids, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked_bytes, naive_bytes = temp_bytes(chunked), temp_bytes(naive)
    assert naive_bytes >= B * T * V * 4  # the naive path holds at least the full logits
    assert chunked_bytes <= naive_bytes / 4, (chunked_bytes, naive_bytes)


def test_model_token_logps_match_transformers(tiny_checkpoints):
    path = tiny_checkpoints["gqa"]
    model, params = models.from_hf(path)
    ids, mask = padded_batch(2)
    loss_mask = mask.copy()
    loss_mask[:, :8] = 0  # the "prompt"
    out = models.token_logps(model, params, ids, mask, loss_mask, chunk_size=4)
    logp = torch.log_softmax(torch.tensor(_hf_logits(_hf(path), ids, mask)), -1).numpy()
    expected = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(
        np.asarray(out["token_logps"])[:, 1:] * loss_mask[:, 1:], expected * loss_mask[:, 1:], atol=2e-5
    )
    np.testing.assert_allclose(out["logps"], (expected * loss_mask[:, 1:]).sum(-1), rtol=1e-5, atol=1e-4)


def _jit_logps(model, **static):
    """token_logps jitted once per model (eager flax calls are slow on CPU)."""
    return jax.jit(
        lambda p, ids, m, lm, seg=None, pos=None: models.token_logps(model, p, ids, m, lm, seg, pos, **static)
    )


def test_packed_row_equals_sequences_run_separately(tiny_checkpoints):
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    logps = _jit_logps(model)
    rng = np.random.default_rng(3)
    a, b = rng.integers(6, 320, 7), rng.integers(6, 320, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    loss = (segments != 0).astype(np.float32)
    out = logps(params, packed, (segments != 0).astype(np.int32), loss, segments)
    for seq, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
        alone = logps(params, seq[None], np.ones((1, len(seq)), np.int32), np.ones((1, len(seq)), np.float32))
        # the first token of a packed segment has no prefix inside its segment: compare the rest
        np.testing.assert_allclose(out["token_logps"][0, sl][1:], alone["token_logps"][0, 1:], atol=1e-5)


def test_prompt_shared_row_equals_the_two_pairs_separately(tiny_checkpoints):
    # One prompt, two answers in one row: segment 1 holds the prompt but its last token, and
    # each answer segment (2, 3) starts with that last prompt token at its own position, so the
    # first answer token is predicted from it, as in the unshared rows.
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    logps = _jit_logps(model, shared_segment=1)
    rng = np.random.default_rng(4)
    prompt, ans1, ans2 = rng.integers(6, 320, 6), rng.integers(6, 320, 4), rng.integers(6, 320, 3)
    row = np.concatenate([prompt[:-1], prompt[-1:], ans1, prompt[-1:], ans2])[None]
    seg = np.array([[1] * 5 + [2] * 5 + [3] * 4])
    pos = np.array([list(range(5)) + list(range(5, 10)) + list(range(5, 9))])
    loss = np.array([[0] * 5 + [0, 1, 1, 1, 1] + [0, 1, 1, 1]], np.float32)
    out = logps(params, row, np.ones_like(seg), loss, seg, pos)
    plain = _jit_logps(model)
    expected = 0.0
    for ans, sl in ((ans1, slice(6, 10)), (ans2, slice(11, 14))):
        full = np.concatenate([prompt, ans])[None]
        alone = plain(params, full, np.ones_like(full), np.ones_like(full, np.float32))
        np.testing.assert_allclose(out["token_logps"][0, sl], alone["token_logps"][0, 6:], atol=1e-5)
        expected += float(alone["token_logps"][0, 6:].sum())
    np.testing.assert_allclose(out["logps"][0], expected, rtol=1e-5)


def test_greedy_generate_matches_transformers(tiny_checkpoints):
    path = tiny_checkpoints["tied_llama3"]
    model, params = models.from_hf(path)
    rng = np.random.default_rng(5)
    prompts = rng.integers(6, 320, (3, 6))
    mask = np.ones_like(prompts)
    mask[0, :2] = 0  # left padding
    prompts[0, :2] = 5
    got = models.generate(model, params, prompts, mask, max_new_tokens=10, eos_ids=(1, 4), pad_id=5)
    with torch.no_grad():
        hf = (
            _hf(path)
            .generate(
                input_ids=torch.tensor(prompts),
                attention_mask=torch.tensor(mask),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=[1, 4],
                pad_token_id=5,
            )[:, 6:]
            .numpy()
        )
    tokens = np.asarray(got["tokens"])[:, : hf.shape[1]]
    np.testing.assert_array_equal(tokens, hf)


def test_sampling_is_reproducible_at_a_fixed_key(tiny_checkpoints):
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    prompts = np.arange(6, 18).reshape(2, 6)
    mask = np.ones_like(prompts)
    kw = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "eos_ids": ()}
    first = models.generate(model, params, prompts, mask, rng=jax.random.key(1), **kw)["tokens"]
    again = models.generate(model, params, prompts, mask, rng=jax.random.key(1), **kw)["tokens"]
    other = models.generate(model, params, prompts, mask, rng=jax.random.key(2), **kw)["tokens"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_top_k_one_is_greedy(tiny_checkpoints):
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    prompts, mask = np.arange(6, 18).reshape(2, 6), np.ones((2, 6), np.int32)
    greedy = models.generate(model, params, prompts, mask, max_new_tokens=6, eos_ids=())["tokens"]
    top1 = models.generate(
        model, params, prompts, mask, max_new_tokens=6, temperature=2.0, top_k=1, eos_ids=()
    )
    np.testing.assert_array_equal(top1["tokens"], greedy)


def test_cdf_sampler_and_bisected_nucleus_match_numpy():
    """The sampler's two-level inverse CDF draws from softmax(logits), masked tokens never, and its
    nucleus is the sorted-cumsum set of Holtzman et al. written out in numpy; counts over 20K draws
    of a 600-token vocabulary (3 blocks of 256, the last padded) pass a chi-square test."""
    from apo_jax.models.sample import _categorical, _nucleus

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 600)).astype(np.float32)
    logits[1, 300:] = -np.inf  # a masked tail, as top-k leaves it
    logits[2, :590] = -np.inf  # all mass in the padded last block
    for top_p in (0.9, 0.5):
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        sp = np.take_along_axis(p, order, 1)
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, order, (np.cumsum(sp, 1) - sp) < top_p, 1)
        got = np.isfinite(np.asarray(_nucleus(jnp.asarray(logits), top_p)))
        np.testing.assert_array_equal(got, keep)
    n = 20_000
    draw = jax.jit(jax.vmap(lambda k: _categorical(k, jnp.asarray(logits))))
    samples = np.asarray(draw(jax.random.split(jax.random.key(3), n)))  # [n, 3]
    for b in range(3):
        q = np.exp(logits[b] - logits[b].max())
        q /= q.sum()
        counts = np.bincount(samples[:, b], minlength=600)
        assert counts[q == 0].sum() == 0
        big = q * n >= 5  # chi-square over cells with enough expected counts, the rest pooled
        exp = np.append(q[big] * n, q[~big].sum() * n)
        obs = np.append(counts[big], counts[~big].sum())
        exp, obs = (exp, obs) if exp[-1] > 0 else (exp[:-1], obs[:-1])
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        dof = len(exp) - 1
        assert chi2 < dof + 5 * np.sqrt(2 * dof), (b, chi2, dof)


def _mean_logp_check(samples, logits_true, logits_sampled, label):
    """Samples drawn from softmax(logits_sampled) have E[log softmax(logits_true)] = Σ q·log p: the
    empirical mean lies within 4.5 standard errors of the exact value (torch logits, numpy)."""
    logp = torch.log_softmax(torch.tensor(logits_true, dtype=torch.float64), -1).numpy()
    q = torch.softmax(torch.tensor(logits_sampled, dtype=torch.float64), -1).numpy()
    exact, var = float(q @ logp), float(q @ logp**2 - (q @ logp) ** 2)
    got = logp[samples]
    assert abs(got.mean() - exact) < 4.5 * np.sqrt(var / len(got)), (label, got.mean(), exact)
    return exact


def test_rising_step_temperature_and_logit_mixing_sample_the_right_distributions(tmp_path, tiny_checkpoints):
    """Step-Controlled DPO's temperature min(t0 + Δ·steps, t_max) and the online-DPO samplers' logit
    mixing (Shi et al.): the token distributions against softmax of transformers' logits."""
    path = tiny_checkpoints["gqa"]
    ref_path = helpers.tiny_hf_llama(tmp_path / "ref", seed=7)
    model, params = models.from_hf(path)
    _, ref_params = models.from_hf(ref_path)
    n, prompt = 4096, np.arange(6, 12)
    ids, mask = np.tile(prompt, (n, 1)), np.ones((n, 6), np.int32)
    with torch.no_grad():
        l0 = _hf(path)(input_ids=torch.tensor(prompt[None])).logits[0, -1].numpy()
        r0 = _hf(ref_path)(input_ids=torch.tensor(prompt[None])).logits[0, -1].numpy()
    # every token ends a "step": the first token is drawn at t0 = 0.5, the second at min(0.5 + 1, 1.2)
    schedule = {"temperature": 0.5, "temperature_step": 1.0, "temperature_max": 1.2}
    out = models.generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=2,
        step_end_ids=np.arange(384),
        eos_ids=(),
        rng=jax.random.key(3),
        **schedule,
    )
    tokens = np.asarray(out["tokens"])
    at_t0 = _mean_logp_check(tokens[:, 0], l0, l0 / 0.5, "first token at 0.5")
    top = np.bincount(tokens[:, 0]).argmax()  # the second token, after the most frequent first one
    with torch.no_grad():
        l1 = _hf(path)(input_ids=torch.tensor(np.append(prompt, top)[None])).logits[0, -1].numpy()
    second = tokens[tokens[:, 0] == top, 1]
    at_t1 = _mean_logp_check(second, l1, l1 / 1.2, "second token at 1.2")
    with pytest.raises(AssertionError):  # the check can tell the temperatures apart
        _mean_logp_check(second, l1, l1 / 0.5, "second token at 0.5")
    assert at_t0 > at_t1
    # logit mixing: half the rows from 1.5·l_θ − 0.5·l_ref, half from 0.5·l_θ + 0.5·l_ref (temperature 1)
    mix = np.repeat([[1.5, -0.5], [0.5, 0.5]], n // 2, axis=0)
    out = models.generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=1,
        temperature=1.0,
        eos_ids=(),
        ref_params=ref_params,
        mix=mix,
        rng=jax.random.key(4),
    )
    first = np.asarray(out["tokens"])[:, 0]
    _mean_logp_check(first[: n // 2], l0, 1.5 * l0 - 0.5 * r0, "mix (1.5, -0.5)")
    _mean_logp_check(first[n // 2 :], l0, 0.5 * l0 + 0.5 * r0, "mix (0.5, 0.5)")


def test_sharded_logits_equal_single_device(tiny_checkpoints):
    path = tiny_checkpoints["gqa"]
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model, params = models.from_hf(path)
    _, sharded = models.from_hf(path, mesh=mesh)
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, N, H]: D over fsdp, N over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    ids, mask = padded_batch(6)
    batch = jax.sharding.NamedSharding(mesh, sharding.logical_sharding(mesh, ("batch", "length")).spec)
    ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
    logits = sharding.on_mesh(lambda p, i, m: models.logits(model, p, i, m), mesh)
    got = jax.jit(logits)(sharded, ids_s, mask_s)
    expected = models.logits(model, params, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bad_checkpoints_get_clear_errors(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["gqa"]
    with pytest.raises(models.CheckpointError, match="no config.json"):
        models.from_hf(tmp_path)
    bad = tmp_path / "phi3"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "phi3"}))
    with pytest.raises(models.CheckpointError, match="model_type='phi3'"):
        models.from_hf(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(models.CheckpointError, match="rope_type='yarn'"):
        models.from_hf(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    with pytest.raises(models.CheckpointError, match="hidden_act='gelu'"):
        models.from_hf(bad)
    (bad / "config.json").write_text(json.dumps(cfg | {"hidden_size": 96}))
    with pytest.raises(models.CheckpointError, match="shape"):
        models.from_hf(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match="dtype 'float8': use one of"):
        models.from_hf(bad, dtype="float8")
    # a sharded checkpoint whose index names a file that is not there
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(models.CheckpointError, match="shard model-00002-of-00002.safetensors"):
        models.from_hf(bad)
    # pickle-based weights only
    (bad / "model.safetensors.index.json").unlink()
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(models.CheckpointError, match="safetensors only"):
        models.from_hf(bad)


def test_bfloat16_policies_stay_close_to_float32(tiny_checkpoints):
    path = tiny_checkpoints["gqa"]
    model, params = models.from_hf(path)
    ids, mask = padded_batch(7)
    ref = np.asarray(models.logits(model, params, ids, mask))
    real = mask.astype(bool)
    for dtype, param_dtype in (("bfloat16", "float32"), ("bfloat16", "bfloat16")):
        m16, p16 = models.from_hf(path, dtype=dtype, param_dtype=param_dtype)
        assert jax.tree.leaves(p16)[0].dtype == jnp.dtype(param_dtype)
        got = np.asarray(models.logits(m16, p16, ids, mask))
        # bfloat16 keeps 8 bits of mantissa: agreement to a few percent of the logit scale
        assert np.abs(got[real] - ref[real]).max() < 0.05 * np.abs(ref[real]).max()
        assert np.mean(got[real].argmax(-1) == ref[real].argmax(-1)) > 0.9


@pytest.mark.parametrize("name", ["gqa", "tied_llama3"])
def test_a_frozen_copy_in_the_compute_dtype_gives_the_same_log_probs(tiny_checkpoints, name):
    """float32 master weights, bfloat16 compute: the reference's copy holds bfloat16 weights (the
    output projection excepted) and its log-probs equal the float32 weights' bit for bit."""
    model, params = models.from_hf(tiny_checkpoints[name], dtype="bfloat16", param_dtype="float32")
    ref = models.frozen_copy(model.config, params)
    flat = jax.tree_util.tree_flatten_with_path(ref)[0]
    kept = [jax.tree_util.keystr(k) for k, x in flat if x.dtype == jnp.float32]
    tied = model.config.tie_word_embeddings
    assert kept == (["['embed_tokens']['embedding']"] if tied else ["['lm_head']"])
    assert sum(x.nbytes for _, x in flat) < 0.75 * sum(x.nbytes for x in jax.tree.leaves(params))
    ids, mask = padded_batch(5)
    a, b = (models.token_logps(model, p, ids, mask, mask, chunk_size=8)["token_logps"] for p in (params, ref))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dtypes_are_taken_as_jax_users_write_them(tiny_checkpoints, tmp_path):
    """from_hf(path, dtype=jnp.bfloat16) is from_hf(path, dtype="bfloat16"); to_hf and LlamaConfig
    take np / jnp dtypes too; anything else is named."""
    path = tiny_checkpoints["gqa"]
    by_name = models.from_hf(path, dtype="bfloat16")
    for dtype in (jnp.bfloat16, np.dtype(jnp.bfloat16)):
        model, params = models.from_hf(path, dtype=dtype, param_dtype=np.float32)
        assert model.config == by_name[0].config and model.config.dtype == "bfloat16"
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(by_name[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    models.to_hf(model, params, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(models.CheckpointError, match="dtype <class 'jax.numpy.int32'>: use one of"):
        models.from_hf(path, dtype=jnp.int32)


def test_remat_policies_give_the_same_gradients(tiny_checkpoints):
    path = tiny_checkpoints["bias_mha"]
    ids, mask = padded_batch(8)
    grads = {}
    for policy in ("none", "full", "dots"):
        model, params = models.from_hf(path, remat_policy=policy)

        def loss(p, model=model):
            return models.token_logps(model, p, ids, mask, mask, chunk_size=8)["logps"].sum()

        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in ("full", "dots"):
        # recomputation reorders float32 sums: equal to ~1e-5 of gradients of order 1
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_profs_edit_equals_numpy_on_transformers_hidden_states(tmp_path, tiny_tokenizer):
    """ProFS (apo_jax.train.edit): the projector from transformers' own layer outputs, written out in
    numpy; only the edited layer's MLP output projection changes, and it no longer writes along the
    removed directions."""
    import helpers
    import torch
    import transformers

    from apo_jax.data.tfrecords import read_records
    from apo_jax.train.edit import edit_checkpoint

    src = helpers.tiny_hf_llama(tmp_path / "m", num_hidden_layers=3, seed=5, tokenizer=tiny_tokenizer)
    data = tiny.tiny_preference_records(tmp_path / "pairs", tiny_tokenizer, n=12, max_length=64)
    edit_checkpoint(src, data, tmp_path / "edited", layers="1:2", rank=2)

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    records, _ = read_records(data)
    emb = {"chosen": [], "rejected": []}
    for r in records:
        for side in emb:
            ids = np.concatenate([r["prompt_ids"], r[f"{side}_ids"]])
            with torch.no_grad():
                states = hf(torch.tensor(ids[None]), output_hidden_states=True).hidden_states
            layer1 = states[2][0].double().numpy()  # the output of layer 1 (states[0]: the embeddings)
            emb[side].append(layer1[len(r["prompt_ids"]) :].mean(0))  # mean over the answer's tokens
    plus, minus = np.stack(emb["chosen"]), np.stack(emb["rejected"])
    p = (plus - minus) / 2
    mu = np.linalg.svd(plus)[2][0]
    p = p @ (np.eye(len(mu)) - np.outer(mu, mu))
    v = np.linalg.svd(p)[2][:2]
    w = hf.model.layers[1].mlp.down_proj.weight.detach().double().numpy()  # [D, F]: y = W x
    expected = (np.eye(len(mu)) - v.T @ v) @ w

    edited = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    got = dict(edited.named_parameters())
    np.testing.assert_allclose(
        got["model.layers.1.mlp.down_proj.weight"].detach().numpy(), expected, atol=2e-5
    )
    assert np.abs(v @ got["model.layers.1.mlp.down_proj.weight"].detach().double().numpy()).max() < 2e-5
    for name, before in hf.named_parameters():
        if name != "model.layers.1.mlp.down_proj.weight":
            np.testing.assert_array_equal(got[name].detach().numpy(), before.detach().numpy(), err_msg=name)

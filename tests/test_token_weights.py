"""Token weights (TIS-DPO, Mask-DPO, D²PO) and the token-level train step, against torch and numpy."""

from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pytest
import torch
import transformers
from conftest import first_step

from apo_jax import losses, models, train
from apo_jax.data import layouts, tiny, token_weights
from apo_jax.data.tfrecords import read_records, rewrite_records


@pytest.fixture(scope="module")
def pair_models(tmp_path_factory, tiny_tokenizer):
    """Two tiny HF Llamas of one shape (π⁺, π⁻ for TIS; policy, reference for the step) and records."""
    root = tmp_path_factory.mktemp("tw")
    dirs = [
        helpers.tiny_hf_llama(
            root / f"m{i}", vocab_size=len(tiny_tokenizer), seed=10 + i, tokenizer=tiny_tokenizer
        )
        for i in range(2)
    ]
    recs = tiny.tiny_preference_records(root / "records", tiny_tokenizer, n=16, max_length=48, seed=5)
    return dirs, recs


def _torch_log_softmax(model_dir, batch, side):
    """[b, T, V] log p(· | tokens <= t) from transformers' PyTorch Llama."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = batch[f"{side}_input_ids"].astype(np.int64)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(batch[f"{side}_attention_mask"]))
    return torch.log_softmax(logits.logits.double(), -1).numpy()


def _torch_token_logps(model_dir, batch, side):
    """[b, T] log p(token t | tokens < t) from transformers' PyTorch Llama (0 at t = 0)."""
    ids = batch[f"{side}_input_ids"].astype(np.int64)
    logp = _torch_log_softmax(model_dir, batch, side)
    out = np.zeros(ids.shape, np.float64)
    out[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return out


def test_tis_weights_equal_the_formula_on_torch_log_probs(tmp_path, pair_models):
    (plus, minus), recs = pair_models
    out = token_weights.add_weights(
        recs, tmp_path / "tis", method="tis", plus_model=plus, minus_model=minus, lower=-0.2, upper=0.3, k=1.5
    )
    got, meta = read_records(out)
    assert meta["token_weights"]["method"] == "tis" and "chosen_weights" in meta["fields"]
    batch = layouts.padded(got, 48)
    for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
        d = _torch_token_logps(plus, batch, side) - _torch_token_logps(minus, batch, side)
        expected = 1.5 * np.exp(mu * np.clip(d, -0.2, 0.3))
        mask = batch[f"{side}_loss_mask"] > 0
        np.testing.assert_allclose(batch[f"{side}_weights"][mask], expected[mask], rtol=2e-5)
        assert np.all(batch[f"{side}_weights"][~mask] == 0)
        # clipping is active on some tokens: the test exercises both bounds
        assert np.any(d[mask] < -0.2) and np.any(d[mask] > 0.3)


def test_tis_code_transforms_on_hand_worked_scores():
    """The TIS-DPO code's transforms (preference_datasets.py), worked by hand on d = log π⁺ − log π⁻;
    a chosen answer's score is d, a rejected answer's −d, rounded to 2 decimals first."""
    d = [0.3, -1.234, 0.3, 2.0, 0.0]

    def w(transform, chosen=True, **kw):
        return token_weights.tis_weights(d, chosen=chosen, transform=transform, **kw).tolist()

    assert w("origin") == pytest.approx([0.3, -1.23, 0.3, 2.0, 0.0])
    assert w("origin", chosen=False) == pytest.approx([-0.3, 1.23, -0.3, -2.0, 0.0])
    # top 50% of 5 = 2 places: 2.0 (1st) and 0.3 (2nd), but the tied 0.3 also sits 3rd, which wins
    assert w("binary", top_percent=50) == [0, 0, 0, 1, 0]
    assert w("binary") == [1, 1, 1, 1, 1]  # the code's default, top 100%
    assert w("threshold") == pytest.approx([0.3, -1.0, 0.3, 1.0, 0.0])
    # clip to ±1.5, then 0.7 + (x + 1.5)·0.6/3
    assert w("threshold_and_scale") == pytest.approx([1.06, 0.754, 1.06, 1.3, 1.0])
    # ascending ranks 0..4 over [0.7, 1.3]: -1.23 → 0, 0.0 → 1, the two 0.3 → 2, 3 (first first), 2.0 → 4
    assert w("rank_based") == pytest.approx([1.0, 0.7, 1.15, 1.3, 0.85])
    assert w("rank_based", chosen=False) == pytest.approx([0.85, 1.3, 1.0, 0.7, 1.15])  # -2 < -.3 ≤ -.3 < 0
    r = w("random", rng=np.random.default_rng(1))
    assert all(0.7 <= x <= 1.3 for x in r) and r == w("random", rng=np.random.default_rng(1))
    assert w("exp", lower=-0.5, upper=0.5, k=2.0) == pytest.approx(2 * np.exp(np.clip(d, -0.5, 0.5)))


def test_tis_rank_based_weights_from_the_two_models(tmp_path, pair_models):
    """`--transform rank_based` from the command line: each answer's weights are its ranks of
    μ·round(d, 2), d from transformers' log-probs of the two models, spread over [0.7, 1.3]."""
    (plus, minus), recs = pair_models
    out = tmp_path / "tis_rank"
    assert (
        token_weights.main(
            [
                "--records",
                str(recs),
                "--output",
                str(out),
                "--method",
                "tis",
                "--plus-model",
                str(plus),
                "--minus-model",
                str(minus),
                "--transform",
                "rank_based",
            ]
        )
        == 0
    )
    got, meta = read_records(out)
    assert meta["token_weights"]["transform"] == "rank_based"
    batch = layouts.padded(got, 48)
    for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
        d = _torch_token_logps(plus, batch, side) - _torch_token_logps(minus, batch, side)
        for row in range(len(got)):
            mask = batch[f"{side}_loss_mask"][row] > 0
            score = mu * np.array([round(float(x), 2) for x in d[row][mask]])  # the code's round(weight, 2)
            ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable")
            n = len(score)
            expected = 0.7 + ranks / (n - 1) * 0.6 if n > 1 else [1.0]  # the code gives one token 1.0
            np.testing.assert_allclose(batch[f"{side}_weights"][row][mask], expected, rtol=1e-5)


def test_mask_dpo_weights_follow_the_sentence_labels(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        {
            "prompt": "Compute 7 + 5 - 9.",
            "chosen": "7 + 5 = 12\n12 - 9 = 3\nAnswer: 3",
            "rejected": "7 + 5 = 12\n12 - 9 = 4\nAnswer: 4",
            "chosen_labels": [1, 1, 1],
            "rejected_labels": [1, 0, 0],
        }
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from apo_jax.data.preprocess import preprocess

    preprocess(str(pairs), tmp_path / "rec", tok, max_length=96)
    out = token_weights.add_weights(
        tmp_path / "rec", tmp_path / "mask", method="mask", pairs=pairs, tokenizer=tok
    )
    (r,), _ = read_records(out)
    assert np.all(r["chosen_weights"] == 1)  # every sentence of the chosen answer is right
    dropped = [int(t) for t, w in zip(r["rejected_ids"], r["rejected_weights"], strict=True) if w == 0]
    assert tok.decode(dropped).replace(" ", "") == "7+5=12"  # the rejected answer's one right line
    kept = [int(t) for t, w in zip(r["rejected_ids"], r["rejected_weights"], strict=True) if w == 1]
    assert "12-9=4" in tok.decode(kept).replace(" ", "") and "Answer:4" in tok.decode(kept).replace(" ", "")
    rows[0]["rejected_labels"] = [1, 0]
    pairs.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl: row 0 \(rejected\): 2 sentence labels.*3 sentences"):
        token_weights.add_weights(tmp_path / "rec", tmp_path / "x", method="mask", pairs=pairs, tokenizer=tok)


def _metaspace_tokenizer(corpus):
    """A SentencePiece-style (Llama 2) tokenizer: ▁ for spaces, a decoder that strips the first one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False)
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_token_ends_equal_the_lengths_of_every_decoded_prefix(kind, tiny_tokenizer, monkeypatch):
    """Mask-DPO's token -> character map, decoded incrementally (2 decodes a token, not a prefix
    each), against decoding each prefix whole; a token inside a multi-byte character ends where the
    character does."""
    text = "Café au lait: 3€.\n  Two  spaces, then naïve → résumé!\nAnswer: 42"
    tok = tiny_tokenizer if kind == "byte_level" else _metaspace_tokenizer([text, text.upper()])
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prefixes = [tok.decode(ids[: j + 1], skip_special_tokens=True) for j in range(len(ids))]
    expected = []
    for j in range(len(ids)):
        k = j
        while prefixes[k].endswith("\ufffd"):  # inside a character: its end
            k += 1
        expected.append(len(prefixes[k]))
    calls, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    assert token_weights.token_ends(ids, tok) == expected
    assert len(calls) == 2 * len(ids) + 1  # the incremental path, not the quadratic fallback
    assert prefixes[-1] == text  # both tokenizers give the text back
    if kind == "byte_level":
        assert any(p.endswith("\ufffd") for p in prefixes)  # € and → span several byte tokens


def _weighted_batch(pair_models, seed):
    """The records with random token weights in [0, 2), padded; the policy and the reference."""
    (pol_dir, ref_dir), recs = pair_models
    records, _ = read_records(recs)
    rng = np.random.default_rng(seed)
    for r in records:
        r["chosen_weights"] = rng.uniform(0, 2, len(r["chosen_ids"])).astype(np.float32)
        r["rejected_weights"] = rng.uniform(0, 2, len(r["rejected_ids"])).astype(np.float32)
    model, params = models.from_hf(pol_dir)
    _, ref_params = models.from_hf(ref_dir)
    return layouts.padded(records, 48), model, params, ref_params


def test_token_level_step_equals_the_weighted_formula_on_torch_log_probs(pair_models):
    from apo_jax.train.step import StepConfig, preference_loss

    (pol_dir, ref_dir), _ = pair_models
    batch, model, params, ref_params = _weighted_batch(pair_models, seed=0)
    loss = losses.build("tis_dpo", beta=0.3)
    value, (metrics, _) = preference_loss(model, loss, StepConfig(), params, ref_params, None, batch)
    rho = {}
    for side in ("chosen", "rejected"):
        w = batch[f"{side}_weights"] * batch[f"{side}_loss_mask"]
        diff = _torch_token_logps(pol_dir, batch, side) - _torch_token_logps(ref_dir, batch, side)
        rho[side] = (w * diff).sum(-1)
    expected = np.mean(np.logaddexp(0.0, -0.3 * (rho["chosen"] - rho["rejected"])))
    assert float(value) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["rewards/margins"]) == pytest.approx(
        0.3 * np.mean(rho["chosen"] - rho["rejected"]), rel=1e-4, abs=1e-5
    )


@pytest.mark.parametrize("name", ["tdpo", "tis_dpo_kl"])
def test_kl_losses_in_the_step_equal_their_formulas_on_torch_logits(pair_models, name):
    """TDPO2 and TIS-DPO's token-level variant: the step's loss, rewards and KL metrics (and the eval
    step's held-out KLs) against the official codes' formulas on transformers' full-vocabulary
    distributions of policy and reference."""
    import optax

    from apo_jax.train.state import create_state
    from apo_jax.train.step import StepConfig, make_eval_step, preference_loss

    (pol_dir, ref_dir), _ = pair_models
    batch, model, params, ref_params = _weighted_batch(pair_models, seed=3)
    beta, alpha = 0.3, 0.7
    loss, cfg = losses.build(name, alpha=alpha, beta=beta), StepConfig(chunk_size=16)
    value, (metrics, _) = preference_loss(model, loss, cfg, params, ref_params, None, batch)
    rho, kl, plain_kl = {}, {}, {}
    for side in ("chosen", "rejected"):
        mask = batch[f"{side}_loss_mask"][:, 1:].astype(np.float64)
        w = mask * batch[f"{side}_weights"][:, 1:] if name == "tis_dpo_kl" else mask
        lp, lr = (_torch_log_softmax(d, batch, side)[:, :-1] for d in (pol_dir, ref_dir))
        ids = batch[f"{side}_input_ids"][:, 1:, None].astype(np.int64)
        diff = np.take_along_axis(lp, ids, -1)[..., 0] - np.take_along_axis(lr, ids, -1)[..., 0]
        a, b = (lr, lp) if name == "tdpo" else (lp, lr)  # KL(π_ref ‖ π) for TDPO, KL(π ‖ π_ref) for TIS
        rho[side] = (w * diff).sum(-1)
        kl[side] = (w * (np.exp(a) * (a - b)).sum(-1)).sum(-1)
        plain_kl[side] = (mask * (np.exp(a) * (a - b)).sum(-1)).sum(-1)
    if name == "tdpo":
        z = rho["chosen"] - rho["rejected"] + alpha * (kl["chosen"] - kl["rejected"])
        reward = {s: beta * (rho[s] + kl[s]) for s in rho}
    else:
        z = rho["chosen"] - rho["rejected"] - alpha * (kl["chosen"] - kl["rejected"])
        reward = {s: beta * (rho[s] - kl[s]) for s in rho}
    assert float(value) == pytest.approx(np.mean(np.logaddexp(0.0, -beta * z)), rel=1e-4)
    for side in ("chosen", "rejected"):
        assert float(metrics[f"rewards/{side}"]) == pytest.approx(np.mean(reward[side]), rel=1e-4, abs=1e-6)
        assert float(metrics[f"kl/{side}"]) == pytest.approx(np.mean(kl[side]), rel=1e-4, abs=1e-7)
    assert np.all(kl["chosen"] > 0) and abs(np.mean(kl["chosen"] - kl["rejected"])) > 1e-3  # the term acts
    # held out: each side's summed KL (unweighted), from the eval step's joint pass
    state = create_state(params, optax.identity(), seed=0, ref_params=ref_params)
    ev = make_eval_step(model, loss, cfg)(state, batch)
    for side in ("chosen", "rejected"):
        assert float(ev[f"eval/kl/{side}"]) == pytest.approx(np.mean(plain_kl[side]), rel=1e-4)
        # held-out rewards as the loss defines them (TDPO's include the KL), not a generic β·(π − π_ref)
        assert float(ev[f"eval/rewards/{side}"]) == pytest.approx(np.mean(reward[side]), rel=1e-4, abs=1e-6)
    assert float(ev["eval/loss"]) == pytest.approx(np.mean(np.logaddexp(0.0, -beta * z)), rel=1e-4)


def test_trainer_feeds_token_weights_from_the_records(tmp_path, pair_models):
    """Weights of 2 on every token make token-weighted DPO at β equal DPO at 2β: the records' weights
    reach the loss through the reader, the layout and the step."""
    _, recs = pair_models
    records, meta = read_records(recs)
    sides = ("chosen", "rejected")
    doubled = [
        dict(r, **{f"{s}_weights": np.full(len(r[f"{s}_ids"]), 2.0, np.float32) for s in sides})
        for r in records
    ]
    weighted = rewrite_records(doubled, meta, tmp_path / "doubled", {}, tool="tests")
    runs = {}
    for name, data, beta in (("tis_dpo", weighted, 0.25), ("sigmoid", recs, 0.5)):
        cfg = train.default_config()
        cfg.workdir, cfg.model.preset, cfg.data.train = str(tmp_path / name), "tiny", str(data)
        cfg.loss.name, cfg.loss.beta = name, beta
        cfg.optimizer.lr, cfg.optimizer.schedule = 1e-3, "constant"
        cfg.train.steps, cfg.train.batch_size, cfg.train.progress, cfg.train.export_hf = 3, 4, False, False
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
        train.run(cfg)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert first_step(tmp_path / "tis_dpo")["loss"] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_allclose(runs["tis_dpo"], runs["sigmoid"], rtol=2e-5)
    assert runs["sigmoid"][-1] < runs["sigmoid"][0]


def test_tdpo_trains_sharded_from_zero_kl(tmp_path, pair_models):
    """TDPO on a data × fsdp × tensor mesh: at step 0 the policy is the reference, so every KL and
    margin is 0 and the loss is log 2; training then moves the policy away (KL > 0) and lowers it."""
    _, recs = pair_models
    cfg = train.default_config()
    cfg.workdir, cfg.model.preset, cfg.data.train = str(tmp_path / "tdpo"), "tiny", str(recs)
    cfg.loss.name, cfg.loss.beta = "tdpo", 0.5
    cfg.optimizer.lr, cfg.optimizer.schedule = 3e-3, "constant"
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress, cfg.train.export_hf = 4, 4, False, False
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    train.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "tdpo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["kl/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl/rejected"] > 1e-4 and rows[-1]["loss"] < rows[0]["loss"]

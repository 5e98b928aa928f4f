"""apo_jax.eval: CHES against a numpy computation on transformers' own hidden states."""

from __future__ import annotations

import numpy as np
import pytest


def test_ches_equals_numpy_on_transformers_hidden_states(tiny_checkpoints, tiny_tokenizer):
    import torch
    import transformers

    from apo_jax import data
    from apo_jax.data.ches import ches_scores
    from apo_jax.data.formats import Pair

    pairs = [
        Pair("Compute 7 + 5.", "7 + 5 = 12", "7 + 5 = 13"),
        Pair("Name a colour.", "Blue, the colour of the sky.", "A dog."),
        Pair("Say hi.", "hi", "Hello there, how are you today?"),
    ]
    records = []
    for p in pairs:
        t = data.tokenize_example(tiny_tokenizer, p)
        records.append(
            {
                "prompt_ids": np.asarray(t.prompt_ids),
                "chosen_ids": np.asarray(t.chosen_ids),
                "rejected_ids": np.asarray(t.rejected_ids),
            }
        )
    path = tiny_checkpoints["gqa"]
    ours = ches_scores(path, records, batch_size=2)
    ours_mean = ches_scores(path, records, batch_size=2, normalized=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected, expected_mean = [], []
    for r in records:
        P = len(r["prompt_ids"])
        sums = {}
        for side in ("chosen", "rejected"):
            ids = np.concatenate([r["prompt_ids"], r[f"{side}_ids"]])
            with torch.no_grad():
                h = hf.model(torch.tensor(ids[None])).last_hidden_state[0].double().numpy()
            # the last prompt token through the answer's second-to-last token: |answer| vectors
            rows = h[P - 1 : len(ids) - 1]
            assert len(rows) == len(r[f"{side}_ids"])
            sums[side] = (rows.sum(0), rows.mean(0))
        for k, out in ((0, expected), (1, expected_mean)):
            s_plus, s_minus = sums["chosen"][k], sums["rejected"][k]
            out.append(s_plus @ s_minus - s_plus @ s_plus)
    np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=1e-3)
    np.testing.assert_allclose(ours_mean, expected_mean, rtol=2e-4, atol=1e-5)
    # a pair whose answers are the same scores 0: <S, S> - ||S||²
    same = dict(records[0], rejected_ids=records[0]["chosen_ids"])
    assert ches_scores(path, [same], batch_size=1)[0] == pytest.approx(0.0, abs=1e-3)


def test_clair_stats_reports_ches_under_a_model(tmp_path, tiny_checkpoints, tiny_tokenizer, capsys):
    import json

    from apo_jax import data
    from apo_jax.data.ches import ches_scores
    from apo_jax.data.clair.__main__ import main
    from apo_jax.data.formats import as_chat, normalize_pair

    rows = [
        {"prompt": "Compute 7 + 5.", "chosen": "7 + 5 = 12", "rejected": "7 + 5 = 13"},
        {"prompt": "Say hi.", "chosen": "hi", "rejected": "Hello there."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Red."},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tiny_checkpoints["gqa"]
    out = tmp_path / "s.json"
    assert main(["stats", "--input", str(src), "--model", str(path), "--as-chat", "--json", str(out)]) == 0
    assert "ches_median" in capsys.readouterr().out
    got = json.loads(out.read_text())["pairs"]
    records = []
    for i, r in enumerate(rows):
        t = data.tokenize_example(tiny_tokenizer, as_chat(normalize_pair(r, i)))
        records.append(
            {
                "prompt_ids": np.asarray(t.prompt_ids),
                "chosen_ids": np.asarray(t.chosen_ids),
                "rejected_ids": np.asarray(t.rejected_ids),
            }
        )
    assert got["ches_median"] == pytest.approx(float(np.median(ches_scores(path, records))), rel=1e-5)
    # hand-worked Jaccard: {7, +, 5, =} shared of 6 distinct words; the other two pairs share none
    assert got["jaccard_mean"] == pytest.approx((4 / 6 + 0 + 0) / 3)


def test_preprocess_leaves_out_the_highest_ches_pairs(tmp_path, tiny_checkpoints, tiny_tokenizer):
    from apo_jax.data import preprocess, tiny
    from apo_jax.data.ches import ches_scores
    from apo_jax.data.tfrecords import read_records

    path = tiny_checkpoints["gqa"]
    full = tiny.tiny_preference_records(tmp_path / "full", tiny_tokenizer, n=16, max_length=64)
    records, _ = read_records(full)
    scores = ches_scores(path, records)
    src = str(tmp_path / "full.jsonl")  # the rows tiny_preference_records wrote beside its records
    meta = preprocess.preprocess(
        src, tmp_path / "kept", tiny_tokenizer, max_length=64, ches_model=str(path), ches_drop=0.25
    )
    kept, _ = read_records(tmp_path / "kept")
    highest = {int(records[i]["source_index"]) for i in np.argsort(scores)[-4:]}  # 25% of 16
    assert meta["ches_filter"]["dropped"] == 4 and len(kept) == 12
    assert {int(r["source_index"]) for r in kept} == {int(r["source_index"]) for r in records} - highest
    assert "highest CHES" in preprocess.summary(meta)

"""Preference data: formats, TRL-identical tokenization, TFRecords, the exact reader, layouts."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from apo_jax import data, models
from apo_jax.data import layouts, preprocess
from apo_jax.data.formats import Pair
from apo_jax.data.tfrecords import read_records

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "trl_tokenization.json").read_text())
HYBRID = [json.loads(line) for line in (DATA / "clair_pairs_hybrid_format.jsonl").open()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(source):
    examples, report = data.read_examples(source)
    assert report.skipped == 0, report.errors
    return [e for _, e in examples]


# --- formats -----------------------------------------------------------------------------------


def test_every_layout_normalizes_to_the_same_pairs(tmp_path):
    explicit = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in HYBRID
    ]
    implicit = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in HYBRID]
    reference = [Pair(r["chosen"][:1], r["chosen"][1:], r["rejected"][1:]) for r in HYBRID]
    assert reference[0].prompt[0]["role"] == "user" and reference[0].chosen[0]["role"] == "assistant"
    assert _pairs(DATA / "clair_pairs_hybrid_format.jsonl") == reference  # the hybrid layout
    assert _pairs(_write_jsonl(tmp_path / "explicit.jsonl", explicit)) == reference
    assert _pairs(_write_jsonl(tmp_path / "implicit.jsonl", implicit)) == reference
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(HYBRID), tmp_path / "hybrid.parquet")
    assert _pairs(tmp_path / "hybrid.parquet") == reference
    datasets.Dataset.from_list(HYBRID).save_to_disk(str(tmp_path / "saved"))
    assert _pairs(tmp_path / "saved") == reference
    (tmp_path / "hub_like").mkdir()
    _write_jsonl(tmp_path / "hub_like" / "train.jsonl", HYBRID)  # a dataset repo directory
    assert _pairs(tmp_path / "hub_like") == reference


def test_standard_rows_and_extras():
    pair = data.normalize_pair(
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "is_tie": 1, "score": 0.5}, 0
    )
    assert pair == Pair("Q: 2+2?", " 4", " 5", {"is_tie": True, "score": 0.5})
    implicit = data.normalize_pair({"chosen": "Q: sky? It is blue.", "rejected": "Q: sky? It is green."}, 3)
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == ("Q: sky? It is", " blue.", " green.")
    mixed = data.normalize_pair(
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}, 1
    )
    assert mixed.chosen == [{"role": "assistant", "content": "a"}] and mixed.conversational


def test_malformed_rows_are_reported_with_index_and_field(tmp_path):
    good = HYBRID[0]
    rows = [
        good,
        {"prompt": "x", "chosen": "y"},  # 1: no rejected
        {**good, "chosen": [{"role": "user", "content": "another prompt"}, good["chosen"][1]]},  # 2
        {**good, "rejected": [{"role": "assistant"}]},  # 3: message without content
        {**good, "timestamp": "yesterday"},  # 4
        good,
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")  # 6
    examples, report = data.read_examples(path)
    assert [i for i, _ in examples] == [0, 5]
    assert report.rows == 7 and report.skipped == 5
    expected = [
        "row 1, field 'rejected': missing",
        "row 2, field 'chosen': the conversation's user turn does not repeat the prompt string",
        "row 3, field 'rejected'",
        "row 4, field 'timestamp': expected a number",
        "row 6, field '<row>'",
    ]
    for message, fragment in zip(report.errors, expected, strict=True):
        assert fragment in message and str(path) in message


# --- tokenization ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["conversational", "standard"])
def test_tokenization_equals_trl(tiny_tokenizer, layout):
    from apo_jax.data.tokenize import tokenizer_fingerprint

    assert tokenizer_fingerprint(tiny_tokenizer) == GOLDEN["tokenizer_fingerprint"]
    case = GOLDEN["cases"][layout]
    # the conversational case starts from the raw hybrid rows: our normalization + tokenization
    rows = (
        HYBRID
        if layout == "conversational"
        else [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in case["rows"]]
    )
    kept, out = [], {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    padded_rows = []
    for i, row in enumerate(rows):
        t, info = data.truncate(data.tokenize_example(tiny_tokenizer, data.normalize_pair(row, i)), None)
        for key in out:
            out[key].append(getattr(t, key))
        t, info = data.truncate(t, GOLDEN["max_length"])
        if not info.dropped:
            kept.append(i)
            padded_rows.append(
                {"prompt_ids": t.prompt_ids, "chosen_ids": t.chosen_ids, "rejected_ids": t.rejected_ids}
            )
    assert kept == case["kept"]
    for key in out:  # TRL's dataset columns, before the collator truncates
        assert [out[key][i] for i in kept] == case[key]
    batch = layouts.padded(padded_rows, GOLDEN["max_length"])
    for side in ("chosen", "rejected"):
        n = batch[f"{side}_attention_mask"].sum(-1)
        assert [list(batch[f"{side}_input_ids"][j, : n[j]]) for j in range(len(kept))] == case[
            f"{side}_input_ids"
        ]
        assert [list(batch[f"{side}_loss_mask"][j, : n[j]].astype(int)) for j in range(len(kept))] == case[
            f"{side}_loss_mask"
        ]


def test_fixed_date_string_for_templates_that_stamp_today(tiny_tokenizer):
    from apo_jax.data.tokenize import DEFAULT_DATE_STRING, chat_kwargs

    assert chat_kwargs(tiny_tokenizer) == {}
    dated = type(
        "T", (), {"chat_template": "{{ date_string if date_string is defined else strftime_now('%d') }}"}
    )()
    assert chat_kwargs(dated) == {"date_string": DEFAULT_DATE_STRING}


# --- preprocess and read back --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(path)
    return path


def test_preprocess_then_read_round_trips(tmp_path, tokenizer_dir, tiny_tokenizer, capsys):
    rows = [dict(r, is_tie=i % 3 == 0, timestamp=10 + i, score=i / 10) for i, r in enumerate(HYBRID)]
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows + [{"prompt": "broken"}])
    out = tmp_path / "records"
    argv = [
        "--input",
        str(src),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--max-length",
        "512",
    ]
    assert preprocess.main([*argv, "--num-shards", "3"]) == 0
    printed = capsys.readouterr().out
    assert (
        "rows read 11: written 6, skipped (malformed) 1, dropped (prompt alone >= max_length 512) 4"
        in printed
    )
    records, meta = read_records(out)
    assert meta["rows"]["written"] == 6 and len(meta["shards"]) == 3 and meta["kind"] == "paired"
    assert meta["source"]["fingerprint"] == preprocess.source_fingerprint(str(src))
    expected_kept = GOLDEN["cases"]["conversational"]["kept"]
    assert [int(r["source_index"]) for r in records] == expected_kept
    cut = {"chosen": 0, "rejected": 0}
    for r in records:
        i = int(r["source_index"])
        full = data.tokenize_example(tiny_tokenizer, data.normalize_pair(rows[i], i))
        t, _ = data.truncate(full, 512)
        assert list(r["prompt_ids"]) == t.prompt_ids and list(r["chosen_ids"]) == t.chosen_ids
        assert list(r["rejected_ids"]) == t.rejected_ids
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 512
        assert bool(r["is_tie"]) == (i % 3 == 0) and int(r["timestamp"]) == 10 + i
        assert abs(float(r["score"]) - i / 10) < 1e-6
        for side in cut:
            cut[side] += len(full.prompt_ids) + len(getattr(full, f"{side}_ids")) > 512
    assert meta["truncated"] == {"prompt": 0, **cut} and cut["chosen"] > 0
    batch = layouts.padded(records, 512)
    assert batch["timestamps"].dtype == np.int32 and list(batch["timestamps"]) == [
        10 + i for i in expected_kept
    ]


def test_preprocess_unpaired_builds_block_kl_pairs(tmp_path, tokenizer_dir, tiny_tokenizer):
    rows = [
        {"prompt": f"question {i}?", "completion": f" answer {i}.", "label": i % 2 == 0} for i in range(10)
    ]
    meta = preprocess.preprocess(
        str(_write_jsonl(tmp_path / "kto.jsonl", rows)),
        tmp_path / "kto",
        tiny_tokenizer,
        unpaired=True,
        kl_block=4,
    )
    records, _ = read_records(tmp_path / "kto")
    assert meta["kind"] == "unpaired" and len(records) == 10
    for start in (0, 4, 8):
        block = records[start : start + 4]
        for i, r in enumerate(block):
            np.testing.assert_array_equal(
                r["kl_completion_ids"], block[(i + 1) % len(block)]["completion_ids"]
            )
    batch = layouts.build("padded", records[:4], 32)
    assert list(batch["label"]) == [True, False, True, False] and batch["kl_input_ids"].shape == (4, 32)


def test_preprocess_errors_name_the_problem(tmp_path, tokenizer_dir, capsys):
    assert (
        preprocess.main(
            [
                "--input",
                str(tmp_path / "none.jsonl"),
                "--output",
                str(tmp_path / "o"),
                "--tokenizer",
                str(tokenizer_dir),
            ]
        )
        == 2
    )
    assert "none.jsonl" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        read_records(tmp_path)


# --- the reader ----------------------------------------------------------------------------------


def _synthetic_records(n=40, seed=0, V=320):
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(6, V, rng.integers(lo, hi)).astype(np.int32)

    return [
        {"prompt_ids": ids(2, 8), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7), "source_index": i}
        for i in range(n)
    ]


def test_reader_is_deterministic_resumable_and_process_independent():
    records = _synthetic_records()
    kw = {"global_batch_size": 8, "seed": 7, "length": 16}
    a = data.PreferenceReader(records, process_index=0, process_count=1, **kw)
    b = data.PreferenceReader(records, process_index=0, process_count=1, **kw)
    first = [next(a) for _ in range(12)]  # 5 steps per epoch: crosses two epoch boundaries
    for x in first:
        y = next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert a.state_dict() == {"epoch": 2, "row": 16}  # batch 2 of epoch 2: rows 16-23
    # an epoch is a permutation: every record once
    seen = np.concatenate([a.global_indices(0, k) for k in range(a.steps_per_epoch)])
    assert sorted(seen) == list(range(40))
    # restored at (epoch, k), it continues with the same batches
    c = data.PreferenceReader(records, process_index=0, process_count=1, **kw)
    c.load_state_dict({"epoch": 1, "step": 3})  # a cursor saved before cursors counted rows
    for x in first[8:]:
        y = next(c)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # two processes read slices that together are the one-process global batch
    halves = [data.PreferenceReader(records, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for x in first[:6]:
        parts = [next(h) for h in halves]
        for k in x:
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), x[k])


def test_bucketed_rows_are_the_padded_rows_cut_to_the_batch_longest():
    """data.bucket: each global batch is padded to its longest sequence rounded up to the bucket (the
    same length on every process), and its rows are the full-length rows with the padding cut off."""
    records = _synthetic_records()
    kw = {"global_batch_size": 8, "seed": 3, "length": 16, "process_index": 0, "process_count": 1}
    full = data.PreferenceReader(records, **kw)
    cut = data.PreferenceReader(records, bucket=4, **kw)
    halves = [
        data.PreferenceReader(records, bucket=4, **kw | {"process_index": p, "process_count": 2})
        for p in (0, 1)
    ]
    lengths = set()
    for step in range(5):
        rows = full.global_indices(0, step)
        longest = max(
            len(records[i]["prompt_ids"])
            + max(len(records[i]["chosen_ids"]), len(records[i]["rejected_ids"]))
            for i in rows
        )
        want = min(16, (longest + 3) // 4 * 4)
        a, b = full.batch(0, step), cut.batch(0, step)
        for k in b:
            assert b[k].shape[1] == want, k
            np.testing.assert_array_equal(b[k], a[k][:, :want])
            assert not a[k][:, want:].any()  # only padding was cut
        parts = [h.batch(0, step) for h in halves]
        assert {p["chosen_input_ids"].shape[1] for p in parts} == {want}
        lengths.add(want)
    assert len(lengths) > 1  # the synthetic lengths vary across batches
    with pytest.raises(ValueError, match="bucketed row lengths are for the padded layout"):
        data.PreferenceReader(records, bucket=4, layout="packed", **kw)


def test_reader_validates_its_configuration():
    records = _synthetic_records(8)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        data.PreferenceReader(records, global_batch_size=8, length=16, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        data.PreferenceReader(records, global_batch_size=16, length=16, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="unknown batch layout"):
        data.PreferenceReader(
            records, global_batch_size=8, length=16, layout="ragged", process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="more than the layout's row length"):
        layouts.padded(records, 6)


# --- layouts through the model -------------------------------------------------------------------


def test_packed_and_prompt_shared_equal_padded_log_probs(tiny_checkpoints):
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    records = _synthetic_records(6, seed=1)
    logps = jax.jit(
        lambda p, ids, m, lm, seg=None, pos=None, shared=None: models.token_logps(
            model, p, ids, m, lm, seg, pos, shared_segment=shared
        ),
        static_argnames="shared",
    )

    pad = layouts.padded(records, 16)
    expected = {
        side: logps(
            params, pad[f"{side}_input_ids"], pad[f"{side}_attention_mask"], pad[f"{side}_loss_mask"]
        )["logps"]
        for side in ("chosen", "rejected")
    }
    for name, shared in (("packed", None), ("prompt_shared", 1)):
        batch = layouts.build(name, records, 32, rows=4)
        ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        out = logps(params, ids, mask, loss, batch["segment_ids"], batch["positions"], shared=shared)
        for side in ("chosen", "rejected"):
            got = layouts.sequence_logps(
                out["token_logps"], batch["loss_mask"], batch["segment_ids"], batch[f"{side}_index"]
            )
            np.testing.assert_allclose(got, expected[side], rtol=1e-5, atol=1e-4, err_msg=f"{name}/{side}")
    assert layouts.build("packed", records, 32, rows=4)["input_ids"].shape == (
        4,
        32,
    )  # 12 sequences in 4 rows


def test_reference_fingerprint_ties_log_probs_to_weights_and_settings(tiny_checkpoints, tmp_path):
    from apo_jax.data.tfrecords import reference_fingerprint

    kw = {
        "tokenizer_fingerprint": "t",
        "data_fingerprint": "d",
        "max_length": 512,
        "ld_alpha": None,
        "dtype": "float32",
        "granularity": "sequence",
    }
    base = reference_fingerprint(tiny_checkpoints["gqa"], **kw)
    assert base == reference_fingerprint(tiny_checkpoints["gqa"], **kw)
    assert base != reference_fingerprint(tiny_checkpoints["bias_mha"], **kw)  # other weights
    # the same architecture with one weight changed: safetensors headers are identical, and used to
    # be all that was hashed, so another model's log-probs passed as this one's
    other = tmp_path / "one_weight"
    shutil.copytree(tiny_checkpoints["gqa"], other)
    raw = bytearray((other / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01  # the last byte of the last tensor
    (other / "model.safetensors").write_bytes(bytes(raw))
    assert base != reference_fingerprint(other, **kw)
    for key, value in (
        ("max_length", 1024),
        ("ld_alpha", 0.5),
        ("granularity", "token"),
        ("data_fingerprint", "e"),
    ):
        assert base != reference_fingerprint(tiny_checkpoints["gqa"], **(kw | {key: value})), key
    model, params = models.from_hf(tiny_checkpoints["gqa"])
    models.to_hf(model, params, tmp_path / "bf16", dtype="bfloat16")  # same weights, other storage
    assert base != reference_fingerprint(tmp_path / "bf16", **kw)


def test_as_chat_frames_standard_pairs_with_the_template(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Fix: 2+2=5", "chosen": "2+2=4", "rejected": "2+2=5", "reviser_model": "gpt-4"}]
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    preprocess.preprocess(str(src), tmp_path / "chat", tiny_tokenizer, as_chat=True)
    (record,), _ = read_records(tmp_path / "chat")
    conv = Pair(
        [{"role": "user", "content": "Fix: 2+2=5"}],
        [{"role": "assistant", "content": "2+2=4"}],
        [{"role": "assistant", "content": "2+2=5"}],
    )
    t = data.tokenize_example(tiny_tokenizer, conv)
    assert list(record["prompt_ids"]) == t.prompt_ids and list(record["chosen_ids"]) == t.chosen_ids
    assert tiny_tokenizer.decode(record["prompt_ids"]).startswith("<|begin_of_text|><|start_header_id|>user")


def test_step_pairs_split_at_the_first_wrong_step_and_continue_the_turn(tmp_path, tiny_tokenizer):
    from apo_jax.data import steps

    answer, revision = "7 + 5 = 12\n12 - 9 = 4\nAnswer: 4", "7 + 5 = 12\n12 - 9 = 3\nAnswer: 3"
    pair = steps.step_pair("Compute 7 + 5 - 9.", answer, revision)
    # hand-worked: line 0 agrees, line 1 is the first wrong step
    assert pair == {
        "prompt": "Compute 7 + 5 - 9.",
        "prefix": "7 + 5 = 12\n",
        "chosen": "12 - 9 = 3\n",
        "rejected": "12 - 9 = 4\n",
        "ends_turn": False,
    }
    assert steps.step_pair("q", "a\nb", "a\nb") is None and steps.step_pair("q", "a", "a\nb") is None
    last = steps.step_pair("q", "1 + 1 = 2\nAnswer: 3", "1 + 1 = 2\nAnswer: 2")
    assert (last["chosen"], last["rejected"]) == ("Answer: 2", "Answer: 3")  # the final line: no newline
    assert last["ends_turn"]  # ... and the step closes the assistant's turn
    src = _write_jsonl(
        tmp_path / "steps.jsonl",
        steps.step_pairs(
            [{"prompt": "Compute 7 + 5 - 9.", "chosen": revision, "rejected": answer, "source": "m0"}]
        ),
    )
    preprocess.preprocess(str(src), tmp_path / "records", tiny_tokenizer, as_chat=True)
    (record,), _ = read_records(tmp_path / "records")
    # the prompt is the chat template's generation prompt (tokenized by the template itself) + the prefix
    user = [{"role": "user", "content": "Compute 7 + 5 - 9."}]
    head = tiny_tokenizer.apply_chat_template(
        user, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    prompt = list(record["prompt_ids"])
    assert prompt[: len(head["input_ids"])] == list(head["input_ids"])
    assert tiny_tokenizer.decode(prompt[len(head["input_ids"]) :]) == "7 + 5 = 12\n"
    # each answer is the step alone, continuing the turn: no end-of-turn or EOS token
    assert tiny_tokenizer.decode(record["chosen_ids"]) == "12 - 9 = 3\n"
    assert tiny_tokenizer.decode(record["rejected_ids"]) == "12 - 9 = 4\n"
    ends = {tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    assert not ends & (set(record["chosen_ids"]) | set(record["rejected_ids"]))
    with pytest.raises(ValueError, match="row 0, field 'prefix'"):
        data.formats.normalize_pair({"prompt": "q", "prefix": 3, "chosen": "a", "rejected": "b"}, 0)
    with pytest.raises(ValueError, match="row 0, field 'ends_turn'"):
        data.formats.normalize_pair(
            {"prompt": "q", "prefix": "p", "chosen": "a", "rejected": "b", "ends_turn": 1}, 0
        )
    # a last step ends the turn: the answer's tokens are those of the whole templated conversation
    src = _write_jsonl(tmp_path / "last.jsonl", [dict(last, prompt="Compute 1 + 1.")])
    preprocess.preprocess(str(src), tmp_path / "last", tiny_tokenizer, as_chat=True)
    (record,), _ = read_records(tmp_path / "last")
    chat = [
        {"role": "user", "content": "Compute 1 + 1."},
        {"role": "assistant", "content": "1 + 1 = 2\nAnswer: 2"},
    ]
    whole = tiny_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert list(record["prompt_ids"]) + list(record["chosen_ids"]) == list(whole)
    assert record["chosen_ids"][-1] in ends
    assert tiny_tokenizer.decode(record["chosen_ids"][:-1]) == "Answer: 2"


def test_scdpo_negatives_keep_the_right_steps_before_the_chosen_step(tmp_path, tiny_tokenizer):
    """Step-Controlled DPO: the sampler continues each right solution after its first k lines at a rising
    temperature; the negatives are wrong answers whose first k steps are the solution's (the
    miniature's line-by-line scorer checks them), and chosen is the solution's own rest."""
    import random

    import helpers

    from apo_jax.data import generate, steps
    from experiments.mini import task

    model_dir = helpers.tiny_hf_llama(
        tmp_path / "m", vocab_size=len(tiny_tokenizer), seed=2, tokenizer=tiny_tokenizer
    )
    problems = task.problems(12, seed=1)
    solutions = [
        {"prompt": p["prompt"], "response": task.gold_answer(p), "index": i} for i, p in enumerate(problems)
    ]
    starts = steps.scdpo_starts(solutions, random.Random(0))
    assert len({s["step"] for s in starts}) > 1  # different cut points
    rows = [{"prompt": s["prompt"], "prefix": s["prefix"], "start": j} for j, s in enumerate(starts)]
    out = tmp_path / "continuations.jsonl"
    generate.generate_with_model(
        rows,
        out,
        model_dir,
        samples=2,
        max_tokens=12,
        batch_size=8,
        progress=False,
        **steps.SCDPO_TEMPERATURE,
    )
    continuations = [json.loads(x) for x in out.read_text().splitlines()]
    for row in rows:  # the sampler's prompt is the chat prompt followed by the kept steps
        ids = generate.prompt_ids(tiny_tokenizer, row, {})
        head = generate.prompt_ids(tiny_tokenizer, {"prompt": row["prompt"]}, {})
        assert ids[: len(head)] == head and tiny_tokenizer.decode(ids[len(head) :]) == row["prefix"]
    pairs = steps.scdpo_pairs(starts, continuations, lambda s, t: task.is_correct(problems[s["index"]], t))
    assert len(pairs) >= 6 and all(p["ends_turn"] for p in pairs)  # continuations finish the answer
    for pair in pairs:
        problem, k = problems[pair["index"]], pair["step"]
        gold = task.gold_answer(problem).split("\n")
        assert pair["prefix"] == "".join(x + "\n" for x in gold[:k]) and pair["chosen"] == "\n".join(gold[k:])
        whole = pair["prefix"] + pair["rejected"]
        assert not task.is_correct(problem, whole)
        assert all(task.line_labels(problem, whole)[:k])  # right before step k


def test_anchor_pairs_follow_the_rule_of_each_category():
    from apo_jax.data.anchor import anchor_pairs, category

    rows = [
        # always right: best-scored over worst-scored
        {
            "prompt": "a",
            "responses": ["a1", "a2", "a3"],
            "correct": [True, True, True],
            "scores": [2.0, 9.0, 1.0],
        },
        # sometimes right: the first right answer over the first wrong one
        {"prompt": "b", "responses": ["b1", "b2", "b3"], "correct": [False, True, False]},
        # never right: the anchor (gold) over a wrong answer
        {"prompt": "c", "responses": ["c1", "c2"], "correct": [False, False], "anchor": "gold c"},
        # always right, all scored alike: nothing to prefer; never right without an anchor: nothing
        {"prompt": "d", "responses": ["d1", "d2"], "correct": [True, True], "scores": [5.0, 5.0]},
        {"prompt": "e", "responses": ["e1"], "correct": [False]},
    ]
    assert anchor_pairs(rows) == [
        {"prompt": "a", "chosen": "a2", "rejected": "a3", "category": "consistently_correct"},
        {"prompt": "b", "chosen": "b2", "rejected": "b1", "category": "variable"},
        {"prompt": "c", "chosen": "gold c", "rejected": "c1", "category": "consistently_wrong"},
    ]
    assert category([True, False]) == "variable"
    with pytest.raises(ValueError, match="differ in length"):
        anchor_pairs([{"prompt": "x", "responses": ["1", "2"], "correct": [True]}])

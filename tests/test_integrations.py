"""The tools researchers already use: experiment trackers (W&B offline), lm-evaluation-harness,
answer files for AlpacaEval and MT-Bench, an inference server for the online loop's samples."""

from __future__ import annotations

import json
import pathlib
import struct

import lm_eval
import numpy as np
import transformers
from conftest import SigtermAt
from helpers import make_config
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from apo_jax import loopback, train
from apo_jax.eval import answers, judge
from apo_jax.eval.harness import ApoJaxLM


def wandb_history(run_dir: pathlib.Path) -> tuple[str, list[dict], dict]:
    """(run id, the logged rows, the config) of an offline W&B run, read from its transaction log:
    LevelDB-style 32 KiB blocks of records (checksum, length, type: full / first / middle / last),
    each a `wandb_internal_pb2.Record` protobuf, after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    data, pos, block = log.read_bytes(), 7, 32768
    assert data[:4] == b":W&B"
    payloads, partial = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind in (2, 3):
            partial = chunk if kind == 2 else partial + chunk
        elif kind == 4:
            payloads.append(partial + chunk)
    rows, run_id, config = [], None, {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        which = record.WhichOneof("record_type")
        if which == "run":
            run_id = record.run.run_id
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif which == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif which == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return run_id, rows, config


def test_wandb_and_trackio_get_the_jsonl_metrics_and_a_resume_continues_their_runs(
    tmp_path, records, monkeypatch
):
    """train.trackers = ("jsonl", "wandb", "trackio"), W&B in its offline mode: the run's W&B files
    and Trackio's database hold the same metrics at the same steps as metrics.jsonl, with the
    resolved config; SIGTERM, then the same command: the resumed run logs under the same W&B run id
    (and the same Trackio run), from the step after its checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    cfg = make_config(tmp_path / "run", records, train__steps=6, train__checkpoint_every=2)
    cfg.train.trackers = ("jsonl", "wandb", "trackio")
    cfg.train.wandb_project = "apo_jax_test"
    cfg.train.eval_every = 0
    with SigtermAt(3):
        assert train.run(cfg)["status"] == "preempted"
    assert train.run(cfg)["status"] == "done"
    jsonl = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    id1, rows1, _ = wandb_history(first)
    id2, rows2, config = wandb_history(second)
    assert id1 == id2 == json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]
    k = len(rows1)  # the stop saved step k; the resumed run logs k + 1 onwards
    assert 0 < k < 6 and [r["step"] for r in rows1 + rows2] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4, 5, 6]
    for row, logged in zip(jsonl, rows1 + rows2, strict=True):
        assert logged == row
    assert config["loss"]["name"] == "apo_zero" and config["train"]["trackers"] == [
        "jsonl",
        "wandb",
        "trackio",
    ]
    # Trackio: one run (resumed, not a second one) holding the same rows, the config beside them
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("apo_jax_test") == ["run"]
    logs = SQLiteStorage.get_logs("apo_jax_test", "run")
    assert [{k: r[k] for k in row} for r, row in zip(logs, jsonl, strict=True)] == jsonl
    assert SQLiteStorage.get_run_config("apo_jax_test", "run")["loss"]["name"] == "apo_zero"


TASKS = """
task: apo_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
---
task: apo_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{question}}}} {{{{choices[label]}}}}"
doc_to_target: "{{{{question}}}} {{{{choices[label]}}}}"
metric_list:
  - metric: word_perplexity
---
task: apo_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match
"""


def test_lm_eval_adapter_equals_lm_evals_hf_model(tmp_path, tiny_checkpoints):
    """Three local tasks (multiple choice, rolling log-likelihood, generate_until: nothing downloaded)
    through lm-eval's own evaluator, on the `apo_jax` model and on lm-eval's `hf` model of the same
    checkpoint: every request's log-likelihood agrees to 1e-4, is_greedy too, and the greedy
    generations are the same strings."""
    docs = [
        {"question": q, "choices": c, "label": y}
        for q, c, y in [
            ("The quick brown fox", [" jumps over the lazy dog.", " revises the answer.", " is a table."], 0),
            ("A stronger model minimally", [" revises the answer", " lowers the rejected one"], 0),
            ("Compute the first twenty", [" Fibonacci numbers", " golden ratio", " dog"], 0),
            ("user assistant system:", [" explain, revise", " the answer is correct"], 1),
        ]
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for i, text in enumerate(TASKS.format(data=data).split("---")):
        (tasks_dir / f"task{i}.yaml").write_text(text)
    names = ["apo_tiny_choice", "apo_tiny_rolling", "apo_tiny_generate"]
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # not lm-eval's 10k tasks
    path = tiny_checkpoints["gqa"]
    results = {}
    for name, model in (
        ("apo_jax", ApoJaxLM(path=str(path), batch_size=8, max_length=64)),
        ("hf", HFLM(pretrained=str(path), device="cpu", batch_size=8, max_length=64)),
    ):
        out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True)
        results[name] = out["samples"]
    ours, theirs = results["apo_jax"], results["hf"]
    for task in ("apo_tiny_choice", "apo_tiny_rolling"):
        for a, b in zip(ours[task], theirs[task], strict=True):
            la, lb = [r[0] for r in a["resps"]], [r[0] for r in b["resps"]]
            if task == "apo_tiny_choice":  # (log-likelihood, is_greedy) per choice
                assert [x[1] for x in la] == [x[1] for x in lb]
                la, lb = [x[0] for x in la], [x[0] for x in lb]
            assert np.allclose(la, lb, rtol=0, atol=1e-4), (task, la, lb)
    generated = [s["resps"][0][0] for s in ours["apo_tiny_generate"]]
    assert generated == [s["resps"][0][0] for s in theirs["apo_tiny_generate"]]
    assert any(generated)  # not all empty: the comparison means something


def _greedy_hf(hf, tok, messages, max_new_tokens: int) -> str:
    """transformers' greedy answer to a chat-templated conversation (the independent side)."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_alpaca_eval_and_mt_bench_answer_files_and_their_judged_win_rate(tmp_path, tiny_checkpoints):
    """The answer files in AlpacaEval's layout (a JSON list of instruction, output, generator, dataset)
    and FastChat MT-Bench's (question_id, answer_id, model_id, choices[0].turns, tstamp): the answers
    are the model's greedy ones, transformers' for the same chat-templated conversation (MT-Bench's
    second turn after the first's answer); the judge command reads AlpacaEval files and scores them
    against a reference's through a loopback OpenAI-compatible judge."""
    path = tiny_checkpoints["gqa"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    alpaca = [
        {"instruction": "Explain the golden ratio.", "dataset": "helpful_base"},
        {"instruction": "Revise it."},
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    questions = [
        {
            "question_id": 81,
            "category": "math",
            "turns": ["Compute the first twenty numbers.", "Check each step."],
        },
        {"question_id": 82, "category": "math", "turns": ["What is the answer?", "Why is it correct?"]},
    ]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = ["--model-dir", str(path), "--max-tokens", "8", "--name", "tiny"]
    assert (
        answers.main(
            [
                "--benchmark",
                "alpaca_eval",
                "--questions",
                str(tmp_path / "alpaca.json"),
                "--output",
                str(tmp_path / "model_outputs.json"),
                *common,
            ]
        )
        == 0
    )
    assert (
        answers.main(
            [
                "--benchmark",
                "mt_bench",
                "--questions",
                str(tmp_path / "question.jsonl"),
                "--output",
                str(tmp_path / "model_answer" / "tiny.jsonl"),
                *common,
            ]
        )
        == 0
    )
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert [o["instruction"] for o in outputs] == [a["instruction"] for a in alpaca]
    assert outputs[0]["generator"] == "tiny" and outputs[0]["dataset"] == "helpful_base"
    want = _greedy_hf(hf, tok, [{"role": "user", "content": alpaca[0]["instruction"]}], 8)
    assert outputs[0]["output"] == want and want
    rows = [json.loads(x) for x in (tmp_path / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 2
    assert [r["question_id"] for r in rows] == [81, 82] and rows[0]["model_id"] == "tiny"
    first, second = rows[0]["choices"][0]["turns"]
    q = questions[0]["turns"]
    assert first == _greedy_hf(hf, tok, [{"role": "user", "content": q[0]}], 8)
    conversation = [
        {"role": "user", "content": q[0]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": q[1]},
    ]
    assert second == _greedy_hf(hf, tok, conversation, 8)

    # the judge: ours against a reference whose answers are "x"; this judge prefers the longer answer
    reference = [dict(o, output="x", generator="ref") for o in outputs]
    (tmp_path / "ref.json").write_text(json.dumps(reference))

    def longer(body):
        text = body["messages"][0]["content"]
        a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        b = text.split("[Response B]\n")[1].rstrip("\n")
        return "Verdict: " + ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")

    with loopback.ChatServer(longer) as server:
        assert (
            judge.main(
                [
                    "--answers",
                    str(tmp_path / "model_outputs.json"),
                    "--reference",
                    str(tmp_path / "ref.json"),
                    "--output",
                    str(tmp_path / "judged"),
                    "--base-url",
                    server.url,
                    "--judge-model",
                    "j",
                ]
            )
            == 0
        )
    summary = json.loads((tmp_path / "judged" / "summary.json").read_text())
    expected = np.mean(
        [1.0 if len(o["output"]) > 1 else 0.5 if len(o["output"]) == 1 else 0.0 for o in outputs]
    )
    assert summary["n"] == 4 and summary["win_rate"] == expected

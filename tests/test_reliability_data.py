"""The data commands under bad input and faults (issue 16): preprocess, token_weights, edit, generate,
judge and the readers. Each probe checks the message names the file, row or flag, that it is one
line with exit status 2, and that nothing outside the output was touched."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers import PAIRS, one_line_error, run_preprocess, write_jsonl

from apo_jax.data import formats, token_weights
from apo_jax.data.tfrecords import read_records
from apo_jax.eval import judge
from apo_jax.train import edit


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes: what a command must leave as it found it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_never_deletes_what_the_tool_did_not_write(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Finding 1: `--output data` used to delete the input pairs.jsonl, NOTES.txt and ckpt/ beside it."""
    data = tmp_path / "data"
    src = write_jsonl(data / "pairs.jsonl", PAIRS)
    (data / "NOTES.txt").write_text("my notes")
    (data / "ckpt").mkdir()
    (data / "ckpt" / "model.safetensors").write_bytes(b"weights")
    before = _tree(tmp_path)
    assert run_preprocess(src, data, tokenizer_dir) == 2
    one_line_error(capsys, f"--output {data}", "holds the input")
    other = tmp_path / "other"  # a folder of someone else's files, the input elsewhere
    (other / "sub").mkdir(parents=True)
    (other / "NOTES.txt").write_text("keep me")
    before = _tree(tmp_path)
    assert run_preprocess(src, other, tokenizer_dir) == 2
    one_line_error(
        capsys, f"--output {other}", "holds files apo_jax.data.preprocess did not write", "NOTES.txt"
    )
    monkeypatch.chdir(data)
    for here in (".", str(tmp_path)):  # the working directory, and a folder above it
        assert run_preprocess(src, here, tokenizer_dir) == 2
        one_line_error(capsys, "is the working directory, a folder above it")
    (tmp_path / "a_file").write_text("x")
    assert run_preprocess(src, tmp_path / "a_file", tokenizer_dir) == 2  # refused before any work
    one_line_error(capsys, "a_file: is a file")
    (tmp_path / "a_file").unlink()
    assert _tree(tmp_path) == before
    # its own earlier output is replaced; with --overwrite, a foreign folder is too
    out = tmp_path / "records"
    assert run_preprocess(src, out, tokenizer_dir) == 0
    assert run_preprocess(src, out, tokenizer_dir, "--max-length", "64") == 0
    assert read_records(out)[1]["max_length"] == 64
    assert run_preprocess(src, other, tokenizer_dir, "--overwrite") == 0
    assert not (other / "NOTES.txt").exists() and len(read_records(other)[0]) == len(PAIRS)
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial" in p.name or ".old-" in p.name]
    assert leftovers == []
    # token_weights and edit write through the same rule
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    argv = ["--records", str(out), "--output", str(foreign), "--method", "d2po"]
    assert token_weights.main(argv) == 2
    one_line_error(capsys, "holds files apo_jax.data.token_weights did not write", "keep.txt")
    assert edit.main(["--model", str(tmp_path / "none"), "--pairs", str(out), "--output", str(foreign)]) == 2
    one_line_error(capsys, "holds files apo_jax.train.edit did not write", "keep.txt")
    assert (foreign / "keep.txt").read_text() == "keep"


def test_length_settings_are_checked_before_any_row(tmp_path, tokenizer_dir, capsys):
    """Findings 5 and 10: --max-prompt-length -3 cut BOS and the header off every prompt, 0 reported
    every prompt cut, and --max-length 0 / -5 / 20 ended in a bare "no usable rows"."""
    src = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for flags, says in [
        (["--max-prompt-length", "-3"], "--max-prompt-length -3: must be a positive number"),
        (["--max-prompt-length", "0"], "--max-prompt-length 0: must be a positive number"),
        (["--max-length", "0"], "--max-length 0: must be a positive number"),
        (["--max-length", "-5"], "--max-length -5: must be a positive number"),
        (["--max-length", "64", "--max-prompt-length", "64"], "--max-prompt-length 64 must be below"),
    ]:
        assert run_preprocess(src, tmp_path / "out", tokenizer_dir, *flags) == 2
        one_line_error(capsys, says)
    assert run_preprocess(src, tmp_path / "out", tokenizer_dir, "--max-length", "4") == 2
    one_line_error(capsys, "no usable rows (6 read, 0 malformed, 6 dropped: prompt alone >= --max-length 4)")
    assert not (tmp_path / "out").exists()


def test_bad_rows_are_named_and_skipped_one_by_one(tmp_path, tokenizer_dir, capsys):
    """Findings 8, 9 and 12: a non-UTF-8 byte aborted the whole file without naming it; an empty
    conversational answer became a record of only the end-of-turn token; "no usable rows" did not
    name the missing field."""
    src = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r).encode() for r in PAIRS]
    lines[2] = lines[2].replace(b"good", b"g\xffod")  # one bad byte in line 3
    empty_turn = {
        "prompt": [{"role": "user", "content": "q?"}],
        "chosen": [{"role": "assistant", "content": ""}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    lines += [json.dumps(empty_turn).encode(), json.dumps(dict(PAIRS[0], chosen="")).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert run_preprocess(src, tmp_path / "out", tokenizer_dir) == 0
    printed = capsys.readouterr().out
    assert "rows read 8: written 5, skipped (malformed) 3" in printed
    assert f"{src}:3: not UTF-8 (byte 0xff at column" in printed
    assert (
        "row 6, field 'chosen': empty answer" in printed and "row 7, field 'chosen': empty answer" in printed
    )
    assert sorted(int(r["source_index"]) for r in read_records(tmp_path / "out")[0]) == [0, 1, 3, 4, 5]
    no_chosen = write_jsonl(tmp_path / "no_chosen.jsonl", [{"prompt": "q", "answer": "a"}] * 3)
    assert run_preprocess(no_chosen, tmp_path / "out2", tokenizer_dir) == 2
    one_line_error(capsys, "no usable rows (3 read, 3 malformed)", "row 0, field 'chosen': missing")


def test_missing_inputs_are_named_in_one_line(tmp_path, tokenizer_dir, capsys):
    """Findings 11 and 12: a missing tokenizer folder said "Repo id must be in the form"; a truncated
    shard raised TensorFlow's DataLossError naming no file; a hub name offline took 30 s."""
    src = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert run_preprocess(src, tmp_path / "out", tmp_path / "no_tok") == 2
    one_line_error(capsys, f"{tmp_path / 'no_tok'}: no such tokenizer folder")
    (tmp_path / "empty_dir").mkdir()
    assert run_preprocess(src, tmp_path / "out", tmp_path / "empty_dir") == 2
    one_line_error(capsys, "empty_dir: holds no tokenizer files")
    argv = [
        "--records",
        str(tmp_path),
        "--output",
        str(tmp_path / "w"),
        "--method",
        "mask",
        "--pairs",
        str(src),
    ]
    assert token_weights.main([*argv, "--tokenizer", str(tmp_path / "no_tok")]) == 2
    one_line_error(capsys, "no_tok: no such tokenizer folder")
    assert run_preprocess("someone/some-dataset", tmp_path / "out", tokenizer_dir) == 2
    one_line_error(capsys, "someone/some-dataset: not a file or folder here, and not a dataset in the local")
    out = tmp_path / "records"
    assert run_preprocess(src, out, tokenizer_dir) == 0
    shard = next(out.glob("*.tfrecord*"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"{shard}: a truncated or corrupt shard after"):
        read_records(out)
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": \n')
    assert (
        judge.main(
            [
                "--prompts",
                str(src),
                "--answers",
                str(answers),
                "--output",
                str(tmp_path / "j"),
                "--mode",
                "exact",
            ]
        )
        == 2
    )
    one_line_error(capsys, f"{answers}:2: not valid JSON")


def test_iter_rows_reads_offline_and_fast(tmp_path):
    rows = list(formats.iter_rows(write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    assert rows == PAIRS
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file or folder"):
        list(formats.iter_rows(tmp_path / "missing.jsonl"))

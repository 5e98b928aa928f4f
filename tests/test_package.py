"""Package-level promises: a light `import apo_jax`, 8 simulated devices, losses under sharding."""

from __future__ import annotations

import subprocess
import sys

import jax
import losses_reference as ref
import numpy as np
import pytest
from helpers import RTOL, f64
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from apo_jax import losses


def test_import_is_light():
    # GPU machines may lack TensorFlow and datasets: `import apo_jax` must not need them.
    code = (
        "import sys, apo_jax, apo_jax.losses, apo_jax.models, apo_jax.logprobs, apo_jax.sharding; "
        "heavy = {'tensorflow', 'datasets', 'torch', 'transformers'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_conftest_gives_eight_cpu_devices():
    assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


def _sharded_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(1, 30, n).astype(np.float32), -rng.uniform(1, 30, n).astype(np.float32)
    return {
        "pc": pc,
        "pr": pr,
        "rc": (pc + rng.normal(0, 5, n)).astype(np.float32),
        "rr": (pr + rng.normal(0, 5, n)).astype(np.float32),
        "chosen_lengths": rng.integers(1, 30, n).astype(np.float32),
        "rejected_lengths": rng.integers(1, 30, n).astype(np.float32),
    }


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_batch_coupled_losses_are_exact_on_a_sharded_batch(axis_type):
    # Sorting (aot), log-mean-exp (dr_dpo), the batch token mean (sft) and batch statistics
    # (alpha_dpo) must see the global batch when it is split over 8 devices.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    b = _sharded_batch()
    sharded = jax.device_put(b, NamedSharding(mesh, P("data")))
    for name, hp in [
        ("aot", {}),
        ("aot_unpaired", {}),
        ("dr_dpo", {"beta_prime": 0.5}),
        ("sft", {}),
        ("sigmoid", {}),
    ]:
        loss = losses.get(name)

        def fn(x, loss=loss, hp=hp):
            kw = {k: x[k] for k in loss.needs}
            return loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1, **kw, **hp).loss

        got = jax.jit(fn)(sharded)
        expected = getattr(ref, name)(f64(b), {"beta": 0.1, **hp})
        np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-5, err_msg=name)
    alpha = losses.get("alpha_dpo")
    got = jax.jit(
        lambda x: (
            alpha(
                x["pc"],
                x["pr"],
                x["rc"],
                x["rr"],
                beta=2.5,
                chosen_lengths=x["chosen_lengths"],
                rejected_lengths=x["rejected_lengths"],
            ).loss
        )
    )(sharded)
    expected, _ = ref.alpha_dpo(f64(b), {"beta": 2.5})
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-5)


def test_traced_beta_is_accepted_and_exact():
    # a scheduled β arrives as a tracer: validation steps aside, the value is unchanged
    b = _sharded_batch(8, seed=3)
    fn = losses.get("apo_down")
    got = jax.jit(lambda beta: fn(b["pc"], b["pr"], b["rc"], b["rr"], beta=beta).loss)(0.3)
    np.testing.assert_allclose(got, ref.apo_down(f64(b), {"beta": 0.3}), rtol=RTOL, atol=2e-6)


def test_make_mesh_sizes_read_as_written():
    """`data` left out takes what the other sizes leave: make_mesh() is all data, make_mesh(fsdp=-1) all
    fsdp (8 devices here); two axes at -1 is ambiguous and refused."""
    from apo_jax import sharding

    def sizes(mesh):
        return tuple(mesh.shape[a] for a in sharding.MESH_AXES)

    assert sizes(sharding.make_mesh()) == (8, 1, 1)
    assert sizes(sharding.make_mesh(fsdp=-1)) == (1, 8, 1)
    assert sizes(sharding.make_mesh(tensor=-1)) == (1, 1, 8)
    assert sizes(sharding.make_mesh(fsdp=4)) == (2, 4, 1)
    assert sizes(sharding.make_mesh(data=2, fsdp=-1, tensor=2)) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)

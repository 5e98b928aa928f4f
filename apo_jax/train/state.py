"""What a run starts from: the model and its parameters, the optimizer, and the train state (one
pytree that orbax saves), all built from the config."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from apo_jax import models, sharding
from apo_jax.models import lora
from apo_jax.train import config as config_lib


def model_vocab_size(m) -> int:
    """The vocabulary of the model `cfg.model` describes, read before any weight is."""
    return models.read_config(m.path).vocab_size if m.path else m.vocab_size  # a preset takes vocab_size


def model_policies(cfg, *, adapters: bool = True) -> dict:
    """The LlamaConfig fields a run config sets on any architecture: compute and parameter dtypes,
    remat, and LoRA's (unless `adapters` is False)."""
    m, lo = cfg.model, cfg.get("lora", None)
    policies = {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat_policy": m.remat_policy}
    if lo is not None and lo.rank and adapters:
        policies["lora"] = config_lib.lora_config(cfg)
    return policies


def build_model(cfg, mesh, *, adapters: bool = True):
    """(model, params) from `cfg.model`: a Hugging Face directory, or the tiny preset at random. With
    `lora.rank` > 0 (and `adapters`), LoRA adapters beside the base: fresh (B = 0, the policy starts
    as the base) or read from the PEFT folder `lora.path`; `adapters=False` gives the base alone."""
    m, lo = cfg.model, cfg.get("lora", None)
    policies = model_policies(cfg, adapters=adapters)
    peft = None
    if "lora" in policies and lo.path:  # the PEFT folder's config, read once, before any weight
        try:
            peft = lora.check_adapter_config(lo.path, policies["lora"])
        except models.CheckpointError as e:
            raise config_lib.ConfigError(f"lora.path: {e}") from None
    if m.path:
        model, params = models.from_hf(m.path, mesh=mesh, **policies)
        if model.config.lora and not lo.path:  # lora.path's adapters are read below
            params = lora.add_adapters(model, params, m.seed, mesh)
    else:
        model = models.Llama(models.preset(m.preset, vocab_size=m.vocab_size, **policies))
        params = models.init_params(model, m.seed, mesh)
    if peft is not None:
        params = lora.load_peft(model, params, lo.path, mesh, adapter_config=peft)
    return model, params


def trainable(params):
    """What the optimizer updates: the LoRA adapters when the params have them, else all of them."""
    return lora.split(params)[0] if lora.has_adapters(params) else params


def with_trainable(params, train):
    """`params` with the part `trainable` gives replaced by `train`."""
    return lora.join(train, lora.base(params)) if lora.has_adapters(params) else train


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; the reader's cursor is saved beside it.

    `ref_params` is the frozen (or TR-DPO synced) reference, an empty dict when the reference is
    precomputed or unused; `loss_state` carries running statistics of stateful losses (alpha-DPO).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (orbax saves plain arrays)
    ref_params: Any
    loss_state: Any
    nonfinite_total: jax.Array
    nonfinite_run: jax.Array


def schedule(opt, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then linear or cosine decay to 0 at `steps`,
    or constant."""
    warm = int(opt.warmup_steps)
    if opt.schedule == "constant":
        after = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.lr, max(1, steps - warm))
    else:
        after = optax.linear_schedule(opt.lr, 0.0, max(1, steps - warm))
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warm), after], [warm])


def _decay_mask(params):
    """Weight decay on matrices only: not on norms ('weight' leaves) or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("weight", "bias"), params
    )


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and the schedule above; `mu_dtype` stores the first moment in
    bfloat16 (the second stays in the params' dtype: its squares need the range)."""
    lr = schedule(opt, total_steps)
    mu_dtype = opt.get("mu_dtype", "") or None
    tx = optax.chain(
        optax.clip_by_global_norm(opt.max_grad_norm) if opt.max_grad_norm > 0 else optax.identity(),
        optax.adamw(
            lr,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=_decay_mask,
            mu_dtype=mu_dtype,
        ),
    )
    return tx, lr


def opt_state_shardings(model, tx, mesh):
    """The optimizer state's NamedShardings: each moment split like its parameter by the rules
    table (read from `tx.init` of the boxed abstract parameters it updates), the counters replicated."""
    abstract = trainable(models.abstract_params(model))
    return sharding.param_shardings(jax.eval_shape(tx.init, abstract), mesh)


def initial_state(model, tx, params, reference: str, *, seed: int, mesh, loss_state=None, ref_loaded=None):
    """The first train state of a run (traceable: jit it). `reference` is the run's reference source
    (apo_jax.train.setup): `ref_loaded` (a model of its own) or the starting policy, a frozen copy
    in the compute dtype for `frozen` (the same log-probs in less memory), in the policy's own
    precision for TR-DPO's `sync`; none otherwise (`base`: the step reads the base, adapters off,
    out of the params). AdamW's moments, of what the optimizer updates (`trainable`), are split over
    `mesh` like their parameters."""
    ref = ref_loaded
    if reference == "frozen":
        ref = models.frozen_copy(model.config, params if ref is None else ref)
    elif reference == "sync" and ref is None:
        ref = jax.tree.map(jnp.copy, params)
    opt_shardings = opt_state_shardings(model, tx, mesh)
    return create_state(
        params, tx, seed=seed, ref_params=ref, loss_state=loss_state, opt_shardings=opt_shardings
    )


def create_state(
    params, tx, *, seed: int, ref_params=None, loss_state=None, opt_shardings=None
) -> TrainState:
    """The initial state, on the params' devices (call under jit to keep shardings). The optimizer's
    moments are zeros that depend on no input, so the compiler would replicate them on every device:
    pass `opt_shardings` (`opt_state_shardings`) to split them like the parameters."""
    opt_state = tx.init(trainable(params))
    if opt_shardings is not None:
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.key(seed)),
        ref_params={} if ref_params is None else ref_params,
        loss_state={} if loss_state is None else loss_state,
        nonfinite_total=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
    )

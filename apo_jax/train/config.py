"""The run config: one ml_collections ConfigDict, validated once at start, errors naming the key.

Groups: model, data, loss, optimizer, train, mesh, reference, workdir. `loss` holds `name`
(a name or a list: TRL's `loss_type`), `weights` (TRL's `loss_weights`), `beta`, the step-level
options `ld_alpha` and `use_weighting`, and every hyperparameter of the chosen loss(es) under
its TRL config field name (checked against what the losses take).
"""

from __future__ import annotations

import math
import pathlib

import ml_collections

from apo_jax import losses
from apo_jax.cli import UserError
from apo_jax.data.jsonl import write_atomic
from apo_jax.data.layouts import LAYOUTS, PACKED, PADDED
from apo_jax.models.config import LORA_TARGETS, PRESETS, LoraConfig, preset
from apo_jax.models.hf import read_config
from apo_jax.train import trackers

STEP_LOSS_OPTIONS = ("name", "weights", "beta", "ld_alpha", "use_weighting")


def default_model() -> ml_collections.ConfigDict:
    """The policy: a Hugging Face directory or a preset, its dtypes and remat."""
    return ml_collections.ConfigDict(
        {
            "path": "",  # a Hugging Face Llama directory ...
            "preset": "",  # ... or "tiny": a random tiny Llama (tests, the miniature)
            "vocab_size": 384,  # for presets
            "dtype": "float32",  # compute dtype
            "param_dtype": "float32",  # master weights
            "remat_policy": "none",
            "seed": 0,  # presets' random init
        }
    )


def default_data() -> ml_collections.ConfigDict:
    """The records (apo_jax.data.preprocess's) and how batches lay them out."""
    return ml_collections.ConfigDict(
        {
            "train": "",
            "eval": "",
            "layout": "padded",
            "length": 0,
            "pad_id": 0,
            "packed_rows": 0,
            "bucket": 0,  # padded layout: rows padded to each batch's longest, rounded up to this
            "probes": "",
        }  # probes: "name=dir,...": pair records whose log-probs are logged at each eval
    )


def default_optimizer() -> ml_collections.ConfigDict:
    """AdamW and its schedule (apo_jax.train.state.make_optimizer)."""
    return ml_collections.ConfigDict(
        {
            "name": "adamw",
            "lr": 2e-7,  # APO paper, Section 5.2
            "warmup_steps": 0,
            "schedule": "linear",  # linear | cosine | constant (after warmup)
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "mu_dtype": "",  # AdamW's first moment: "" = the params' dtype, or "bfloat16" to save memory
        }
    )


def default_train() -> ml_collections.ConfigDict:
    """The loop: steps, batch, logging, evaluation, checkpoints, trackers."""
    return ml_collections.ConfigDict(
        {
            "mode": "preference",  # preference | sft
            "steps": 100,
            "batch_size": 64,  # global pairs (or unpaired rows) per optimizer step; APO paper, B.1
            "grad_accum": 1,
            "seed": 0,
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 4,
            "checkpoint_every": 0,
            "keep_checkpoints": 3,
            "max_nonfinite": 10,  # consecutive skipped updates before the run stops
            "export_hf": True,
            "progress": True,
            "peak_flops": 0.0,  # per device, for mfu; 0: looked up from the device kind
            "trackers": ("jsonl", "tensorboard"),  # + "wandb", "trackio" (apo_jax.train.trackers)
            "wandb_project": "apo_jax",  # the W&B / Trackio project
            "wandb_entity": "",  # the W&B entity (team); "" = the logged-in user's default
            "resume_changed": False,  # resume checkpoints under a changed config (apo_jax.train.record)
        }
    )


def default_reference() -> ml_collections.ConfigDict:
    """Where the reference comes from (apo_jax.train.setup.reference_source decides)."""
    return ml_collections.ConfigDict(
        {
            "mode": "frozen",  # frozen | precomputed | sync | none
            "path": "",  # a Hugging Face directory of the reference; "" = the policy's initial weights
            "sync_steps": 512,  # TR-DPO τ (TRL's ref_model_sync_steps)
            "mixup_alpha": 0.6,  # TR-DPO α (TRL's ref_model_mixup_alpha); 1.0 = hard update
            "precompute_batch_size": 8,
        }
    )


def default_lora() -> ml_collections.ConfigDict:
    """LoRA adapters on a frozen base (0: full fine-tuning)."""
    return ml_collections.ConfigDict(
        {
            "rank": 0,  # 0: full fine-tuning; r > 0: LoRA adapters of rank r on a frozen base
            "alpha": 16.0,  # the adapters' product is scaled by alpha / rank (PEFT's lora_alpha)
            "targets": LORA_TARGETS,  # projections: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
            "dropout": 0.0,  # PEFT's lora_dropout: on each adapter's input, in training steps only
            "layers": 0,  # 0: adapters on every layer; K: the top K only (the backward pass stops there)
            "path": "",  # a PEFT adapter folder to start from (its rank, alpha and targets must match)
        }
    )


def default_config() -> ml_collections.ConfigDict:
    """The whole schema: every group's keys and defaults (an unknown key is an error)."""
    c = ml_collections.ConfigDict()
    c.workdir = ""
    # free-form settings of an experiment recipe (experiments/): the trainer does not read them
    c.experiment = ml_collections.ConfigDict({"kind": ""})
    c.model = default_model()
    c.data = default_data()
    c.loss = ml_collections.ConfigDict({"name": "sigmoid", "weights": (), "beta": 0.1})
    c.optimizer = default_optimizer()
    c.train = default_train()
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.reference = default_reference()
    c.lora = default_lora()
    c.online = default_online()  # the online / iterative loop (apo_jax.train.online); train.run ignores it
    return c


class ConfigError(UserError, ValueError):
    """A config key that is unknown or inconsistent; the message names it."""


# The range of every numeric setting: (key, lowest, highest, whether the lowest is allowed).
RANGES = (
    ("optimizer.lr", 0.0, math.inf, False),
    ("optimizer.weight_decay", 0.0, math.inf, True),
    ("optimizer.max_grad_norm", 0.0, math.inf, True),
    ("optimizer.b1", 0.0, 1.0, True),
    ("optimizer.b2", 0.0, 1.0, True),
    ("optimizer.eps", 0.0, math.inf, False),
    ("train.log_every", 1, math.inf, True),
    ("train.eval_every", 0, math.inf, True),
    ("train.eval_batches", 1, math.inf, True),
    ("train.checkpoint_every", 0, math.inf, True),
    ("train.keep_checkpoints", 1, math.inf, True),
    ("train.max_nonfinite", 1, math.inf, True),
    ("train.peak_flops", 0.0, math.inf, True),
    ("data.length", 0, math.inf, True),
    ("data.packed_rows", 0, math.inf, True),
    ("data.bucket", 0, math.inf, True),
    ("data.pad_id", 0, math.inf, True),
    ("model.vocab_size", 1, 2**31, True),  # token ids are int32
    ("reference.sync_steps", 1, math.inf, True),
    ("reference.precompute_batch_size", 1, math.inf, True),
)


def check_ranges(config) -> None:
    """Every numeric setting within its range (a negative learning rate would ascend the loss)."""
    for key, low, high, low_ok in RANGES:
        group, name = key.split(".")
        value = config[group].get(name)
        if value is None:
            continue
        if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value < high):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high < math.inf else "")
            raise ConfigError(f"{key}={value}: must be {bound}")


def default_online() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rounds": 2,
            "prompts": "",  # a JSONL file of rows with `prompt` (other fields reach the scorer)
            "prompts_per_round": 0,  # 0: every prompt each round; else consecutive slices
            "samples": 4,  # K samples per prompt
            "sampler": "uniform",  # uniform | mixed | server (an OpenAI-compatible inference server)
            "server_url": "",  # sampler server: its base URL (http://host:8000/v1), serving the policy ...
            "server_reload": "update_weights_from_disk",  # ... reloaded each round (SGLang's), or ""
            "server_command": "",  # ... or started each round: e.g. "vllm serve {model} --port {port}"
            "server_port": 8000,  # {port} of server_command
            "server_model": "",  # the model name requests carry; "" = the policy's path (vLLM's default)
            "server_start_timeout": 900.0,  # seconds server_command may take to answer /v1/models
            "temperature": 0.7,
            "max_tokens": 512,
            "sample_batch_size": 32,  # rows per sampler call
            "labeler": "scorer",  # scorer | judge | clair | dice
            "scorer": "",  # "module:function" for labeler scorer: f(prompt_row, response) -> float
            "replay": 0.0,  # γ: the offline share of each round's pairs
            "offline": "",  # offline pairs (prompt, chosen, rejected) for replay
            "reference": "previous",  # previous: π_t (iterative DPO) | initial: π_0 (reference.path wins)
            "accelerate_alpha": 0.0,  # accelerated_po's α
            "dice_alpha": -1.0,  # α_lc of DICE; < 0: grid search
            "max_length": 1024,  # preprocess's max_length for each round's records
            "base_url": "",  # judge / reviser: an OpenAI-compatible endpoint ...
            "api_model": "",  # ... and its model name
            "api_key_env": "OPENAI_API_KEY",
            "concurrency": 8,
        }
    )


def _check_keys(config, schema, prefix=""):
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r}; known: {sorted(schema.keys())}")
        if isinstance(schema[key], ml_collections.ConfigDict) and key not in ("loss", "experiment"):
            if not isinstance(config[key], ml_collections.ConfigDict | dict):
                raise ConfigError(f"config key {name!r} must be a group")
            _check_keys(config[key], schema[key], name + ".")


def loss_hparams(config) -> dict:
    """The loss hyperparameters of `config.loss` (beta included), without the step-level options."""
    out = {k: v for k, v in config.loss.items() if k not in STEP_LOSS_OPTIONS}
    out["beta"] = config.loss.beta
    return out


def fill_loss(config) -> ml_collections.ConfigDict:
    """Makes `config.loss` hold exactly the configured loss's hyperparameters (values the config set,
    the registry's defaults for the rest) and the step options, so that `--config.loss.alpha=0.3` is
    a plain ml_collections override, typed by its default. Config files call it last, after naming
    their loss; it drops keys of another loss (a config that switched losses)."""
    loss = build_loss(config, bind=False)
    old = config.loss
    group = {"name": old.name, "weights": old.weights, "beta": old.beta}
    group |= {"ld_alpha": old.get("ld_alpha", None), "use_weighting": old.get("use_weighting", False)}
    for key, default in loss.hparams.items():
        if key != "beta":
            group[key] = old.get(key, default)
    filled = ml_collections.ConfigDict()
    for key, value in group.items():  # a None default (an optional float) stays overridable as a float
        filled[key] = ml_collections.config_dict.placeholder(float) if value is None else value
    config.loss = filled
    return config


def config_text(config) -> str:
    """The whole config (command-line overrides included) as config.json holds it."""
    return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"


def save_config(config, workdir) -> pathlib.Path:
    """Writes `<workdir>/config.json` atomically."""
    return write_atomic(pathlib.Path(workdir) / "config.json", config_text(config))


def build_loss(config, *, bind: bool = True):
    """The configured loss with config.loss's hyperparameters bound (`bind=False`: the bare loss,
    to read its defaults)."""
    weights = tuple(config.loss.weights) or None
    try:
        loss = losses.build(config.loss.name, weights)
    except ValueError as e:
        raise ConfigError(f"loss.name / loss.weights: {e}") from None
    if not bind:
        return loss
    try:
        return loss.bind(**loss_hparams(config))
    except ValueError as e:
        raise ConfigError(
            f"config.loss: {e} (config.loss holds the hyperparameters of the loss its config file named: "
            "to change the loss, choose a config that names it, e.g. --config=<data>_<loss>)"
        ) from None


def probe_sets(spec: str) -> dict[str, str]:
    """`data.probes` = "name=dir,name=dir" -> {name: record directory}."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"data.probes: {item!r} is not name=directory")
        out[name] = path
    return out


def validate(config) -> None:
    """Raises ConfigError naming the first unknown or inconsistent key."""
    _check_keys(config, default_config())
    m, t, o, r, d = config.model, config.train, config.optimizer, config.reference, config.data
    if not config.workdir:
        raise ConfigError("workdir is empty: every run writes its metrics and checkpoints there")
    if bool(m.path) == bool(m.preset):
        raise ConfigError("set exactly one of model.path (a Hugging Face directory) and model.preset")
    check_ranges(config)
    if m.preset and m.preset != "tiny":
        raise ConfigError(f"model.preset={m.preset!r}: the known preset is 'tiny'")
    if t.mode not in ("preference", "sft"):
        raise ConfigError(f"train.mode={t.mode!r}: use 'preference' or 'sft'")
    if not d.train:
        raise ConfigError("data.train is empty: give a directory written by apo_jax.data.preprocess")
    probe_sets(d.get("probes", ""))
    if d.layout not in LAYOUTS:
        raise ConfigError(f"data.layout={d.layout!r}: use one of {list(LAYOUTS)}")
    if o.name != "adamw":
        raise ConfigError(f"optimizer.name={o.name!r}: the supported optimizer is 'adamw'")
    if o.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optimizer.schedule={o.schedule!r}: use linear, cosine or constant")
    if o.mu_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"optimizer.mu_dtype={o.mu_dtype!r}: use '', 'float32' or 'bfloat16'")
    check_lora(config)
    try:
        trackers.check(t.trackers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.param_dtype in ("bfloat16", "float16") and o.lr < 1e-4 and not config.lora.rank:
        raise ConfigError(
            f"model.param_dtype={m.param_dtype!r} with optimizer.lr={o.lr:g}: an AdamW step moves a weight "
            f"by about lr, below {m.param_dtype}'s resolution (a weight of 0.01 moves in steps of 6e-5), so "
            "the updates would be rounded away. Keep model.param_dtype='float32' (master weights) with "
            "model.dtype='bfloat16' for compute, and optimizer.mu_dtype='bfloat16' to save memory"
        )
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must lie in [0, train.steps={t.steps}]")
    if t.steps <= 0 or t.batch_size <= 0 or t.grad_accum <= 0:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum must be positive")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if d.bucket and d.layout != PADDED:
        raise ConfigError(f"data.bucket={d.bucket}: bucketed row lengths are for data.layout='padded'")
    if d.packed_rows and d.packed_rows % t.grad_accum:
        raise ConfigError(
            f"data.packed_rows={d.packed_rows} does not split into train.grad_accum={t.grad_accum} "
            "micro-batches"
        )
    if r.mode not in ("frozen", "precomputed", "sync", "none"):
        raise ConfigError(f"reference.mode={r.mode!r}: use frozen, precomputed, sync or none")
    if r.path and r.mode not in ("frozen", "sync"):
        raise ConfigError(f"reference.path is for reference.mode frozen or sync, not {r.mode!r}")
    if not 0 < r.mixup_alpha <= 1:
        raise ConfigError(f"reference.mixup_alpha={r.mixup_alpha} must lie in (0, 1]")
    if t.mode == "sft":
        return
    loss = build_loss(config)
    ld_alpha = config.loss.get("ld_alpha", None)
    if ld_alpha is not None and not 0 <= ld_alpha <= 1:
        raise ConfigError(f"loss.ld_alpha={ld_alpha} must lie in [0, 1]")
    if (ld_alpha is not None or config.loss.get("use_weighting", False)) and d.layout != PADDED:
        raise ConfigError("loss.ld_alpha and loss.use_weighting need data.layout='padded'")
    if ld_alpha is not None and loss.granularity == "token":
        raise ConfigError(
            f"loss.ld_alpha aggregates sequence log-probs; the token-level loss {loss.name!r} would ignore it"
        )
    if loss.granularity == "token" and (d.layout != PADDED or r.mode == "precomputed"):
        raise ConfigError(
            f"loss {loss.name!r} is token-level: it needs data.layout='padded' and a reference model "
            f"(reference.mode frozen or sync), not layout {d.layout!r} with reference.mode {r.mode!r}"
        )
    if loss.kl is not None and r.mode not in ("frozen", "sync"):
        raise ConfigError(
            f"loss {loss.name!r} takes the KL between policy and reference at every position: it needs "
            f"reference.mode frozen or sync (the reference's logits each step), not {r.mode!r}"
        )
    if not loss.uses_reference and r.mode not in ("none", "frozen"):
        raise ConfigError(f"loss {loss.name!r} uses no reference: set reference.mode='none'")


def lora_config(config):
    """The run's LoraConfig from the lora group (rank > 0); its own checks, named as config keys."""
    lo = config.lora
    try:
        return LoraConfig(
            rank=lo.rank, alpha=lo.alpha, targets=lo.targets, dropout=lo.dropout, layers=lo.get("layers", 0)
        )
    except ValueError as e:
        raise ConfigError(f"lora.{e}") from None


def check_lora(config) -> None:
    """The lora group: its values (LoraConfig's checks), no TR-DPO (its reference mixes in the
    policy's weights, while a LoRA run's reference is the base with adapters off), no more layers
    than the model has. The PEFT folder of `lora.path` is read (once) where the model is built,
    before any weight (apo_jax.train.state.build_model)."""
    lo = config.lora
    if not lo.rank:
        if lo.path:
            raise ConfigError(f"lora.path={lo.path}: set lora.rank (and alpha, targets) to the adapter's")
        return
    lora_config(config)
    if config.reference.mode == "sync":
        raise ConfigError(
            "reference.mode='sync' (TR-DPO) with lora.rank > 0: the reference of a LoRA run is the "
            "base with its adapters off; use reference.mode frozen, precomputed or none"
        )
    if lo.get("layers", 0) and (config.model.path or config.model.preset):
        m = config.model
        if not m.path:
            total = preset(m.preset).num_hidden_layers if m.preset in PRESETS else math.inf
        elif (pathlib.Path(m.path) / "config.json").is_file():
            total = read_config(m.path).num_hidden_layers
        else:
            total = math.inf  # a missing checkpoint is reported where it is read
        if lo.layers > total:
            raise ConfigError(f"lora.layers={lo.layers}: the model has {total} layers (0 adapts them all)")


def check_mesh(config, mesh) -> None:
    """The batch (and packed rows) over the mesh's data-parallel shards, once the mesh is known."""
    t = config.train
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (t.batch_size // t.grad_accum) % shards:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {t.batch_size // t.grad_accum} is not divisible by "
            f"mesh.data × mesh.fsdp = {shards}"
        )
    processes = len({device.process_index for device in mesh.devices.flat})
    rows = config.data.packed_rows * processes // t.grad_accum  # one micro-batch's, all processes
    if config.data.layout == PACKED and rows % shards:
        raise ConfigError(
            f"data.packed_rows={config.data.packed_rows} per process gives {rows} rows per micro-batch, "
            f"not divisible by mesh.data × mesh.fsdp = {shards}"
        )

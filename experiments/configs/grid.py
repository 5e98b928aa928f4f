"""Every cell of the paper's grid, `<data>_<loss>`, from one shared base: no copied files.

data ∈ {clair, on_policy_judge, off_policy_judge, stronger_preferred} (APO paper, Section 4);
loss: any name in `apo_jax.losses.names()` (the paper's cells: apo_zero, apo_down, dpo).
Variants after a colon: the default (alias `mini`) is the CPU miniature of the whole paper,
`tiny` the CI-sized miniature, `paper` the paper's setup on Llama-3-8B-Instruct, `smollm2` the
recipe on the real SmolLM2-135M-Instruct (experiments/instruct; `smollm2_tiny` its CI cut).

    python -m experiments.run --config=clair_apo_zero            # the miniature, ~5 min on 2 CPU cores
    python -m experiments.run --config=clair_apo_zero:paper      # a TPU host or 8 GPUs (README)
    python -m experiments.run --config=clair_apo_zero:smollm2    # SmolLM2-135M-Instruct, on this CPU
"""

from __future__ import annotations

import functools
import json
import pathlib

from apo_jax import losses
from apo_jax.train.config import default_config, fill_loss

DATA = ("clair", "on_policy_judge", "off_policy_judge", "stronger_preferred")
# Beyond the paper, miniature only: Step-DPO pairs (apo_jax.data.steps) from the same CLAIR revisions,
# anchor pairs (apo_jax.data.anchor) from M's judged samples with the gold solution as anchor,
# Step-Controlled DPO pairs (apo_jax.data.steps.scdpo_*) from M's continuations of its right answers
MINI_DATA = ("clair_steps", "anchor", "scdpo")
PAPER_LOSSES = ("apo_zero", "apo_down", "dpo")
VARIANTS = ("mini", "tiny", "paper", "smollm2", "smollm2_tiny")
SMOLLM2_DATA = ("clair", "on_policy_judge", "stronger_preferred")  # experiments/instruct/pipeline.py
SMOLLM2_LORA_LAYERS = 8  # LoRA on SmolLM2's top 8 of 30 layers (README, "On a real model")
# The miniature's learning rates, chosen on validation problems by `python -m experiments.select`
SELECTED = pathlib.Path(__file__).with_name("selected_lr.json")


@functools.cache
def _selected() -> dict:
    if not SELECTED.exists():
        raise ValueError(
            f"{SELECTED} is missing: run `python -m experiments.select` to choose the learning rates"
        )
    return json.loads(SELECTED.read_text())


def selected_lr(loss: str, choice: str = "per_objective") -> float:
    """The miniature's learning rate for `loss` from experiments/select.py's table: the objective's own
    best rate on the validation problems (`per_objective`), or the best rate shared by the paper's three
    objectives (`shared`, also what an objective the selection did not try gets)."""
    if choice not in ("per_objective", "shared"):
        raise ValueError(f"learning-rate choice {choice!r}: use 'per_objective' or 'shared'")
    table = _selected()
    return table["per_objective"].get(loss, table["shared"]) if choice == "per_objective" else table["shared"]


# The paper's four 32K datasets on the Hugging Face hub (Section 4); the off-policy name is unverified
PAPER_DATASETS = {
    "clair": "ContextualAI/ultrafeedback_clair_32k",
    "on_policy_judge": "ContextualAI/ultrafeedback_rlaif_32k",
    "off_policy_judge": "ContextualAI/ultrafeedback_rlaif-offpolicy_32k",
    "stronger_preferred": "ContextualAI/ultrafeedback_stronger-preferred_32k",
}


def parse(name: str) -> tuple[str, str]:
    """'on_policy_judge_todo' -> ('on_policy_judge', 'todo'); ValueError listing what exists."""
    for data in sorted(DATA + MINI_DATA, key=len, reverse=True):
        if name.startswith(data + "_"):
            loss = name[len(data) + 1 :]
            if loss in losses.names():
                return data, loss
    cells = [f"{d}_{loss}" for d in DATA for loss in PAPER_LOSSES]
    raise ValueError(
        f"unknown experiment {name!r}: use <data>_<loss> with data in {list(DATA)} and a loss from "
        f"apo_jax.losses.names() (the paper's cells: {cells}), or a file in experiments/configs/"
    )


def workdir(name: str, variant: str) -> str:
    """`workdirs/<name>` for the miniature, `workdirs/<name>_<variant>` for the others."""
    return f"workdirs/{name}" + ("" if variant == "mini" else f"_{variant}")


def miniature_only(name: str, cell: str, arg: str, *, at_scale: str):
    """The config of a miniature-only experiment built on grid cell `cell`, in its own workdir; its
    `:paper` variant is refused with `at_scale`, what to run at full scale instead."""
    variant = arg or "mini"
    if variant == "paper":
        raise ValueError(f"{name} runs on the miniature; at full scale {at_scale}")
    config = get_config(f"{cell}:{variant}")
    config.workdir = workdir(name, variant)
    return config


def get_config(arg: str, *, selected: bool = True):
    """The cell's config; `selected=False` leaves the miniature's learning rate unset (NaN) for
    experiments/select.py, which chooses it."""
    name, _, variant = arg.partition(":")
    variant = variant or "mini"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of {name}: use one of {list(VARIANTS)}")
    data, loss = parse(name)
    config = default_config()
    config.workdir = workdir(name, variant)

    # Data
    config.experiment = {
        "kind": "paper" if variant == "paper" else "mini",
        "data": data,
        "name": name,
        "variant": variant,
    }

    # Loss
    config.loss.name = loss
    config.loss.beta = 0.1  # APO paper, Section 5.2
    if loss == "todo":
        config.loss.beta = 0.01  # TODO README (XXares/TODO)

    if variant == "paper":
        if data not in PAPER_DATASETS:
            raise ValueError(f"{name}: {data!r} pairs exist in the miniature only (no paper dataset)")
        return fill_loss(_paper(config))
    if variant.startswith("smollm2"):
        if data not in SMOLLM2_DATA:
            raise ValueError(
                f"{name}: {data!r} pairs are not built for SmolLM2; use one of {list(SMOLLM2_DATA)}"
            )
        return fill_loss(_smollm2(config, small=variant == "smollm2_tiny"))

    # Model: the miniature's M is trained by the pipeline (experiments/mini) and put in model.path
    config.model.preset = "tiny"
    small = variant == "tiny"
    config.experiment.update(
        {
            "seed": 0,
            "hidden_size": 64,
            "layers": 3,
            "careless": 0.6,
            "sft_examples": 256 if small else 6000,
            "sft_steps": 10 if small else 600,
            "train_prompts": 48 if small else 3072,
            "eval_prompts": 16 if small else 512,
            "temperature": 0.7,
            "eval_samples": 2 if small else 4,
            "eval_set": "test",  # or "validation" (experiments/select.py)
            "epochs": 0.0,  # > 0: train.steps set to this many passes over the cell's pairs
        }
    )
    if loss in ("tis_dpo", "tis_dpo_kl"):  # DPO steps of each contrastive model behind TIS-DPO's weights
        config.experiment.tis_steps = 2 if small else 50
        config.experiment.tis_transform = "exp"  # the paper's form; the code's: rank_based, binary, ...

    # Trainer. β is the paper's; the learning rate each objective's best on the validation problems
    # (experiments/select.py, its table in selected_lr.json; README, "What the miniature shows")
    config.optimizer.lr = selected_lr(loss) if selected else float("nan")
    config.optimizer.warmup_steps = 0 if small else 10
    config.optimizer.schedule = "linear"
    config.train.steps = 4 if small else 100
    config.train.batch_size = 8 if small else 32
    config.train.eval_every = 2 if small else 25
    config.train.eval_batches = 2 if small else 8  # 256 held-out pairs of the cell's kind, M's per seed
    config.train.export_hf = True
    config.mesh.data = 1

    # Evaluation: held-out pairs of the same kind (Figure 4) and exact-match accuracy (results.md)
    return fill_loss(config)


def _paper(config):
    """The paper's setup. Numbers cite the APO paper (TACL 2025) or are marked unverified."""
    config.model.path = "Meta-Llama-3-8B-Instruct"  # a local Hugging Face directory
    # Memory (README, "The paper's setup"): f32 master weights (bf16 ones would round every 2e-7 update
    # away), bf16 compute, AdamW's first moment in bf16: 8.03B × (4 + 2 + 4) bytes = 80 GB of state
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.optimizer.mu_dtype = "bfloat16"
    config.model.remat_policy = "full"  # v5e-8: ~3 GB/chip left after the state; 8 GPUs: dots_no_batch
    config.experiment.hf_dataset = PAPER_DATASETS[config.experiment.data]
    # data/<data>_ref: `python -m apo_jax.data.preprocess --input <hf_dataset> --output data/<data>
    # --max-length 1024`, then `--precompute_reference=data/<data>_ref` (README, "The paper's setup")
    config.data.train = f"data/{config.experiment.data}_ref"
    config.reference.mode = "precomputed"  # reference log-probs added once (apo_jax.train.reference)
    config.optimizer.lr = 2e-7  # APO paper, Section 5.2
    config.optimizer.warmup_steps = 50  # unverified
    config.optimizer.schedule = "linear"  # unverified
    config.optimizer.weight_decay = 0.0  # unverified
    config.train.batch_size = 64  # APO paper, Appendix B.1
    config.train.steps = 500  # 32K pairs / 64 = one epoch; the epoch count is unverified
    # maximum prompt 512 + completion 512 tokens (Section 5.2): preprocess --max-length 1024
    config.train.grad_accum = 8
    config.train.checkpoint_every = 100
    config.train.eval_every = 50
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    if losses.get(config.loss.name).granularity == "token":
        # token-level losses (TIS-DPO, D²PO, Mask-DPO, TDPO) read the reference's per-token log-probs,
        # TDPO its whole next-token distribution, every step: a frozen bf16 copy (~17 GB more) instead
        config.reference.mode = "frozen"
        config.data.train = f"data/{config.experiment.data}"
    return config


def _smollm2(config, *, small: bool):
    """SmolLM2-135M-Instruct on the instruction-following task, LoRA on this CPU (experiments/instruct).
    `small`: the CI cut, two prompts of two kinds M always breaks, two steps."""
    config.experiment.kind = "instruct"
    config.experiment.update(
        {
            "seed": 0,
            "per_pair": 1,  # training prompts: every train topic × constraint kind, this many times
            "train_prompts": 2 if small else 0,  # 0: all of them
            "kinds": "end_phrase,quotation" if small else "",  # "" = every constraint kind
            "eval_set": "test",  # or "validation" (the learning-rate choice)
            "eval_per_pair": 1,
            "eval_prompts": 2 if small else 0,
            "max_tokens": 16 if small else 128,  # M's answers and the scored ones
            "temperature": 0.7,  # M's sampling temperature, the paper's
            "batch_size_generate": 2 if small else 64,
            "epochs": 0.0,
        }
    )
    config.lora.rank, config.lora.alpha = 16, 16.0
    # adapters on the top 8 of 30 layers: the backward pass stops there, and the frozen reference's
    # lower 22 layers are the policy's, computed once for both (models.llama._top_layers_trained)
    config.lora.layers = SMOLLM2_LORA_LAYERS
    config.data.bucket = 32  # rows padded to each batch's longest pair: about 220 tokens, not 336
    config.optimizer.lr = 3e-4
    config.optimizer.warmup_steps = 0 if small else 2
    config.optimizer.schedule = "linear"
    config.train.steps = 2 if small else 20  # about 40 s a step here: 20 steps, 160 pairs, ~15 min
    config.train.batch_size = 2 if small else 8
    config.train.eval_every = 0
    config.train.checkpoint_every = 0 if small else 5
    config.train.export_hf = True
    config.mesh.data = 1
    return config

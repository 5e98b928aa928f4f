"""The same step in TRL's DPOTrainer on PyTorch, on the same weights, tokens and optimizer."""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import tempfile
import time

from apo_jax import models
from apo_jax.data import tiny
from apo_jax.models import lora
from experiments.bench.common import bench_optimizer
from experiments.bench.step import real_tokens


def _trl_config(
    args,
    out: str,
    n: int,
    steps: int,
    *,
    gradient_checkpointing: bool,
    precompute: bool,
    bf16: bool,
    cuda: bool,
):
    """TRL's DPOConfig for the step apo_jax runs: APO-zero at β 0.1, the same AdamW (bench_optimizer)."""
    import trl

    opt = bench_optimizer(args.lr)
    return trl.DPOConfig(
        output_dir=out,
        loss_type=["apo_zero"],
        beta=0.1,
        learning_rate=opt.lr,
        lr_scheduler_type=opt.schedule,
        warmup_steps=opt.warmup_steps,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
        adam_beta1=opt.b1,
        adam_beta2=opt.b2,
        adam_epsilon=opt.eps,
        per_device_train_batch_size=n,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=gradient_checkpointing,
        bf16=bf16,
        max_length=args.length,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=0,
        disable_tqdm=True,
    )


def _trainer_class(losses_seen: list):
    import trl

    class Trainer(trl.DPOTrainer):  # the same token ids as the JAX side: skip TRL's tokenization
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def compute_loss(self, *a, **k):  # the exact loss (the Trainer logs it rounded to 4 digits)
            out = super().compute_loss(*a, **k)
            losses_seen.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    return Trainer


def _timer(times: list, logs: list, cuda: bool):
    """A callback that times each step (synchronised on a GPU) and keeps every log line."""
    import torch
    import transformers

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **k):
            logs_seen.append(dict(logs or {}, step=state.global_step))

    logs_seen = logs
    return Timer()


def bench_trl(
    args, model_dir, tokenizer_dir, records, *, gradient_checkpointing: bool, precompute: bool, bf16: bool
) -> dict:
    """TRL's DPOTrainer (loss_type apo_zero) on the same token ids, batch and optimizer settings."""
    import datasets
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{k: r[k].tolist() for k in keys} for r in records]
    steps = args.steps + args.warmup + 2
    losses_seen, times, logs = [], [], []
    with tempfile.TemporaryDirectory() as out:
        cfg = _trl_config(
            args,
            out,
            len(rows),
            steps,
            gradient_checkpointing=gradient_checkpointing,
            precompute=precompute,
            bf16=bf16,
            cuda=cuda,
        )
        # float32 master weights, bf16 autocast when asked: the same mixed precision as apo_jax's
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        adapter = pathlib.Path(model_dir) / "adapter"
        if adapter.is_dir():  # LoRA: TRL's reference is this model with its adapters disabled
            import peft

            model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        t0 = time.perf_counter()
        dataset, timer = datasets.Dataset.from_list(rows), _timer(times, logs, cuda)
        trainer_class = _trainer_class(losses_seen)
        trainer = trainer_class(
            model=model, args=cfg, train_dataset=dataset, processing_class=tok, callbacks=[timer]
        )
        setup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # the Trainer prints every log
            trainer.train()
        memory = torch.cuda.max_memory_allocated() if cuda else None
    by_step = {x["step"]: x for x in logs if "loss" in x}
    measured = times[args.warmup + 2 :]
    tokens = real_tokens(records)
    return {
        "part": "step",
        "impl": "trl",
        "reference": "precomputed" if precompute else "frozen",
        "layout": "padded (to the longest)",
        "gradient_checkpointing": gradient_checkpointing,
        "setup_s": setup_s,
        "median_s": statistics.median(measured),
        "min_s": min(measured),
        "max_s": max(measured),
        "steps": len(measured),
        "real_tokens": tokens,
        "tokens_per_s": tokens / statistics.median(measured),
        "memory_bytes": memory,
        "step0_logps_chosen": by_step[1]["logps/chosen"],
        "step0_logps_rejected": by_step[1]["logps/rejected"],
        "step0_loss": losses_seen[0],
        "step1_loss": losses_seen[1],
        "lora": adapter.is_dir(),
        "trl": trl.__version__,
        "torch": torch.__version__,
    }


def export_model(config, params, out: pathlib.Path, vocab: int) -> tuple[str, str]:
    """The same weights as a Hugging Face directory for TRL, with a tokenizer TRL can load; LoRA
    adapters, if any, beside it in `out/adapter` (a PEFT folder)."""
    tok = tiny.tiny_tokenizer(vocab_size=min(vocab, 320))
    model = models.Llama(config)
    if lora.has_adapters(params):
        lora.save_peft(model, params, out / "adapter")
        model, params = models.Llama(lora.plain(config)), lora.base(params)
    models.to_hf(model, params, out, tokenizer=tok)
    return str(out), str(out)

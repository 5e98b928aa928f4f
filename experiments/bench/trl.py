"""The same step in TRL's DPOTrainer on PyTorch, on the same weights, tokens and optimizer."""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import tempfile
import time

from experiments.bench.step import real_tokens


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

    losses_seen = []

    class Trainer(trl.DPOTrainer):  # the same token ids as the JAX side: skip TRL's tokenization
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def compute_loss(self, *a, **k):  # the exact loss (the Trainer logs it rounded to 4 digits)
            out = super().compute_loss(*a, **k)
            losses_seen.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    rows = [
        {
            "prompt_ids": r["prompt_ids"].tolist(),
            "chosen_ids": r["chosen_ids"].tolist(),
            "rejected_ids": r["rejected_ids"].tolist(),
        }
        for r in records
    ]
    n = len(rows)
    steps = args.steps + args.warmup + 2
    times, logs = [], []

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
            logs_copy = dict(logs or {})
            logs_copy["step"] = state.global_step
            logs_list.append(logs_copy)

    logs_list = logs
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(
            output_dir=out,
            loss_type=["apo_zero"],
            beta=0.1,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
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
        # float32 master weights, bf16 autocast when asked: the same mixed precision as apo_jax's
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        t0 = time.perf_counter()
        trainer = Trainer(
            model=model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[Timer()],
        )
        setup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # the Trainer prints every log
            trainer.train()
        memory = torch.cuda.max_memory_allocated() if cuda else None
    by_step = {x["step"]: x for x in logs if "loss" in x}
    timed = times[args.warmup + 2 :]
    tokens = real_tokens(records)
    return {
        "part": "step",
        "impl": "trl",
        "reference": "precomputed" if precompute else "frozen",
        "layout": "padded (to the longest)",
        "gradient_checkpointing": gradient_checkpointing,
        "setup_s": setup_s,
        "median_s": statistics.median(timed),
        "min_s": min(timed),
        "max_s": max(timed),
        "steps": len(timed),
        "real_tokens": tokens,
        "tokens_per_s": tokens / statistics.median(timed),
        "memory_bytes": memory,
        "step0_logps_chosen": by_step[1]["logps/chosen"],
        "step0_logps_rejected": by_step[1]["logps/rejected"],
        "step0_loss": losses_seen[0],
        "step1_loss": losses_seen[1],
        "trl": trl.__version__,
        "torch": torch.__version__,
    }


def export_model(config, params, out: pathlib.Path, vocab: int) -> tuple[str, str]:
    """The same weights as a Hugging Face directory for TRL, with a tokenizer TRL can load."""
    from apo_jax import models, testing

    tok = testing.tiny_tokenizer(vocab_size=min(vocab, 320))
    models.to_hf(models.Llama(config), params, out, tokenizer=tok)
    return str(out), str(out)

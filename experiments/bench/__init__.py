"""Benchmarks against TRL, in one run on one machine: `python -m experiments.bench`.

    python -m experiments.bench --shape 125m --length 512 --batch 8          # CPU: the JAX and TRL steps
    python -m experiments.bench --shape 1b --length 2048 --batch 8 --dtype bfloat16   # one H100
    python -m experiments.bench --smoke                                       # CI: tiny, ~1 minute

Parts (`--parts`, comma-separated; default all):
  step       the preference train step (APO-zero, padded, online frozen reference / precomputed
             reference): compile time, step time (median, min, max after warm-up), tokens/s of real
             (non-padding) tokens, peak memory, FLOP/s and MFU;
  trl        the same step in TRL's DPOTrainer on PyTorch: the same weights (exported to a Hugging
             Face directory), the same token ids, batch, loss and optimizer, matched precision, gradient
             checkpointing on and off, online and precomputed reference; agreement on the step-0
             `logps/chosen`, `logps/rejected` and the loss after one update, and the ratios;
  logprobs   chunked vs full-logits log-probs (value and gradient): compiled temporary memory at the
             issue's size (V = 128k, T = 2048, 8 pairs; compiled, never run, on CPU) and time at `--length`;
  layouts    padded vs packed vs prompt-shared batches on the length mix of the CLAIR pairs;
  data       preprocessing (pairs/s) and TFRecords -> batches/s (needs TensorFlow; skipped without it);
  sampling   generated tokens/s with the KV cache at a few batch sizes.

FLOPs per real token, forward: 2·P_matmul + 2·L·N·H·T (P_matmul: the attention and MLP matrices and
the LM head, counted even when tied; embeddings not counted; causal attention over T = the row length;
recomputation not counted). A step is 3 forwards for the policy plus 1 for an online reference.
MFU = FLOPs per step / step time / (devices × peak bf16 dense FLOP/s of the device).

Memory: on a CPU, the compiled program's temporaries + arguments + outputs; on a GPU, the process's
peak so far (JAX cannot reset it: run one `--parts` per process for per-part peaks).

Per-device memory of the paper's step at 8B and 1B, compiled from abstract shapes (no weights):
`python -m experiments.bench.memory` (experiments/bench/memory.py).

Prints a table and writes JSON (`--out`), so results compare across commits. Random weights, nothing
downloaded. Runs from the source tree; the GPU path imports no TensorFlow.
"""

from apo_jax.models.flops import flops_per_token, param_counts
from experiments.bench.common import PARTS, shape_config
from experiments.bench.run import main

__all__ = ["PARTS", "flops_per_token", "main", "param_counts", "shape_config"]

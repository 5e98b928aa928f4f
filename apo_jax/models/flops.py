"""FLOP accounting of a Llama: parameters by kind, forward FLOPs per token, and the dense bf16 peak
of the accelerators (for MFU in the trainer's metrics and in experiments.bench)."""

from __future__ import annotations

from apo_jax.models.config import LlamaConfig

# Dense bf16 peak FLOP/s per device, for mfu (train.peak_flops overrides).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def param_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameters by kind (biases left out): the matmul ones count in FLOPs, the embedding does not.
    Norms: 2 per layer (4 with Gemma-2's sandwich norms) and the final one, plus Qwen3's q/k norms."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.H
    layers = L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F)
    head = 0 if config.tie_word_embeddings else D * V
    norms = (L * (4 if config.sandwich_norms else 2) + 1) * D + (2 * L * H if config.qk_norm else 0)
    return {"matmul_layers": layers, "lm_head": head, "embedding": D * V, "norms": norms}


def flops_per_token(config: LlamaConfig, length: int) -> float:
    """Forward FLOPs per token: 2·(matmul parameters, LM head included even when tied) + 2·L·N·H·T."""
    D, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    N, H = config.num_attention_heads, config.H
    return 2.0 * (param_counts(config)["matmul_layers"] + D * V) + 2.0 * L * N * H * length


def peak_flops(device_kind: str) -> float:
    """PEAK_FLOPS of the longest matching prefix: device kinds carry suffixes ("NVIDIA H100 80GB HBM3")."""
    keys = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
    return PEAK_FLOPS[max(keys, key=len)] if keys else 0.0

"""The Llama model: Flax Linen module, Hugging Face checkpoints, log-probs and sampling.

from apo_jax import models
model, params = models.from_hf("Meta-Llama-3-8B-Instruct/", dtype="bfloat16", mesh=mesh)
out = models.token_logps(model, params, ids, attention_mask, loss_mask)   # out["logps"]: [B]
new = models.generate(model, params, prompt_ids, prompt_mask, max_new_tokens=256)
models.to_hf(model, params, "exported/", tokenizer=models.load_tokenizer("Meta-Llama-3-8B-Instruct/"))
model, params = models.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # llama.cpp's files, no PyTorch
"""

from apo_jax.models.config import PRESETS, LlamaConfig, LoraConfig, preset
from apo_jax.models.gguf import from_gguf, gguf_tokenizer
from apo_jax.models.hf import CheckpointError, from_hf, load_tokenizer, read_config, to_hf
from apo_jax.models.llama import Llama, frozen_copy, hidden_states, logits, output_weight, token_logps
from apo_jax.models.params import abstract_params, init_params
from apo_jax.models.sample import generate

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "abstract_params",
    "from_gguf",
    "from_hf",
    "frozen_copy",
    "generate",
    "gguf_tokenizer",
    "hidden_states",
    "init_params",
    "load_tokenizer",
    "logits",
    "output_weight",
    "preset",
    "read_config",
    "to_hf",
    "token_logps",
]

"""Test helpers that need PyTorch (the test extra): random transformers checkpoints and an
OpenAI-compatible inference server on transformers' model, the independent side of parity and
online-loop tests.

    python tests/helpers.py serve MODEL PORT    # a ModelServer in the foreground (online.server_command)
"""

from __future__ import annotations

import os
import pathlib
import threading

from apo_jax.loopback import LoopbackServer
from apo_jax.models import LlamaConfig


def tiny_hf_llama(
    path: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    rope_theta: float = 10000.0,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    initializer_range: float = 0.1,
    seed: int = 0,
    tokenizer=None,
    model_type: str = "llama",
    **family,
) -> pathlib.Path:
    """Writes a random Hugging Face Llama (safetensors, float32) to `path` and returns it; another
    family of transformers with `model_type` ("mistral", "qwen2", "qwen3") and its own config fields
    in `family` (e.g. `sliding_window=5`).

    Sizes left out are the `tiny` preset's (models.LlamaConfig.tiny: GQA, 4 query heads over 2 kv
    heads), token ids too. A larger `initializer_range` than
    Llama's 0.02 keeps the random model's predictions far from uniform, so parity tests mean
    something. A tokenizer, if given, is saved beside it.
    """
    import torch
    import transformers

    tiny = LlamaConfig.tiny()
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
    }
    torch.manual_seed(seed)
    sizes = {k: getattr(tiny, k) if v is None else v for k, v in sizes.items()}
    config = transformers.AutoConfig.for_model(
        model_type,
        **sizes,
        head_dim=head_dim or sizes["hidden_size"] // sizes["num_attention_heads"],  # Qwen3's default is 128
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        rope_theta=rope_theta,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        initializer_range=initializer_range,
        max_position_embeddings=256,
        bos_token_id=tiny.bos_token_id,
        eos_token_id=list(tiny.eos_token_id),
        pad_token_id=tiny.pad_token_id,
        **family,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms at 1 would hide a wrong norm mapping: make them random too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(
                    1.0 + 0.2 * torch.randn_like(p)
                    if name.endswith("norm.weight")
                    else 0.1 * torch.randn_like(p)
                )
    path = pathlib.Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class ModelServer(LoopbackServer):
    """An OpenAI-compatible inference server for a Hugging Face checkpoint, on transformers' PyTorch
    model (the independent side of tests, needs the test extra): /v1/chat/completions (greedy at
    temperature 0, else sampled with the request's seed), /v1/models (the served path as `root`, as
    vLLM and SGLang report it) and SGLang's /update_weights_from_disk {"model_path"} to reload."""

    def __init__(self, model_path, name: str = "policy", port: int = 0):
        self.name, self.reloads = name, []
        self._load(model_path)
        super().__init__(port)

    def _load(self, path) -> None:
        import transformers

        self.path = str(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.path).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(self.path)

    def handle_get(self, h) -> None:
        if h.path.rstrip("/").endswith("/models"):
            self.send(
                h, 200, {"object": "list", "data": [{"id": self.name, "object": "model", "root": self.path}]}
            )
        else:
            super().handle_get(h)

    def handle(self, h, body) -> None:
        import torch

        if h.path.rstrip("/").endswith("/update_weights_from_disk"):
            with self.lock:
                self._load(body["model_path"])
                self.reloads.append(self.path)
            self.send(h, 200, {"success": True, "message": f"loaded {self.path}"})
            return
        with self.lock:
            ids = self.tok.apply_chat_template(
                body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            temperature = float(body.get("temperature", 1.0))
            if temperature > 0:
                torch.manual_seed(int(body.get("seed", 0) or 0))
            with torch.no_grad():
                out = self.model.generate(
                    **ids,
                    max_new_tokens=int(body.get("max_tokens", 16)),
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=float(body.get("top_p", 1.0)),
                )
            text = self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        self.send_chat(h, body["model"], text)


def _serve(argv=None) -> None:
    """`python tests/helpers.py serve MODEL PORT`: a ModelServer in the foreground (the stand-in
    for `vllm serve` in tests of online.server_command)."""
    import signal
    import sys

    _, model, port = sys.argv[1:] if argv is None else argv
    server = ModelServer(model, port=int(port))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        threading.Event().wait()
    finally:
        server.close()


if __name__ == "__main__":
    _serve()

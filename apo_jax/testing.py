"""Tiny, real models and tokenizers built locally: shared by tests, notebooks and the miniature.

Nothing here downloads anything. `tiny_hf_llama` writes a randomly initialized
`transformers.LlamaForCausalLM` with `save_pretrained` (needs PyTorch: the test extra);
`tiny_tokenizer` trains a byte-level BPE tokenizer on a few sentences and gives it a
Llama-3-style chat template. `ChatServer` is a real OpenAI-compatible endpoint on 127.0.0.1 that
answers with a Python function (the stand-in for a stronger LLM in tests and the miniature).
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import random
import threading

from apo_jax.data.preprocess import preprocess
from apo_jax.models import LlamaConfig

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
)
# Llama 3's template without the system-header date stamping (see DESIGN.md's pitfalls).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Anchored preference optimization raises the chosen likelihood and lowers the rejected one.",
    "A stronger model minimally revises the answer, so the pair differs only where it matters.",
    "Compute the first twenty Fibonacci numbers with the golden ratio, step by step.",
    "user assistant system: explain, revise, answer, improve, correct, because, therefore.",
)


# The shapes of each family's shipped chat template (the published tokenizer_config.json templates,
# without tools): what moves the prompt/completion boundary is kept, e.g. Qwen2.5's default system
# turn, Qwen3's empty think block opening the answer, Mistral's [INST] without a generation prompt,
# Gemma's `model` role and its refusal of a system turn. {family: (special tokens, bos, eos, pad, template)}
FAMILY_CHAT = {
    "llama": (SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "<|pad|>", CHAT_TEMPLATE),
    "qwen2": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ),
    "qwen3": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') }}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ),
    "mistral": (
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "<s>",
        "</s>",
        "<unk>",
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}",
    ),
    "gemma2": (
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
    ),
}


def tiny_tokenizer(vocab_size: int = 320, corpus=CORPUS, family: str = "llama"):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (a few sentences by default),
    with the special tokens and chat-template shape of `family` (FAMILY_CHAT; Llama 3's by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, pad, template = FAMILY_CHAT[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template
    )


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


WORDS = (
    "the answer is correct because it explains each step clearly and checks the result "
    "revise improve careful wrong number golden ratio table value sequence first second next"
).split()


def tiny_preference_rows(n: int = 64, seed: int = 0, *, unpaired: bool = False) -> list[dict]:
    """Short synthetic conversational pairs (or unpaired rows): prompt, a longer chosen answer."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"question {i}: {text(rng.randint(2, 6))}?"}]
        chosen, rejected = text(rng.randint(3, 9)), text(rng.randint(2, 7))
        if unpaired:
            answer = [{"role": "assistant", "content": chosen if i % 2 else rejected}]
            rows.append({"prompt": prompt, "completion": answer, "label": bool(i % 2)})
        else:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return rows


def tiny_preference_records(
    out_dir,
    tokenizer,
    n: int = 64,
    seed: int = 0,
    max_length: int = 96,
    *,
    unpaired: bool = False,
    extra=None,
) -> pathlib.Path:
    """Writes tiny pairs as JSONL and preprocesses them into `out_dir` (TFRecords + metadata.json)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rows = tiny_preference_rows(n, seed, unpaired=unpaired)
    for i, row in enumerate(rows):
        row.update((extra or (lambda i: {}))(i))
    src = out_dir.with_name(out_dir.name + ".jsonl")
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess(str(src), out_dir, tokenizer, max_length=max_length, unpaired=unpaired)
    return out_dir


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port) that hands every POST's JSON body to
    `handle(handler, body)`; `url` is its OpenAI-style base URL. Use `with` or call `close()`."""

    def __init__(self, port: int = 0):
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                owner.handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_GET(self):
                owner.handle_get(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, h, body) -> None:
        raise NotImplementedError

    def handle_get(self, h) -> None:
        self.send(h, 404, {"error": {"message": f"no GET {h.path}"}})

    @staticmethod
    def send(h, code: int, payload, headers=None) -> None:
        """A JSON response; a client that already hung up is not an error."""
        raw = json.dumps(payload).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @classmethod
    def send_chat(cls, h, model: str, content: str, usage: tuple[int, int] = (0, 0)) -> None:
        """A chat.completion answer with `content`; `usage` = (prompt, completion) tokens."""
        prompt, completion = usage
        message = {"role": "assistant", "content": content}
        tokens = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        cls.send(
            h,
            200,
            {
                "id": "loopback",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": tokens,
            },
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ChatServer(LoopbackServer):
    """A /chat/completions endpoint answering every request with `respond(body) -> content` and keeping
    each request body in `bodies`; `usage` = (prompt, completion) tokens reported per answer."""

    def __init__(self, respond, usage: tuple[int, int] = (0, 0)):
        self.respond, self.usage, self.bodies = respond, usage, []
        super().__init__()

    def handle(self, h, body) -> None:
        with self.lock:
            self.bodies.append(body)
        self.send_chat(h, body["model"], self.respond(body), self.usage)


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
    """`python -m apo_jax.testing serve MODEL PORT`: a ModelServer in the foreground (the stand-in
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

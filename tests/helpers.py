"""What several test modules share (levanter's tests/test_utils.py): random transformers checkpoints
and an OpenAI-compatible inference server on transformers' model (PyTorch, the test extra: the
independent side of parity and online-loop tests), the tiny training config and its logs, the
objectives' random batches, the recorded GPT-4 reviser behind a loopback server, and the data
commands' input files and one-line errors. Test modules import from here, never from each other.

    python tests/helpers.py serve MODEL PORT    # a ModelServer in the foreground (online.server_command)
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import threading
import time

import numpy as np

from apo_jax import losses
from apo_jax.loopback import LoopbackServer
from apo_jax.models import preset

ROOT = pathlib.Path(__file__).resolve().parents[1]


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

    Sizes left out are the `tiny` preset's (models.preset("tiny"): GQA, 4 query heads over 2 kv
    heads), token ids too. A larger `initializer_range` than
    Llama's 0.02 keeps the random model's predictions far from uniform, so parity tests mean
    something. A tokenizer, if given, is saved beside it.
    """
    import torch
    import transformers

    tiny = preset("tiny")
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


# --- training configs and their logs ---------------------------------------------------------


def make_config(workdir, train_dir, **overrides):
    """The tiny model's training config (one device, 6 steps); `group__key=value` overrides."""
    from apo_jax import train  # the trainer (orbax, optax) only where a test trains

    cfg = train.default_config()
    cfg.workdir = str(workdir)
    cfg.model.preset = "tiny"
    cfg.data.train = str(train_dir)
    cfg.loss.name = "apo_zero"
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.schedule = "constant"
    cfg.train.steps = 6
    cfg.train.batch_size = 8
    cfg.train.progress = False
    cfg.train.export_hf = False
    # one device unless a test says otherwise: each new mesh costs compiles (orbax's too)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    for key, value in overrides.items():
        group, _, name = key.rpartition("__")
        (cfg[group] if group else cfg)[name] = value
    return cfg


def metric(workdir, key):
    """One metric over the logged train steps (eval lines carry eval/ keys only)."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def losses_of(workdir):
    return metric(workdir, "loss")


# --- model inputs -------------------------------------------------------------------------------


def padded_batch(seed=0, B=4, T=14, V=320):
    """Random ids with a left-padded row, a right-padded row and two full rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, V, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, :5] = 0  # left padding
    mask[1, 10:] = 0  # right padding
    return ids, mask


# --- the objectives' random batches (float32, as a model gives them) ------------------------------

RTOL, ATOL = 1e-5, 2e-6
B, T = 8, 12


def make_batch(seed, beta_scale=1.0):
    """Random log-probs and extras; float32 as the model would give them."""
    rng = np.random.default_rng(seed)
    lc = rng.integers(1, 40, B).astype(np.float32)
    lr = rng.integers(1, 40, B).astype(np.float32)
    # summed log-probs: per-token averages in [-3, -0.05] times the length
    pc = (-rng.uniform(0.05, 3.0, B) * lc).astype(np.float32)
    pr = (-rng.uniform(0.05, 3.0, B) * lr).astype(np.float32)
    rc = (pc + rng.normal(0, 4.0 * beta_scale, B)).astype(np.float32)
    rr = (pr + rng.normal(0, 4.0 * beta_scale, B)).astype(np.float32)
    mask_c = (np.arange(T)[None] >= rng.integers(1, T - 2, B)[:, None]).astype(np.float32)
    mask_r = (np.arange(T)[None] >= rng.integers(1, T - 2, B)[:, None]).astype(np.float32)
    return {
        "pc": pc,
        "pr": pr,
        "rc": rc,
        "rr": rr,
        "chosen_lengths": lc,
        "rejected_lengths": lr,
        "is_tie": rng.random(B) < 0.4,
        "timestamps": rng.integers(0, 99, B).astype(np.int32),
        "scores": rng.random(B).astype(np.float32),
        "label": rng.random(B) < 0.5,
        "kl_policy": rng.normal(-1, 2, B).astype(np.float32),
        "kl_ref": rng.normal(-1.5, 2, B).astype(np.float32),
        "tpc": (-rng.uniform(0, 3, (B, T))).astype(np.float32),
        "tpr": (-rng.uniform(0, 3, (B, T))).astype(np.float32),
        "trc": (-rng.uniform(0, 3, (B, T))).astype(np.float32),
        "trr": (-rng.uniform(0, 3, (B, T))).astype(np.float32),
        "chosen_loss_mask": mask_c,
        "rejected_loss_mask": mask_r,
        "chosen_weights": rng.uniform(0.5, 1.5, (B, T)).astype(np.float32),
        "rejected_weights": rng.uniform(0.5, 1.5, (B, T)).astype(np.float32),
        "chosen_kl": rng.exponential(0.3, (B, T)).astype(np.float32),  # per-position KLs are >= 0
        "rejected_kl": rng.exponential(0.3, (B, T)).astype(np.float32),
    }


def call(name, b, **hp):
    """Calls the registered loss with what it declares, from a `make_batch` dict."""
    loss = losses.get(name)
    fields = {k: b[k] for k in loss.needs + loss.accepts if k in b}
    if "kl" in loss.needs:
        fields["kl"] = losses.kto_kl(b["kl_policy"], b["kl_ref"])
    if loss.granularity == "token":
        args = (b["tpc"], b["tpr"], b["trc"], b["trr"])
    elif loss.kind == "unpaired":
        args = (b["pc"], b["rc"])
    else:
        args = (b["pc"], b["pr"], b["rc"], b["rr"])
    return loss(*args, **fields, **hp)


def f64(b):
    return {
        k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
        for k, v in b.items()
    }


# --- the recorded GPT-4 reviser behind a loopback server ------------------------------------------

DATA = pathlib.Path(__file__).parent / "data"
CLAIR_ROWS = [json.loads(line) for line in (DATA / "clair_gpt4_revisions.jsonl").open()]


class RecordedReviser(LoopbackServer):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers from the recorded GPT-4
    responses, with scripted faults per row and attempt, and counts requests per row."""

    def __init__(self, script: dict[int, list[str]] | None = None, delay: float = 0.0):
        self.script, self.delay = script or {}, delay
        self.counts: dict[int, int] = {}
        super().__init__()

    def row_of(self, body) -> int:
        text = body["messages"][-1]["content"]
        return next(
            i for i, r in enumerate(CLAIR_ROWS) if f"{{student_solution}}: {r['rejected']}\n\n" in text
        )

    def handle(self, h, body):
        i = self.row_of(body)
        with self.lock:
            attempt = self.counts.get(i, 0)
            self.counts[i] = attempt + 1
        plan = self.script.get(i, [])
        action = (
            plan[attempt]
            if attempt < len(plan)
            else (plan[-1] if plan and plan[-1] in ("malformed", "400") else "ok")
        )
        time.sleep(self.delay)
        if action == "429":
            return self.send(h, 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.05"})
        if action == "500":
            return self.send(h, 500, {"error": {"message": "server error"}})
        if action == "400":
            return self.send(h, 400, {"error": {"message": "bad request"}})
        if action == "timeout":
            time.sleep(1.0)  # the client gave up after 0.5 s
            return
        if action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "malformed":
            raw = b"{not json"
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
            return
        response = json.loads(json.dumps(CLAIR_ROWS[i]["reviser_response"]))
        if action == "unparsable":
            response["choices"][0]["message"]["content"] = "I would not change anything."
        return self.send(h, 200, response)


def clair_answers(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "rejected": r["rejected"], "source": i}) + "\n"
            for i, r in enumerate(CLAIR_ROWS)
        )
    )
    return path


def revise_cmd(answers, out, base_url, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "apo_jax.data.clair",
        "revise",
        "--input",
        str(answers),
        "--output",
        str(out),
        "--base-url",
        base_url,
        "--model",
        "gpt-4-0125-preview",
        *extra,
    ]


# --- data files and the commands' one-line errors ------------------------------------------------

PAIRS = [
    {"prompt": f"question {i}?", "chosen": f" good answer {i}.", "rejected": f" bad {i}."} for i in range(6)
]


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def run_preprocess(src, out, tok, *extra) -> int:
    from apo_jax.data import preprocess  # TensorFlow, only where a test preprocesses

    return preprocess.main(["--input", str(src), "--output", str(out), "--tokenizer", str(tok), *extra])

"""Tiny tokenizers and preference data built locally, for the miniature, the benchmarks, the tests and
the README's examples: nothing is downloaded.

`tiny_tokenizer` trains a byte-level BPE tokenizer on a few sentences and gives it a family's chat
template (Llama 3's by default; apo_jax.models.families.CHAT has the others' shapes);
`tiny_preference_rows` and `tiny_preference_records` make short synthetic conversational pairs,
the latter preprocessed into TFRecords.
"""

from __future__ import annotations

import json
import pathlib
import random

from apo_jax.data.preprocess import preprocess
from apo_jax.models.families import CHAT

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Anchored preference optimization raises the chosen likelihood and lowers the rejected one.",
    "A stronger model minimally revises the answer, so the pair differs only where it matters.",
    "Compute the first twenty Fibonacci numbers with the golden ratio, step by step.",
    "user assistant system: explain, revise, answer, improve, correct, because, therefore.",
)


def tiny_tokenizer(vocab_size: int = 320, corpus=CORPUS, family: str = "llama"):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (a few sentences by default),
    with the special tokens and chat-template shape of `family` (apo_jax.models.families.CHAT;
    Llama 3's by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, pad, template = CHAT[family]
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

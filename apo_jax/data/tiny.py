"""Tiny tokenizers and preference data built locally, for the miniature, the benchmarks, the tests and
the README's examples: nothing is downloaded.

`tiny_tokenizer` trains a byte-level BPE tokenizer on a few sentences and gives it a family's chat
template (Llama 3's by default; FAMILY_CHAT has the shapes of the others); `tiny_preference_rows` and
`tiny_preference_records` make short synthetic conversational pairs, the latter preprocessed into
TFRecords.
"""

from __future__ import annotations

import json
import pathlib
import random

from apo_jax.data.preprocess import preprocess

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

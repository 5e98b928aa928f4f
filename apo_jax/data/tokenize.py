"""Tokenization of pairs as TRL 1.16's DPOTrainer does it, plus truncation with counts.

prompt ids = the chat template of the prompt with `add_generation_prompt=True`; completion ids =
the suffix of the templated prompt+completion after the prompt ids. Where the two disagree (a
template that renders the prompt differently alone, or a token merging across the boundary),
the completion starts at the common prefix, as in TRL, and the row is counted as a prefix
mismatch (never silently). Standard (string) rows get the EOS token appended when missing;
conversational rows take their end tokens from the template. One `max_length` keeps the start
of prompt+completion; rows whose prompt alone fills it are dropped. An optional
`max_prompt_length` keeps the end of long prompts (the part next to the answer). Step-level
pairs (a `prefix`: the answer so far) continue the assistant turn: no EOS or end-of-turn tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from apo_jax.data.formats import Pair, Unpaired

# Llama 3.2/3.3 templates stamp today's date unless given one: fix it, so ids do not change daily.
DEFAULT_DATE_STRING = "26 Jul 2024"


@dataclasses.dataclass
class Tokenized:
    prompt_ids: list[int]
    chosen_ids: list[int]  # for unpaired examples: the completion
    rejected_ids: list[int] | None
    prefix_mismatch: bool


def chat_kwargs(tokenizer, extra: dict | None = None) -> dict:
    """Keyword arguments for `apply_chat_template`: a fixed `date_string` where the template reads one."""
    kwargs = dict(extra or {})
    template = getattr(tokenizer, "chat_template", None) or ""
    if "date_string" in template or "strftime_now" in template:
        kwargs.setdefault("date_string", DEFAULT_DATE_STRING)
    return kwargs


def _template(tokenizer, messages, kwargs, **more) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **more)
    return list(out["input_ids"])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(tokenizer, example: Pair | Unpaired, kwargs: dict | None = None) -> Tokenized:
    """Token ids of one pair (or unpaired example), exactly as TRL 1.16 builds them."""
    kwargs = chat_kwargs(tokenizer) if kwargs is None else kwargs
    answers = [example.chosen, example.rejected] if isinstance(example, Pair) else [example.completion]
    if isinstance(example, Pair) and example.prefix:
        return _continuation(tokenizer, example, kwargs)
    if example.conversational:
        prompt_ids = _template(tokenizer, example.prompt, kwargs, add_generation_prompt=True)
        full = [_template(tokenizer, example.prompt + answer, kwargs) for answer in answers]
    else:
        eos = tokenizer.eos_token
        answers = [a if a.endswith(eos) else a + eos for a in answers]
        prompt_ids = list(tokenizer(text=example.prompt)["input_ids"])
        full = [list(tokenizer(text=example.prompt + a)["input_ids"]) for a in answers]
    prompt_len = min(_common_prefix_length(prompt_ids, f) for f in full)
    completions = [f[prompt_len:] for f in full]
    return Tokenized(
        prompt_ids=prompt_ids[:prompt_len],
        chosen_ids=completions[0],
        rejected_ids=completions[1] if len(completions) > 1 else None,
        prefix_mismatch=prompt_len < len(prompt_ids),
    )


def _continuation(tokenizer, example: Pair, kwargs: dict) -> Tokenized:
    """A step-level pair (Step-DPO): the prompt is the (chat-framed) question plus the answer so far,
    and chosen/rejected are the next step's text, which continues the same turn: no EOS, no end of
    turn, unless the row `ends_turn` (the answers finish the solution: Step-DPO's last step, SCDPO's
    continuations). The completion ids are the suffix of the tokenized whole after the common prefix."""
    if example.conversational:
        head = tokenizer.apply_chat_template(
            example.prompt, tokenize=False, add_generation_prompt=True, **kwargs
        )
        special = False  # the template writes BOS itself
    else:
        head, special = example.prompt, True

    def ids(text):
        return list(tokenizer(text=text, add_special_tokens=special)["input_ids"])

    prompt_ids = ids(head + example.prefix)
    answers = (example.chosen, example.rejected)
    if not example.ends_turn:
        full = [ids(head + example.prefix + answer) for answer in answers]
    elif example.conversational:  # the answer finishes the turn: the template closes it
        turns = [example.prompt + [{"role": "assistant", "content": example.prefix + a}] for a in answers]
        full = [_template(tokenizer, t, kwargs) for t in turns]
    else:
        full = [ids(head + example.prefix + a + tokenizer.eos_token) for a in answers]
    prompt_len = min(_common_prefix_length(prompt_ids, f) for f in full)
    return Tokenized(
        prompt_ids[:prompt_len], full[0][prompt_len:], full[1][prompt_len:], prompt_len < len(prompt_ids)
    )


@dataclasses.dataclass
class Truncation:
    dropped: bool = False
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False


def truncate(t: Tokenized, max_length: int | None, max_prompt_length: int | None = None):
    """(Tokenized, Truncation) under TRL's `keep_start` rule; `dropped` when the prompt fills max_length."""
    info = Truncation()
    prompt = t.prompt_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, info.prompt_truncated = prompt[-max_prompt_length:], True
    if max_length is None:
        return dataclasses.replace(t, prompt_ids=prompt), info
    if len(prompt) >= max_length:
        info.dropped = True
        return t, info
    room = max_length - len(prompt)
    chosen = t.chosen_ids[:room]
    info.chosen_truncated = len(chosen) < len(t.chosen_ids)
    rejected = None
    if t.rejected_ids is not None:
        rejected = t.rejected_ids[:room]
        info.rejected_truncated = len(rejected) < len(t.rejected_ids)
    return dataclasses.replace(t, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected), info


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the tokenizer model, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "tokenizer": backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

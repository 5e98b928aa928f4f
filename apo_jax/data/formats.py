"""Preference rows in, in every common layout; one canonical pair (or unpaired example) out.

Accepted (TRL's dataset formats, decided per column, not from one sampled key):
  - standard, explicit prompt:       {"prompt": str, "chosen": str, "rejected": str}
  - standard, implicit prompt:       {"chosen": str, "rejected": str}  (prompt = common prefix)
  - conversational, explicit prompt: {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
  - conversational, implicit prompt: {"chosen": [msgs], "rejected": [msgs]}  (prompt = common turns)
  - hybrid (ContextualAI/ultrafeedback_clair_32k): "prompt" a string while "chosen"/"rejected"
    are whole [user, assistant] conversations that repeat the prompt as their user turn.
  - unpaired (KTO): {"prompt", "completion", "label"}.
Optional extras: `is_tie` (TODO), `timestamp` (NS-DPO), `score` (UNA). Step-level pairs (Step-DPO,
apo_jax.data.steps) add `prefix`: the answer's text so far (its correct earlier steps), after which
chosen and rejected continue the same assistant turn. A row that cannot be
read raises `RowError` naming its index and field; `read_pairs` counts and skips those.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import Any

from apo_jax.data.jsonl import parse_lines

EXTRAS = {"is_tie": bool, "timestamp": int, "score": float}


class RowError(ValueError):
    """A malformed row: says which row (0-based index in the source) and which field."""

    def __init__(self, index: int, field: str, problem: str):
        super().__init__(f"row {index}, field {field!r}: {problem}")
        self.index, self.field, self.problem = index, field, problem


@dataclasses.dataclass
class Pair:
    """A canonical preference pair: conversational (message lists) or standard (strings).

    Conversational pairs follow TRL's explicit-prompt form: `prompt` holds the turns before the
    answer, `chosen`/`rejected` the assistant turn(s).
    """

    prompt: list[dict] | str
    chosen: list[dict] | str
    rejected: list[dict] | str
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    prefix: str = ""  # step-level pairs: the assistant's answer so far; chosen/rejected continue it
    ends_turn: bool = False  # with a prefix: chosen/rejected finish the answer (end-of-turn included)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclasses.dataclass
class Unpaired:
    prompt: list[dict] | str
    completion: list[dict] | str
    label: bool
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _messages(index: int, field: str, value) -> list[dict] | str:
    """A string, or a validated list of {"role", "content"} messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(
            index, field, f"expected a string or a non-empty list of messages, got {type(value).__name__}"
        )
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RowError(index, field, f"each message needs string 'role' and 'content', got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_conversation(index: int, field: str, conv: list[dict]) -> tuple[list[dict], list[dict]]:
    """(turns before the final assistant answer, the answer turns)."""
    k = len(conv)
    while k > 0 and conv[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(conv):
        raise RowError(index, field, "the conversation has no assistant turn at its end")
    return conv[:k], conv[k:]


def _common_prefix(a, b):
    """TRL's `extract_prompt`: the longest common prefix (turns, or characters back to a space)."""
    idx = 0
    for idx in range(min(len(a), len(b))):
        if a[idx] != b[idx]:
            if isinstance(a, str) and a[idx - 1] == " ":
                idx -= 1
            break
    return a[:idx], a[idx:], b[idx:]


def _extras(index: int, row: dict) -> dict[str, Any]:
    out = {}
    for key, kind in EXTRAS.items():
        if row.get(key) is None:
            continue
        value = row[key]
        if kind is bool and not isinstance(value, bool | int):
            raise RowError(index, key, f"expected a boolean, got {value!r}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RowError(index, key, f"expected a number, got {value!r}")
        if kind is int and value != int(value):
            raise RowError(index, key, f"expected an integer, got {value!r}")
        out[key] = kind(value)
    return out


def normalize_pair(row: dict, index: int) -> Pair:
    """One source row -> a canonical Pair (see the module docstring), or RowError."""
    if not isinstance(row, dict):
        raise RowError(index, "<row>", f"expected a JSON object, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise RowError(index, field, "missing")
    chosen = _messages(index, "chosen", row["chosen"])
    rejected = _messages(index, "rejected", row["rejected"])
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise RowError(
                index, "rejected", "chosen and rejected must both be strings or both conversations"
            )
        prompt, chosen, rejected = _common_prefix(chosen, rejected)
        if not prompt:
            raise RowError(index, "chosen", "no prompt column and no common prefix to take it from")
        if not chosen or not rejected:
            raise RowError(
                index, "chosen" if not chosen else "rejected", "empty after removing the common prompt"
            )
        extras, prefix, ends = _extras(index, row), _prefix(index, row), _ends_turn(index, row)
        return Pair(prompt, chosen, rejected, extras, prefix, ends)
    prompt = _messages(index, "prompt", prompt)
    answers = {}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            head, answer = _split_conversation(index, field, value)
            if head:  # a whole conversation: its leading turns must be the prompt (hybrid layout)
                expected = prompt if isinstance(prompt, list) else None
                if expected is None:
                    users = [m for m in head if m["role"] == "user"]
                    if not users or users[-1]["content"].strip() != prompt.strip():
                        raise RowError(
                            index, field, "the conversation's user turn does not repeat the prompt string"
                        )
                    expected = head
                elif head != expected:
                    raise RowError(index, field, "the conversation's leading turns differ from the prompt")
                answers[f"{field}_prompt"] = head
            value = answer
        answers[field] = value
    conversational = isinstance(prompt, list) or "chosen_prompt" in answers or "rejected_prompt" in answers
    if conversational:
        if isinstance(prompt, str):
            prompt = answers.get("chosen_prompt") or answers.get("rejected_prompt")
        for field in ("chosen", "rejected"):
            if isinstance(answers[field], str):
                answers[field] = [{"role": "assistant", "content": answers[field]}]
    for field in ("chosen", "rejected"):
        if _empty(answers[field]):
            raise RowError(index, field, "empty answer")
    return Pair(
        prompt,
        answers["chosen"],
        answers["rejected"],
        _extras(index, row),
        _prefix(index, row),
        _ends_turn(index, row),
    )


def _empty(answer) -> bool:
    """An answer with no text: "", or assistant turns whose contents are all empty."""
    if isinstance(answer, str):
        return not answer.strip()
    return not answer or all(not m["content"].strip() for m in answer)


def _ends_turn(index: int, row: dict) -> bool:
    value = row.get("ends_turn", False)
    if not isinstance(value, bool):
        raise RowError(index, "ends_turn", f"expected true or false, got {value!r}")
    return value and bool(row.get("prefix"))  # without a prefix the answers are whole: they end the turn


def _prefix(index: int, row: dict) -> str:
    prefix = row.get("prefix")
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise RowError(index, "prefix", f"expected a string (the answer so far), got {type(prefix).__name__}")
    for field in ("chosen", "rejected"):
        if not isinstance(row[field], str):
            raise RowError(
                index, field, "a row with a prefix continues one answer: give chosen/rejected as strings"
            )
    return prefix


def normalize_unpaired(row: dict, index: int) -> Unpaired:
    """One {"prompt", "completion", "label"} row -> Unpaired, or RowError."""
    if not isinstance(row, dict):
        raise RowError(index, "<row>", f"expected a JSON object, got {type(row).__name__}")
    for field in ("prompt", "completion", "label"):
        if row.get(field) is None:
            raise RowError(index, field, "missing")
    if not isinstance(row["label"], bool | int):
        raise RowError(index, "label", f"expected a boolean, got {row['label']!r}")
    prompt = _messages(index, "prompt", row["prompt"])
    completion = _messages(index, "completion", row["completion"])
    if isinstance(prompt, list) != isinstance(completion, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        else:
            raise RowError(index, "prompt", "a string prompt with a conversational completion")
    if _empty(completion):
        raise RowError(index, "completion", "empty answer")
    return Unpaired(prompt, completion, bool(row["label"]), _extras(index, row))


def iter_rows(source: str | pathlib.Path, split: str = "train") -> Iterator[dict]:
    """Raw rows from a .jsonl/.json file, a .parquet file, or a Hugging Face dataset
    (a `save_to_disk` directory, a local dataset directory, or a cached hub name, offline)."""
    path = pathlib.Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        for row, problem in parse_lines(path):
            yield row if problem is None else _BadLine(problem)
        return
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = _split(ds, split, source)
    else:
        ds = _load_offline(datasets, source, split)
    yield from ds


def _split(splits, split: str, source):
    """`splits[split]`, or a one-line error naming the splits there are."""
    if split not in splits:
        raise ValueError(
            f"{source}: no split {split!r} (--split); its splits are {', '.join(map(repr, splits))}"
        )
    return splits[split]


def _load_offline(datasets, source, split):
    """The split of a local dataset directory or of a hub name already in the local cache; never the
    network. A slice such as `train[:100]` is datasets' own syntax."""
    path = pathlib.Path(source)
    if not path.exists() and (path.suffix or str(source).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{source}: no such file or folder")
    import huggingface_hub.constants as hub

    flags = [
        (hub, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        splits = datasets.load_dataset(str(source))  # every split: datasets prepares them all anyway
        if split not in splits and split.split("[")[0] in splits:
            return datasets.load_dataset(str(source), split=split)
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as e:
        raise FileNotFoundError(
            f"{source}: not a file or folder here, and not a dataset in the local Hugging Face cache "
            f"(read offline: {type(e).__name__})"
        ) from None
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)
    return _split(splits, split, source)


class _BadLine(dict):
    """Stands in for a line that is not JSON, so that it is reported with its index."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem


@dataclasses.dataclass
class ReadReport:
    rows: int = 0
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)  # the first few, for the summary


def as_chat(example: Pair | Unpaired) -> Pair | Unpaired:
    """A standard (string) example as a one-turn conversation: user prompt, assistant answer(s).

    For instruction-tuned models, whose chat template must frame the text (CLAIR's pairs.jsonl is
    TRL's standard format; preprocess it with `--as-chat`)."""
    if example.conversational:
        return example

    def turn(role, text):
        return [{"role": role, "content": text}]

    if isinstance(example, Pair):
        if example.prefix:  # a continuation stays text: tokenize_example frames the prompt
            return Pair(
                turn("user", example.prompt),
                example.chosen,
                example.rejected,
                example.extras,
                example.prefix,
                example.ends_turn,
            )
        return Pair(
            turn("user", example.prompt),
            turn("assistant", example.chosen),
            turn("assistant", example.rejected),
            example.extras,
        )
    return Unpaired(
        turn("user", example.prompt), turn("assistant", example.completion), example.label, example.extras
    )


def read_examples(
    source, *, unpaired: bool = False, split: str = "train", max_errors_shown: int = 20, chat: bool = False
):
    """([(source row index, Pair or Unpaired)], ReadReport): malformed rows skipped and counted.

    `chat`: standard (string) rows become one-turn conversations (see `as_chat`)."""
    report, out = ReadReport(), []
    normalize = normalize_unpaired if unpaired else normalize_pair
    for index, row in enumerate(iter_rows(source, split)):
        report.rows += 1
        try:
            if isinstance(row, _BadLine):
                raise RowError(index, "<row>", row.problem)
            example = normalize(row, index)
            out.append((index, as_chat(example) if chat else example))
        except RowError as e:
            report.skipped += 1
            if len(report.errors) < max_errors_shown:
                report.errors.append(f"{source}: {e}")
    return out, report

"""JSON Lines files: read all rows (`parse_lines` names each bad line, for readers that skip it),
write all rows atomically (a crash leaves the old file or the new); `write_atomic` does the same for
any text file."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any


def parse_lines(path) -> Iterator[tuple[Any, str | None]]:
    """(row, None) for every non-empty line of `path` that is UTF-8 JSON, (None, problem) for one that
    is not: the problem names the file and line, and the caller skips or raises it. Read as bytes, so
    a bad byte costs its line, not the file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield None, f"{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line), None
            except json.JSONDecodeError as e:
                yield None, f"{path}:{number}: not valid JSON ({e.msg})"


def read_jsonl(path) -> list[dict]:
    """Every non-empty line of `path`, parsed; a line that is not UTF-8 JSON is a ValueError naming
    the file and line."""
    rows = []
    for row, problem in parse_lines(path):
        if problem is not None:
            raise ValueError(problem)
        rows.append(row)
    return rows


def read_json_rows(path) -> list[dict]:
    """A JSON list of objects (AlpacaEval's files) or JSONL (`read_jsonl`); bad JSON is a ValueError
    naming the file (and line)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        return read_jsonl(path)
    try:
        rows = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: a JSON list whose items are not all objects")
    return rows


def write_atomic(path, text: str) -> pathlib.Path:
    """Writes `text` to `path` through a temporary file renamed into place."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_jsonl(path, rows) -> pathlib.Path:
    """Writes `rows` one JSON object per line, atomically."""
    return write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

"""JSON Lines files: read all rows (`parse_lines` names each bad line, for readers that skip it; a
file that is one JSON array is read as its items), write all rows atomically (a crash leaves the old
file or the new; `write_atomic` does the same for any text file). The append-only logs of long jobs
are `apo_jax.outputs`' (`append_lines`, `repair_tail`)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any


def _json_array(path) -> tuple[list | None, str | None]:
    """(items, None) if `path` is one JSON array; (None, None) if it is JSON Lines whose first line
    starts with '['; (None, problem) if it is neither."""
    raw = pathlib.Path(path).read_bytes()
    try:
        rows = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        first = raw.lstrip().split(b"\n", 1)[0]
        try:
            json.loads(first)
            return None, None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, f"{path}: starts with '[' but is neither a JSON array nor JSON Lines ({e})"
    return (rows, None) if isinstance(rows, list) else (None, None)


def parse_lines(path) -> Iterator[tuple[Any, str | None]]:
    """(row, None) for every non-empty line of `path` that is UTF-8 JSON, (None, problem) for one that
    is not: the problem names the file and line, and the caller skips or raises it. Read as bytes, so
    a bad byte costs its line, not the file. A file that is one JSON array (a list of rows, as
    AlpacaEval ships them) yields its items; one that starts with '[' and is neither yields a single
    problem saying so (not one per line of a pretty-printed array)."""
    with open(path, "rb") as f:
        starts_array = f.read(4096).lstrip()[:1] == b"["
    if starts_array:
        rows, problem = _json_array(path)
        if problem is not None:
            yield None, problem
            return
        if rows is not None:
            for row in rows:
                yield row, None
            return
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
    """Every non-empty line of `path`, parsed (or the items of a JSON array); a line that is not UTF-8
    JSON is a ValueError naming the file and line."""
    rows = []
    for row, problem in parse_lines(path):
        if problem is not None:
            raise ValueError(problem)
        rows.append(row)
    return rows


def read_json_rows(path) -> list[dict]:
    """A JSON list of objects (AlpacaEval's files) or JSONL (`read_jsonl`); bad JSON is a ValueError
    naming the file (and line)."""
    rows = read_jsonl(path)
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: rows that are not all JSON objects")
    return rows


def write_atomic(path, text: str) -> pathlib.Path:
    """Writes `text` to `path` through a temporary file renamed into place; a failed write (a full
    disk) leaves `path` as it was, removes the temporary file, and is an OSError naming `path`."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # write() errors name no file
    tmp.replace(path)
    return path


def write_jsonl(path, rows) -> pathlib.Path:
    """Writes `rows` one JSON object per line, atomically."""
    return write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

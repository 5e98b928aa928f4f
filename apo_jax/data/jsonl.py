"""JSON Lines files: read all rows, write all rows atomically (a crash leaves the old file or the new);
`write_atomic` does the same for any text file."""

from __future__ import annotations

import json
import pathlib


def read_jsonl(path) -> list[dict]:
    """Every non-empty line of `path`, parsed; a line that is not UTF-8 JSON is a ValueError naming
    the file and line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append(json.loads(line))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
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

"""Where commands write, so that no command deletes what it did not write.

- `replacing(out_dir, tool)`: a fresh temporary sibling to write into, moved into place when it is
  complete. An existing `out_dir` is replaced only when it holds exactly a previous output of the same
  tool (its manifest, `metadata.json` by default, names the tool and lists every other file) or when
  the user said `overwrite`; never the working directory, a folder above it, the home folder or a
  folder holding an input.
- `WorkdirLock(workdir)`: one live run per workdir; a second is refused naming the holder's host and
  pid; a lock left by a process that no longer exists on this host is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

from apo_jax.cli import UserError

MANIFEST = "metadata.json"


def manifest(tool: str, files=(), **extra) -> dict:
    """The provenance fields a tool writes into its output's manifest: what wrote it, and which files."""
    return {"written_by": tool, "files": sorted(files), **extra}


def _listed(meta: dict, name: str) -> set[str]:
    return {name, *meta.get("files", ()), *(s["file"] for s in meta.get("shards", ()))}


def previous_output(out: pathlib.Path, tool: str, name: str = MANIFEST) -> bool:
    """Whether `out` holds exactly what `tool` wrote: its manifest says so and lists every file there.
    Record folders written before manifests named their tool (`schema_version` and `shards` only)
    count as any record writer's."""
    try:
        meta = json.loads((out / name).read_text())
        present = {p.name for p in out.iterdir()}
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    writer = meta.get("written_by")
    legacy_records = writer is None and "schema_version" in meta and "shards" in meta
    return (writer == tool or legacy_records) and present == _listed(meta, name)


def check_output(
    out_dir,
    tool: str,
    *,
    overwrite: bool = False,
    inputs=(),
    manifest_name: str = MANIFEST,
    flag: str = "--output",
) -> pathlib.Path:
    """Raises UserError if writing `out_dir` could destroy anything but `tool`'s own earlier output."""
    out = pathlib.Path(out_dir).absolute()
    real = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out_dir}: is a file; give a folder (a new one, or one {tool} wrote)")
    cwd = pathlib.Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == pathlib.Path.home().resolve():
        raise UserError(
            f"{flag} {out_dir}: is the working directory, a folder above it or the home folder; "
            "the output replaces its folder, so name a new one (e.g. data/records)"
        )
    for given in inputs:
        path = pathlib.Path(given).resolve()
        if path.exists() and (path == real or real in path.parents):
            raise UserError(f"{flag} {out_dir}: holds the input {given}; name another folder for the output")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return out
    if previous_output(out, tool, manifest_name):
        return out
    names = sorted(p.name for p in out.iterdir())
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise UserError(
        f"{flag} {out_dir}: holds files {tool} did not write ({shown}); name a new folder, or pass "
        "--overwrite to replace it"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _partial_prefix(out: pathlib.Path) -> str:
    return f".{out.name}.partial-{socket.gethostname()}-"


def _remove_dead_partials(out: pathlib.Path) -> None:
    """Temporary siblings left by our own killed runs on this host (their pid is gone)."""
    prefix = _partial_prefix(out)
    for p in out.parent.glob(prefix + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def replacing(
    out_dir,
    tool: str,
    *,
    overwrite: bool = False,
    inputs=(),
    manifest_name: str = MANIFEST,
    flag: str = "--output",
):
    """Yields a fresh temporary folder beside `out_dir`; when the block ends without an error it
    replaces `out_dir` (checked first by `check_output`), otherwise it is removed. A killed job leaves
    only a hidden `.NAME.partial-HOST-PID-…` folder, removed by the next run on this host."""
    out = check_output(
        out_dir, tool, overwrite=overwrite, inputs=inputs, manifest_name=manifest_name, flag=flag
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{_partial_prefix(out)}{os.getpid()}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)


def publish(tmp: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Moves the complete `tmp` to `out`, the old `out` (already checked) aside first, then removed."""
    out = pathlib.Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# --- one run per workdir --------------------------------------------------------------------------

_HELD: dict[pathlib.Path, int] = {}  # lock path -> how many times this process holds it


class WorkdirLock:
    """`<workdir>/.lock` (JSON: host, pid, start time, command), held while a run writes the workdir.
    Re-entrant within one process (`experiments.run` and the trainer under it both take it)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir).absolute()
        self.path = self.workdir / ".lock"

    def acquire(self) -> WorkdirLock:
        if self.path in _HELD:
            _HELD[self.path] += 1
            return self
        if self.workdir.exists() and not self.workdir.is_dir():
            raise UserError(f"workdir {self.workdir}: is a file, not a folder")
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _HELD[self.path] = 1
            return self
        raise UserError(f"workdir {self.workdir}: could not take its lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            held = {}
        host, pid = held.get("host"), held.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            print(
                f"workdir {self.workdir}: taking over the lock of pid {pid}, which has ended", file=sys.stderr
            )
            self.path.unlink(missing_ok=True)
            return
        raise UserError(
            f"workdir {self.workdir} is in use by pid {pid} on host {host} (since {held.get('started')}: "
            f"{held.get('command')}); wait for that run, give another --config.workdir, or remove "
            f"{self.path} if that run is gone"
        )

    def release(self) -> None:
        count = _HELD.get(self.path, 0)
        if count > 1:
            _HELD[self.path] = count - 1
        elif count == 1:
            del _HELD[self.path]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""Where commands write, so that no command deletes what it did not write.

- `replacing(out_dir, tool)`: a fresh temporary sibling to write into, moved into place when it is
  complete. An existing `out_dir` is replaced only when it holds exactly a previous output of the same
  tool (its manifest, `metadata.json` by default, names the tool and lists every other file) or when
  the user said `overwrite`; never the working directory, a folder above it, the home folder or a
  folder holding an input. A symlinked `out_dir` has its target replaced; what a killed swap left
  beside it is put right by the next run there.
- `WorkdirLock(workdir)`: one live run per workdir; a second is refused naming the holder's host and
  pid; a lock left by a process that no longer exists on this host is taken over. `OutputLock(file)`
  does the same for one output file (an API job's); both are a `PathLock`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import sys
import time

from apo_jax.cli import UserError, one_line

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
    """Raises UserError if writing `out_dir` could destroy anything but `tool`'s own earlier output.
    What killed runs on this host left beside it is put right first (`_recover`)."""
    out = pathlib.Path(out_dir).absolute()
    real = pathlib.Path(os.path.realpath(out))  # a symlink's target is what gets replaced
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
    _recover(real)
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


def _old_name(out: pathlib.Path) -> str:
    return f".{out.name}.old-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"


def _dead_olds(out: pathlib.Path) -> list[pathlib.Path]:
    """Earlier outputs that a swap on this host set aside before its process ended, newest first
    (names without a host come from versions that did not write one)."""
    own = re.compile(rf"\.{re.escape(out.name)}\.old-(?:{re.escape(socket.gethostname())}-)?(\d+)-(\d+)")
    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
        m = own.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m[1])):
            found.append((int(m[2]), p))
    return [p for _, p in sorted(found, reverse=True)]


def _recover(out: pathlib.Path) -> None:
    """Puts right what killed runs on this host left beside `out`. A kill between `publish`'s two
    renames leaves no `out` and the old output set aside: it is moved back (the new one is not
    trusted: it may be incomplete). An old output whose swap went through is a superseded copy, and a
    partial folder is unfinished work: both are removed."""
    olds = _dead_olds(out)
    if olds and not os.path.lexists(out):
        olds.pop(0).rename(out)
        print(f"{out}: put back the previous output, set aside by a run that was killed", file=sys.stderr)
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    prefix = _partial_prefix(out)
    for p in out.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if p.is_dir() and not p.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _fresh_dir(parent: pathlib.Path, prefix: str) -> pathlib.Path:
    """A new empty folder `parent/prefix…` made with the user's umask (mkdtemp's are always 0700, and
    this folder becomes the output)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _as_umask(folder: pathlib.Path) -> None:
    """Gives the files a tool wrote into `folder` the user's umask: some writers create theirs private
    (safetensors' save_file makes 0600 files), and the output is the user's to share."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_failure(e: BaseException, tmp: pathlib.Path | None, write_errors: tuple) -> bool:
    """Whether `e` is the output's file system refusing the writes (full, read-only...), rather than
    an error of the work itself; with no `tmp` yet, any OSError is (making it failed)."""
    if isinstance(e, write_errors):
        return True
    if not isinstance(e, OSError):
        return False
    if tmp is None:
        return True
    name = e.filename
    inside = isinstance(name, (str, bytes, os.PathLike)) and tmp in pathlib.Path(os.fsdecode(name)).parents
    return e.errno in _WRITE_ERRNOS or inside


@contextlib.contextmanager
def replacing(
    out_dir,
    tool: str,
    *,
    overwrite: bool = False,
    inputs=(),
    manifest_name: str = MANIFEST,
    flag: str = "--output",
    write_errors: tuple[type[BaseException], ...] = (),
):
    """Yields a fresh temporary folder beside `out_dir`; when the block ends without an error it
    replaces `out_dir` (checked first by `check_output`), otherwise it is removed. A symlink is
    followed: its target is replaced and the link kept. A killed job leaves only hidden
    `.NAME.partial-HOST-PID-…` and `.NAME.old-HOST-PID-…` folders, which the next run on this host
    puts right. A file system that refuses the writes (full, read-only; or any of `write_errors`,
    e.g. a writer library's own error type) is a UserError naming `out_dir`."""
    out = check_output(
        out_dir, tool, overwrite=overwrite, inputs=inputs, manifest_name=manifest_name, flag=flag
    )
    target = pathlib.Path(os.path.realpath(out))
    existed = target.exists()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(target.parent, f"{_partial_prefix(target)}{os.getpid()}-")
        yield tmp
        _as_umask(tmp)
        publish(tmp, target)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if _write_failure(e, tmp, write_errors):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
            kept = f"the previous {out.name}/ is unchanged" if existed else "nothing was written"
            raise UserError(f"{out}: could not write it ({reason}); {kept}") from e
        raise


def publish(tmp: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Moves the complete `tmp` to `out` (a symlink's target), the old `out` (already checked) aside
    first, then removed; if the move fails, the old `out` is put back."""
    out = pathlib.Path(os.path.realpath(out))
    old = None
    if out.exists():
        old = out.with_name(_old_name(out))
        out.rename(old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# --- append-only files of long jobs ------------------------------------------------------------


def check_output_file(path, flag: str = "--output") -> pathlib.Path:
    """Makes sure a job can write the file `path` before it does any work (or pays for any request):
    its folder is created; a path that is a folder, or a folder that cannot be made or written, is a
    UserError naming it."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file in it (e.g. {path / 'out.jsonl'})")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: its folder {folder} is not writable")
    return path


def repair_tail(path) -> int:
    """Cuts the last line of `path` if a crash or a full disk left it incomplete (no newline at its
    end), keeping every complete line, and says so on stderr; returns the number of bytes removed. A
    last line that is a whole JSON object only lacking its newline gets the newline instead."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = pos = size
        while pos > 0:  # the last newline, read backwards in blocks
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            found = f.read(step).rfind(b"\n")
            if found >= 0:
                keep = pos + found + 1
                break
        else:
            keep = 0
        f.seek(keep)
        try:
            whole = isinstance(json.loads(f.read().decode("utf-8")), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = False
        if whole:
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    if whole:
        return 0
    print(
        f"{path}: removed its cut last line ({size - keep} bytes without a newline, left by a crash or a "
        "full disk); every complete line is kept",
        file=sys.stderr,
    )
    return size - keep


def append_lines(path, rows) -> None:
    """Appends `rows`, one JSON line each, flushed and fsync'd. A write that fails (a full disk) is
    undone, the file cut back to its old size so no partial line stays, and raised as an OSError
    naming the file."""
    data = memoryview("".join(json.dumps(r) + "\n" for r in rows).encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the next start's repair_tail cuts what is left
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


# --- one writer per workdir or output file ------------------------------------------------------

_HELD: dict[pathlib.Path, int] = {}  # lock path -> how many times this process holds it


class PathLock:
    """A lock file `path` (JSON: host, pid, start time, command), held while one process writes `what`
    (a workdir, an output file): a second process is refused in one line naming the holder and
    `hint` (what else to do); a lock left by a process that no longer exists on this host is taken
    over. Re-entrant within one process."""

    def __init__(self, path, what: str, hint: str):
        self.path, self.what, self.hint = pathlib.Path(path).absolute(), what, hint

    def acquire(self) -> PathLock:
        if self.path in _HELD:
            _HELD[self.path] += 1
            return self
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
        raise UserError(f"{self.what}: could not take its lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            held = {}
        host, pid = held.get("host"), held.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            print(f"{self.what}: taking over the lock of pid {pid}, which has ended", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return
        raise UserError(
            f"{self.what} is in use by pid {pid} on host {host} (since {held.get('started')}: "
            f"{held.get('command')}); wait for that run, {self.hint}, or remove {self.path} if that run "
            "is gone"
        )

    def release(self) -> None:
        count = _HELD.get(self.path, 0)
        if count > 1:
            _HELD[self.path] = count - 1
        elif count == 1:
            del _HELD[self.path]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class WorkdirLock(PathLock):
    """`<workdir>/.lock`, held while a run writes the workdir (`experiments.run` and the trainer under
    it both take it)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir).absolute()
        super().__init__(self.workdir / ".lock", f"workdir {self.workdir}", "give another --config.workdir")

    def acquire(self) -> WorkdirLock:
        if self.path not in _HELD:
            if self.workdir.exists() and not self.workdir.is_dir():
                raise UserError(f"workdir {self.workdir}: is a file, not a folder")
            self.workdir.mkdir(parents=True, exist_ok=True)
        super().acquire()
        return self


class OutputLock(PathLock):
    """`<output>.lock` beside an output file a job appends to (an API job's responses, a sampler's
    answers), so that two jobs on one output never pay for, or write, the same rows twice. Taking it
    makes the output's folder, or refuses an output that cannot be written (`check_output_file`), as
    `WorkdirLock` makes its workdir: a job holds it before its first request."""

    def __init__(self, output, flag: str = "--output"):
        self.output, self.flag = pathlib.Path(output).absolute(), flag
        super().__init__(
            self.output.with_name(self.output.name + ".lock"), f"{flag} {self.output}", f"give another {flag}"
        )

    def acquire(self) -> OutputLock:
        if self.path not in _HELD:
            check_output_file(self.output, self.flag)
        super().acquire()
        return self

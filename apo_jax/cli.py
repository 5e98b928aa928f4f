"""What every command does with an error: one the user can fix (bad input, a missing file, a config
key, a busy workdir) is one line on stderr and exit status 2; anything else is a bug and keeps its
traceback.

    @cli.command
    def main(argv=None) -> int:
        ...
    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Input, settings or surroundings the user can fix; the message names the file, row or key."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports in one line: ours, missing or unreadable files, bad values
    (ValueError: our checks raise it naming what is wrong), a truncated TFRecord shard."""
    errors: list[type[BaseException]] = [UserError, OSError, ValueError, UnicodeError]
    tf = sys.modules.get("tensorflow")  # only when already imported: `import apo_jax` stays TF-free
    if tf is not None:
        errors.append(tf.errors.OpError)
    return tuple(errors)


def one_line(error: BaseException) -> str:
    """`error` as one line: its message, else its type."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text


def guard(main, *args, prefix: str = "error", **kwargs) -> int:
    """Runs `main(*args, **kwargs)`; an expected error becomes `prefix: message` on stderr and exit
    status 2."""
    try:
        return main(*args, **kwargs) or 0
    except expected_errors() as e:
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        return 2


def command(main):
    """`main` that returns 2 after printing an expected error in one line (see `guard`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        return guard(main, *args, **kwargs)

    return wrapper


# --- progress -------------------------------------------------------------------------------------

LOG_INTERVAL = 60.0  # seconds between progress lines where the output is a log, not a terminal


def progress_bar(**tqdm_kwargs):
    """A tqdm bar (`tqdm_kwargs` as tqdm's) on a terminal. Where its output (`file`, by default
    stderr) is not one (a log file, a batch job's output), tqdm would add a line per update: there it
    writes one plain line at most every LOG_INTERVAL seconds, `set_postfix` included, and a last one
    at `close`."""
    from tqdm import tqdm

    file = tqdm_kwargs.get("file") or sys.stderr
    try:
        terminal = file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        terminal = False
    if terminal:
        return tqdm(**tqdm_kwargs)
    kwargs = tqdm_kwargs | {"file": _Lines(file), "mininterval": LOG_INTERVAL, "dynamic_ncols": False}
    return _log_bar()(**kwargs)


class _Lines:
    """A log stream for tqdm: each status it would draw over the last one (after a carriage return)
    becomes a line of its own; the blank ones are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


@functools.cache
def _log_bar():
    from tqdm import tqdm

    class LogBar(tqdm):
        """tqdm whose every refresh (an update's, `set_postfix`'s) waits for `mininterval`."""

        def refresh(self, nolock=False, lock_args=None):
            now, last = self._time(), getattr(self, "last_print_t", None)  # none yet: the first line
            if last is not None and now - last < self.mininterval:
                return False
            self.last_print_t = now
            return super().refresh(nolock=nolock, lock_args=lock_args)

    return LogBar

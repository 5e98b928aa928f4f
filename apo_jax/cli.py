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

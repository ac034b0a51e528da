"""Errors meant for people, and the one place command-line programs turn them into a single line."""
from __future__ import annotations

import errno
import functools
import sys
from typing import Callable, Iterable, TypeVar

F = TypeVar("F", bound=Callable)


class JaxdiffError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def unknown_choice(what: str, value, choices: Iterable) -> JaxdiffError:
    """`unknown scheduler 'ddmi'; choose one of: ddim, ddpm`."""
    listed = ", ".join(str(c) for c in sorted(choices, key=str))
    return JaxdiffError(f"unknown {what} {value!r}; choose one of: {listed}")


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: what failed, on which file, and for a full disk
    or a read-only file system what to do about it."""
    what = e.strerror or str(e) or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space (or choose a folder on another disk) and run again"
    elif e.errno == errno.EROFS:
        hint = "; choose a writable folder"
    return f"{what}{where}{hint}"


def cli_main(main: F) -> F:
    """Wrap a program's `main` so bad input ends in one `error: ...` line and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except JaxdiffError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:  # a missing file, a full disk, a permission: one line, no traceback
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped  # type: ignore[return-value]

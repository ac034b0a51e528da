"""Errors meant for people, and the one place command-line programs turn them into a single line."""
from __future__ import annotations

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


def cli_main(main: F) -> F:
    """Wrap a program's `main` so bad input ends in one `error: ...` line and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except JaxdiffError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped  # type: ignore[return-value]

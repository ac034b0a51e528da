"""What every program (`train.*`, `sample.*`) shares: its parser, checks of flag values that end
in one `error: ...` line, the compilation-cache flag, compile timing and the one-line JSON report.

    p = program_parser("python -m sample.mnist", __doc__)
    add_compile_cache_flags(p)
    args = p.parse_args(argv)
    at_least(args, 1, "steps", "per_class")          # "--steps must be >= 1, got 0"
    enable_compile_cache(args)
    compiled, compile_seconds = compile_timed(jitted_fn, *call_args)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable

from jaxdiff.errors import JaxdiffError, cli_main  # noqa: F401  (cli_main: part of this module's API)


def flag(name: str) -> str:
    """`batch_size` → `--batch-size`."""
    return "--" + name.replace("_", "-")


def program_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the program's docstring and whose
    epilog is the rest (printed as written)."""
    first, _, rest = (doc or "").partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first or None, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def finite_float(text: str) -> float:
    """An argparse `type` for real numbers: `nan` and `inf` are refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _given(args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None:
            yield name, value


def at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """Each given (not None) flag must be >= `minimum`."""
    for name, value in _given(args, names):
        if value < minimum:
            raise JaxdiffError(f"{flag(name)} must be >= {minimum:g}, got {value}")


def positive(args: argparse.Namespace, *names: str) -> None:
    """Each given flag must be > 0."""
    for name, value in _given(args, names):
        if not value > 0:
            raise JaxdiffError(f"{flag(name)} must be > 0, got {value}")


def in_range(args: argparse.Namespace, low: float, high: float, *names: str,
             include_high: bool = False) -> None:
    """Each given flag must lie in [low, high) (or [low, high] with `include_high`)."""
    for name, value in _given(args, names):
        if not (low <= value <= high if include_high else low <= value < high):
            bracket = "]" if include_high else ")"
            raise JaxdiffError(f"{flag(name)} must be in [{low:g}, {high:g}{bracket}, got {value}")


def one_of(args: argparse.Namespace, *names: str) -> None:
    """At most one of the flags may be given."""
    given = [flag(name) for name, _ in _given(args, names)]
    if len(given) > 1:
        raise JaxdiffError(f"give {' or '.join(given)}, not both" if len(given) == 2
                           else f"give only one of {', '.join(given)}")


def png_path(args: argparse.Namespace, name: str = "out") -> None:
    """The flag names a .png file."""
    value = getattr(args, name)
    if not str(value).lower().endswith(".png"):
        raise JaxdiffError(f"{flag(name)} {value} must name a .png file")


def add_compile_cache_flags(parser: argparse.ArgumentParser, *, folder: bool = False) -> None:
    """`--no-compile-cache` (and, with `folder`, `--compile-cache DIR`)."""
    if folder:
        parser.add_argument("--compile-cache", default=None,
                            help="XLA compilation cache folder (default ~/.cache/jaxdiff/xla)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the XLA compilation cache")


def enable_compile_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache, unless `--no-compile-cache`."""
    if getattr(args, "no_compile_cache", False):
        return
    from jaxdiff.compile_cache import enable_compilation_cache

    enable_compilation_cache(getattr(args, "compile_cache", None))


def compile_timed(jitted: Callable, *call_args) -> tuple[Callable, float]:
    """Compile `jitted` ahead of time for these arguments: (compiled function, seconds)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*call_args).compile()
    return compiled, time.perf_counter() - t0


def run_timed(fn: Callable, *call_args) -> tuple[Any, float]:
    """Call `fn` and wait for its arrays: (result, seconds)."""
    import jax

    t0 = time.perf_counter()
    result = jax.block_until_ready(fn(*call_args))
    return result, time.perf_counter() - t0


def program_main(parse_args: Callable[[Any], argparse.Namespace], run: Callable[[argparse.Namespace], dict]):
    """A program's `main(argv=None)`: parse the flags, `run`, print its summary as the one JSON
    line; bad input ends in one `error: ...` line and exit code 2 (`cli_main`)."""

    @cli_main
    def main(argv=None) -> None:
        print_report(run(parse_args(argv)))

    return main


def print_report(summary: dict) -> None:
    """The program's one JSON line on stdout (only from the main process of a multi-host run)."""
    from jaxdiff.parallel import distributed

    if distributed.is_main_process():
        print(json.dumps(summary), flush=True)
        sys.stdout.flush()

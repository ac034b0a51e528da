"""JAX's persistent compilation cache, so a second process starts without recompiling."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("JAXDIFF_CACHE_DIR", Path.home() / ".cache" / "jaxdiff" / "xla"))


def enable_compilation_cache(directory: str | os.PathLike | None = None,
                             min_compile_seconds: float = 0.5) -> Path:
    """Store every compiled XLA program that took over `min_compile_seconds` in `directory`
    (default ``$JAXDIFF_CACHE_DIR`` or ``~/.cache/jaxdiff/xla``); later processes reuse them."""
    import jax

    path = Path(directory) if directory is not None else DEFAULT_DIR
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

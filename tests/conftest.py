"""Shared test set-up: 8 host devices for pmap tests, a persistent XLA cache, shared fixtures.

Tests compare jaxdiff against the PyTorch reference (diffusers/transformers on CPU torch) with
tiny configs. Compiled functions that several tests use are built once in session fixtures.
"""
from __future__ import annotations

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxdiff.compile_cache import enable_compilation_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
enable_compilation_cache(ROOT / ".jax_cache", min_compile_seconds=0.2)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the project's shared data) is not present")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def mnist_dir(shared_dir) -> Path:
    return shared_dir / "data" / "mnist"

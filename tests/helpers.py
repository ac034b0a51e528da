"""What the test files share: NHWC ↔ NCHW at the PyTorch boundary, closeness measures with
stated tolerances, and tree equality. Import as `from helpers import ...` (tests/ is on the path).

Test files never import each other: anything two files need lives here (or in conftest.py when
it is a fixture, or in subprocesses.py for tests that start programs).
"""
from __future__ import annotations

import jax
import numpy as np


def nhwc(t) -> np.ndarray:
    """A PyTorch NCHW tensor (or array) as a numpy NHWC array."""
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return a.transpose(0, 2, 3, 1)


def nchw(a):
    """A numpy/JAX NHWC array as a contiguous PyTorch NCHW tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def rel_err(got, want) -> float:
    """max |got − want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_rel_close(got, want, rtol: float, what: str = "") -> None:
    """Same shape, and max |got − want| ≤ rtol · max |want|."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what} shape {got.shape} != {want.shape}"
    err = rel_err(got, want)
    assert err <= rtol, f"{what} relative error {err:.2e} > {rtol:.0e}".strip()


def assert_close(got, want, rtol: float = 1e-5, what: str = "", scale: float | None = None) -> None:
    """max |got − want| ≤ rtol · max(1, max |want|) (or rtol · `scale`): relative for large
    values, absolute near zero."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what} shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max())) if scale is None else scale
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what} max |diff| {err:.3g} > {rtol:g} x {scale:.3g}".strip()


def assert_trees_equal(a, b) -> None:
    """Same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

"""Applying LoRA adapters to parameter trees: fused (exactly undoable) or merged in-program
with traced scales. Models never see adapters: both return an ordinary params tree.

    fused, originals = fuse(params, adapter, 0.8)      # host-side, no compile
    params_again = unfuse(fused, originals)            # bit for bit the params before

    @jax.jit
    def run(params, adapters, scales, x):              # scales: (n_adapters,) traced
        return model.apply({"params": merge(params, adapters, scales)["unet"]}, x)

`fuse` computes ``W + scale · α/r · (a @ b)`` in float32 and casts to W's dtype, as diffusers'
`fuse_lora` does, one small jitted program per kernel shape (on the device holding W). `unfuse` does not subtract (float arithmetic would not give W back): `fuse`
returns the original leaves it replaced (references to the arrays already held, no copy), and
`unfuse` puts them back.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError

Originals = dict  # {component: {path: the original leaf}}


def delta(layer: Mapping, shape: tuple[int, ...], xp=jnp):
    """The weight update α/r · a @ b of one layer, reshaped to the kernel's `shape` (float32)."""
    a, b = layer["a"], layer["b"]
    r = a.shape[-1]
    d = xp.asarray(a, xp.float32).reshape(-1, r) @ xp.asarray(b, xp.float32)
    return (d * xp.asarray(layer["scale"], xp.float32)).reshape(shape)


def _get(tree: Mapping, path: str):
    node = tree
    for k in path.split("/"):
        node = node[k]
    return node


def _set(tree: dict, path: str, value) -> dict:
    """A copy of `tree` with the leaf at `path` replaced (only the dicts along the path copied)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


def _check(params: Mapping, adapter: Mapping) -> None:
    for comp, layers in adapter.items():
        if comp not in params:
            raise JaxdiffError(f"the adapter changes the {comp}, which these params do not have "
                               f"(they hold {', '.join(sorted(params))})")
        for path in layers:
            try:
                _get(params[comp], path)
            except (KeyError, TypeError):
                raise JaxdiffError(f"the adapter changes {comp}/{path}, which these params do "
                                   "not have; load the adapter against this pipeline") from None


def fuse(params: Mapping, adapter: Mapping, scale: float = 1.0) -> tuple[dict, Originals]:
    """(params with `adapter` added at `scale`, the original leaves it replaced).

    params: ``{component: tree}`` (a pipeline's params). Each new leaf is computed by a small
    jitted program per kernel shape (compiled once per shape, ~20 shapes for SD 1.5)."""
    _check(params, adapter)
    out = dict(params)
    originals: Originals = {}
    scale = np.float32(scale)
    for comp, layers in adapter.items():
        tree = out[comp]
        for path, layer in layers.items():
            w = _get(tree, path)
            new = _fuse_leaf(w, layer["a"], layer["b"], layer["scale"] * scale)
            if not isinstance(w, jax.Array):
                new = np.asarray(new)
            originals.setdefault(comp, {}).setdefault(path, w)
            tree = _set(tree, path, new)
        out[comp] = tree
    return out, originals


@jax.jit
def _fuse_leaf(w, a, b, scale):
    """W + scale · a @ b in float32, in W's dtype and shape (one small program per shape)."""
    r = a.shape[-1]
    d = jnp.asarray(a, jnp.float32).reshape(-1, r) @ jnp.asarray(b, jnp.float32)
    return (jnp.asarray(w, jnp.float32) + scale * d.reshape(w.shape)).astype(w.dtype)


def unfuse(params: Mapping, originals: Originals) -> dict:
    """`params` with the leaves `fuse` replaced put back: bit for bit the params before it."""
    out = dict(params)
    for comp, leaves in originals.items():
        tree = out[comp]
        for path, w in leaves.items():
            tree = _set(tree, path, w)
        out[comp] = tree
    return out


def merge(params: Mapping, adapters: Sequence[Mapping], scales) -> dict:
    """Params with every adapter added at its scale, as traced array ops (call inside `jit`):
    ``W + Σ_i scales[i] · α_i/r_i · a_i @ b_i`` in float32, cast to W's dtype.

    adapters: a sequence of adapter pytrees (their structure is static); scales: `(n,)`
    array, traced, so changing the scales does not recompile."""
    scales = jnp.asarray(scales, jnp.float32)
    if scales.shape != (len(adapters),):
        raise JaxdiffError(f"{scales.shape[0] if scales.ndim else 'a scalar'} scales for "
                           f"{len(adapters)} adapters; pass one scale per adapter")
    updates: dict[tuple[str, str], list] = {}
    for i, adapter in enumerate(adapters):
        _check(params, adapter)
        for comp, layers in adapter.items():
            for path, layer in layers.items():
                updates.setdefault((comp, path), []).append((i, layer))
    out = dict(params)
    for (comp, path), items in updates.items():
        w = _get(out[comp], path)
        total = jnp.asarray(w, jnp.float32)
        for i, layer in items:
            total = total + scales[i] * delta(layer, w.shape)
        out[comp] = _set(out[comp], path, total.astype(w.dtype))
    return out

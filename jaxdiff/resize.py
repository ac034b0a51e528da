"""Image resizing exactly as the PyTorch reference does it, as separable resampling matrices.

* `interpolate(x, size, mode, align_corners)` — `torch.nn.functional.interpolate` for
  `mode="bilinear"` and `mode="bicubic"` (Keys' cubic, A = −0.75, out-of-range taps clamped to
  the border), no antialiasing. diffusers resizes depth maps with it, DPT upsamples its features
  with it. Another kernel (PIL's A = −0.5, or an antialiased one) moves an image by several /255.
* `pil_resize(x, size, resample)` — PIL's `Image.resize` of 8-bit images (BILINEAR / BICUBIC,
  antialiased when shrinking): its float64 filter weights rounded to 22-bit fixed point, a
  horizontal then a vertical pass, each rounded and clipped to 0..255 — in integer arithmetic,
  so the result is PIL's to the bit. transformers' `DPTImageProcessor` (PIL backend) resizes with it.

Each 1-D resampling is a (out, in) matrix built on the host from static sizes and applied with
one `einsum` per axis; images are NHWC (or (B, H, W)), float32.
"""
from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import unknown_choice

CUBIC_A = -0.75  # torch's bicubic
PIL_CUBIC_A = -0.5  # PIL's
PIL_PRECISION_BITS = 32 - 8 - 2
PIL_FILTERS = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


# --------------------------------------------------------------------------------------------
# torch.nn.functional.interpolate
# --------------------------------------------------------------------------------------------

def _torch_scale(in_size: int, out_size: int, align_corners: bool) -> np.float32:
    """ATen's area_pixel_compute_scale (float32)."""
    if align_corners:
        return np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    return np.float32(np.float32(in_size) / np.float32(out_size))


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, as ATen's CPU kernels (built with FMA) round it."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """The four Keys weights of taps floor(s)−1 … floor(s)+2 at fraction t (ATen's formulas,
    with the multiply-adds its compiler fuses)."""
    a, one = np.float32(a), np.float32(1)

    def near(x):  # |x| <= 1: ((a + 2) x − (a + 3)) x² + 1
        return _fma((_fma(a + 2, x, -(a + 3)) * x).astype(np.float32), x, one)

    def far(x):  # 1 < |x| < 2: ((a x − 5a) x + 8a) x − 4a
        return _fma(_fma(_fma(a, x, np.float32(-5) * a), x, np.float32(8) * a), x, np.float32(-4) * a)

    return np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=-1)


@lru_cache(maxsize=64)
def interpolate_taps(in_size: int, out_size: int, mode: str = "bicubic",
                     align_corners: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_size, taps): torch's 1-D resampling taps (2 for bilinear,
    4 for bicubic; indices clamped to the border, float32 weights as ATen computes them)."""
    if mode not in ("bilinear", "bicubic"):
        raise unknown_choice("interpolation mode", mode, ("bilinear", "bicubic"))
    scale = _torch_scale(in_size, out_size, align_corners)
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        src = scale * dst
    else:
        src = _fma(scale, dst + np.float32(0.5), np.float32(-0.5))
    if mode == "bilinear":
        if not align_corners:
            src = np.maximum(src, np.float32(0))
        i0 = src.astype(np.int64)  # src >= 0: truncation is floor
        i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
        l1 = (src - i0.astype(np.float32)).astype(np.float32)
        return np.stack([i0, i1], -1), np.stack([np.float32(1) - l1, l1], -1)
    i = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - i.astype(np.float32), 0, 1).astype(np.float32)
    idx = np.clip(i[:, None] + np.arange(-1, 3)[None], 0, in_size - 1)
    return idx, _cubic_weights(t, CUBIC_A)


def interpolate_matrix(in_size: int, out_size: int, mode: str = "bicubic",
                       align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with `y = M @ x` torch's 1-D resampling."""
    idx, w = interpolate_taps(in_size, out_size, mode, align_corners)
    m = np.zeros((out_size, in_size), np.float32)
    for k in range(idx.shape[1]):
        np.add.at(m, (np.arange(out_size), idx[:, k]), w[:, k])
    return m


def interpolate(x: jax.Array, size: tuple[int, int], mode: str = "bicubic",
                align_corners: bool = False) -> jax.Array:
    """`torch.nn.functional.interpolate(x, size, mode=mode, align_corners=align_corners)` for
    NHWC `x` (B, H, W, C), or (B, H, W), summed in ATen's order (each output: the rows' taps of
    the width taps), so float32 results agree with torch's to the last bit or two. Gathers
    taps² values per output: for narrow maps (depth maps); see `interpolate_matmul`."""
    x = jnp.asarray(x, jnp.float32)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    iy, wy = interpolate_taps(x.shape[1], int(size[0]), mode, bool(align_corners))
    ix, wx = interpolate_taps(x.shape[2], int(size[1]), mode, bool(align_corners))
    out = None
    for i in range(iy.shape[1]):
        rows = x[:, iy[:, i]]  # (B, out_h, W, C)
        inner = None
        for j in range(ix.shape[1]):
            term = rows[:, :, ix[:, j]] * wx[None, None, :, j, None]
            inner = term if inner is None else inner + term
        term = inner * wy[None, :, i, None, None]
        out = term if out is None else out + term
    return out[..., 0] if squeeze else out


def interpolate_matmul(x: jax.Array, size: tuple[int, int], mode: str = "bicubic",
                       align_corners: bool = False) -> jax.Array:
    """`interpolate` as two matrix products (same weights, float32 round-off in another order):
    for wide feature maps, where gathering every tap would be large."""
    x = jnp.asarray(x, jnp.float32)
    mh = interpolate_matrix(x.shape[1], int(size[0]), mode, bool(align_corners))
    mw = interpolate_matrix(x.shape[2], int(size[1]), mode, bool(align_corners))
    hi = jax.lax.Precision.HIGHEST
    if x.ndim == 4:
        y = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
        return jnp.einsum("pw,bowc->bopc", mw, y, precision=hi)
    y = jnp.einsum("oh,bhw->bow", mh, x, precision=hi)
    return jnp.einsum("pw,bow->bop", mw, y, precision=hi)


# --------------------------------------------------------------------------------------------
# PIL's Image.resize of 8-bit images
# --------------------------------------------------------------------------------------------

def _pil_filter(name: str):
    if name == "bilinear":
        def f(x):
            x = np.abs(x)
            return np.where(x < 1.0, 1.0 - x, 0.0)
        return f, 1.0
    if name == "bicubic":
        a = PIL_CUBIC_A

        def f(x):
            x = np.abs(x)
            return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                            np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))
        return f, 2.0
    raise unknown_choice("PIL resampling filter", name, PIL_FILTERS)


@lru_cache(maxsize=64)
def pil_resample_matrix(in_size: int, out_size: int, resample: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) int32 matrix of PIL's fixed-point coefficients (Resample.c:
    precompute_coeffs + normalize_coeffs_8bpc)."""
    filt, support = _pil_filter(resample)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    m = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = np.arange(xmax)
        w = filt((taps + xmin - center + 0.5) * (1.0 / filterscale))
        ww = w.sum()
        if ww != 0.0:
            w = w / ww
        fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << PIL_PRECISION_BITS)),
                         np.trunc(0.5 + w * (1 << PIL_PRECISION_BITS)))
        m[xx, xmin:xmin + xmax] = fixed.astype(np.int64)
    return m.astype(np.int32)


def _pil_pass(x: jax.Array, m: np.ndarray, spec: str) -> jax.Array:
    acc = jnp.einsum(spec, jnp.asarray(m), x, preferred_element_type=jnp.int32)
    acc = acc + (1 << (PIL_PRECISION_BITS - 1))
    return jnp.clip(acc >> PIL_PRECISION_BITS, 0, 255)


def pil_resize(x: jax.Array, size: tuple[int, int], resample: str = "bicubic") -> jax.Array:
    """PIL's `Image.resize((w, h), resample)` of 8-bit images: NHWC `x` (B, H, W, C) holding
    integers 0..255 (any dtype) → (B, size[0], size[1], C) float32 integers 0..255."""
    x = jnp.round(jnp.asarray(x, jnp.float32)).astype(jnp.int32)
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = int(size[0]), int(size[1])
    if out_w != w:  # PIL runs the horizontal pass first, each pass rounds to 8 bits
        x = _pil_pass(x, pil_resample_matrix(w, out_w, resample), "pw,bhwc->bhpc")
    if out_h != h:
        x = _pil_pass(x, pil_resample_matrix(h, out_h, resample), "oh,bhwc->bowc")
    return x.astype(jnp.float32)


def pil_filter_name(resample: int) -> str:
    """PIL.Image.Resampling value (2, 3) → "bilinear" / "bicubic"; others refused."""
    names = {v: k for k, v in PIL_FILTERS.items()}
    if resample not in names:
        raise unknown_choice("resample value (PIL.Image.Resampling) in the image processor config",
                             resample, names)
    return names[resample]


__all__ = [
    "interpolate",
    "interpolate_matmul",
    "interpolate_matrix",
    "interpolate_taps",
    "pil_filter_name",
    "pil_resample_matrix",
    "pil_resize",
]

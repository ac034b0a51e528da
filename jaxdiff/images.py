"""Image conversions between the model's range [-1, 1], [0, 1] floats and uint8, and PNG grids.

All arrays are NHWC (or HWC for one image); work on numpy or jax arrays alike.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def to_unit(x):
    """[-1, 1] → [0, 1], clipped."""
    return (x * 0.5 + 0.5).clip(0.0, 1.0)


def from_unit(x):
    """[0, 1] → [-1, 1]."""
    return x * 2.0 - 1.0


def uint8_to_model(x, dtype=np.float32):
    """uint8 0..255 → floats in [-1, 1] (works on jax arrays inside jit too)."""
    return x.astype(dtype) * (2.0 / 255.0) - 1.0


def unit_to_uint8(x) -> np.ndarray:
    """[0, 1] floats → uint8 0..255 (rounded, clipped)."""
    return np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def model_to_uint8(x) -> np.ndarray:
    """[-1, 1] floats → uint8 0..255."""
    return unit_to_uint8(to_unit(np.asarray(x, np.float32)))


def make_grid(images, nrow: int, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """uint8 (N, H, W, C) → one uint8 (H', W', C) image with `nrow` images per row, like
    torchvision's `make_grid`. Missing cells at the end stay `pad_value`."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value,
                   dtype=images.dtype)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = im
    return grid


def save_png(image, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write a uint8 (H, W, C) image (C = 1 or 3) as PNG, enlarged `scale`× (nearest), atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png wants uint8, got {image.dtype}; convert with unit_to_uint8")
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images, path: str | os.PathLike, nrow: int, *, value_range: str = "model",
              padding: int = 2, scale: int = 1) -> Path:
    """Save (N, H, W, C) images as a PNG grid, `nrow` per row. `value_range` says what the
    floats are: "model" ([-1, 1]), "unit" ([0, 1]); uint8 input is taken as is."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        if value_range == "model":
            images = model_to_uint8(images)
        elif value_range == "unit":
            images = unit_to_uint8(images)
        else:
            raise ValueError(f"unknown value_range {value_range!r}; choose one of: model, unit")
    return save_png(make_grid(images, nrow, padding), path, scale)

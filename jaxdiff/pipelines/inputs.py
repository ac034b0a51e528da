"""Image files the pipelines take (`--init-image`, `--mask-image`, ...) as float arrays.

    image = load_init_image("photo.png", 512, 512, 8)     # (1, 512, 512, 3) float32 in [0, 1]
    mask = load_mask_image("mask.png", 512, 512)           # (1, 512, 512, 1) float32 in [0, 1]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdiff.errors import JaxdiffError


def open_image(path: str, flag: str, mode: str | None = "RGB"):
    """A PIL image in `mode` (None: as stored), or one JaxdiffError line naming the flag."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise JaxdiffError(f"{flag} {p} does not exist")
    try:
        image = Image.open(p)
        image.load()
        return image.convert(mode) if mode else image
    except (UnidentifiedImageError, OSError) as e:
        raise JaxdiffError(f"{flag} {p} is not an image PIL can read ({e})") from None


def _resized(image, height: int | None, width: int | None, factor: int, flag: str, path: str,
             resample: str = "lanczos"):
    from PIL import Image

    w = width or image.width // factor * factor
    h = height or image.height // factor * factor
    if h <= 0 or w <= 0:
        raise JaxdiffError(f"{flag} {path} is smaller than {factor} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}[resample])
    return image


def load_init_image(path: str, height: int | None, width: int | None, factor: int,
                    flag: str = "--init-image", resample: str = "lanczos") -> np.ndarray:
    """An RGB image file → (1, H, W, 3) float32 in [0, 1], resized (`resample`: "lanczos" or
    "bicubic", as diffusers' image processors) to height×width (default: its own size rounded
    down to a multiple of `factor`)."""
    image = _resized(open_image(path, flag), height, width, factor, flag, path, resample)
    return (np.asarray(image, np.float32) / 255.0)[None]


def load_mask_image(path: str, height: int, width: int, flag: str = "--mask-image") -> np.ndarray:
    """A mask file (any mode; read as greyscale "L") → (1, H, W, 1) float32 in [0, 1], resized
    to height×width as diffusers' mask processor does (Lanczos on the "L" image). White = 1."""
    image = _resized(open_image(path, flag, "L"), height, width, 1, flag, path)
    return (np.asarray(image, np.float32) / 255.0)[None, :, :, None]


__all__ = ["load_init_image", "load_mask_image", "open_image"]

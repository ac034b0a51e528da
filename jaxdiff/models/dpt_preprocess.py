"""DPT's image processor (transformers' `DPTImageProcessor`, the PIL backend) in JAX.

A pipeline's `feature_extractor/preprocessor_config.json` says what to do; the steps, in
transformers' order: resize with PIL (8-bit, `resample` 2 = bilinear, 3 = bicubic; to `size`, or
keeping the aspect ratio and/or a multiple of `ensure_multiple_of`), rescale by `rescale_factor`
(1/255), normalise with `image_mean`/`image_std`, centre-pad to a multiple of `size_divisor`.
Every step runs on device inside the caller's program; sizes are static.

    cfg = load_image_processor_config(folder)          # feature_extractor/preprocessor_config.json
    pixel_values = preprocess(cfg, images)              # (B, H, W, 3) in [0, 1] → (B, 384, 384, 3)
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import resize
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError

PROCESSOR_NAMES = ("preprocessor_config.json",)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class DPTImageProcessorConfig:
    """The keys of transformers' `DPTImageProcessor` (defaults as there)."""
    do_resize: bool = True
    height: int = 384
    width: int = 384
    resample: int = 3
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD
    image_std: tuple = IMAGENET_STANDARD
    do_pad: bool = False
    size_divisor: int | None = None

    def __post_init__(self):
        resize.pil_filter_name(self.resample)  # refuses what is not supported
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            v = (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)
            if len(v) != 3:
                raise JaxdiffError(f"image processor {name} must hold 3 values (RGB), got {len(v)}")
            object.__setattr__(self, name, v)
        if self.height < 1 or self.width < 1 or self.ensure_multiple_of < 1:
            raise JaxdiffError("image processor size and ensure_multiple_of must be positive")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPTImageProcessorConfig:
        d = dict(d)
        size = d.pop("size", None)
        if isinstance(size, (int, float)):
            d["height"] = d["width"] = int(size)
        elif isinstance(size, Mapping):
            if "height" not in size or "width" not in size:
                raise JaxdiffError(f"image processor size {dict(size)} must name height and width")
            d["height"], d["width"] = int(size["height"]), int(size["width"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' `get_resize_output_image_size` for an input of height × width."""
        if not self.do_resize:
            return height, width
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return (_multiple(scale_h * height, self.ensure_multiple_of),
                _multiple(scale_w * width, self.ensure_multiple_of))


def _multiple(val: float, multiple: int) -> int:
    x = round(val / multiple) * multiple
    return math.ceil(val / multiple) * multiple if x < 0 else int(x)


def load_image_processor_config(folder: str | os.PathLike, subfolder: str | None = "feature_extractor"
                                ) -> DPTImageProcessorConfig:
    """The `DPTImageProcessor` config of a pipeline folder (or of a processor folder itself)."""
    root = Path(folder).expanduser()
    for path in ([root / subfolder] if subfolder else []) + [root]:
        if (path / PROCESSOR_NAMES[0]).is_file():
            return DPTImageProcessorConfig.from_dict(W.read_json(path / PROCESSOR_NAMES[0]))
    where = f"{root / subfolder}/" if subfolder else f"{root}/"
    raise JaxdiffError(f"no {where}{PROCESSOR_NAMES[0]}: the depth estimator's image processor config is missing")


def preprocess(config: DPTImageProcessorConfig, images: jax.Array, *, uint8: bool = False) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] (or 0..255 with `uint8=True`; floats are rounded to 8 bits
    first, as the PIL images transformers receives are) → DPT `pixel_values` (B, h, w, 3) float32."""
    x = jnp.asarray(images, jnp.float32)
    x = jnp.clip(jnp.round(x if uint8 else x * 255.0), 0, 255)
    if config.do_resize:
        size = config.output_size(x.shape[1], x.shape[2])
        x = resize.pil_resize(x, size, resize.pil_filter_name(config.resample))
    if config.do_rescale:  # float64 products rounded to float32, as transformers' rescale
        table = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
        x = jnp.asarray(table)[x.astype(jnp.int32)]
    if config.do_normalize:
        x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    if config.do_pad and config.size_divisor:
        x = jnp.pad(x, ((0, 0), _center_pad(x.shape[1], config.size_divisor),
                        _center_pad(x.shape[2], config.size_divisor), (0, 0)))
    return x


def _center_pad(size: int, divisor: int) -> tuple[int, int]:
    pad = math.ceil(size / divisor) * divisor - size
    return pad // 2, pad - pad // 2


__all__ = ["DPTImageProcessorConfig", "load_image_processor_config", "preprocess"]

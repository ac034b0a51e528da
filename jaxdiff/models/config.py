"""The one config pattern of every model: a frozen, hashable dataclass whose fields are the keys
(and defaults) of the diffusers/transformers `config.json`, built with `from_dict` and written
back with `to_dict`. The module takes it as its single `config` field (plus a compute `dtype`):

    config = UNet2DConditionConfig.from_dict(read_config(folder, "unet")[1])
    unet = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    save_json(config.to_dict(), folder / "config.json")

Lists become tuples (recursively), so a config can be a static `jit` argument.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping


def freeze(value):
    """JSON lists → tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """Tuples → JSON lists, recursively."""
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def freeze_fields(config) -> None:
    """In a frozen dataclass's `__post_init__`: every list field becomes a tuple."""
    for f in dataclasses.fields(config):
        object.__setattr__(config, f.name, freeze(getattr(config, f.name)))


def known_keys(cls, d: Mapping[str, Any], *, warn_unknown: str | None = None) -> dict:
    """The entries of `d` that are fields of `cls`, frozen. Keys starting with "_" are
    metadata; with `warn_unknown` (the model's name) other unknown keys are ignored with a
    warning, as diffusers does."""
    names = {f.name for f in dataclasses.fields(cls)}
    if warn_unknown:
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            warnings.warn(f"{warn_unknown} config keys {', '.join(unknown)} are not used by jaxdiff "
                          f"(nor by diffusers' {warn_unknown}) and are ignored", stacklevel=3)
    return {k: freeze(v) for k, v in d.items() if k in names}


def fields_dict(config) -> dict:
    """The fields of a config dataclass as a JSON-ready dict (tuples as lists), in field order."""
    return {f.name: thaw(getattr(config, f.name)) for f in dataclasses.fields(config)}


def diffusers_dict(config, class_name: str) -> dict:
    """A diffusers `config.json` dict: `_class_name`, `_diffusers_version`, then the fields."""
    return {"_class_name": class_name, "_diffusers_version": diffusers_version(), **fields_dict(config)}


def diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is not a runtime dependency
        return "0.30.0"

"""LoRA adapter files → factor pytrees keyed by Flax parameter paths.

Two file formats are read (safetensors only; nothing is unpickled):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also
  ``text_encoder.`` / ``text_encoder_2.``, the older ``.lora.down/up.weight`` spelling, and
  PEFT's ``base_model.model.`` prefix for a single component). ``lora_alpha`` / ``r`` /
  ``alpha_pattern`` / ``rank_pattern`` / ``use_rslora`` come from the file's
  ``lora_adapter_metadata`` (``unet.lora_alpha`` ...) or an ``adapter_config.json`` beside it;
  per-module ``<module>.alpha`` tensors are honoured; with none of them alpha = rank (scale 1),
  as diffusers does.
* kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` /
  ``alpha`` (``lora_te_``, ``lora_te1_``, ``lora_te2_`` for the text encoders), including conv
  LoRA (LoCon) on 3×3 convs; UNet modules in diffusers names or in the original layout's
  (``input_blocks_4_1_…``, as kohya's SDXL LoRAs name them). Missing ``alpha`` means alpha = rank.

An adapter is a plain pytree ``{component: {"a/b/kernel": {"a", "b", "scale"}}}``: for a target
kernel of Flax shape ``(..., in, out)`` (Dense ``(in, out)``, conv ``(kh, kw, in, out)``),
``a`` is ``(kh, kw, in, r)`` or ``(in, r)``, ``b`` is ``(r, out)`` and ``scale`` = alpha / r
(float32 scalar), so the weight update is ``scale · (a.reshape(-1, r) @ b).reshape(kernel)``.
Every key of the file maps to a parameter of the given template, or loading fails naming the
first unknown keys.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError

Adapter = dict  # {component: {path: {"a": array, "b": array, "scale": float32 array}}}

PEFT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# --------------------------------------------------------------------------------------------
# Flax paths ↔ PyTorch module names
# --------------------------------------------------------------------------------------------

def torch_module_name(path: tuple[str, ...]) -> str:
    """Flax module path (without the leaf) → PyTorch module name:
    ``down_blocks_0/attentions_0/.../to_out_0`` → ``down_blocks.0.attentions.0....to_out.0``."""
    parts: list[str] = []
    for p in path:
        base, _, idx = p.rpartition("_")
        parts.extend([base, idx] if idx.isdigit() and base in W.TORCH_LIST_NAMES else [p])
    return ".".join(parts)


def module_index(template: Mapping) -> dict[str, tuple[str, ...]]:
    """{PyTorch module name: Flax kernel path} of every kernel in a params tree (or shape
    template). CLIP text towers are also indexed without their ``text_model.`` prefix
    (transformers v5 names)."""
    index: dict[str, tuple[str, ...]] = {}
    for path in W.flatten(template):
        if path[-1] != "kernel":
            continue
        name = torch_module_name(path[:-1])
        index[name] = path
        if name.startswith("text_model."):
            index.setdefault(name[len("text_model."):], path)
    return index


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def check_adapter_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise JaxdiffError(f"{p} is a PyTorch pickle ({p.suffix}), which jaxdiff never unpickles "
                           "(it can run code); use the .safetensors release of the adapter")
    if not p.is_file():
        raise JaxdiffError(f"LoRA file {p} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise JaxdiffError(f"{p} is not a .safetensors file; LoRA adapters are read from safetensors")
    return p


def read_safetensors_metadata(path: Path) -> dict:
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise JaxdiffError(f"{path} is not a valid safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if not 0 < n <= W.MAX_HEADER_BYTES:
            raise JaxdiffError(f"{path} is not a valid safetensors file; re-download it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise JaxdiffError(f"{path} is not a valid safetensors file; re-download it") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _peft_config(path: Path, metadata: Mapping) -> dict[str, dict]:
    """{component: LoraConfig dict} from the file's `lora_adapter_metadata` or an
    `adapter_config.json` beside it (for every component)."""
    out: dict[str, dict] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except ValueError:
            raise JaxdiffError(f"{path}: its lora_adapter_metadata is not JSON; re-save the adapter") from None
        for key, value in flat.items():
            comp, _, field = key.partition(".")
            if field:
                out.setdefault(comp, {})[field] = value
    config_file = path.parent / "adapter_config.json"
    if not out and config_file.is_file():
        cfg = W.read_json(config_file)
        out = {c: cfg for c in PEFT_PREFIXES}
    return out


def _pattern_value(patterns: Mapping, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _factors(down: np.ndarray, up: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch-layout LoRA factors → (a, b) in Flax layout (see the module docstring)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    r = down.shape[0]
    if up.ndim not in (2, 4) or up.shape[1] != r or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise JaxdiffError(f"{where}: up/B {up.shape} does not fit down/A {down.shape} "
                           "(expected (out, rank[, 1, 1])); the adapter file is malformed")
    b = up.reshape(up.shape[0], r).T
    if down.ndim == 2:
        a = down.T
    elif down.ndim == 4:
        a = down.transpose(2, 3, 1, 0)
    else:
        raise JaxdiffError(f"{where}: down/A has shape {down.shape}; expected (rank, in[, kh, kw])")
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(format, module key, part) of a tensor name: part is down / up / alpha."""
    for old, new in ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"),
                     (".lora_linear_layer.down.weight", ".lora_A.weight"),
                     (".lora_linear_layer.up.weight", ".lora_B.weight")):
        if key.endswith(old):
            key = key[: -len(old)] + new
    for suffix, fmt, part in ((".lora_A.weight", "peft", "down"), (".lora_B.weight", "peft", "up"),
                              (".lora_down.weight", "kohya", "down"), (".lora_up.weight", "kohya", "up")):
        if key.endswith(suffix):
            return fmt, key[: -len(suffix)], part
    if key.endswith(".alpha"):
        module = key[: -len(".alpha")]
        return ("kohya" if module.startswith("lora_") else "peft"), module, "alpha"
    return None


def _component(fmt: str, module: str, default_component: str) -> tuple[str | None, str]:
    """(component, module name within it) of a module key."""
    if fmt == "kohya":
        for prefix, comp in KOHYA_PREFIXES.items():
            if module.startswith(prefix):
                return comp, module[len(prefix):]
        return None, module
    if module.startswith("base_model.model."):
        return default_component, module[len("base_model.model."):]
    head, _, rest = module.partition(".")
    if head in PEFT_PREFIXES and rest:
        return PEFT_PREFIXES[head], rest
    return None, module


def load_lora(path: str | os.PathLike, templates: Mapping[str, Mapping], *,
              default_component: str = "unet") -> Adapter:
    """Read a LoRA `*.safetensors` file (PEFT or kohya) onto `templates` — the pipeline's params
    (or shape trees) by component, e.g. ``{"unet": ..., "text_encoder": ...}``.

    Returns the adapter pytree (see the module docstring). Unknown keys, components the pipeline
    lacks and shape mismatches are one `JaxdiffError` naming the first few offending keys."""
    p = check_adapter_file(path)
    metadata = read_safetensors_metadata(p)
    configs = _peft_config(p, metadata)
    groups: dict[tuple[str, str], dict] = {}
    unknown: list[str] = []
    for key, value in W.iter_safetensors(p):
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        fmt, module, part = split
        comp, name = _component(fmt, module, default_component)
        if comp is None:
            unknown.append(key)
            continue
        entry = groups.setdefault((comp, name), {"fmt": fmt, "keys": []})
        entry[part] = value
        entry["keys"].append(key)

    indexes = {c: module_index(t) for c, t in templates.items()}
    kohya_indexes = {c: {n.replace(".", "_"): pth for n, pth in idx.items()} for c, idx in indexes.items()}
    adapter: Adapter = {}
    for (comp, name), entry in groups.items():
        index = indexes.get(comp)
        if index is None:
            unknown.extend(entry["keys"])
            continue
        fmt = entry["fmt"]
        if fmt == "kohya":
            target = kohya_indexes[comp].get(name)
            if target is None and comp == "unet":
                target = kohya_indexes[comp].get(_ldm_to_diffusers_kohya(name, templates[comp]) or "")
        else:
            target = index.get(name)
        if target is None or "down" not in entry or "up" not in entry:
            unknown.extend(entry["keys"])
            continue
        a, b = _factors(entry["down"], entry["up"], f"{p}: {entry['keys'][0]}")
        want = tuple(W.flatten(templates[comp])[target].shape)
        if a.size // a.shape[-1] * b.shape[-1] != math.prod(want) or b.shape[-1] != want[-1]:
            raise JaxdiffError(f"{p}: {entry['keys'][0]} makes an update of {a.shape[:-1] + b.shape[1:]} "
                               f"for {comp}/{'/'.join(target)}, which has shape {want}; the adapter "
                               "belongs to another model")
        rank = a.shape[-1]
        alpha, r_cfg, rslora = _alpha(entry, configs.get(comp, {}), name, rank)
        scale = alpha / math.sqrt(r_cfg) if rslora else alpha / r_cfg
        adapter.setdefault(comp, {})["/".join(target)] = {
            "a": a, "b": b, "scale": np.asarray(scale, np.float32)}
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise JaxdiffError(f"{p}: {len(unknown)} LoRA keys match no parameter of "
                           f"{', '.join(sorted(templates))}: {', '.join(unknown[:5])}{more}; "
                           "the adapter is for another model or in an unsupported format")
    if not adapter:
        raise JaxdiffError(f"{p} holds no LoRA weights (lora_A/lora_B or lora_down/lora_up)")
    return adapter


def _alpha(entry: Mapping, config: Mapping, module: str, rank: int) -> tuple[float, int, bool]:
    """(alpha, r, use_rslora) for one module, as diffusers/PEFT would configure it."""
    if "alpha" in entry:
        return float(np.asarray(entry["alpha"]).reshape(())), rank, False
    if config:
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", rank)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        return alpha, r, bool(config.get("use_rslora", False))
    return float(rank), rank, False


def load_loras(specs: Iterable[str | os.PathLike], templates: Mapping[str, Mapping]) -> list[Adapter]:
    return [load_lora(s, templates) for s in specs]


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` → (file, scale); a trailing ``:number`` is the scale (default 1)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(scale):
            raise JaxdiffError(f"--lora {spec}: the scale {tail} is not a finite number")
        return head, scale
    return spec, 1.0


_LDM_TOKENS = (("in_layers_", "in_layers."), ("out_layers_", "out_layers."), ("emb_layers_", "emb_layers."),
               ("time_embed_", "time_embed."), ("label_emb_0_", "label_emb.0."))


def _ldm_to_diffusers_kohya(name: str, unet_template: Mapping) -> str | None:
    """A kohya module name in the original UNet layout (SDXL LoRAs: `input_blocks_4_1_transformer_
    blocks_0_attn1_to_q`, `middle_block_0_in_layers_2`, `out_2`) → the diffusers name with '_'."""
    from jaxdiff.single_file import ldm_unet_name

    m = re.match(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$", name) or \
        re.match(r"(middle_block)_(\d+)_(.+)$", name) or re.match(r"(time_embed|out|label_emb_0)_(\d+)$", name)
    if m is None:
        return None
    if m.group(1) in ("time_embed", "out", "label_emb_0"):
        dotted = f"{m.group(1).replace('_0', '.0')}.{m.group(2)}.weight"
    else:
        head = ".".join(m.groups()[:-1])
        rest = m.groups()[-1]
        for old, new in _LDM_TOKENS:
            if rest.startswith(old):
                rest = new + rest[len(old):]
        dotted = f"{head}.{rest}.weight"
    lpb = _layers_per_block(unet_template)
    converted = ldm_unet_name(dotted, lpb) if lpb else None
    return converted[: -len(".weight")].replace(".", "_") if converted else None


def _layers_per_block(unet_template: Mapping) -> int | None:
    """ResNets per down block of a UNet param tree (what the original layout's numbering needs)."""
    down0 = unet_template.get("down_blocks_0")
    if not isinstance(down0, Mapping):
        return None
    return sum(1 for k in down0 if k.startswith("resnets_"))

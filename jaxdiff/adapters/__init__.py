"""LoRA adapters as functions on parameter trees (DESIGN.md seam 8).

    adapter = load_lora("style.safetensors", params)          # PEFT or kohya, UNet + text encoder
    fused, originals = fuse(params, adapter, 0.8)             # no runtime cost
    params = unfuse(fused, originals)                         # exactly the params before
    merged = merge(params, [a1, a2], jnp.array([0.8, 0.5]))  # inside jit; scales traced
"""
from jaxdiff.adapters.apply import delta, fuse, merge, unfuse
from jaxdiff.adapters.lora import (
           Adapter,
           load_lora,
           load_loras,
           module_index,
           parse_lora_spec,
)

__all__ = ["Adapter", "delta", "fuse", "load_lora", "load_loras", "merge", "module_index",
           "parse_lora_spec", "unfuse"]

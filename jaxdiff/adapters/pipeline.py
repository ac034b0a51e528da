"""Adapters on a Stable Diffusion pipeline: load `FILE[:SCALE]` specs and generate with the
adapters merged inside the one compiled program (scales traced: no recompile when they change).

    adapters, scales = load_pipeline_loras(params, ["style.safetensors:0.8", "detail.safetensors"])
    images = generate_with_adapters(pipe, params, adapters, scales, ids, neg, key, 7.5, config=config)
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.adapters.apply import merge
from jaxdiff.adapters.lora import load_lora, parse_lora_spec
from jaxdiff.pipelines import stable_diffusion as sd


def load_pipeline_loras(params: dict, specs: Sequence[str]) -> tuple[list[dict], np.ndarray]:
    """(adapters, scales (n,) float32) from ``FILE[:SCALE]`` specs, read onto the pipeline's params."""
    adapters, scales = [], []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        adapters.append(load_lora(path, params))
        scales.append(scale)
    return adapters, np.asarray(scales, np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(pipe, config, params, adapters, scales, prompt_ids, negative_ids, key, guidance_scale,
              guidance_rescale, latents):
    return sd.generate(pipe, merge(params, adapters, scales), prompt_ids, negative_ids, key,
                       guidance_scale, config=config, guidance_rescale=guidance_rescale, latents=latents)


def generate_with_adapters(pipe, params: dict, adapters: Sequence[dict], scales, prompt_ids, negative_ids,
                           key, guidance_scale=7.5, *, config: sd.GenerateConfig | None = None,
                           guidance_rescale=0.0, latents=None) -> jax.Array:
    """`stable_diffusion.generate` (text-to-image) with `adapters` merged at `scales` (n,) in
    the same program; scales, prompts, keys and guidance are traced."""
    import dataclasses

    config = config or sd.GenerateConfig()
    if not config.use_guidance_rescale and not (isinstance(guidance_rescale, (int, float))
                                                and guidance_rescale == 0):
        config = dataclasses.replace(config, use_guidance_rescale=True)
    return _generate(pipe, config, params, list(adapters), jnp.asarray(scales, jnp.float32),
                     jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(negative_ids, jnp.int32), key,
                     jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(guidance_rescale, jnp.float32),
                     latents)


def fuse_loras(params: dict, specs: Sequence[str]) -> dict:
    """`params` with each ``FILE[:SCALE]`` adapter fused in at its scale (what
    `sample.stable_diffusion --lora` does: no runtime cost for a one-off run)."""
    from jaxdiff.adapters.apply import fuse

    for spec in specs:
        path, scale = parse_lora_spec(spec)
        params, _ = fuse(params, load_lora(path, params), scale)
    return params

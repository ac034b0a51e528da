"""The x4 upscaler as diffusers' `StableDiffusionUpscalePipeline` runs it, in one compiled program.

    pipe, params = load_pipeline("path/to/stable-diffusion-x4-upscaler")
    ids, neg = sd.tokenize_prompts(pipe, ["a white cat"])
    big = generate(pipe, params, ids, neg, jax.random.key(0), 9.0, image=low_res, noise_level=20,
                   config=UpscaleConfig(num_inference_steps=75))     # (1, 4H, 4W, 3) in [0, 1]

The low-resolution image (B, H, W, 3) in [0, 1] is noised by the folder's `low_res_scheduler`
to `noise_level` (which the UNet also gets as its class label, `num_class_embeds`) and
concatenated to the latents (B, H, W, 4) each step: a 7-channel UNet. The latents are decoded
by the folder's VAE with its own scale factor (4) and `scaling_factor` (0.08333), in tiles
(`autoencoder_kl.decode_tiled`, diffusers' `vae.enable_tiling()`) when they are larger than a
tile, so a 512² image upscales to 2048² without a whole-image decoder pass.
Prompts, keys, guidance scale, images and `noise_level` are traced; `UpscaleConfig` is static.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import autoencoder_kl as vae_lib
from jaxdiff.pipelines import registry
from jaxdiff.pipelines import stable_diffusion as sd
from jaxdiff.sampling import cfg, sample
from jaxdiff.schedulers import Scheduler, create_scheduler


@dataclasses.dataclass(frozen=True, eq=False)
class Upscaler(sd.StableDiffusion):
    """A Stable Diffusion pipeline plus the scheduler that noises the low-resolution image and
    the largest noise level the pipeline accepts (model_index.json's `max_noise_level`)."""
    low_res_scheduler: Scheduler | None = None
    max_noise_level: int = 350


@dataclasses.dataclass(frozen=True)
class UpscaleConfig:
    """The static settings of one compiled upscaling program.

    tiled_decode: decode latents larger than the VAE's tile in overlapping tiles (diffusers'
        `enable_tiling`); False: one whole-image decoder pass, as diffusers by default.
    output: "images" ((B, 4H, 4W, 3) in [0, 1]) or "latents" ((B, H, W, 4))."""
    num_inference_steps: int = 75
    tiled_decode: bool = True
    clip_skip: int | None = None
    output: str = "images"

    def __post_init__(self):
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise JaxdiffError(f"num_inference_steps must be a positive int, got {self.num_inference_steps!r}")
        if self.output not in ("images", "latents"):
            raise JaxdiffError(f"output {self.output!r}; choose one of: images, latents")


def load_pipeline(folder: str | os.PathLike, **kwargs) -> tuple[Upscaler, dict]:
    """`(pipe, params)` of a diffusers `StableDiffusionUpscalePipeline` folder (`low_res_scheduler/`
    beside the usual five). Keyword arguments as `stable_diffusion.load_pipeline`."""
    base, params = sd.load_components(folder, kinds=("upscale",), **kwargs)
    root = base.folder
    if not (root / "low_res_scheduler").is_dir():
        raise JaxdiffError(f"{root} has no low_res_scheduler/ folder: the x4 upscaler noises the "
                           "low-resolution image with it")
    index = W.read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    pipe = Upscaler(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                    low_res_scheduler=create_scheduler(root / "low_res_scheduler"),
                    max_noise_level=int(index.get("max_noise_level", 350)))
    c, lat = pipe.unet.config.in_channels, pipe.latent_channels
    if c != lat + 3:
        raise JaxdiffError(f"{root}: the UNet takes {c} input channels; the upscaler's takes {lat + 3} "
                           f"(latents and the low-resolution RGB image)")
    if pipe.unet.config.num_class_embeds is None and pipe.unet.config.class_embed_type is None:
        raise JaxdiffError(f"{root}: the UNet has no class embedding (num_class_embeds) for the noise level")
    return pipe, params


def _generate(pipe: Upscaler, config: UpscaleConfig, params: dict, prompt_ids, negative_ids, key,
              guidance_scale, image, noise_level, latents=None, image_noise=None):
    batch = prompt_ids.shape[0]
    if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != 3:
        raise JaxdiffError(f"low-resolution images of shape {tuple(image.shape)}; expected NHWC "
                           f"({batch}, H, W, 3), one per prompt")
    h, w = image.shape[1:3]
    shape = (batch, h, w, pipe.latent_channels)
    k_image, k_noise, k_sample = jax.random.split(key, 3)

    ids = jnp.concatenate([prompt_ids, negative_ids], axis=0)
    context = sd.encode_prompt(pipe, params, ids, config.clip_skip)
    cond, uncond = context[:batch], context[batch:]

    low = pipe.low_res_scheduler
    if image_noise is None:
        image_noise = jax.random.normal(k_image, image.shape, jnp.float32)
    levels = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (batch,))
    with jax.ensure_compile_time_eval():
        low_state = low.create_state()
    noisy = low.add_noise(low_state, image.astype(jnp.float32) * 2 - 1, image_noise.astype(jnp.float32), levels)

    noise = jax.random.normal(k_noise, shape, jnp.float32) if latents is None else latents.astype(jnp.float32)
    if tuple(noise.shape) != shape:
        raise JaxdiffError(f"latents of shape {tuple(noise.shape)} do not fit this generation: expected NHWC {shape}")
    unet_params = params["unet"]

    def denoise(x, t, c):
        ctx, low_res, labels = c
        return pipe.unet.apply({"params": unet_params}, jnp.concatenate([x, low_res], -1), t, ctx,
                               class_labels=labels)

    sched = pipe.scheduler
    with jax.ensure_compile_time_eval():
        state = sched.set_timesteps(sched.create_state(), config.num_inference_steps)
    guided = cfg(denoise, jnp.asarray(guidance_scale, jnp.float32))
    out = sample(guided, sched, state, noise, k_sample, ((cond, noisy, levels), (uncond, noisy, levels)))
    if config.output == "latents":
        return out
    z = vae_lib.unscale_latents(pipe.vae.config, out)
    if config.tiled_decode:
        images = vae_lib.decode_tiled(pipe.vae, params["vae"], z)
    else:
        images = pipe.vae.apply({"params": params["vae"]}, z, method=pipe.vae.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))
_generate_pmap = jax.pmap(_generate, axis_name="devices", static_broadcasted_argnums=(0, 1),
                          in_axes=(None, None, 0, 0, 0, 0, None, 0, None, 0, 0))


def _check_noise_level(pipe: Upscaler, noise_level) -> None:
    if isinstance(noise_level, (int, np.integer)) and not 0 <= noise_level <= pipe.max_noise_level:
        raise JaxdiffError(f"noise level {noise_level} is outside 0..{pipe.max_noise_level} "
                           "(the folder's max_noise_level)")


def generate(pipe: Upscaler, params: dict, prompt_ids, negative_ids, key, guidance_scale=9.0, *, image,
             noise_level=20, config: UpscaleConfig = UpscaleConfig(), latents=None, image_noise=None) -> jax.Array:
    """Upscale `image` 4× (the VAE's factor) guided by the prompts, in one compiled program.

    prompt_ids, negative_ids: (B, 77) int32 (`stable_diffusion.tokenize_prompts`).
    image: (B, H, W, 3) low-resolution images in [0, 1], one per prompt.
    noise_level: int in 0..max_noise_level (traced): the low_res_scheduler timestep the image is
        noised to, and the UNet's class label. guidance_scale: traced.
    latents: initial unit noise (B, H, W, 4); image_noise: the unit noise (B, H, W, 3) added to
        the image; both default to draws from `key`.
    Returns (B, 4H, 4W, 3) float32 in [0, 1] (or latents, `config.output`).
    """
    _check_noise_level(pipe, noise_level)
    return _generate_jit(pipe, config, params, jnp.asarray(prompt_ids, jnp.int32),
                         jnp.asarray(negative_ids, jnp.int32), key, jnp.asarray(guidance_scale, jnp.float32),
                         jnp.asarray(image, jnp.float32), jnp.asarray(noise_level, jnp.int32), latents,
                         image_noise)


def compile_generate(pipe: Upscaler, params: dict, batch: int, height: int, width: int, *,
                     config: UpscaleConfig = UpscaleConfig()):
    """Ahead-of-time compiled `generate` for `batch` images of height×width (low resolution):
    `fn(params, prompt_ids, negative_ids, key, guidance_scale, image, noise_level)`; its
    `.memory_analysis()` (XLA's figures for the compiled program) is on `fn.compiled`."""
    ids = jax.ShapeDtypeStruct((batch, pipe.max_length), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    level = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = _generate_jit.lower(pipe, config, params, ids, ids, jax.random.key(0), scalar, image, level,
                                   None, None).compile()

    def run(params, prompt_ids, negative_ids, key, guidance_scale, image, noise_level=20):
        _check_noise_level(pipe, noise_level)
        return compiled(params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(negative_ids, jnp.int32), key,
                        jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(image, jnp.float32),
                        jnp.asarray(noise_level, jnp.int32), None, None)

    run.compiled = compiled
    return run


def generate_parallel(pipe: Upscaler, replicated_params: dict, prompt_ids, negative_ids, keys,
                      guidance_scale=9.0, *, image, noise_level=20, config: UpscaleConfig = UpscaleConfig(),
                      latents=None, image_noise=None) -> jax.Array:
    """`generate` on every local device (`pmap`): rows d·b … d·b+b−1 of every batched input go to
    device d with `keys[d]` (as `stable_diffusion.generate_parallel`)."""
    _check_noise_level(pipe, noise_level)
    n = sd.parallel_split(prompt_ids, keys)

    def split(x, dtype=jnp.float32):
        return None if x is None else jnp.asarray(x, dtype).reshape((n, -1) + tuple(np.shape(x)[1:]))

    out = _generate_pmap(pipe, config, replicated_params, split(prompt_ids, jnp.int32),
                         split(negative_ids, jnp.int32), keys, jnp.asarray(guidance_scale, jnp.float32),
                         split(image), jnp.asarray(noise_level, jnp.int32), split(latents), split(image_noise))
    return out.reshape((-1,) + out.shape[2:])


# --------------------------------------------------------------------------------------------
# What sample.stable_diffusion asks for
# --------------------------------------------------------------------------------------------

def run_request(pipe: Upscaler, params: dict, request: registry.Request, report: dict) -> np.ndarray:
    """The program's upscaling run (`registry` protocol): (N, 4H, 4W, 3) in [0, 1]."""
    from jaxdiff.pipelines.inputs import load_init_image

    r = request
    if r.height or r.width:
        raise JaxdiffError("--height/--width do not apply to the upscaler: the output is the VAE's factor "
                           f"({pipe.vae_scale_factor}) times the --init-image size")
    _check_noise_level(pipe, r.noise_level)
    image = load_init_image(r.init_image, None, None, pipe.vae_scale_factor, resample="bicubic")
    latents = None
    num_images = r.num_images
    if r.latents:
        latents = sd.load_latents(r.latents)
        num_images = num_images or latents.shape[0]
        sd.check_latents(latents, (num_images,) + image.shape[1:3] + (pipe.latent_channels,), r.latents)
    num_images = num_images or 1
    images = np.repeat(image, num_images, 0)
    config = UpscaleConfig(r.steps)
    ids, neg = sd.tokenize_prompts(pipe, [r.prompt] * num_images, r.negative_prompt)
    n_dev = parallel.device_count()
    use_pmap = registry.use_pmap(r, num_images, n_dev)
    report["where"] = registry.describe_devices(use_pmap, n_dev)
    key = jax.random.key(r.seed)
    t0 = time.perf_counter()
    if use_pmap:
        out = generate_parallel(pipe, sd.replicate_params(params), ids, neg, jax.random.split(key, n_dev),
                                r.guidance_scale, image=images, noise_level=r.noise_level, config=config,
                                latents=latents)
    else:
        out = generate(pipe, params, ids, neg, key, r.guidance_scale, image=images, noise_level=r.noise_level,
                       config=config, latents=latents)
    out = np.asarray(out)
    report.setdefault("times", {})["compile+generate"] = time.perf_counter() - t0
    return out


__all__ = ["Upscaler", "UpscaleConfig", "load_pipeline", "generate", "compile_generate", "generate_parallel",
           "run_request"]

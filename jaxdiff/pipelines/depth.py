"""Depth-to-image as diffusers' `StableDiffusionDepth2ImgPipeline` does it, in one compiled program.

    pipe, params = load_pipeline("path/to/stable-diffusion-2-depth")
    ids, neg = sd.tokenize_prompts(pipe.sd, ["a castle"] * 2)
    images = generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=image,
                      config=sd.GenerateConfig(num_inference_steps=50, height=512, width=512, strength=0.8))

The UNet takes 5 channels: the latents and the depth map, resized to the latents' size with
torch's bicubic interpolation (`jaxdiff.resize.interpolate`, ATen's kernel: another one moves
the image by several /255) and normalised per image to [−1, 1]. The depth comes from `depth_map`
(B or 1, H', W') of any size and scale, or, when absent, from the folder's DPT
(`depth_estimator/`, `jaxdiff.models.dpt`) run on the image after its `feature_extractor/`
preprocessing (`jaxdiff.models.dpt_preprocess`) — inside the same program.

The image is always the start: its VAE latents are noised to the first of the last
`int(n · strength)` timesteps (strength default 0.8, diffusers' default) with `latents`, the unit
noise (B, h, w, 4), as img2img does. Prompts, keys, guidance scale, images and depth maps are
traced; the `GenerateConfig` is static.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, resize
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import dpt as dpt_lib
from jaxdiff.models import dpt_preprocess
from jaxdiff.pipelines import registry
from jaxdiff.pipelines import stable_diffusion as sd
from jaxdiff.sampling import cfg, img2img_start, sample
from jaxdiff.schedulers import Scheduler

DEFAULT_STRENGTH = 0.8


@dataclasses.dataclass(frozen=True, eq=False)
class DepthToImage:
    """The static half of a depth-to-image pipeline: the Stable Diffusion components (`sd`, a
    5-channel UNet), the DPT and its image processor config (None: the folder has no
    `depth_estimator/`, so every call needs a depth map). Hashed by identity (a static jit
    argument); the parameters live in `{"unet", "vae", "text_encoder"[, "depth_estimator"]}`."""
    sd: sd.StableDiffusion
    depth_estimator: dpt_lib.DPTForDepthEstimation | None = None
    processor: dpt_preprocess.DPTImageProcessorConfig | None = None

    @property
    def scheduler(self) -> Scheduler:
        return self.sd.scheduler

    @property
    def folder(self) -> Path | None:
        return self.sd.folder

    def with_scheduler(self, scheduler: Scheduler | str) -> DepthToImage:
        return dataclasses.replace(self, sd=self.sd.with_scheduler(scheduler))


def load_pipeline(folder: str | os.PathLike, **kwargs) -> tuple[DepthToImage, dict]:
    """`(pipe, params)` of a `StableDiffusionDepth2ImgPipeline` folder: the SD components
    (keyword arguments as `stable_diffusion.load_pipeline`), and `depth_estimator/` (a
    transformers DPT, float32) with `feature_extractor/` when the folder has them."""
    pipe, params = sd.load_components(folder, kinds=("depth",), **kwargs)
    check_unet(pipe)
    root = Path(folder).expanduser()
    estimator = processor = None
    if (root / "depth_estimator").is_dir():
        estimator, dpt_params = dpt_lib.load_dpt(root, "depth_estimator", variant=kwargs.get("variant"),
                                                 allow_outside_paths=kwargs.get("allow_outside_paths", False))
        processor = dpt_preprocess.load_image_processor_config(root, "feature_extractor")
        params["depth_estimator"] = jax.device_put(dpt_params)
    return DepthToImage(pipe, estimator, processor), params


def check_unet(pipe: sd.StableDiffusion) -> None:
    c, lat = pipe.unet.config.in_channels, pipe.latent_channels
    if c != lat + 1:
        raise JaxdiffError(f"{pipe.folder}: the UNet takes {c} input channels; depth-to-image needs "
                           f"{lat + 1} (the {lat}-channel latents and the depth map)")


def normalized_depth(depth: jax.Array, size: tuple[int, int]) -> jax.Array:
    """A depth map (B, H', W') → (B, h, w, 1) at the latents' size: torch's bicubic resize
    (align_corners=False), then each map scaled to [−1, 1] by its min and max (diffusers)."""
    d = resize.interpolate(jnp.asarray(depth, jnp.float32), size, "bicubic", align_corners=False)
    lo = d.min(axis=(1, 2), keepdims=True)
    hi = d.max(axis=(1, 2), keepdims=True)
    return (2.0 * (d - lo) / (hi - lo) - 1.0)[..., None]


def estimate_depth(pipe: DepthToImage, params: dict, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] → the DPT's depth (B, h', w') (relative inverse depth)."""
    if pipe.depth_estimator is None:
        raise JaxdiffError(f"{pipe.folder} has no depth_estimator/ to estimate depth with; "
                           "give a depth map (--depth-map FILE)")
    pixel_values = dpt_preprocess.preprocess(pipe.processor, images)
    return pipe.depth_estimator.apply({"params": params["depth_estimator"]}, pixel_values)


def _generate(pipe: DepthToImage, config: sd.GenerateConfig, params: dict, prompt_ids, negative_ids, key,
              guidance_scale, image, depth_map=None, latents=None, init_latents=None):
    base = pipe.sd
    batch = prompt_ids.shape[0]
    shape = config.latent_shape(base, batch)
    h, w = config.size(base)
    if tuple(image.shape) != (batch, h, w, 3):
        raise JaxdiffError(f"depth-to-image image of shape {tuple(image.shape)}; this generation needs "
                           f"NHWC {(batch, h, w, 3)}")
    strength = DEFAULT_STRENGTH if config.strength is None else float(config.strength)
    k_noise, k_encode, k_sample = jax.random.split(key, 3)

    ids = jnp.concatenate([prompt_ids, negative_ids], axis=0)
    context = sd.encode_prompt(base, params, ids, config.clip_skip)
    cond, uncond = context[:batch], context[batch:]

    depth = estimate_depth(pipe, params, image) if depth_map is None else depth_map
    if depth.ndim != 3 or batch % depth.shape[0]:
        raise JaxdiffError(f"depth map of shape {tuple(depth.shape)}; give (B, H, W) with B = 1 or "
                           f"the number of images ({batch})")
    depth = normalized_depth(depth, shape[1:3])
    depth = jnp.tile(depth, (batch // depth.shape[0], 1, 1, 1))

    noise = jax.random.normal(k_noise, shape, jnp.float32) if latents is None else latents.astype(jnp.float32)
    if tuple(noise.shape) != shape:
        raise JaxdiffError(f"latents of shape {tuple(noise.shape)} do not fit this generation: expected NHWC {shape}")
    if init_latents is None:
        init_latents = sd.encode_images(base, params, image, k_encode)

    sched = base.scheduler
    with jax.ensure_compile_time_eval():
        state = sched.set_timesteps(sched.create_state(), config.num_inference_steps, strength=strength)
    x_T = img2img_start(sched, state, init_latents.astype(jnp.float32), noise)
    unet_params = params["unet"]

    def denoise(x, t, c):
        ctx, d = c
        return base.unet.apply({"params": unet_params}, jnp.concatenate([x, d.astype(x.dtype)], -1), t, ctx)

    guided = cfg(denoise, jnp.asarray(guidance_scale, jnp.float32))
    out = sample(guided, sched, state, x_T, k_sample, ((cond, depth), (uncond, depth)), scale_x_T=False)
    if config.output == "latents":
        return out
    return sd.decode_latents(base, params, out)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))
_generate_pmap = jax.pmap(_generate, axis_name="devices", static_broadcasted_argnums=(0, 1),
                          in_axes=(None, None, 0, 0, 0, 0, None, 0, 0, 0, 0))


def generate(pipe: DepthToImage, params: dict, prompt_ids, negative_ids, key, guidance_scale=7.5, *,
             image, depth_map=None, config: sd.GenerateConfig | None = None, latents=None,
             init_latents=None) -> jax.Array:
    """Depth-conditioned img2img of `image`, in one compiled program.

    prompt_ids, negative_ids: (B, 77) int32 (`stable_diffusion.tokenize_prompts(pipe.sd, ...)`).
    image: (B, H, W, 3) in [0, 1]; H, W = the config's size (default: the UNet's).
    depth_map: (B or 1, H', W') float, any size and scale (e.g. `load_depth_map`); default: the
        DPT's estimate from `image`.
    key: PRNG key (noise, the VAE posterior sample). guidance_scale: traced.
    config.strength: the fraction of the schedule run (default 0.8).
    latents: the unit noise (B, h, w, 4) added to the image's latents; default drawn from `key`.
    init_latents: the image's already-encoded (scaled) latents; default: encoded here.
    Returns (B, H, W, 3) float32 in [0, 1] (or latents, `config.output`).
    """
    config = config or sd.GenerateConfig(strength=DEFAULT_STRENGTH)
    return _generate_jit(pipe, config, params, jnp.asarray(prompt_ids, jnp.int32),
                         jnp.asarray(negative_ids, jnp.int32), key, jnp.asarray(guidance_scale, jnp.float32),
                         jnp.asarray(image, jnp.float32),
                         None if depth_map is None else jnp.asarray(depth_map, jnp.float32), latents, init_latents)


def generate_parallel(pipe: DepthToImage, replicated_params: dict, prompt_ids, negative_ids, keys,
                      guidance_scale=7.5, *, image, depth_map=None,
                      config: sd.GenerateConfig | None = None, latents=None,
                      init_latents=None) -> jax.Array:
    """`generate` on every local device (`pmap`): rows d·b … d·b+b−1 of every batched input
    (a depth map: one per image) go to device d with `keys[d]`."""
    config = config or sd.GenerateConfig(strength=DEFAULT_STRENGTH)
    n = sd.parallel_split(prompt_ids, keys)
    if depth_map is not None and np.shape(depth_map)[0] != np.shape(prompt_ids)[0]:
        depth_map = np.repeat(np.asarray(depth_map), np.shape(prompt_ids)[0] // np.shape(depth_map)[0], 0)

    def split(x, dtype=jnp.float32):
        return None if x is None else jnp.asarray(x, dtype).reshape((n, -1) + tuple(np.shape(x)[1:]))

    out = _generate_pmap(pipe, config, replicated_params, split(prompt_ids, jnp.int32),
                         split(negative_ids, jnp.int32), keys, jnp.asarray(guidance_scale, jnp.float32),
                         split(image), split(depth_map), split(latents), split(init_latents))
    return out.reshape((-1,) + out.shape[2:])


# --------------------------------------------------------------------------------------------
# Depth map files
# --------------------------------------------------------------------------------------------

def load_depth_map(path: str | os.PathLike, flag: str = "--depth-map") -> np.ndarray:
    """A depth map file → (B, H, W) float32: a `.npy` array (H, W), (B, H, W) or (B, 1, H, W)
    (as diffusers' `depth_map` tensor), or a single-channel PNG (16-bit, or 8-bit) of any size.
    The scale does not matter (each map is normalised to [−1, 1]); a constant or non-finite map
    is refused."""
    p = Path(path)
    if not p.is_file():
        raise JaxdiffError(f"{flag} {p} does not exist")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise JaxdiffError(f"{flag} {p} is not a .npy array ({e})") from None
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise JaxdiffError(f"{flag} {p} holds a {arr.dtype} array of shape {arr.shape}; a depth map is "
                               "real numbers of shape (H, W), (B, H, W) or (B, 1, H, W)")
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I", "L", "F"):
                    raise JaxdiffError(f"{flag} {p} is a {im.mode} image; a depth map is one channel: a "
                                       "16-bit (or 8-bit) greyscale PNG, or a .npy array")
                arr = np.asarray(im.convert("I") if im.mode.startswith("I;16") else im)[None]
        except (UnidentifiedImageError, OSError) as e:
            raise JaxdiffError(f"{flag} {p} is neither a .npy array nor an image PIL can read ({e})") from None
    arr = arr.astype(np.float32)
    if min(arr.shape[1:]) < 1:
        raise JaxdiffError(f"{flag} {p} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise JaxdiffError(f"{flag} {p} holds NaN or infinite values; give a finite depth map")
    flat = arr.reshape(arr.shape[0], -1)
    if (flat.max(1) == flat.min(1)).any():
        raise JaxdiffError(f"{flag} {p} is constant; a depth map needs at least two depths "
                           "(it is normalised by its min and max)")
    return arr


# --------------------------------------------------------------------------------------------
# What sample.stable_diffusion asks for
# --------------------------------------------------------------------------------------------

def run_request(pipe: DepthToImage, params: dict, request: registry.Request, report: dict) -> np.ndarray:
    """The program's depth-to-image run (`registry` protocol): (N, H, W, 3) in [0, 1]."""
    from jaxdiff.pipelines.inputs import load_init_image

    r = request
    base = pipe.sd
    image = load_init_image(r.init_image, r.height, r.width, base.vae_scale_factor)
    depth = load_depth_map(r.depth_map) if r.depth_map else None
    if depth is None and pipe.depth_estimator is None:
        raise JaxdiffError(f"{pipe.folder} has no depth_estimator/; give --depth-map FILE")
    latents = None
    num_images = r.num_images
    if r.latents:
        latents = sd.load_latents(r.latents)
        num_images = num_images or latents.shape[0]
    num_images = num_images or 1
    if depth is not None and depth.shape[0] not in (1, num_images):
        raise JaxdiffError(f"--depth-map {r.depth_map} holds {depth.shape[0]} maps for {num_images} "
                           "images; give one map, or one per image")
    config = sd.GenerateConfig(r.steps, image.shape[1], image.shape[2], strength=r.strength)
    if latents is not None:
        sd.check_latents(latents, config.latent_shape(base, num_images), r.latents)
    images = np.repeat(image, num_images, 0)
    ids, neg = sd.tokenize_prompts(base, [r.prompt] * num_images, r.negative_prompt)
    n_dev = parallel.device_count()
    use_pmap = registry.use_pmap(r, num_images, n_dev)
    report["where"] = registry.describe_devices(use_pmap, n_dev)
    key = jax.random.key(r.seed)
    t0 = time.perf_counter()
    if use_pmap:
        out = generate_parallel(pipe, sd.replicate_params(params), ids, neg, jax.random.split(key, n_dev),
                                r.guidance_scale, image=images, depth_map=depth, config=config, latents=latents)
    else:
        out = generate(pipe, params, ids, neg, key, r.guidance_scale, image=images, depth_map=depth,
                       config=config, latents=latents)
    out = np.asarray(out)
    report.setdefault("times", {})["compile+generate"] = time.perf_counter() - t0
    return out


__all__ = ["DEFAULT_STRENGTH", "DepthToImage", "check_unet", "estimate_depth", "generate", "generate_parallel",
           "load_depth_map", "load_pipeline", "normalized_depth", "run_request"]

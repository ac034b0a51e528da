"""Inpainting as diffusers' `StableDiffusionInpaintPipeline` does it, in one compiled program.

    pipe, params = load_pipeline("path/to/stable-diffusion-2-inpainting")      # or any SD 1.x/2.x folder
    ids, neg = sd.tokenize_prompts(pipe, ["a cat on a bench"] * 2)
    images = generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=image, mask=mask,
                      config=sd.GenerateConfig(num_inference_steps=50, height=512, width=512))

image: (B, H, W, 3) in [0, 1]; mask: (B, H, W, 1) in [0, 1], white (≥ 0.5) = repaint, binarised
as diffusers' mask processor does. Two kinds of UNet:
- 9 input channels (inpainting checkpoints): each step the UNet sees [latents ‖ mask ‖
  masked-image latents], the mask downsampled (nearest) to the latents' size and the masked image
  (`image · (mask < 0.5)`) encoded by the VAE.
- 4 input channels (any text-to-image folder): after each step the known region is replaced by
  the image's latents noised to the next timestep (clean after the last step), diffusers' blend.

`strength` (default 1.0, diffusers' default; traced): below 1 the loop runs the last
`int(n · strength)` steps from the image's latents noised to the first of them (as img2img; the
earlier steps are skipped by `lax.cond`); at 1 it starts from pure noise. `latents` is that unit
noise (B, h, w, 4) in both cases (for strength < 1 diffusers' own `latents=` argument ignores the
image; its generator path is what this matches). Prompts, keys, guidance scale, strength, images
and masks are traced; the config (steps, size) is static.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.errors import JaxdiffError
from jaxdiff.pipelines import registry
from jaxdiff.pipelines import stable_diffusion as sd
from jaxdiff.sampling import cfg, sample, strength_start

UNET_CHANNELS = (4, 9)


def load_pipeline(folder: str | os.PathLike, **kwargs) -> tuple[sd.StableDiffusion, dict]:
    """`(pipe, params)` of an inpainting folder (9-channel UNet) or of a text-to-image folder
    (4-channel UNet, inpainted by blending). Keyword arguments as `stable_diffusion.load_pipeline`."""
    pipe, params = sd.load_components(folder, kinds=("inpaint", "text-to-image"), **kwargs)
    check_unet(pipe)
    return pipe, params


def check_unet(pipe: sd.StableDiffusion) -> None:
    c, lat = pipe.unet.config.in_channels, pipe.latent_channels
    if c not in (lat, 2 * lat + 1):
        raise JaxdiffError(f"{pipe.folder}: the UNet takes {c} input channels; inpainting needs {lat} "
                           f"(a text-to-image UNet) or {2 * lat + 1} (latents, mask, masked-image latents)")


def prepare_mask(mask: jax.Array, factor: int) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, 1) in [0, 1] → the binarised mask at image size and at latent size (nearest:
    every `factor`-th pixel, as torch's default `interpolate`)."""
    binary = (mask >= 0.5).astype(jnp.float32)
    return binary, binary[:, ::factor, ::factor, :]


def _generate(pipe: sd.StableDiffusion, config: sd.GenerateConfig, params: dict, prompt_ids, negative_ids,
              key, guidance_scale, strength, init_steps, image, mask, latents=None, image_latents=None,
              masked_image_latents=None):
    batch = prompt_ids.shape[0]
    shape = config.latent_shape(pipe, batch)
    h, w = config.size(pipe)
    for name, arr, channels in (("image", image, 3), ("mask", mask, 1)):
        if tuple(arr.shape) != (batch, h, w, channels):
            raise JaxdiffError(f"inpaint {name} of shape {tuple(arr.shape)}; this generation needs "
                               f"NHWC {(batch, h, w, channels)}")
    nine = pipe.unet.config.in_channels != pipe.latent_channels
    k_noise, k_image, k_masked, k_sample = jax.random.split(key, 4)

    ids = jnp.concatenate([prompt_ids, negative_ids], axis=0)
    context = sd.encode_prompt(pipe, params, ids, config.clip_skip)
    cond, uncond = context[:batch], context[batch:]

    noise = jax.random.normal(k_noise, shape, jnp.float32) if latents is None else latents.astype(jnp.float32)
    if tuple(noise.shape) != shape:
        raise JaxdiffError(f"latents of shape {tuple(noise.shape)} do not fit this generation: expected NHWC {shape}")
    image = jnp.asarray(image, jnp.float32)
    mask_full, mask_latent = prepare_mask(jnp.asarray(mask, jnp.float32), pipe.vae_scale_factor)
    if image_latents is None:
        image_latents = sd.encode_images(pipe, params, image, k_image)
    image_latents = image_latents.astype(jnp.float32)

    sched = pipe.scheduler
    with jax.ensure_compile_time_eval():
        state = sched.set_timesteps(sched.create_state(), config.num_inference_steps)
    timesteps = state.timesteps
    x_img, begin, state = strength_start(sched, state, init_steps, image_latents, noise)
    x_T = jnp.where(strength >= 1.0, noise * sched.init_noise_sigma(state), x_img)

    unet_params = params["unet"]
    after_step = None
    if nine:
        if masked_image_latents is None:
            masked = image * (1.0 - mask_full)  # diffusers: [-1, 1] image · (mask < 0.5); 0 in [-1, 1] is 0.5 here
            masked_image_latents = sd.encode_images(pipe, params, masked + 0.5 * mask_full, k_masked)
        extra = jnp.concatenate([mask_latent, masked_image_latents.astype(jnp.float32)], axis=-1)

        def denoise(x, t, c):
            ctx, ex = c
            return pipe.unet.apply({"params": unet_params}, jnp.concatenate([x, ex], -1), t, ctx)

        conds = ((cond, extra), (uncond, extra))
    else:
        def denoise(x, t, c):
            return pipe.unet.apply({"params": unet_params}, x, t, c)

        def after_step(x, i):
            n = timesteps.shape[0]
            t_next = timesteps[jnp.minimum(i + 1, n - 1)]
            noised = sched.add_noise(state, image_latents, noise, jnp.broadcast_to(t_next, (batch,)))
            known = jnp.where(i < n - 1, noised, image_latents)
            return (1.0 - mask_latent) * known + mask_latent * x

        conds = (cond, uncond)

    guided = cfg(denoise, jnp.asarray(guidance_scale, jnp.float32))
    out = sample(guided, sched, state, x_T, k_sample, conds, scale_x_T=False, after_step=after_step,
                 start_index=begin)
    if config.output == "latents":
        return out
    return sd.decode_latents(pipe, params, out)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))
_generate_pmap = jax.pmap(_generate, axis_name="devices", static_broadcasted_argnums=(0, 1),
                          in_axes=(None, None, 0, 0, 0, 0, None, None, None, 0, 0, 0, 0, 0))


def _strength(config: sd.GenerateConfig, strength) -> tuple[sd.GenerateConfig, jax.Array, jax.Array]:
    """(config without strength, traced strength, traced `stable_diffusion.init_steps`)."""
    if strength is None:
        strength = 1.0 if config.strength is None else config.strength
    steps = sd.init_steps(config.num_inference_steps, strength)
    return dataclasses.replace(config, strength=None), jnp.asarray(strength, jnp.float32), steps


def generate(pipe: sd.StableDiffusion, params: dict, prompt_ids, negative_ids, key, guidance_scale=7.5, *,
             image, mask, strength=None, config: sd.GenerateConfig = sd.GenerateConfig(), latents=None,
             image_latents=None, masked_image_latents=None) -> jax.Array:
    """Inpaint `image` where `mask` is white, in one compiled program.

    prompt_ids, negative_ids: (B, 77) int32 (`stable_diffusion.tokenize_prompts`).
    image: (B, H, W, 3) in [0, 1]; mask: (B, H, W, 1) in [0, 1] (≥ 0.5 = repaint); H, W =
        config's size (default: the UNet's).
    key: PRNG key (noise, the VAE posterior samples). guidance_scale: traced.
    strength: in (0, 1], traced (default `config.strength`, else 1.0).
    latents: the unit noise (B, h, w, 4), default drawn from `key`. image_latents,
        masked_image_latents: already-encoded (scaled) latents of the image / of the masked image,
        default: encoded here (posterior samples).
    Returns (B, H, W, 3) float32 in [0, 1] (or latents, `config.output`).
    """
    config, strength, init_steps = _strength(config, strength)
    return _generate_jit(pipe, config, params, jnp.asarray(prompt_ids, jnp.int32),
                         jnp.asarray(negative_ids, jnp.int32), key, jnp.asarray(guidance_scale, jnp.float32),
                         strength, init_steps, jnp.asarray(image, jnp.float32), jnp.asarray(mask, jnp.float32), latents,
                         image_latents, masked_image_latents)


def generate_parallel(pipe: sd.StableDiffusion, replicated_params: dict, prompt_ids, negative_ids, keys,
                      guidance_scale=7.5, *, image, mask, strength=None,
                      config: sd.GenerateConfig = sd.GenerateConfig(), latents=None, image_latents=None,
                      masked_image_latents=None) -> jax.Array:
    """`generate` on every local device (`pmap`): rows d·b … d·b+b−1 of every batched input go to
    device d with `keys[d]` (as `stable_diffusion.generate_parallel`)."""
    n = sd.parallel_split(prompt_ids, keys)

    def split(x, dtype=jnp.float32):
        return None if x is None else jnp.asarray(x, dtype).reshape((n, -1) + tuple(np.shape(x)[1:]))

    config, strength, init_steps = _strength(config, strength)
    out = _generate_pmap(pipe, config, replicated_params, split(prompt_ids, jnp.int32),
                         split(negative_ids, jnp.int32), keys, jnp.asarray(guidance_scale, jnp.float32),
                         strength, init_steps, split(image), split(mask), split(latents), split(image_latents),
                         split(masked_image_latents))
    return out.reshape((-1,) + out.shape[2:])


# --------------------------------------------------------------------------------------------
# What sample.stable_diffusion asks for
# --------------------------------------------------------------------------------------------

def _pil_resample():
    from PIL import Image

    return Image.LANCZOS  # diffusers' VaeImageProcessor default


def crop_region(mask, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """diffusers' `VaeImageProcessor.get_crop_region`: the box (x1, y1, x2, y2) around the mask's
    non-black pixels, grown by `pad` and then to the aspect ratio width:height (kept inside the
    image). `mask`: a PIL image."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
    if cols.size == 0:
        raise JaxdiffError("--padding-mask-crop: the mask has no white pixel to crop around")
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio_crop, ratio = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio:
        diff = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= h:
            y1, y2 = y1 - (y2 - h), h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, h)
    else:
        diff = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= w:
            x1, x2 = x1 - (x2 - w), w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, w)
    return x1, y1, x2, y2


def resize(image, width: int, height: int, mode: str = "default"):
    """diffusers' `VaeImageProcessor.resize` of a PIL image (Lanczos): "default" stretches,
    "fill" fits inside and fills the margins by stretching the edge rows/columns, "crop" covers
    and centres (the excess cut)."""
    from PIL import Image

    resample = _pil_resample()
    if mode == "default":
        return image.resize((width, height), resample=resample)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=resample)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill" and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif mode == "fill" and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def apply_overlay(mask, init_image, image, crop: tuple[int, int, int, int] | None = None):
    """diffusers' `VaeImageProcessor.apply_overlay`: the generated PIL `image` (resized into the
    `crop` box of the original when given) under the original where the mask is black."""
    from PIL import Image, ImageOps

    width, height = init_image.width, init_image.height
    kept = Image.new("RGBa", (width, height))
    kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    if crop is not None:
        x, y, x2, y2 = crop
        base = Image.new("RGBA", (width, height))
        base.paste(resize(image, x2 - x, y2 - y, "crop"), (x, y))
        image = base.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def read_inputs(request: registry.Request, factor: int):
    """The request's image and mask files, as diffusers' processors make them:
    ((1, H, W, 3), (1, H, W, 1)) float32 in [0, 1], plus (original image, mask, crop box) for
    `apply_overlay` when `padding_mask_crop` is given (else None). The mask is blurred first
    (`mask_blur`: PIL's GaussianBlur, diffusers' `VaeImageProcessor.blur`); H×W is
    --height × --width, default the image's size rounded down to a multiple of `factor`; with
    `padding_mask_crop` both are cropped to `crop_region` and resized to H×W in "fill" mode."""
    from PIL import ImageFilter

    from jaxdiff.pipelines.inputs import open_image

    original = open_image(request.init_image, "--init-image")
    mask = open_image(request.mask_image, "--mask-image", mode=None)
    if mask.mode not in ("L", "RGB"):
        mask = mask.convert("RGB")
    if request.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    w = request.width or original.width // factor * factor
    h = request.height or original.height // factor * factor
    if h <= 0 or w <= 0:
        raise JaxdiffError(f"--init-image {request.init_image} is smaller than {factor} pixels")
    crop, mode, image = None, "default", original
    if request.padding_mask_crop is not None:
        crop, mode = crop_region(mask, w, h, request.padding_mask_crop), "fill"
        image, mask_in = image.crop(crop), mask.crop(crop)
    else:
        mask_in = mask
    if image.size != (w, h) or mode != "default":
        image = resize(image, w, h, mode)
    if mask_in.size != (w, h) or mode != "default":
        mask_in = resize(mask_in, w, h, mode)
    arrays = ((np.asarray(image.convert("RGB"), np.float32) / 255.0)[None],
              (np.asarray(mask_in.convert("L"), np.float32) / 255.0)[None, :, :, None])
    return arrays + ((original, mask, crop) if crop is not None else None,)


def run_request(pipe: sd.StableDiffusion, params: dict, request: registry.Request, report: dict) -> np.ndarray:
    """The program's inpainting run (`registry` protocol): (N, H, W, 3) in [0, 1]."""
    r = request
    image, mask, overlay = read_inputs(r, pipe.vae_scale_factor)
    latents = None
    num_images = r.num_images
    if r.latents:
        latents = sd.load_latents(r.latents)
        num_images = num_images or latents.shape[0]
    num_images = num_images or 1
    config = sd.GenerateConfig(r.steps, image.shape[1], image.shape[2])
    if latents is not None:
        sd.check_latents(latents, config.latent_shape(pipe, num_images), r.latents)
    images, masks = np.repeat(image, num_images, 0), np.repeat(mask, num_images, 0)
    ids, neg = sd.tokenize_prompts(pipe, [r.prompt] * num_images, r.negative_prompt)
    n_dev = parallel.device_count()
    use_pmap = registry.use_pmap(r, num_images, n_dev)
    report["where"] = registry.describe_devices(use_pmap, n_dev)
    key = jax.random.key(r.seed)
    t0 = time.perf_counter()
    if use_pmap:
        out = generate_parallel(pipe, sd.replicate_params(params), ids, neg, jax.random.split(key, n_dev),
                                r.guidance_scale, image=images, mask=masks, strength=r.strength, config=config,
                                latents=latents)
    else:
        out = generate(pipe, params, ids, neg, key, r.guidance_scale, image=images, mask=masks,
                       strength=r.strength, config=config, latents=latents)
    out = np.asarray(out)
    report.setdefault("times", {})["compile+generate"] = time.perf_counter() - t0
    if overlay is not None:  # diffusers pastes the uint8 result into the original image
        from PIL import Image

        original, mask_image, crop = overlay
        pixels = np.round(out * 255.0).clip(0, 255).astype(np.uint8)
        out = np.stack([np.asarray(apply_overlay(mask_image, original, Image.fromarray(p), crop), np.float32)
                        for p in pixels]) / 255.0
    return out


__all__ = ["load_pipeline", "check_unet", "prepare_mask", "generate", "generate_parallel", "read_inputs",
           "crop_region", "resize", "apply_overlay", "run_request"]

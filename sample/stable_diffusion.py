"""Generate images with a Stable Diffusion 1.x/2.x folder, on every local device.

    python -m sample.stable_diffusion --model-dir ./stable-diffusion-v1-5 \\
        --prompt "a photograph of an astronaut riding a horse" --num-images 8 --out samples/

Writes `OUT/000.png`, `OUT/001.png`, ... The whole run (text encoder, sampling loop with
classifier-free guidance, VAE decoder) is one compiled program; the progress bar shows its
stages (load, compile, generate, save), not individual steps, because the loop never returns
to the host. With several devices and a number of images divisible by their count, the images
are generated in parallel (`pmap`, one key per device split from --seed, so the same seed gives
other images on another number of devices; `--devices one` runs on one). `--latents FILE.npy` takes initial latents as diffusers
takes them (NCHW float32), so a run can be reproduced exactly against another implementation.
The XLA compilation cache (`--compile-cache`, default ~/.cache/jaxdiff/xla) makes a second run
start without recompiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from jaxdiff.cli import (add_compile_cache_flags, at_least, cli_main, enable_compile_cache, finite_float,
                         in_range, positive, program_parser)
from jaxdiff.errors import JaxdiffError

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m sample.stable_diffusion", __doc__)
    p.add_argument("--model-dir", required=True, help="diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt)")
    p.add_argument("--steps", type=int, default=50, help="number of inference steps (default 50)")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5)
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0, help="Lin et al. 2023 rescale, 0..1 (default 0)")
    p.add_argument("--scheduler", default=None,
                   help="sampler: pndm, ddim, euler, euler-ancestral, dpm++, lms, ... (default: the folder's)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=None, help="default 1 (or the batch of --latents)")
    p.add_argument("--init-image", default=None, help="img2img: start from this image")
    p.add_argument("--strength", type=finite_float, default=0.8, help="img2img: how much of the schedule to run (0..1]")
    p.add_argument("--latents", default=None, help="initial latents, NCHW float32 .npy (as diffusers takes them)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16", help="UNet compute dtype")
    p.add_argument("--vae-dtype", choices=("bf16", "fp32", "fp16"), default=None,
                   help="default: fp32 when the VAE config says force_upcast, else --dtype")
    p.add_argument("--variant", default=None, help='weight variant to load, e.g. "fp16"')
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let a shard index (*.safetensors.index.json) name files outside the model folder")
    p.add_argument("--devices", choices=("all", "one"), default="all",
                   help="all: pmap over the local devices when the images split evenly (default)")
    add_compile_cache_flags(p, folder=True)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    return p.parse_args(argv)


def _check(args) -> None:
    at_least(args, 1, "steps", "num_images")
    if args.init_image and args.latents:
        raise JaxdiffError("--init-image and --latents exclude each other: img2img draws its own noise "
                           "from --seed")
    if args.init_image:
        positive(args, "strength")
        in_range(args, 0.0, 1.0, "strength", include_high=True)
    in_range(args, 0.0, 1.0, "guidance_rescale", include_high=True)
    for flag, path in (("--model-dir", args.model_dir), ("--latents", args.latents),
                       ("--init-image", args.init_image)):
        if path and not Path(path).exists():
            raise JaxdiffError(f"{flag} {path} does not exist")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise JaxdiffError(f"--{name} must be a positive multiple of 8, got {v}")


def load_init_image(path: str, height: int | None, width: int | None, factor: int):
    """An RGB image file → (1, H, W, 3) float32 in [0, 1], resized to height×width (default: its
    own size rounded down to a multiple of the VAE factor)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise JaxdiffError(f"--init-image {p} does not exist")
    try:
        image = Image.open(p).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise JaxdiffError(f"--init-image {p} is not an image PIL can read ({e})") from None
    w = width or image.width // factor * factor
    h = height or image.height // factor * factor
    if h <= 0 or w <= 0:
        raise JaxdiffError(f"--init-image {p} is smaller than {factor} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0)[None]


@cli_main
def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    _check(args)

    import jax.numpy as jnp
    from tqdm import tqdm

    enable_compile_cache(args)
    dtype = jnp.dtype(DTYPES[args.dtype])
    vae_dtype = jnp.dtype(DTYPES[args.vae_dtype]) if args.vae_dtype else None
    times: dict[str, float] = {}
    bar = tqdm(total=4, desc="load", leave=False, bar_format="{desc:<10} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    try:
        return _run(args, bar, times, dtype, vae_dtype)
    finally:
        bar.close()


def _run(args, bar, times: dict, dtype, vae_dtype) -> list[Path]:
    import jax
    import numpy as np
    from PIL import Image

    from jaxdiff import parallel as devices
    from jaxdiff.pipelines import stable_diffusion as sd

    t0 = time.perf_counter()
    pipe, params = sd.load_pipeline(args.model_dir, dtype=dtype, vae_dtype=vae_dtype,
                                    variant=args.variant, scheduler=args.scheduler,
                                    allow_outside_paths=args.allow_outside_paths)
    times["load"] = time.perf_counter() - t0
    bar.update(1)

    factor = pipe.vae_scale_factor
    latents = init_image = None
    num_images = args.num_images
    if args.latents:
        latents = sd.load_latents(args.latents)
        num_images = num_images or latents.shape[0]
        config = sd.GenerateConfig(args.steps, args.height or latents.shape[1] * factor,
                                   args.width or latents.shape[2] * factor)
        sd.check_latents(latents, config.latent_shape(pipe, num_images), args.latents)
    elif args.init_image:
        image = load_init_image(args.init_image, args.height, args.width, factor)
        num_images = num_images or 1
        init_image = np.repeat(image, num_images, axis=0)
        config = sd.GenerateConfig(args.steps, image.shape[1], image.shape[2], strength=args.strength)
    else:
        num_images = num_images or 1
        config = sd.GenerateConfig(args.steps, args.height, args.width)
    config = dataclasses.replace(config, use_guidance_rescale=args.guidance_rescale > 0)
    config.size(pipe)  # validates height/width against the VAE factor

    ids, neg = sd.tokenize_prompts(pipe, [args.prompt] * num_images, args.negative_prompt)
    n_dev = devices.device_count()
    parallel = args.devices == "all" and n_dev > 1 and num_images % n_dev == 0
    key = jax.random.key(args.seed)

    bar.set_description("compile")
    t0 = time.perf_counter()
    if parallel:
        params = sd.replicate_params(params)
        keys = jax.random.split(key, n_dev)

        def run():
            return sd.generate_parallel(pipe, params, ids, neg, keys, args.guidance_scale, config=config,
                                        guidance_rescale=args.guidance_rescale, latents=latents,
                                        init_image=init_image)
        # pmap compiles on its first call: time compile + run together, then split below.
        images = run()
        images.block_until_ready()
        times["compile+generate"] = time.perf_counter() - t0
        bar.update(2)
    else:
        if init_image is None:
            fn = sd.compile_generate(pipe, params, num_images, config=config, with_latents=latents is not None)
            times["compile"] = time.perf_counter() - t0
            bar.update(1)
            bar.set_description("generate")
            t0 = time.perf_counter()
            images = fn(params, ids, neg, key, args.guidance_scale, args.guidance_rescale, latents)
        else:
            bar.update(1)
            bar.set_description("generate")
            images = sd.generate(pipe, params, ids, neg, key, args.guidance_scale, config=config,
                                 guidance_rescale=args.guidance_rescale, init_image=init_image)
        images.block_until_ready()
        times["generate"] = time.perf_counter() - t0
        bar.update(1)

    bar.set_description("save")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = np.round(np.asarray(images, np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        path = out / f"{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    bar.update(1)
    bar.close()
    where = f"{n_dev} devices (pmap)" if parallel else f"1 device ({jax.devices()[0].platform})"
    print(f"{len(paths)} images ({config.size(pipe)[0]}×{config.size(pipe)[1]}, {args.steps} steps, "
          f"{pipe.scheduler.name}, {args.dtype}) on {where} → {out}/")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return paths


if __name__ == "__main__":
    main()

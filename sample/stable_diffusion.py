"""Generate images with a diffusers Stable Diffusion folder — text-to-image, img2img, inpainting,
depth-to-image, the x4 upscaler, SDXL — on every local device.

    python -m sample.stable_diffusion --model-dir ./stable-diffusion-v1-5 \\
        --prompt "a photograph of an astronaut riding a horse" --num-images 8 --out samples/
    python -m sample.stable_diffusion --model-dir ./stable-diffusion-2-inpainting \\
        --prompt "a cat on a bench" --init-image bench.png --mask-image mask.png --out cats/
    python -m sample.stable_diffusion --model-dir ./stable-diffusion-x4-upscaler \\
        --prompt "a white cat" --init-image cat-128.png --noise-level 20 --out big/
    python -m sample.stable_diffusion --model-dir ./stable-diffusion-xl-base-1.0 \\
        --refiner-dir ./stable-diffusion-xl-refiner-1.0 --high-noise-frac 0.8 \\
        --prompt "a majestic lion jumping from a big stone at night" --steps 40 --out lions/

The folder's model_index.json (`_class_name`) picks the pipeline (jaxdiff.pipelines.registry), and
the pipeline says what it needs: inpainting needs --init-image and --mask-image (white = repaint),
the upscaler --init-image (the low-resolution image), depth-to-image --init-image (and takes
--depth-map); a flag the pipeline does not use is refused. `--pipeline inpaint` inpaints with a
text-to-image folder's 4-channel UNet (diffusers' behaviour: the known region re-noised and
blended each step). --steps, --guidance-scale and --strength default to diffusers' values for
that pipeline.

Writes `OUT/000.png`, `OUT/001.png`, ... The whole run (text encoder, sampling loop with
classifier-free guidance, VAE decoder) is one compiled program; the progress bar shows its
stages (load, generate, save), not individual steps, because the loop never returns
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
from jaxdiff.pipelines import registry
from jaxdiff.pipelines.inputs import load_init_image  # noqa: F401  (part of this program's API)

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m sample.stable_diffusion", __doc__)
    p.add_argument("--model-dir", default=None, help="diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...)")
    p.add_argument("--model-file", default=None,
                   help="instead of --model-dir: one original-layout SD 1.x/2.x .safetensors checkpoint")
    p.add_argument("--config-dir", default=None,
                   help="--model-file: a pipeline folder without weights whose configs and tokenizer describe "
                        "the model (default: the shipped configs of the detected family)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="--model-file: the model's prediction type (SD 2.x default: v_prediction; epsilon "
                        "= the 512 px 2.x-base)")
    p.add_argument("--pipeline", choices=registry.KINDS, default=None,
                   help="run the folder as this pipeline (default: its model_index.json _class_name)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt)")
    p.add_argument("--steps", type=int, default=None,
                   help="number of inference steps (default: the pipeline's, 50; 75 for the upscaler)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="default: the pipeline's (7.5; 9 for the upscaler, 5 for SDXL)")
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0, help="Lin et al. 2023 rescale, 0..1 (default 0)")
    p.add_argument("--scheduler", default=None,
                   help="sampler: pndm, ddim, euler, euler-ancestral, dpm++, lms, ... (default: the folder's)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=None, help="default 1 (or the batch of --latents)")
    p.add_argument("--init-image", default=None,
                   help="img2img: start from this image; inpaint: the image to repaint; upscale: the low-resolution image")
    p.add_argument("--mask-image", default=None, help="inpaint: white = repaint, black = keep")
    p.add_argument("--mask-blur", type=finite_float, default=None,
                   help="inpaint: blur the mask by this Gaussian radius in pixels (default 0)")
    p.add_argument("--padding-mask-crop", type=int, default=None,
                   help="inpaint: work on the mask's bounding box plus this margin, pasted back after")
    p.add_argument("--depth-map", default=None, help="depth-to-image: depth map, .npy or 16-bit PNG (default: estimated)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="img2img/inpaint/depth: how much of the schedule to run (0..1]; default 0.8 (inpaint 1.0)")
    p.add_argument("--noise-level", type=int, default=None,
                   help="upscale: noise added to the low-resolution image (default 20)")
    p.add_argument("--refiner-dir", default=None,
                   help="SDXL: a refiner folder that finishes the base's schedule (ensemble of experts)")
    p.add_argument("--high-noise-frac", type=finite_float, default=None,
                   help="SDXL with --refiner-dir: the part of the schedule the base runs, (0, 1) (default 0.8)")
    p.add_argument("--latents", default=None, help="initial latents, NCHW float32 .npy (as diffusers takes them)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16", help="UNet compute dtype")
    p.add_argument("--vae-dtype", choices=("bf16", "fp32", "fp16"), default=None,
                   help="default: fp32 when the VAE config says force_upcast, else --dtype")
    p.add_argument("--variant", default=None, help='weight variant to load, e.g. "fp16"')
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapter (.safetensors, PEFT/diffusers or kohya format) fused in at SCALE "
                        "(default 1); repeatable")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let a shard index (*.safetensors.index.json) name files outside the model folder")
    p.add_argument("--devices", choices=("all", "one"), default="all",
                   help="all: pmap over the local devices when the images split evenly (default)")
    add_compile_cache_flags(p, folder=True)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    return p.parse_args(argv)


def _check(args) -> None:
    at_least(args, 1, "steps", "num_images")
    at_least(args, 0, "mask_blur", "padding_mask_crop", "noise_level")
    positive(args, "strength", "high_noise_frac")
    in_range(args, 0.0, 1.0, "strength", include_high=True)
    in_range(args, 0.0, 1.0, "guidance_rescale", include_high=True)
    in_range(args, 0.0, 1.0, "high_noise_frac")
    if args.high_noise_frac is not None and not args.refiner_dir:
        raise JaxdiffError("--high-noise-frac splits the schedule between the SDXL base and a refiner: "
                           "pass --refiner-dir too")
    for flag, path in (("--model-dir", args.model_dir), ("--latents", args.latents),
                       ("--init-image", args.init_image), ("--mask-image", args.mask_image),
                       ("--depth-map", args.depth_map), ("--refiner-dir", args.refiner_dir)):
        if path and not Path(path).exists():
            raise JaxdiffError(f"{flag} {path} does not exist")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise JaxdiffError(f"--{name} must be a positive multiple of 8, got {v}")


def _check_model_source(args) -> None:
    """Exactly one of --model-dir / --model-file; the single-file flags only with --model-file."""
    if bool(args.model_dir) == bool(args.model_file):
        raise JaxdiffError("pass --model-dir (a diffusers folder) or --model-file (one .safetensors "
                           "checkpoint), exactly one of them")
    if args.model_dir and (args.config_dir or args.prediction_type):
        raise JaxdiffError("--config-dir and --prediction-type go with --model-file; a --model-dir folder "
                           "carries its own configs")
    for flag, path in (("--model-file", args.model_file), ("--config-dir", args.config_dir)):
        if path and not Path(path).exists():
            raise JaxdiffError(f"{flag} {path} does not exist")


def request_of(args) -> registry.Request:
    """The flags as a pipeline request (jaxdiff.pipelines.registry)."""
    fields = {f.name for f in dataclasses.fields(registry.Request)}
    return registry.Request(**{k: v for k, v in vars(args).items() if k in fields})


@cli_main
def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    _check_model_source(args)
    _check(args)
    if args.model_dir:
        class_name = registry.pipeline_class(args.model_dir)
    else:  # a single file: SD 1.x/2.x, or SDXL base / refiner (from its keys)
        from jaxdiff.single_file import pipeline_class

        class_name = pipeline_class(args.model_file, args.prediction_type)
    spec = (registry.spec_for_kind(args.pipeline) if args.pipeline
            else registry.spec_for_class(class_name, args.model_dir))
    if args.model_file and spec.kind not in ("text-to-image", "sdxl"):
        raise JaxdiffError(f"--model-file runs text-to-image / img2img only, not --pipeline {spec.kind}; "
                           "convert the checkpoint to a diffusers folder for that pipeline")
    request = registry.resolve(spec, request_of(args), args.model_dir or args.model_file, class_name)
    module = spec.load()

    import jax.numpy as jnp
    from tqdm import tqdm

    enable_compile_cache(args)
    dtype = jnp.dtype(DTYPES[args.dtype])
    vae_dtype = jnp.dtype(DTYPES[args.vae_dtype]) if args.vae_dtype else None
    bar = tqdm(total=3, desc="load", leave=False, bar_format="{desc:<10} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    try:
        t0 = time.perf_counter()
        if args.model_file:
            from jaxdiff.single_file import load_single_file

            pipe, params = load_single_file(args.model_file, config_dir=args.config_dir,
                                            prediction_type=args.prediction_type, dtype=dtype,
                                            vae_dtype=vae_dtype, scheduler=args.scheduler)
        else:
            pipe, params = module.load_pipeline(args.model_dir, dtype=dtype, vae_dtype=vae_dtype,
                                                variant=args.variant, scheduler=args.scheduler,
                                                allow_outside_paths=args.allow_outside_paths)
        if args.lora:
            from jaxdiff.adapters.pipeline import fuse_loras

            params = fuse_loras(params, args.lora)
        report: dict = {"times": {"load": time.perf_counter() - t0}}
        bar.update(1)
        bar.set_description("generate")
        images = module.run_request(pipe, params, request, report)
        bar.update(1)
        bar.set_description("save")
        paths = _save(images, Path(args.out))
        bar.update(1)
    finally:
        bar.close()
    print(f"{len(paths)} images ({images.shape[1]}×{images.shape[2]}, {spec.kind}, {request.steps} steps, "
          f"{pipe.scheduler.name}, {args.dtype}) on {report.get('where', '1 device')} → {args.out}/")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["times"].items()))
    return paths


def _save(images, out: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    pixels = np.round(np.asarray(images, np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        path = out / f"{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()

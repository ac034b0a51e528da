"""Steer any diffusers UNet2DModel (or a train.mnist run) towards a colour with loss guidance.

    python -m sample.color_guidance --model-dir ./sd-class-wikiart-from-bedrooms --color "#19e680" \\
        --guidance-scale 40 --steps 40 --batch-size 8 --out color.png
    python -m sample.color_guidance --model-dir runs/mnist --color 0.8 --class-label 3 --out bright3.png

The course's colour guidance (unit 2): at every step x is nudged down the gradient of the mean
absolute distance between the predicted clean image and the colour. `--variant shortcut` (default)
differentiates the scheduler's x0 formula only; `through_model` also differentiates the UNet.
`--model-dir` is a diffusers UNet2DModel folder (or a pipeline folder with `unet/`), its
scheduler read from `scheduler/` or `scheduler_config.json` beside it (diffusers' DDPM defaults
otherwise), or a train.mnist run folder (one-channel: give `--color` as one grey level).
The whole loop is one compiled program; one JSON line on stdout reports the colour loss of the
guided samples and the timings.
"""
from __future__ import annotations

import argparse

from jaxdiff.cli import program_main, program_parser
from jaxdiff.errors import JaxdiffError
from jaxdiff.pipelines.unet_2d import add_guidance_flags, check_guidance_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m sample.color_guidance", __doc__)
    add_guidance_flags(p, steps=40, scale=40.0, schedule="constant")
    p.add_argument("--color", default="0.1,0.9,0.5",
                   help="target colour: hex (#19e680) or 0-1 floats (0.1,0.9,0.5), one float for grey "
                        "(default: the course's 0.1,0.9,0.5)")
    p.add_argument("--out", default="color_guidance.png", help="PNG file for the grid")
    return p.parse_args(argv)


def run(args) -> dict:
    check_guidance_flags(args)
    import jax.numpy as jnp

    from jaxdiff.guidance import color_loss, make_color_loss, parse_color
    from jaxdiff.pipelines.unet_2d import load_denoiser, run_guided

    target = parse_color(args.color)
    model = load_denoiser(args.model_dir, args.scheduler)
    cond = model.labels(args.batch_size, args.class_label)
    channels = model.sample_shape[-1]
    if target.shape[0] not in (1, channels):
        raise JaxdiffError(f"--color has {target.shape[0]} values but the model makes {channels}-channel "
                           f"images; give {'one grey level' if channels == 1 else 'an RGB colour'}")
    result = run_guided(args, model, cond, make_color_loss, jnp.asarray(target),
                        lambda x0: color_loss(x0, target))
    result["color"] = [round(float(v), 4) for v in target]
    return result


main = program_main(parse_args, run)


if __name__ == "__main__":
    main()

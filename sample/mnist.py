"""Draw digits from a class-conditioned MNIST run trained by `python -m train.mnist`.

    python -m sample.mnist --run runs/mnist --out grid.png                       # DDIM, 40 steps
    python -m sample.mnist --run runs/mnist --out grid.png --scheduler ddpm       # the course's 1000 steps
    python -m sample.mnist --run runs/mnist --out grid.png --guidance-scale 3 --save-array samples.npz

Row i of the grid is digit i (`--per-class` columns). The whole reverse process runs as one
jitted `lax.scan`; with `--guidance-scale w` ≠ 1 each step also evaluates the null label
(classifier-free guidance, for runs trained with `--cfg-dropout`). `--save-array` writes
`images` (N, 28, 28, 1) float32 in [0, 1] and `labels` (N,). One JSON line on stdout gives the
sampling time (compilation excluded).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from jaxdiff.cli import (add_compile_cache_flags, at_least, compile_timed, enable_compile_cache, finite_float,
                         png_path, program_main, program_parser, run_timed)
from jaxdiff.pipelines.class_conditioned import DEFAULT_GUIDANCE

DEFAULT_STEPS = {"ddpm": 1000, "dpm++": 20}  # every other sampler: DEFAULT_FAST_STEPS
DEFAULT_FAST_STEPS = 40


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m sample.mnist", __doc__)
    p.add_argument("--run", required=True, help="run folder written by train.mnist (--out there)")
    p.add_argument("--out", required=True, help="PNG file for the grid")
    p.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm, dpm++, pndm, euler, ...")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default 1000 for ddpm, 20 for dpm++, {DEFAULT_FAST_STEPS} otherwise)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help=f"classifier-free guidance w (default {DEFAULT_GUIDANCE} when the run was trained "
                        "with --cfg-dropout, else 1 = plain conditional sampling)")
    p.add_argument("--per-class", type=int, default=8, help="samples of each digit (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-array", default=None, help="also write images and labels to this .npz")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="use the EMA weights")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    p.add_argument("--scale", type=int, default=2, help="enlarge the PNG this many times (default 2)")
    add_compile_cache_flags(p)
    return p.parse_args(argv)


def save_array(path: str, images, labels) -> str:
    """`images` float32 and `labels` in one .npz."""
    import numpy as np

    array_path = Path(path)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(array_path, images=images.astype(np.float32), labels=labels)
    return str(array_path)


def run(args) -> dict:
    at_least(args, 1, "steps", "per_class", "scale")
    png_path(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.images import save_grid
    from jaxdiff.pipelines.class_conditioned import class_labels, default_guidance, load_run, make_generator
    from jaxdiff.schedulers import scheduler_class

    enable_compile_cache(args)
    name = scheduler_class(args.scheduler).name  # unknown names fail before loading anything
    model, params, run_cfg = load_run(args.run, ema=args.ema)
    steps = args.steps or DEFAULT_STEPS.get(name, DEFAULT_FAST_STEPS)
    guidance = args.guidance_scale if args.guidance_scale is not None else default_guidance(model)
    generate = make_generator(model, run_cfg.sampler(name), steps, use_cfg=guidance != 1.0)
    labels = class_labels(model.num_classes, args.per_class)
    call = (params, labels, jax.random.PRNGKey(args.seed), jnp.float32(guidance))
    compiled, compile_seconds = compile_timed(generate, *call)
    images, seconds = run_timed(compiled, *call)
    images = np.asarray(images)
    path = save_grid(images, args.out, nrow=args.per_class, value_range="unit", scale=args.scale)
    result = {"out": str(path), "images": int(len(labels)), "scheduler": name, "steps": steps,
              "guidance_scale": guidance, "sample_seconds": round(seconds, 3),
              "compile_seconds": round(compile_seconds, 2)}
    if args.save_array:
        result["array"] = save_array(args.save_array, images, labels)
    return result


main = program_main(parse_args, run)


if __name__ == "__main__":
    main()

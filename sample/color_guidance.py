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
import json
import time
from pathlib import Path

from jaxdiff.errors import JaxdiffError, cli_main

SCHEDULES = ("constant", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar")
VARIANTS = ("shortcut", "through_model")


def add_common_args(p: argparse.ArgumentParser, *, steps: int, scale: float, schedule: str) -> None:
    p.add_argument("--model-dir", required=True,
                   help="diffusers UNet2DModel folder (or pipeline folder with unet/), or a train.mnist run")
    p.add_argument("--guidance-scale", type=float, default=scale, help=f"loss weight (default {scale:g})")
    p.add_argument("--schedule", choices=SCHEDULES, default=schedule,
                   help=f"guidance weight over time w(t) (default {schedule})")
    p.add_argument("--variant", choices=VARIANTS, default="shortcut",
                   help="shortcut: gradient through the x0 formula only (default); through_model: "
                        "through the UNet too (slower, more memory)")
    p.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps})")
    p.add_argument("--scheduler", default="ddim", help="sampler: ddim (default), ddpm, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--class-label", type=int, default=None,
                   help="class-conditioned models: the label of every image (default: 0, 1, 2, ... cycling)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: up to 8)")
    p.add_argument("--no-compile-cache", action="store_true")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sample.color_guidance", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=40, scale=40.0, schedule="constant")
    p.add_argument("--color", default="0.1,0.9,0.5",
                   help="target colour: hex (#19e680) or 0-1 floats (0.1,0.9,0.5), one float for grey "
                        "(default: the course's 0.1,0.9,0.5)")
    p.add_argument("--out", default="color_guidance.png", help="PNG file for the grid")
    return p.parse_args(argv)


def check_common(args) -> None:
    if args.steps < 1:
        raise JaxdiffError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise JaxdiffError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nrow is not None and args.nrow < 1:
        raise JaxdiffError(f"--nrow must be >= 1, got {args.nrow}")
    if not str(args.out).lower().endswith(".png"):
        raise JaxdiffError(f"--out {args.out} must name a .png file")


# --------------------------------------------------------------------------------------------
# Models: a diffusers UNet2DModel folder or a train.mnist run, as (apply, params, scheduler, ...)
# --------------------------------------------------------------------------------------------

def _is_mnist_run(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "scheduler"} <= config.keys() and "_class_name" not in config


def _scheduler_config(folder: Path) -> dict:
    from jaxdiff.schedulers import read_scheduler_config

    for cand in (folder, folder / "scheduler", folder.parent / "scheduler"):
        if (cand / "scheduler_config.json").is_file():
            return read_scheduler_config(cand)
    return {"_class_name": "DDPMScheduler"}  # diffusers' defaults (linear 1e-4..0.02, 1000 steps)


def load_model(model_dir: str, scheduler_name: str, batch_size: int, class_label: int | None):
    """(apply(params, x, t, cond), params, scheduler, sample shape (H, W, C), cond)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.schedulers import create_scheduler, scheduler_class

    scheduler_class(scheduler_name)  # an unknown name fails before loading anything
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise JaxdiffError(f"--model-dir {folder} does not exist")
    if _is_mnist_run(folder):
        from jaxdiff.pipelines.class_conditioned import load_run

        model, params, run = load_run(folder)
        n = model.num_classes
        if class_label is not None and not 0 <= class_label < n:
            raise JaxdiffError(f"--class-label must be in [0, {n - 1}] for this model, got {class_label}")
        labels = np.full(batch_size, class_label) if class_label is not None else np.arange(batch_size) % n
        size = model.model.sample_size or 28
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (*size, model.model.in_channels - model.class_emb_size)
        apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)  # noqa: E731
        return apply, params, run.sampler(scheduler_name), shape, jnp.asarray(labels, jnp.int32)

    from jaxdiff.models.unet_2d import load_unet_2d

    module, params = load_unet_2d(folder)
    cond = None
    if module.num_class_embeds is not None or module.class_embed_type is not None:
        if module.num_class_embeds is None:
            raise JaxdiffError(f"{folder}: class_embed_type {module.class_embed_type!r} needs "
                               "embeddings as labels, which this script does not make")
        n = module.num_class_embeds
        if class_label is not None and not 0 <= class_label < n:
            raise JaxdiffError(f"--class-label must be in [0, {n - 1}] for this model, got {class_label}")
        labels = np.full(batch_size, class_label) if class_label is not None else np.arange(batch_size) % n
        cond = jnp.asarray(labels, jnp.int32)
    elif class_label is not None:
        raise JaxdiffError(f"{folder} is not class-conditioned; drop --class-label")
    size = module.sample_size or 64
    size = (size, size) if isinstance(size, int) else tuple(size)
    apply = lambda p, x, t, c: module.apply({"params": p}, x, t, c)  # noqa: E731
    scheduler = create_scheduler(_scheduler_config(folder), name=scheduler_name)
    return apply, params, scheduler, (*size, module.in_channels), cond


def guided_generator(apply, scheduler, steps: int, variant: str):
    """A jitted `generate(params, x_T, key, cond, loss_args, scale, schedule) -> images in [0, 1]`
    for a loss built by `make_loss(loss_args)`; every argument is traced."""
    import jax

    from jaxdiff.guidance import guided_sample

    state = scheduler.set_timesteps(scheduler.create_state(), steps)

    def build(make_loss):
        @jax.jit
        def generate(params, x_T, key, cond, loss_args, scale, schedule):
            denoise = lambda x, t, c: apply(params, x, t, c)  # noqa: E731
            x0 = guided_sample(denoise, scheduler, state, x_T, key, cond, loss=make_loss(loss_args),
                               guidance_scale=scale, schedule=schedule, variant=variant)
            return x0
        return generate

    return state, build


def run_generation(args, generate, params, state, shape, cond, loss_args, loss_of):
    """Compile, run, save the grid; the summary dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.compile_cache import enable_compilation_cache
    from jaxdiff.guidance import guidance_schedule
    from jaxdiff.images import save_grid

    if not args.no_compile_cache:
        enable_compilation_cache()
    key = jax.random.PRNGKey(args.seed)
    k_noise, k_loop = jax.random.split(key)
    x_T = jax.random.normal(k_noise, (args.batch_size, *shape), jnp.float32)
    schedule = guidance_schedule(args.schedule, state.alphas_cumprod)
    call = (params, x_T, k_loop, cond, loss_args, jnp.float32(args.guidance_scale), schedule)
    t0 = time.perf_counter()
    compiled = generate.lower(*call).compile()
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    x0 = jax.block_until_ready(compiled(*call))
    seconds = time.perf_counter() - t0
    nrow = args.nrow or min(args.batch_size, 8)
    path = save_grid(np.asarray(x0), args.out, nrow=nrow, value_range="model")
    return {"out": str(path), "images": args.batch_size, "steps": args.steps,
            "guidance_scale": args.guidance_scale, "schedule": args.schedule, "variant": args.variant,
            "loss": round(float(jnp.mean(loss_of(x0))), 5),
            "sample_seconds": round(seconds, 3), "compile_seconds": round(compile_seconds, 2)}


def run(args) -> dict:
    check_common(args)
    import jax.numpy as jnp

    from jaxdiff.guidance import color_loss, make_color_loss, parse_color

    target = parse_color(args.color)
    apply, params, scheduler, shape, cond = load_model(args.model_dir, args.scheduler, args.batch_size,
                                                       args.class_label)
    if target.shape[0] not in (1, shape[-1]):
        raise JaxdiffError(f"--color has {target.shape[0]} values but the model makes {shape[-1]}-channel "
                           f"images; give {'one grey level' if shape[-1] == 1 else 'an RGB colour'}")
    state, build = guided_generator(apply, scheduler, args.steps, args.variant)
    generate = build(make_color_loss)
    result = run_generation(args, generate, params, state, shape, cond, jnp.asarray(target),
                            lambda x0: color_loss(x0, target))
    result["color"] = [round(float(v), 4) for v in target]
    return result


@cli_main
def main(argv=None) -> None:
    print(json.dumps(run(parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()

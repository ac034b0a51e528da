"""Any UNet2DModel as a denoiser: a diffusers UNet2DModel folder (or a pipeline folder with
`unet/`) or a train.mnist run folder → network, params, sampling scheduler, sample shape and
class conditioning; and what the loss-guidance programs (`sample.color_guidance`,
`sample.clip_guidance`) share: their flags and their compiled, timed, saved guided run.

    model = load_denoiser("./ddpm-church-256", "ddim")
    denoise = as_denoiser(model.module, model.params)        # denoise(x, t, cond)
    cond = model.labels(8)                                    # None unless class-conditioned
    x_T = jax.random.normal(key, (8, *model.sample_shape))   # (B, H, W, C)
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import Scheduler


@dataclasses.dataclass(frozen=True)
class UNet2DDenoiser:
    """A loaded network and how to sample it.

    module: a `UNet2DModel` or a `ClassConditionedUnet` (`as_denoiser(module, params)` runs it);
    scheduler: the sampling scheduler, with the model's training schedule;
    sample_shape: (H, W, C) of one image; num_classes: the number of class labels of a
    class-conditioned model, None for an unconditional one; folder: where it was read."""

    module: Any
    params: Any
    scheduler: Scheduler
    sample_shape: tuple[int, int, int]
    num_classes: Optional[int]
    folder: Path

    def labels(self, batch_size: int, class_label: Optional[int] = None) -> Optional[jax.Array]:
        """(batch_size,) int32 class labels, every one `class_label` or 0, 1, 2, ... cycling;
        None for an unconditional model (which refuses a `class_label`)."""
        n = self.num_classes
        if n is None:
            if class_label is not None:
                raise JaxdiffError(f"{self.folder} is not class-conditioned; drop --class-label")
            return None
        if class_label is not None and not 0 <= class_label < n:
            raise JaxdiffError(f"--class-label must be in [0, {n - 1}] for this model, got {class_label}")
        labels = np.full(batch_size, class_label) if class_label is not None else np.arange(batch_size) % n
        return jnp.asarray(labels, jnp.int32)


def _scheduler_config(folder: Path) -> dict:
    """The scheduler config beside a UNet folder (its own, `scheduler/`, or the pipeline's
    `../scheduler/`); diffusers' DDPM defaults (linear 1e-4..0.02, 1000 steps) when none."""
    from jaxdiff.schedulers import read_scheduler_config

    for cand in (folder, folder / "scheduler", folder.parent / "scheduler"):
        if (cand / "scheduler_config.json").is_file():
            return read_scheduler_config(cand)
    return {"_class_name": "DDPMScheduler"}


def _load_run(folder: Path, scheduler_name: str) -> UNet2DDenoiser:
    from jaxdiff.pipelines.class_conditioned import load_run

    model, params, run = load_run(folder)
    return UNet2DDenoiser(model, params, run.sampler(scheduler_name), model.image_shape,
                          model.num_classes, folder)


def _load_diffusers(folder: Path, scheduler_name: str) -> UNet2DDenoiser:
    from jaxdiff.models.unet_2d import load_unet_2d
    from jaxdiff.schedulers import create_scheduler

    module, params = load_unet_2d(folder)
    config = module.config
    if config.class_embed_type is not None and config.num_class_embeds is None:
        raise JaxdiffError(f"{folder}: class_embed_type {config.class_embed_type!r} needs "
                           "embeddings as labels, which this script does not make")
    size = config.image_size or (64, 64)
    scheduler = create_scheduler(_scheduler_config(folder), name=scheduler_name)
    return UNet2DDenoiser(module, params, scheduler, (*size, config.in_channels), config.num_class_embeds,
                          folder)


def load_denoiser(model_dir: str | Path, scheduler_name: str = "ddim") -> UNet2DDenoiser:
    """A diffusers UNet2DModel folder (or pipeline folder with `unet/`; its scheduler read from
    `scheduler/` or `scheduler_config.json` beside it, diffusers' DDPM defaults otherwise) or a
    train.mnist run folder (its newest checkpoint, EMA weights when present), with a sampling
    scheduler `scheduler_name` (ddim, ddpm, dpm++, ...) on the model's training schedule."""
    from jaxdiff.pipelines.class_conditioned import is_run_folder
    from jaxdiff.schedulers import scheduler_class

    scheduler_class(scheduler_name)  # an unknown name fails before loading anything
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise JaxdiffError(f"--model-dir {folder} does not exist")
    if is_run_folder(folder):
        return _load_run(folder, scheduler_name)
    return _load_diffusers(folder, scheduler_name)


# --------------------------------------------------------------------------------------------
# What the loss-guidance programs share
# --------------------------------------------------------------------------------------------

def add_guidance_flags(p: argparse.ArgumentParser, *, steps: int, scale: float, schedule: str) -> None:
    """The flags of every loss-guidance program, with its own defaults; `--out` is the
    program's."""
    from jaxdiff.cli import add_compile_cache_flags, finite_float
    from jaxdiff.guidance import GUIDANCE_SCHEDULES, VARIANTS

    p.add_argument("--model-dir", required=True,
                   help="diffusers UNet2DModel folder (or pipeline folder with unet/), or a train.mnist run")
    p.add_argument("--guidance-scale", type=finite_float, default=scale, help=f"loss weight (default {scale:g})")
    p.add_argument("--schedule", choices=GUIDANCE_SCHEDULES, default=schedule,
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
    add_compile_cache_flags(p)


def check_guidance_flags(args: argparse.Namespace) -> None:
    """The checks `add_guidance_flags`' values need (and a .png `--out`)."""
    from jaxdiff.cli import at_least, png_path

    at_least(args, 1, "steps", "batch_size", "nrow")
    png_path(args)


def run_guided(args: argparse.Namespace, model: UNet2DDenoiser, cond, make_loss: Callable, loss_args,
               loss_of: Callable[[jax.Array], jax.Array]) -> dict:
    """Compile and run the guided loop the flags describe (loss `make_loss(loss_args)`), save
    the grid to `--out`; the program's summary, with the mean `loss_of(x0)` of the samples."""
    from jaxdiff.cli import compile_timed, enable_compile_cache, run_timed
    from jaxdiff.guidance import guidance_schedule, guided_generator
    from jaxdiff.images import save_grid

    enable_compile_cache(args)
    generate = guided_generator(model.module, model.scheduler, args.steps, make_loss, variant=args.variant)
    k_noise, k_loop = jax.random.split(jax.random.PRNGKey(args.seed))
    x_T = jax.random.normal(k_noise, (args.batch_size, *model.sample_shape), jnp.float32)
    schedule = guidance_schedule(args.schedule, model.scheduler.create_state().alphas_cumprod)
    call = (model.params, x_T, k_loop, cond, loss_args, jnp.float32(args.guidance_scale), schedule)
    compiled, compile_seconds = compile_timed(generate, *call)
    x0, seconds = run_timed(compiled, *call)
    path = save_grid(np.asarray(x0), args.out, nrow=args.nrow or min(args.batch_size, 8), value_range="model")
    return {"out": str(path), "images": args.batch_size, "steps": args.steps,
            "guidance_scale": args.guidance_scale, "schedule": args.schedule, "variant": args.variant,
            "loss": round(float(jnp.mean(loss_of(x0))), 5),
            "sample_seconds": round(seconds, 3), "compile_seconds": round(compile_seconds, 2)}

"""Class-conditioned generation (the course's MNIST model): labels → images with any scheduler,
optionally with classifier-free guidance, the whole reverse process in one jitted `lax.scan`.

    model, params, run = load_run("runs/mnist")                     # a train.mnist run folder
    generate = make_generator(model, run.sampler("ddim"), 50, use_cfg=True)
    images = generate(params, labels, jax.random.key(0), 3.0)      # (N, 28, 28, 1) in [0, 1]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.models.class_conditioned import ClassConditionedUnet
from jaxdiff.sampling import as_denoiser, cfg, sample
from jaxdiff.schedulers import Scheduler, create_scheduler
from jaxdiff.training.run_folder import CHECKPOINTS, read_run

PROGRAM = "train.mnist"  # the program whose run folders load_run reads
DEFAULT_GUIDANCE = 3.0  # for models trained with label dropout (a null class)


def default_guidance(model: ClassConditionedUnet) -> float:
    """`DEFAULT_GUIDANCE` for a model with a null class, 1 (no guidance) otherwise."""
    return DEFAULT_GUIDANCE if model.null_label is not None else 1.0


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """(num_classes * per_class,) labels 0,0,..,1,1,..: row i of a grid with `per_class` columns
    is digit i."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def make_generator(model: ClassConditionedUnet, scheduler: Scheduler, num_inference_steps: int, *,
                   use_cfg: bool = False) -> Callable:
    """A jitted `generate(params, labels, key, guidance_scale=1.0) -> images`, images
    (N, H, W, C) float32 in [0, 1] for `labels` (N,) ints.

    With `use_cfg` (needs a model trained with a null class) every step evaluates the model on
    the labels and on the null label and mixes them by `guidance_scale` (1.0 = conditional
    only); without it `guidance_scale` is ignored and each step is one model call.
    `guidance_scale`, `params`, `labels` and `key` are traced: new values do not recompile."""
    if use_cfg and model.null_label is None:
        raise JaxdiffError("classifier-free guidance needs a model trained with a null class "
                           "(train with --cfg-dropout > 0); use --guidance-scale 1")
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps)
    shape = model.image_shape

    @jax.jit
    def generate(params, labels, key, guidance_scale=1.0):
        labels = jnp.asarray(labels, jnp.int32)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0],) + shape, jnp.float32)
        denoise = as_denoiser(model, params)
        if use_cfg:
            x0 = sample(cfg(denoise, guidance_scale), scheduler, state, x_T, k_loop,
                        (labels, jnp.full_like(labels, model.null_label)))
        else:
            x0 = sample(denoise, scheduler, state, x_T, k_loop, labels)
        return jnp.clip(x0 * 0.5 + 0.5, 0.0, 1.0)

    return generate


class GridSampler:
    """`per_class` samples of every class as one uint8 grid image (row i = class i), from one
    compiled sampler (the training program's --eval-every grids and its samples.png)."""

    def __init__(self, model: ClassConditionedUnet, scheduler: Scheduler, steps: int, per_class: int,
                 guidance: float, seed: int):
        self.labels = class_labels(model.num_classes, per_class)
        self.per_class = per_class
        self.generate = make_generator(model, scheduler, steps, use_cfg=guidance != 1.0)
        self.key = jax.random.PRNGKey(seed)
        self.guidance = jnp.float32(guidance)

    def grid(self, params) -> np.ndarray:
        """(rows·(H+2)+2, cols·(W+2)+2, C) uint8."""
        from jaxdiff.images import make_grid, unit_to_uint8

        images = np.asarray(self.generate(params, self.labels, self.key, self.guidance))
        return make_grid(unit_to_uint8(images), nrow=self.per_class)


# --------------------------------------------------------------------------------------------
# Run folders written by train.mnist (`jaxdiff.training.run_folder`)
# --------------------------------------------------------------------------------------------

def is_run_folder(path: str | Path) -> bool:
    """Whether `path` holds a train.mnist run (RUN/jaxdiff_run.json, or an earlier version's
    RUN/config.json)."""
    try:
        return read_run(path).program == PROGRAM
    except JaxdiffError:
        return False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a train.mnist run records: the model, the training scheduler and training options."""

    model: dict
    scheduler: dict
    train: dict

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunConfig":
        record = read_run(run_dir, PROGRAM)
        if not isinstance(record.model, dict) or not isinstance(record.scheduler, dict):
            raise JaxdiffError(f"the run record in {run_dir} is damaged; it should hold model, scheduler "
                               "and train")
        return cls(model=dict(record.model), scheduler=dict(record.scheduler), train=dict(record.train))

    def build_model(self, dtype=jnp.float32) -> ClassConditionedUnet:
        return ClassConditionedUnet.from_config(self.model, dtype=dtype)

    def training_scheduler(self) -> Scheduler:
        return create_scheduler(self.scheduler)

    def sampler(self, name: str | None = None, **overrides) -> Scheduler:
        """A sampling scheduler with the training schedule (betas, prediction type);
        `name` switches the algorithm (ddim, dpm++, ...), None keeps the training one.

        DDIM with `clip_sample` (the course's DDPM config carries it) also gets
        `use_clipped_model_output`: its step then pairs the clipped x0 with the noise that x0
        implies, rather than the model's own. Unpaired, guided samples drift (measured on a
        trained run, DDIM-40 at w=3: 24% of digits read as requested, vs 99% paired)."""
        scheduler = create_scheduler(self.scheduler, name=name, **overrides)
        if getattr(scheduler, "clip_sample", False) and hasattr(scheduler, "use_clipped_model_output") \
                and "use_clipped_model_output" not in overrides:
            scheduler = scheduler.replace(use_clipped_model_output=True)
        return scheduler


def load_run(run_dir: str | Path, *, ema: bool | None = None, dtype=jnp.float32
             ) -> tuple[ClassConditionedUnet, Any, RunConfig]:
    """(model, params, run config) from the newest good checkpoint of a train.mnist run.
    `ema`: True takes the EMA weights (an error if the run has none), False the raw weights,
    None the EMA weights when present."""
    from jaxdiff.training import Checkpointer
    from jaxdiff.weights import flax_tree_to_flax

    run = RunConfig.read(run_dir)
    model = run.build_model(dtype)
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        raise JaxdiffError(f"{run_dir} has no checkpoints yet ({ckpt_dir} is missing)")
    checkpointer = Checkpointer(ckpt_dir, create=False)
    try:
        has_ema = bool(run.train.get("ema_decay"))
        if ema and not has_ema:
            raise JaxdiffError(f"{run_dir} was trained without EMA (--ema-decay); drop --ema")
        part = "ema_params" if (has_ema if ema is None else ema) else "params"
        found = checkpointer.restore_latest(part=part, move_aside=False)
    finally:
        checkpointer.close()
    if found is None:
        raise JaxdiffError(f"no checkpoint in {ckpt_dir}; train first (python -m train.mnist)")
    tree, _ = found
    params = flax_tree_to_flax(tree, model.param_template(), source=f"{ckpt_dir} ({part})")
    return model, jax.tree.map(jnp.asarray, params), run


def sample_grid(model: ClassConditionedUnet, params: Mapping, scheduler: Scheduler, *,
                num_inference_steps: int, per_class: int = 8, guidance_scale: float = 1.0,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) float32 in [0, 1], labels (N,)) with `per_class` of every class."""
    labels = class_labels(model.num_classes, per_class)
    use_cfg = guidance_scale != 1.0
    generate = make_generator(model, scheduler, num_inference_steps, use_cfg=use_cfg)
    images = generate(params, labels, jax.random.PRNGKey(seed), jnp.float32(guidance_scale))
    return np.asarray(images), labels

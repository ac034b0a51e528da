"""Fine-tuning (or training from a config) a diffusers `UNet2DModel` on images: the run's
config, the model and its training scheduler, the loss adapter, sample grids and the export of
RUN as a diffusers `DDPMPipeline` folder (`train.finetune` wires them).

    model = load_model(config)                 # FinetuneModel: module, params, scheduler config
    loss_fn = finetune_loss(model.module, training_scheduler(model.scheduler_config))
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=0.999))
    export_pipeline(run_dir, model.module, params, model.scheduler_config)   # RUN loads in diffusers

The recipe is the course's (unit 2) and diffusers' train_unconditional.py: per image a timestep
t ~ U{0..T-1} and Gaussian noise, the noisy image from the model's own DDPM schedule, the MSE
between the UNet's output and the noise (or v / x0, as the scheduler's prediction type says),
AdamW. A class-conditional UNet (`num_class_embeds`) also gets each image's label.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.captions import MAX_IMAGE_PIXELS, ON_BAD_IMAGE
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel.pmap import AXIS
from jaxdiff.training.program import LoopSettings

PROGRAM = "train.finetune"
FINETUNE_DEFAULT_STEPS = 1000
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The run's settings (fixed on --resume). `model_dir`: a diffusers UNet2DModel or
    DDPMPipeline folder to fine-tune, or `config`: a UNet2DModel config.json to train from
    scratch (with a DDPM `beta_schedule` scheduler, default linear); `train_data`: image folder
    or HF dataset name; `resolution` None: the model's sample_size; `batch_size` images per
    update (--grad-accum, a loop setting, splits it into micro-batches); `max_grad_norm` 0 and
    `ema_decay` 0: off; `snr_gamma` None: MSE."""

    model_dir: Optional[str] = None
    config: Optional[str] = None
    train_data: Optional[str] = None
    split: str = "train"
    image_column: Optional[str] = None
    label_column: str = "label"
    resolution: Optional[int] = None
    random_crop: bool = False
    random_flip: bool = False
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 0
    ema_decay: float = 0.0
    snr_gamma: Optional[float] = None
    beta_schedule: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class FinetuneSettings(LoopSettings):
    """This invocation: sample grids (`num_samples` images, `sample_steps` of
    `sample_scheduler`) at --eval-every and at the end unless not `samples`; `workers`
    image-loading threads; the export of RUN as a DDPMPipeline folder (`export`); the data's
    guards as in train.text_to_image."""

    samples: bool = True
    num_samples: int = 16
    sample_steps: int = 50
    sample_scheduler: str = "ddim"
    workers: int = 4
    export: bool = True
    allow_outside_paths: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    on_bad_image: str = ON_BAD_IMAGE


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FinetuneModel:
    """`module` a `UNet2DModel`; `params` its weights (None when only the shape is needed);
    `scheduler_config` the diffusers scheduler config the model was trained with (what the
    export writes); `size` (H, W) the training resolution."""

    module: Any
    params: Any
    scheduler_config: dict
    size: tuple[int, int]

    @property
    def num_classes(self) -> Optional[int]:
        return self.module.config.num_class_embeds

    @property
    def channels(self) -> int:
        return self.module.config.in_channels


def _source_scheduler_config(model_dir: Path) -> dict:
    from jaxdiff.pipelines.unet_2d import _scheduler_config

    return _scheduler_config(model_dir)


def _check_unet(config, where: str) -> None:
    if config.class_embed_type is not None:
        raise JaxdiffError(f"{where}: class_embed_type {config.class_embed_type!r} takes embeddings, not "
                           "labels; fine-tune UNets without one, or with num_class_embeds")
    if config.in_channels != config.out_channels:
        raise JaxdiffError(f"{where}: in_channels {config.in_channels} != out_channels {config.out_channels}; "
                           "train.finetune trains denoisers of images (learned-variance and "
                           "extra-channel UNets are not supported)")


def _size(config, resolution: Optional[int], where: str) -> tuple[int, int]:
    size = (resolution, resolution) if resolution else config.image_size
    if size is None:
        raise JaxdiffError(f"{where} has no sample_size; give --resolution")
    f = config.downscale_factor
    if size[0] % f or size[1] % f:
        raise JaxdiffError(f"resolution {size[0]}x{size[1]} must be a multiple of {f} for this UNet "
                           f"(2 ** its downsampling levels); choose another --resolution")
    return tuple(int(s) for s in size)


def new_model(config: FinetuneConfig, *, with_params: bool = True) -> FinetuneModel:
    """The model a new run starts from: `config.model_dir`'s UNet and scheduler, or a fresh
    UNet from `config.config` (initialised from the seed) with a DDPM scheduler."""
    from jaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel, init_params, load_unet_2d
    from jaxdiff.weights import read_json

    if (config.model_dir is None) == (config.config is None):
        raise JaxdiffError("give --model-dir (a diffusers UNet2DModel or DDPMPipeline folder to fine-tune) "
                           "or --config (a UNet2DModel config.json to train from scratch), one of them")
    if config.model_dir is not None:
        if config.beta_schedule is not None:
            raise JaxdiffError("--beta-schedule is for a new model (--config); a --model-dir keeps its own "
                               "scheduler")
        folder = Path(config.model_dir).expanduser()
        if not folder.is_dir():
            raise JaxdiffError(f"--model-dir {folder} does not exist")
        module, params = load_unet_2d(folder)
        _check_unet(module.config, str(folder))
        scheduler = _source_scheduler_config(folder)
        return FinetuneModel(module, params, scheduler, _size(module.config, config.resolution, str(folder)))
    path = Path(config.config).expanduser()
    if not path.is_file():
        raise JaxdiffError(f"--config {path} does not exist; give a UNet2DModel config.json")
    raw = read_json(path)
    if raw.get("_class_name") not in (None, "UNet2DModel", "FlaxUNet2DModel"):
        raise JaxdiffError(f"--config {path} describes a {raw['_class_name']}, not a UNet2DModel")
    try:
        unet_config = UNet2DConfig.from_dict(raw)
    except TypeError as e:
        raise JaxdiffError(f"--config {path}: {e}") from None
    module = UNet2DModel(unet_config)
    _check_unet(unet_config, str(path))
    size = _size(unet_config, config.resolution, str(path))
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                 "beta_schedule": config.beta_schedule or "linear"}
    params = init_params(module, jax.random.PRNGKey(config.seed)) if with_params else None
    return FinetuneModel(module, params, scheduler, size)


def model_from_record(record) -> FinetuneModel:
    """The model of a run being resumed (its weights come from the checkpoint)."""
    from jaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel

    module = UNet2DModel(UNet2DConfig.from_dict(record.model["unet"]))
    return FinetuneModel(module, None, dict(record.scheduler), tuple(record.model["size"]))


def model_record(model: FinetuneModel) -> dict:
    return {"unet": model.module.config.to_dict(), "size": list(model.size)}


def training_scheduler(scheduler_config: dict):
    """DDPM on the model's schedule and prediction type (diffusers' `DDPMScheduler.from_pretrained`)."""
    from jaxdiff.schedulers import create_scheduler

    return create_scheduler(scheduler_config, name="ddpm")


def check_data(model: FinetuneModel, data) -> bool:
    """Whether the batches carry labels: a class-conditional UNet needs labelled data with
    labels below its `num_class_embeds`; an unconditional one ignores labels."""
    n = model.num_classes
    if n is None:
        return False
    if data.labels is None:
        raise JaxdiffError(f"this UNet is class-conditional (num_class_embeds={n}) but {data.source} has no "
                           "labels; use class sub-folders or a metadata file with a label column")
    if data.num_classes > n:
        raise JaxdiffError(f"{data.source} has {data.num_classes} classes but the UNet embeds only {n} "
                           f"(num_class_embeds); use at most {n} classes")
    return True


# --------------------------------------------------------------------------------------------
# The loss, the step
# --------------------------------------------------------------------------------------------

def finetune_loss(module, scheduler, *, snr_gamma: Optional[float] = None,
                  axis_name: Optional[str] = AXIS) -> Callable:
    """`loss_fn(params, batch, key) -> (loss, metrics)` for `make_train_step`: the denoising
    loss (`jaxdiff.training.losses.diffusion_loss`) of a UNet2DModel on `batch["images"]`
    uint8 (B, H, W, C), with `batch["labels"]` int (B,) as class labels when present."""
    from jaxdiff.sampling import as_apply_fn
    from jaxdiff.training.losses import diffusion_loss

    return diffusion_loss(as_apply_fn(module), scheduler, scheduler.create_state(), snr_gamma=snr_gamma,
                          axis_name=axis_name)


def train_step_for(config: FinetuneConfig, loss_fn: Callable, total_steps: int, *, grad_accum: int = 1,
                   axis_name: Optional[str] = AXIS):
    """(train_step, optimizer, learning-rate schedule): AdamW (optionally clipped, with a
    warm-up and schedule), each update from `grad_accum` micro-batches, optional EMA."""
    from jaxdiff.training.optim import make_optimizer
    from jaxdiff.training.state import EMA, make_train_step

    tx, lr = make_optimizer(config.lr, total_steps=total_steps, warmup_steps=config.warmup_steps,
                            schedule=config.lr_schedule, weight_decay=config.weight_decay, b1=config.adam_beta1,
                            b2=config.adam_beta2, eps=config.adam_epsilon, max_grad_norm=config.max_grad_norm or None)
    ema = EMA(decay=config.ema_decay) if config.ema_decay > 0 else None
    return make_train_step(loss_fn, tx, ema=ema, axis_name=axis_name, grad_accum=grad_accum), tx, lr


# --------------------------------------------------------------------------------------------
# Samples and export
# --------------------------------------------------------------------------------------------

class SampleGrid:
    """`num_samples` images from fixed noise (labels 0, 1, 2, ... cycling for a class-conditional
    model) with `steps` of `scheduler_name` on the model's schedule, as one uint8 grid; one
    compiled sampler for every call."""

    def __init__(self, model: FinetuneModel, scheduler_name: str, steps: int, num_samples: int, seed: int):
        from jaxdiff.sampling import as_apply_fn, make_sampler
        from jaxdiff.schedulers import create_scheduler

        scheduler = create_scheduler(model.scheduler_config, name=scheduler_name)
        self.run = make_sampler(as_apply_fn(model.module), scheduler, steps)
        key = jax.random.PRNGKey(seed)
        self.x_T = jax.random.normal(jax.random.fold_in(key, 3), (num_samples, *model.size, model.channels))
        self.key = jax.random.fold_in(key, 4)
        self.labels = None if model.num_classes is None else \
            jnp.asarray(np.arange(num_samples) % model.num_classes, jnp.int32)
        self.nrow = max(1, int(np.ceil(np.sqrt(num_samples))))

    def images(self, params) -> np.ndarray:
        """(N, H, W, C) floats in [-1, 1]."""
        return np.asarray(self.run(params, self.x_T, self.key, self.labels))

    def grid(self, params) -> np.ndarray:
        from jaxdiff.images import make_grid, model_to_uint8

        return make_grid(model_to_uint8(self.images(params)), nrow=self.nrow)


def export_pipeline(out, module, params, scheduler_config: dict) -> Path:
    """Write `out` as a diffusers `DDPMPipeline` folder: unet/ (config.json + safetensors),
    scheduler/scheduler_config.json and model_index.json, so `DDPMPipeline.from_pretrained(out)`
    and `jaxdiff.pipelines.unet_2d.load_denoiser(out)` (sample.color_guidance / clip_guidance)
    load it. Returns `out`."""
    from jaxdiff.models.unet_2d import save_unet_2d
    from jaxdiff.weights import save_json

    out = Path(out)
    save_unet_2d(out / "unet", module, params)
    scheduler = {"_class_name": "DDPMScheduler", **scheduler_config}
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    save_json(scheduler, out / "scheduler" / "scheduler_config.json")
    save_json({"_class_name": "DDPMPipeline", "_diffusers_version": "0.21.0",
               "scheduler": ["diffusers", scheduler["_class_name"]], "unet": ["diffusers", "UNet2DModel"]},
              out / "model_index.json")
    return out

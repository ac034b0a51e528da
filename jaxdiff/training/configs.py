"""The training programs' configs and their defaults, in one place (the role of Flax's
`configs/default.py`). Per program two frozen dataclasses: `*Config`, the run's settings (saved
in RUN/jaxdiff_run.json; on --resume a flag with another value is an error), and `*Settings`,
how this invocation trains, evaluates and logs (`LoopSettings` plus the program's own)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxdiff.data.captions import MAX_IMAGE_PIXELS, ON_BAD_IMAGE
from jaxdiff.training.program import LoopSettings

# ------------------------------------------------------------------------------------------------
# train.mnist: the course's class-conditioned MNIST model
# ------------------------------------------------------------------------------------------------

# UNet2DModel config keys on top of the course's (jaxdiff.models.class_conditioned.COURSE_UNET).
MNIST_PRESETS = {
    "course": {},
    # Sized for a CPU: a quarter of the course's channels, one ResNet per level, attention only
    # at 7x7, and the labels also in the UNet's class embedding (every ResNet block sees them).
    "small": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                  unet_class_embedding=True,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}
MNIST_DEFAULT_STEPS = 2000
MNIST_TRAIN_SCHEDULER = dict(name="ddpm", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    """The CPU main job: the course's optimizer (Adam) and schedule, batch 64 (more updates per
    second), label dropout 0.1 (classifier-free guidance), min-SNR-5 weighting and an EMA,
    which reach readable digits in a third of the steps. `model`: a `MNIST_PRESETS` name;
    `snr_gamma` 0 and `ema_decay` 0: off."""

    model: str = "small"
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float = 5.0


# Settings that runs of earlier versions did not record, as those runs trained.
MNIST_MISSING = {"snr_gamma": 0.0}


@dataclasses.dataclass(frozen=True)
class MnistSettings(LoopSettings):
    """`data_dir`: MNIST IDX folder (None: Hugging Face, else the copy shipped with jaxdiff);
    samples.png: `per_class` samples of every digit with `sample_scheduler`, `sample_steps`
    and `guidance_scale` (None: 3 for a model with a null label, else 1)."""

    data_dir: Optional[str] = None
    sample_scheduler: str = "ddim"
    sample_steps: int = 40
    guidance_scale: Optional[float] = None
    per_class: int = 8
    samples: bool = True


# ------------------------------------------------------------------------------------------------
# train.text_to_image: fine-tuning a Stable Diffusion UNet on image–caption pairs
# ------------------------------------------------------------------------------------------------

TEXT_TO_IMAGE_DEFAULT_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class TextToImageConfig:
    """diffusers' train_text_to_image.py recipe. `model_dir`: the SD folder fine-tuned;
    `train_data`: image folder or HF dataset name; `resolution` None: the model's;
    `prediction_type` None: the model's; `snr_gamma` None: plain MSE; `ema_decay` 0: no EMA."""

    model_dir: Optional[str] = None
    train_data: Optional[str] = None
    split: str = "train"
    caption_column: Optional[str] = None
    image_column: Optional[str] = None
    resolution: Optional[int] = None
    batch_size: int = 16
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 0
    cfg_dropout: float = 0.1
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None
    prediction_type: Optional[str] = None
    mixed_precision: str = "bf16"
    ema_decay: float = 0.0
    ema_update_after_step: int = 0
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    cache_latents: bool = False
    cache_dtype: str = "float16"
    lora_rank: int = 0  # > 0: train a LoRA of this rank (jaxdiff.adapters.training), not the UNet
    lora_alpha: Optional[float] = None
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    lora_kohya: bool = False


@dataclasses.dataclass(frozen=True)
class TextToImageSettings(LoopSettings):
    """Checkpoints kept by `best_metric` too ("none": off); sample grids of `validation_prompt`s
    (None: the first captions), `samples_per_prompt` each, `sample_steps` with
    `sample_scheduler` (None: the model's) at `guidance_scale`; `workers` image-loading threads;
    `cache_dir` (None: RUN/cache); `export_pipeline`: copy the model's other components into RUN;
    the data's files must lie inside its folder unless `allow_outside_paths`; images over
    `max_image_pixels` or unreadable are skipped or an error (`on_bad_image`)."""

    best_metric: str = "eval_loss"
    validation_prompt: Optional[tuple] = None
    samples_per_prompt: int = 2
    sample_steps: int = 25
    sample_scheduler: Optional[str] = None
    guidance_scale: float = 7.5
    samples: bool = True
    workers: int = 4
    cache_dir: Optional[str] = None
    export_pipeline: bool = True
    allow_outside_paths: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    on_bad_image: str = ON_BAD_IMAGE

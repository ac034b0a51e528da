"""Guidance by the gradient of a loss of the predicted clean image (course unit 2, "guidance").

At each step, before the scheduler step, the noisy sample is nudged down the gradient of
`loss(x0_pred)`:

    x ← x − guidance_scale · w(t) · ∇ₓ mean(loss(x0_pred(x)))

Two variants, as in the course:

* `shortcut_guidance`: the model output is held fixed (`lax.stop_gradient`); the gradient flows
  only through the scheduler's x0 formula (clipping included). Almost free.
* `through_model_guidance`: the gradient also flows through the network (`jax.vjp` of the
  denoiser), the scheduler step then uses the output of that same forward pass. Costs one
  backward pass of the network.

Both return a hook for `jaxdiff.sampling.sample(..., guidance=hook)`; `guided_sample` wires one
up, `guided_generator` compiles a whole guided loop for a Flax network. `guidance_scale` and the per-timestep weights `schedule` (`guidance_schedule`) are traced:
pass them as arguments of the jitted function and changing them does not recompile.

Losses are functions `loss(x0, key) -> (B,)` (or a scalar): x0 is (B, H, W, C) in the model's
range [-1, 1]. The guidance differentiates their mean over the batch, as the course does.
`color_loss` and `clip_loss` are two; any function of that shape is a loss.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.sampling import Denoiser, Guidance, as_denoiser, sample
from jaxdiff.schedulers.base import Scheduler, SchedulerState

Loss = Callable[[jax.Array, Optional[jax.Array]], jax.Array]

# --------------------------------------------------------------------------------------------
# Guidance strength over time
# --------------------------------------------------------------------------------------------

GUIDANCE_SCHEDULES = ("constant", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar")


def guidance_schedule(name: str, alphas_cumprod) -> jax.Array:
    """Per-training-timestep weights `w(t)`, shape (num_train_timesteps,) float32: "constant"
    (1), "alpha_bar" (ᾱ_t), "sqrt_alpha_bar" (√ᾱ_t, what the course's CLIP guidance uses) or
    "sqrt_one_minus_alpha_bar" (√(1−ᾱ_t)). Any (T,) array of your own works the same way.

    The weight is looked up at the step's timestep t. (The course's CLIP loop multiplies by
    `scheduler.alphas_cumprod[i]` with i the *step index*, i.e. ᾱ of the first few training
    timesteps, ≈ 1: a constant weight in effect.)"""
    ac = jnp.asarray(alphas_cumprod)
    ac = ac.astype(jnp.promote_types(ac.dtype, jnp.float32))
    table = {
        "constant": lambda: jnp.ones_like(ac),
        "alpha_bar": lambda: ac,
        "sqrt_alpha_bar": lambda: jnp.sqrt(ac),
        "sqrt_one_minus_alpha_bar": lambda: jnp.sqrt(1.0 - ac),
    }
    if name not in table:
        raise unknown_choice("guidance schedule", name, GUIDANCE_SCHEDULES)
    return table[name]()


def _step_size(guidance_scale, schedule: Optional[jax.Array], t, dtype) -> jax.Array:
    """guidance_scale · w(t); `t` indexes the per-training-timestep weights (rounded for the
    fractional timesteps of sigma schedulers)."""
    step = jnp.asarray(guidance_scale, dtype)
    if schedule is None:
        return step
    index = jnp.clip(jnp.round(jnp.asarray(t)).astype(jnp.int32), 0, schedule.shape[0] - 1)
    return step * schedule[index].astype(dtype)


# --------------------------------------------------------------------------------------------
# The two guidance transforms
# --------------------------------------------------------------------------------------------

def _pred_x0(scheduler: Scheduler, state: SchedulerState, model_output, t, x):
    """The scheduler's x0 estimate (clip_sample / thresholding included). The step's noise does
    not enter x0, so zeros stand in for it and the rest of the step is dead code."""
    out = scheduler.step(state, model_output, t, x, noise=jnp.zeros_like(x))
    return out.pred_original_sample


def _mean_loss(loss: Loss, x0, key):
    return jnp.mean(loss(x0, key))


def shortcut_guidance(scheduler: Scheduler, loss: Loss, guidance_scale,
                      schedule: Optional[jax.Array] = None) -> Guidance:
    """Hook for `sample`: x ← x − scale·w(t)·∇ₓ loss(x0(x, stop_gradient(model_output)))."""

    def guidance(x, t, model_output, state, key):
        fixed = jax.lax.stop_gradient(model_output)
        grad = jax.grad(lambda x_: _mean_loss(loss, _pred_x0(scheduler, state, fixed, t, x_), key))(x)
        step = _step_size(guidance_scale, schedule, t, grad.dtype)
        return (x - step * grad).astype(x.dtype), model_output

    return guidance


def through_model_guidance(scheduler: Scheduler, denoise: Denoiser, loss: Loss, guidance_scale,
                           schedule: Optional[jax.Array] = None, cond: Any = None) -> Guidance:
    """Hook for `sample`: the gradient of loss(x0(x, denoise(x))) flows through the network too.

    `denoise` and `cond` must be those given to `sample`: the hook re-runs the network under
    `jax.vjp` and hands its output to the scheduler step, so the loop's own forward pass is
    unused and XLA removes it (one forward + one backward per step)."""

    def guidance(x, t, model_output, state, key):
        def objective(x_):
            out = denoise(scheduler.scale_model_input(state, x_, t), t, cond)
            return _mean_loss(loss, _pred_x0(scheduler, state, out, t, x_), key), out

        grad, out = jax.grad(objective, has_aux=True)(x)
        step = _step_size(guidance_scale, schedule, t, grad.dtype)
        return (x - step * grad).astype(x.dtype), out.astype(model_output.dtype)

    return guidance


VARIANTS = ("shortcut", "through_model")


def guided_sample(denoise: Denoiser, scheduler: Scheduler, state: SchedulerState, x_T: jax.Array,
                  key: Optional[jax.Array], cond: Any = None, *, loss: Loss, guidance_scale,
                  schedule: Optional[jax.Array] = None, variant: str = "shortcut", **sample_kwargs):
    """`jaxdiff.sampling.sample` with loss guidance. Call it inside `jax.jit` with
    `guidance_scale` and `schedule` as traced arguments."""
    if variant == "shortcut":
        hook = shortcut_guidance(scheduler, loss, guidance_scale, schedule)
    elif variant == "through_model":
        hook = through_model_guidance(scheduler, denoise, loss, guidance_scale, schedule, cond)
    else:
        raise unknown_choice("guidance variant", variant, VARIANTS)
    return sample(denoise, scheduler, state, x_T, key, cond, guidance=hook, **sample_kwargs)


def guided_generator(module, scheduler: Scheduler, num_inference_steps: int,
                     make_loss: Callable[[Any], Loss], *, variant: str = "shortcut") -> Callable:
    """A jitted `generate(params, x_T, key, cond, loss_args, guidance_scale, schedule) -> x0`
    for the network `module` (run as `as_denoiser(module, params)`) guided by the loss
    `make_loss(loss_args)`: x_T (B, H, W, C) unit noise, x0 of that shape in the model's range,
    schedule (num_train_timesteps,) from `guidance_schedule`. Every argument is traced, so new
    weights, noise, labels, colours, prompts, scales or schedules reuse the compiled program."""
    if variant not in VARIANTS:
        raise unknown_choice("guidance variant", variant, VARIANTS)
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps)

    @jax.jit
    def generate(params, x_T, key, cond, loss_args, guidance_scale, schedule):
        return guided_sample(as_denoiser(module, params), scheduler, state, x_T, key, cond,
                             loss=make_loss(loss_args), guidance_scale=guidance_scale,
                             schedule=schedule, variant=variant)

    return generate


# --------------------------------------------------------------------------------------------
# Colour loss
# --------------------------------------------------------------------------------------------

_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def parse_color(color) -> np.ndarray:
    """A colour as float32 values in [0, 1]: a hex string ("#19e680", "1e8"), comma-separated
    floats ("0.1,0.9,0.5"), a sequence of floats, or one float (a grey level, for one-channel
    models such as MNIST)."""
    if isinstance(color, str):
        text = color.strip()
        m = _HEX.match(text)
        if m:
            h = m.group(1)
            h = "".join(c * 2 for c in h) if len(h) == 3 else h
            return np.array([int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)], np.float32)
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise JaxdiffError(f"cannot read the colour {color!r}; give a hex colour like '#19e680' "
                               "or 0-1 floats like '0.1,0.9,0.5'") from None
    else:
        values = [float(v) for v in np.ravel(np.asarray(color, dtype=np.float64))]
    if len(values) not in (1, 3) or not all(0.0 <= v <= 1.0 for v in values):
        raise JaxdiffError(f"cannot use the colour {color!r}: give 3 values (RGB) or 1 (grey) in "
                           "[0, 1], or a hex colour like '#19e680'")
    return np.asarray(values, np.float32)


def color_loss(x0: jax.Array, target_color) -> jax.Array:
    """The course's colour loss per image, (B,): mean |x0 − (2·target − 1)| with x0 (B, H, W, C)
    in [-1, 1] and `target_color` (C,) or (1,) in [0, 1] (may be traced)."""
    target = jnp.asarray(target_color, jnp.float32) * 2.0 - 1.0
    x0 = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    return jnp.mean(jnp.abs(x0 - target.astype(x0.dtype)), axis=(1, 2, 3))


def make_color_loss(target_color) -> Loss:
    """`loss(x0, key)` for `color_loss` towards `target_color` (array, or anything `parse_color`
    reads)."""
    target = target_color if isinstance(target_color, jax.Array) else parse_color(target_color)
    return lambda x0, key=None: color_loss(x0, target)


# --------------------------------------------------------------------------------------------
# CLIP: augmentations, cutouts, the spherical distance loss
# --------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images: jax.Array) -> jax.Array:
    """[0, 1] RGB (…, 3) → CLIP's normalised input."""
    mean, std = jnp.asarray(CLIP_MEAN, images.dtype), jnp.asarray(CLIP_STD, images.dtype)
    return (images - mean) / std


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The course's CLIP augmentations (torchvision `RandomResizedCrop(size)`, `RandomAffine(5)`,
    `RandomHorizontalFlip()`), drawn independently for every cutout of every image.

    crop_scale: range of the crop's area as a fraction of the image; crop_ratio: range of its
    aspect ratio (width / height), None for the image's own; max_rotation: degrees, uniform in ±max_rotation; flip: random
    horizontal flips with probability 1/2. `Augmentation.none()` gives the plain resized image."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: Optional[tuple[float, float]] = (3 / 4, 4 / 3)
    max_rotation: float = 5.0
    flip: bool = True

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(crop_scale=(1.0, 1.0), crop_ratio=None, max_rotation=0.0, flip=False)

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise JaxdiffError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")
        if self.crop_ratio is not None and not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise JaxdiffError(f"crop_ratio {self.crop_ratio} must satisfy 0 < low <= high")


def _cut_geometry(key, height: int, width: int, aug: Augmentation):
    """One random crop (y0, x0, h, w in pixels), rotation (radians) and flip (±1)."""
    k_scale, k_ratio, k_y, k_x, k_rot, k_flip = jax.random.split(key, 6)
    area = height * width * jax.random.uniform(k_scale, (), minval=aug.crop_scale[0], maxval=aug.crop_scale[1])
    if aug.crop_ratio is None:
        ratio = jnp.float32(width / height)
    else:
        ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=math.log(aug.crop_ratio[0]),
                                           maxval=math.log(aug.crop_ratio[1])))
    w = jnp.minimum(jnp.sqrt(area * ratio), width)
    h = jnp.minimum(jnp.sqrt(area / ratio), height)
    y0 = jax.random.uniform(k_y) * (height - h)
    x0 = jax.random.uniform(k_x) * (width - w)
    angle = jnp.deg2rad(aug.max_rotation) * jax.random.uniform(k_rot, minval=-1.0, maxval=1.0)
    flip = jnp.where(jax.random.bernoulli(k_flip), -1.0, 1.0) if aug.flip else jnp.float32(1.0)
    return y0, x0, h, w, angle, flip


def _resample(image: jax.Array, geometry, size: int) -> jax.Array:
    """The (size, size, C) view of `image` (H, W, C) a crop/rotation/flip describes, by bilinear
    interpolation (zeros outside the image, as RandomAffine fills)."""
    y0, x0, h, w, angle, flip = geometry
    grid = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5      # output coords in (-½, ½)
    v, u = jnp.meshgrid(grid, grid, indexing="ij")
    u = u * flip
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    ur, vr = cos * u - sin * v, sin * u + cos * v                         # rotate about the centre
    sy = y0 + (vr + 0.5) * h - 0.5                                        # source pixel coordinates
    sx = x0 + (ur + 0.5) * w - 0.5

    def channel(c):
        return jax.scipy.ndimage.map_coordinates(c, [sy, sx], order=1, mode="constant", cval=0.0)

    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def make_cutouts(key: jax.Array, images: jax.Array, n_cuts: int, size: int,
                 augmentation: Augmentation = Augmentation()) -> jax.Array:
    """`n_cuts` augmented (size, size) views of every image, as one vmapped batch.

    images: (B, H, W, C) in [0, 1]. Returns (n_cuts, B, size, size, C) in [0, 1] (not yet
    CLIP-normalised). Images much larger than `size` are first reduced with an antialiased
    resize so the bilinear crops do not alias."""
    b, height, width, c = images.shape
    if min(height, width) > 2 * size:
        f = 2 * size / min(height, width)
        height, width = max(int(round(height * f)), 1), max(int(round(width * f)), 1)
        images = jax.image.resize(images, (b, height, width, c), "linear", antialias=True)
    keys = jax.random.split(key, (n_cuts, b))
    geometry = jax.vmap(jax.vmap(lambda k: _cut_geometry(k, height, width, augmentation)))(keys)
    resample = jax.vmap(jax.vmap(lambda g, im: _resample(im, g, size), in_axes=(0, 0)), in_axes=(0, None))
    return resample(geometry, images)


def spherical_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared great-circle distance 2·arcsin(‖â − b̂‖/2)² between the directions of a and b
    (…, D) (normalised here)."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return 2.0 * jnp.square(jnp.arcsin(jnp.clip(jnp.linalg.norm(a - b, axis=-1) / 2.0, 0.0, 1.0)))


def clip_loss(image_embeds: jax.Array, text_embeds: jax.Array, prompt_weights: jax.Array) -> jax.Array:
    """Weighted spherical distance of image embeddings (..., D) to prompt embeddings (P, D):
    Σₚ wₚ·d(image, promptₚ), shape (...). Negative weights push away from a prompt."""
    d = spherical_distance(image_embeds[..., None, :], text_embeds)
    return jnp.sum(d * prompt_weights, axis=-1)


def make_clip_loss(image_features: Callable[[jax.Array], jax.Array], text_embeds: jax.Array,
                   prompt_weights: Optional[jax.Array] = None, *, n_cuts: int = 4, size: int = 224,
                   augmentation: Augmentation = Augmentation()) -> Loss:
    """`loss(x0, key) -> (B,)`: the mean over `n_cuts` augmented cutouts of the weighted
    spherical distance between CLIP's image embedding and the prompts'.

    image_features: CLIP-normalised (N, size, size, 3) → (N, D), e.g.
        `lambda x: clip.apply({"params": p}, x, method=clip.get_image_features)`.
    text_embeds: (P, D) from `encode_prompts`; prompt_weights: (P,), default 1/P each.

    x0 is mapped from [-1, 1] to [0, 1] before CLIP's normalisation (the course passes the
    [-1, 1] x0 straight to transforms that expect [0, 1]). Each cutout of each image gets its
    own random crop, rotation and flip (torchvision draws one set per batch)."""
    text_embeds = jnp.asarray(text_embeds)
    if prompt_weights is None:
        prompt_weights = jnp.full((text_embeds.shape[0],), 1.0 / text_embeds.shape[0], jnp.float32)

    def loss(x0, key):
        if x0.shape[-1] != 3:
            raise JaxdiffError(f"CLIP guidance needs RGB samples, got {x0.shape[-1]} channels")
        if key is None:
            raise JaxdiffError("CLIP guidance draws random cutouts: pass a PRNG key to the sampler")
        unit = (x0.astype(jnp.float32) + 1.0) / 2.0
        cuts = make_cutouts(key, unit, n_cuts, size, augmentation)      # (n, B, s, s, 3)
        n, b = cuts.shape[:2]
        embeds = image_features(clip_normalize(cuts.reshape(n * b, size, size, 3)))
        return jnp.mean(clip_loss(embeds.reshape(n, b, -1), text_embeds, prompt_weights), axis=0)

    return loss


def parse_prompts(prompts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Prompts with optional weights, "a red rose:2", "blurry:-0.5" → (texts, weights), the
    weights scaled so the positive ones sum to 1."""
    texts, weights = [], []
    for p in prompts:
        text, sep, w = p.rpartition(":")
        if sep and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", w):
            texts.append(text.strip())
            weights.append(float(w))
        else:
            texts.append(p.strip())
            weights.append(1.0)
    if not texts or any(not t for t in texts):
        raise JaxdiffError("give at least one non-empty prompt, optionally with a weight: 'a red rose:1'")
    w = np.asarray(weights, np.float32)
    positive = w[w > 0].sum()
    if positive <= 0:
        raise JaxdiffError("at least one prompt needs a positive weight (negative weights push away)")
    return texts, w / positive


def encode_prompts(clip_module, clip_params, token_ids) -> jax.Array:
    """CLIP text embeddings (P, D) of token ids (P, L) (`jaxdiff.tokenizer.tokenize`)."""
    return clip_module.apply({"params": clip_params}, token_ids, method=clip_module.get_text_features)

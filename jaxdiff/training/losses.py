"""The denoising loss, written once: per-example keys, the scheduler's noisy input and training
target (eps, v or x0), the mean squared error and min-SNR-γ weighting. What differs between
models is how a batch becomes clean samples, noise, timesteps and conditioning: a small
`prepare(batch, keys)` adapter with its own random draws (`diffusion_loss` below for pixel
images with class labels; `jaxdiff.training.text_to_image` for Stable Diffusion latents)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.errors import unknown_choice
from jaxdiff.parallel.pmap import AXIS, example_keys
from jaxdiff.training.state import EXAMPLE_INDEX, LossFn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Noising(NamedTuple):
    """One batch made ready for the denoiser: clean samples `x0` (B, ...), `noise` like x0,
    integer timesteps `t` (B,), and the conditioning `cond` the denoiser takes (or None)."""

    x0: jax.Array
    noise: jax.Array
    t: jax.Array
    cond: Any


# `prepare(batch, keys) -> Noising`, keys (B,) one per example (see `example_keys`), and
# `batch_size(batch) -> B`.
Prepare = Callable[[Mapping, jax.Array], Noising]


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at integer timesteps t."""
    a = alphas_cumprod[t].astype(jnp.float32)
    return a / (1.0 - a)


def min_snr_weights(snr_t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Per-example loss weights of min-SNR-γ, as diffusers' training scripts compute them:
    min(SNR, γ) / SNR for an epsilon target, min(SNR, γ) / (SNR + 1) for v, min(SNR, γ) for x0."""
    w = jnp.minimum(snr_t, gamma)
    if prediction_type == "epsilon":
        return w / snr_t
    if prediction_type == "v_prediction":
        return w / (snr_t + 1.0)
    return w


def denoising_loss(apply_fn: Callable, scheduler, scheduler_state, prepare: Prepare,
                   batch_size: Callable[[Mapping], int], *, snr_gamma: float | None = None,
                   axis_name: str | None = AXIS) -> LossFn:
    """`loss_fn(params, batch, key) -> (loss, {"mse": ...})` for `make_train_step`.

    Each example's random draws come from a key made of its index in the global batch
    (`example_keys`), so any number of devices or hosts gives the same numbers; `prepare` turns
    the batch and those keys into `Noising`. Then x_t = `scheduler.add_noise`, the target is the
    scheduler's `training_target`, `apply_fn(params, x_t, t, cond)` predicts it, and the loss is
    the mean squared error, weighted per example by min-SNR-γ (Hang et al. 2023) when
    `snr_gamma` is given. `axis_name`: the pmap axis (None under plain jit)."""
    prediction_type = scheduler.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise unknown_choice("prediction_type", prediction_type, PREDICTION_TYPES)

    def loss_fn(params, batch, key):
        keys = example_keys(key, batch_size(batch), axis_name, batch.get(EXAMPLE_INDEX))
        x0, noise, t, cond = prepare(batch, keys)
        x_t = scheduler.add_noise(scheduler_state, x0, noise, t)
        target = scheduler.training_target(scheduler_state, x0, noise, t)
        pred = apply_fn(params, x_t, t, cond)
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
        metrics = {"mse": jnp.mean(per_example)}
        if snr_gamma is None:
            return metrics["mse"], metrics
        weights = min_snr_weights(snr(scheduler_state.alphas_cumprod, t), snr_gamma, prediction_type)
        return jnp.mean(per_example * weights), metrics

    return loss_fn


def diffusion_loss(apply_fn: Callable, scheduler, scheduler_state, *, cfg_dropout: float = 0.0,
                   null_label: int | None = None, snr_gamma: float | None = None,
                   axis_name: str | None = AXIS) -> LossFn:
    """The denoising loss of pixel images with optional class labels.

    `batch["images"]`: uint8 (B, H, W, C) 0..255 or floats in [-1, 1]; `batch["labels"]` int (B,)
    or absent. Each example draws its noise, a timestep t ~ U{0..T-1} and, with `cfg_dropout`
    p, whether its label becomes `null_label` (classifier-free guidance training).
    `apply_fn(params, x_t, t, labels)` → model output like `x_t`. See `denoising_loss`."""
    if cfg_dropout > 0 and null_label is None:
        raise ValueError("cfg_dropout needs a null_label for the dropped conditioning")
    num_train_timesteps = int(scheduler_state.alphas_cumprod.shape[0])

    def draw(key, shape):
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        return (jax.random.normal(k_noise, shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps),
                jax.random.bernoulli(k_drop, cfg_dropout))

    def prepare(batch, keys):
        images = batch["images"]
        x0 = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0) if images.dtype == jnp.uint8 \
            else images.astype(jnp.float32)
        noise, t, drop = jax.vmap(draw, in_axes=(0, None))(keys, x0.shape[1:])
        labels = batch.get("labels")
        if labels is not None and cfg_dropout > 0:
            labels = jnp.where(drop, null_label, labels)
        return Noising(x0, noise, t, labels)

    return denoising_loss(apply_fn, scheduler, scheduler_state, prepare, lambda batch: batch["images"].shape[0],
                          snr_gamma=snr_gamma, axis_name=axis_name)

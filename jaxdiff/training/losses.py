"""The denoising loss: per-example timesteps and noise, the scheduler's noisy input and training
target (eps, v or x0), the mean squared error and min-SNR-γ weighting."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.parallel.pmap import AXIS, example_keys
from jaxdiff.training.state import LossFn


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


def diffusion_loss(apply_fn: Callable, scheduler, scheduler_state, *, cfg_dropout: float = 0.0,
                   null_label: int | None = None, snr_gamma: float | None = None,
                   axis_name: str | None = AXIS) -> LossFn:
    """The denoising loss as `loss_fn(params, batch, key)`.

    `batch["images"]`: uint8 (B, H, W, C) 0..255 or floats in [-1, 1]; `batch["labels"]` int (B,)
    or absent. Each example gets its own timestep t ~ U{0..T-1} and Gaussian noise from a key
    made of its index in the global batch; with `cfg_dropout` p its label becomes `null_label`
    with probability p (classifier-free guidance training). The target (eps, v or x0) is the
    scheduler's `training_target`; the loss is the mean squared error, weighted per example by
    min-SNR-γ (Hang et al. 2023) when `snr_gamma` is given.
    `apply_fn(params, x_t, t, labels)` → model output like `x_t`."""
    if cfg_dropout > 0 and null_label is None:
        raise ValueError("cfg_dropout needs a null_label for the dropped conditioning")
    num_train_timesteps = int(scheduler_state.alphas_cumprod.shape[0])

    def draw(key, shape):
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        return (jax.random.normal(k_noise, shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps),
                jax.random.bernoulli(k_drop, cfg_dropout))

    def loss_fn(params, batch, key):
        images = batch["images"]
        x0 = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0) if images.dtype == jnp.uint8 \
            else images.astype(jnp.float32)
        keys = example_keys(key, x0.shape[0], axis_name)
        noise, t, drop = jax.vmap(draw, in_axes=(0, None))(keys, x0.shape[1:])
        x_t = scheduler.add_noise(scheduler_state, x0, noise, t)
        target = scheduler.training_target(scheduler_state, x0, noise, t)
        labels = batch.get("labels")
        if labels is not None and cfg_dropout > 0:
            labels = jnp.where(drop, null_label, labels)
        pred = apply_fn(params, x_t, t, labels)
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
        if snr_gamma is None:
            return jnp.mean(per_example), {}
        weights = min_snr_weights(snr(scheduler_state.alphas_cumprod, t), snr_gamma,
                                  scheduler.prediction_type)
        return jnp.mean(per_example * weights), {"mse": jnp.mean(per_example)}

    return loss_fn

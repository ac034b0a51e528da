"""Fine-tuning a Stable Diffusion UNet on image–caption pairs: the loss, the optimizer, and the
pieces that turn a batch (pixels and token ids, or cached latents and text embeddings) into
the UNet's inputs. The train step itself is `jaxdiff.training.make_train_step`.

    loss_fn = text_to_image_loss(pipe, train_scheduler, LossConfig(cfg_dropout=0.1, snr_gamma=5.0))
    tx, lr = make_optimizer(1e-5, total_steps=10_000, warmup_steps=500)
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=0.9999))

The recipe is diffusers' `train_text_to_image.py`: latents = a sample of the VAE posterior ×
`scaling_factor`; per example a timestep t ~ U{0..T-1}, Gaussian noise (plus `noise_offset` ×
a per-channel constant), the noisy latent from the training scheduler; the target is the noise
or, for v-prediction models, v; the loss is the MSE, optionally weighted per example by
min-SNR-γ (Hang et al. 2023). With `cfg_dropout` p each caption is replaced, with probability
p, by the empty prompt, so the trained model works with classifier-free guidance.

Batches (leading axis = this device's examples):
    on the fly: {"pixels": uint8 (b, R, R, 3), "input_ids": int32 (b, L),
                 "encoders": {"vae": params, "text_encoder": params}}
    cached:     {"moments": float (b, R/8, R/8, 2·C) VAE posterior mean ‖ log-variance,
                 "context": float (b, L, D) text embeddings}
Every random draw of an example comes from a key made of its index in the global batch, so
both kinds of batch, and any number of devices or hosts, give the same numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.images import uint8_to_model
from jaxdiff.models.autoencoder_kl import DiagonalGaussianDistribution, scale_latents
from jaxdiff.parallel.pmap import AXIS, example_keys
from jaxdiff.training.losses import min_snr_weights, snr

@dataclasses.dataclass(frozen=True)
class LossConfig:
    """cfg_dropout: probability of training on the empty prompt, in [0, 1).
    noise_offset: std of a per-example, per-channel constant added to the noise (0 = off;
        0.05–0.1 lets the model learn very dark and bright images).
    snr_gamma: min-SNR-γ loss weighting (5.0 is the paper's choice); None = plain MSE."""

    cfg_dropout: float = 0.0
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise JaxdiffError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.noise_offset < 0:
            raise JaxdiffError(f"noise_offset must be >= 0, got {self.noise_offset}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise JaxdiffError(f"snr_gamma must be > 0, got {self.snr_gamma}")


def per_example_draws(key: jax.Array, latent_shape: tuple, num_train_timesteps: int,
                      cfg_dropout: float, noise_offset: float) -> dict:
    """The random draws of one example from its own key: `latent` (unit noise for the VAE
    posterior sample), `noise`, `t`, `drop` (caption dropped?)."""
    k_latent, k_noise, k_offset, k_t, k_drop = jax.random.split(key, 5)
    noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
    if noise_offset > 0:
        noise = noise + noise_offset * jax.random.normal(k_offset, (1, 1, latent_shape[-1]), jnp.float32)
    return {"latent": jax.random.normal(k_latent, latent_shape, jnp.float32), "noise": noise,
            "t": jax.random.randint(k_t, (), 0, num_train_timesteps),
            "drop": jax.random.bernoulli(k_drop, cfg_dropout) if cfg_dropout > 0 else jnp.bool_(False)}


def encode_pixels(pipe, vae_params, pixels: jax.Array) -> jax.Array:
    """uint8 (b, R, R, 3) → the VAE posterior's moments (b, R/8, R/8, 2·C): mean ‖ log-variance
    (what the latent cache stores)."""
    posterior = pipe.vae.apply({"params": vae_params}, uint8_to_model(pixels, jnp.float32),
                               method=pipe.vae.encode)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


def encode_text(pipe, text_encoder_params, input_ids: jax.Array) -> jax.Array:
    """Token ids (b, L) → text embeddings (b, L, D) as the pipeline conditions the UNet."""
    from jaxdiff.pipelines.stable_diffusion import encode_prompt

    return encode_prompt(pipe, {"text_encoder": text_encoder_params}, input_ids)


def text_to_image_loss(pipe, scheduler, config: LossConfig = LossConfig(), *,
                       null_ids: Optional[np.ndarray] = None, null_context: Optional[np.ndarray] = None,
                       axis_name: Optional[str] = AXIS) -> Callable:
    """`loss_fn(unet_params, batch, key) -> (loss, metrics)` for `make_train_step` (see the
    module docstring for the batch). `pipe`: a loaded `StableDiffusion` (its UNet module sets
    the compute dtype, its VAE and text encoder encode on-the-fly batches). `scheduler`: the
    training scheduler (DDPM on the model's beta schedule and prediction type). Caption
    dropout needs `null_ids` (L,) (on the fly) or `null_context` (L, D) (cached): the empty
    prompt. `axis_name`: the pmap axis (None under plain jit)."""
    state = scheduler.create_state()
    alphas_cumprod = state.alphas_cumprod
    num_train_timesteps = int(alphas_cumprod.shape[0])
    prediction_type = scheduler.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise unknown_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
    vae_config = pipe.vae.config

    def loss_fn(params, batch: Mapping, key: jax.Array):
        if "pixels" in batch:
            b = batch["pixels"].shape[0]
        else:
            b = batch["moments"].shape[0]
        keys = example_keys(key, b, axis_name)

        if "pixels" in batch:
            encoders = batch["encoders"]
            moments = jax.lax.stop_gradient(encode_pixels(pipe, encoders["vae"], batch["pixels"]))
        else:
            moments = batch["moments"]
        posterior = DiagonalGaussianDistribution.from_moments(moments)
        latent_shape = posterior.mean.shape[1:]
        draws = jax.vmap(lambda k: per_example_draws(k, latent_shape, num_train_timesteps,
                                                     config.cfg_dropout, config.noise_offset))(keys)

        if "pixels" in batch:
            ids = batch["input_ids"]
            if config.cfg_dropout > 0:
                if null_ids is None:
                    raise JaxdiffError("caption dropout needs null_ids (the empty prompt's token ids)")
                ids = jnp.where(draws["drop"][:, None], jnp.asarray(null_ids, ids.dtype)[None], ids)
            context = jax.lax.stop_gradient(encode_text(pipe, encoders["text_encoder"], ids))
        else:
            context = batch["context"].astype(jnp.float32)
            if config.cfg_dropout > 0:
                if null_context is None:
                    raise JaxdiffError("caption dropout needs null_context (the empty prompt's embedding)")
                context = jnp.where(draws["drop"][:, None, None],
                                    jnp.asarray(null_context, jnp.float32)[None], context)

        latents = scale_latents(vae_config, posterior.mean + posterior.std * draws["latent"])
        t, noise = draws["t"], draws["noise"]
        noisy = scheduler.add_noise(state, latents, noise, t)
        target = scheduler.training_target(state, latents, noise, t)
        pred = pipe.unet.apply({"params": params}, noisy, t, context)
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
        metrics = {"mse": jnp.mean(per_example)}
        if config.snr_gamma is not None:
            weights = min_snr_weights(snr(alphas_cumprod, t), config.snr_gamma, prediction_type)
            loss = jnp.mean(per_example * weights)
        else:
            loss = jnp.mean(per_example)
        return loss, metrics

    return loss_fn

"""DDPM (Ho et al. 2020): ancestral sampling of the posterior q(x_{t-1} | x_t, x0), as
diffusers' `DDPMScheduler`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import (Scheduler, StepOutput, draw_noise,
                                     split_variance)
from jaxdiff.schedulers.eager import is_traced

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def previous_timestep(timesteps, t):
    """The next timestep the loop visits after `t`: the largest entry of `timesteps` below
    `t`, or -1 past the end (diffusers' `previous_timestep` for any t in the schedule)."""
    t = jnp.asarray(t, jnp.int32)
    ts = timesteps.astype(jnp.int32)
    below = jnp.where(ts < t[..., None], ts, -1)
    return jnp.max(below, axis=-1)


def clip_or_threshold(sched, x0):
    """diffusers' x0 post-processing: dynamic thresholding, else clipping to ±clip_sample_range."""
    if sched.thresholding:
        return common.dynamic_threshold(x0, sched.dynamic_thresholding_ratio, sched.sample_max_value)
    if sched.clip_sample:
        return jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
    return x0


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(Scheduler):
    """diffusers `DDPMScheduler` config and update. `step` is stochastic for t > 0: pass `key`
    (or `noise`); the last step (t = 0) adds no noise and needs none. A learned-variance model
    outputs (B, H, W, 2C): mean part, then variance part."""

    name: ClassVar[str] = "ddpm"
    diffusers_class: ClassVar[str] = "DDPMScheduler"
    stochastic: ClassVar[bool] = True
    _choices: ClassVar[dict] = {
        "beta_schedule": common.BETA_SCHEDULES,
        "prediction_type": common.PREDICTION_TYPES,
        "variance_type": VARIANCE_TYPES,
    }

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False

    def _variance(self, alpha_prod_t, alpha_prod_t_prev, current_beta_t, predicted_variance):
        """The standard deviation of the noise added at this step."""
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        variance = jnp.maximum(variance, 1e-20)
        vt = self.variance_type
        if vt == "fixed_small":
            return jnp.sqrt(variance)
        if vt == "fixed_small_log":
            return jnp.exp(0.5 * jnp.log(variance))
        if vt == "fixed_large":
            return jnp.sqrt(current_beta_t)
        if vt == "learned":
            return jnp.sqrt(predicted_variance)
        min_log = jnp.log(variance)
        max_log = jnp.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return jnp.exp(0.5 * (frac * max_log + (1 - frac) * min_log))

    @staticmethod
    def _noise_free(t) -> bool:
        """t is known (not traced) and every entry is 0: the step adds no noise."""
        return not is_traced(t) and bool(np.all(np.asarray(t) == 0))

    def _eager_step_arguments(self, state, model_output, t, x, key=None, noise=None) -> dict:
        if key is None and noise is None and self._noise_free(t):
            return {"noise": jnp.zeros(jnp.shape(x), jnp.float32)}  # compiled once, no key needed
        return {}

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """x_{t-1} ~ q(x_{t-1} | x_t, x0_pred). t: scalar or (B,) int timestep of `x`."""
        self.check_state(state)
        if key is None and noise is None and self._noise_free(t):
            noise = jnp.zeros(jnp.shape(x), jnp.float32)
        out_dtype = x.dtype
        cdt = jnp.promote_types(x.dtype, jnp.float32)
        x = x.astype(cdt)
        model_output, predicted_variance = split_variance(model_output.astype(cdt), x, self.variance_type)
        if self.variance_type in ("learned", "learned_range") and predicted_variance is None:
            raise JaxdiffError(f"variance_type={self.variance_type!r} needs a model output with twice "
                               f"the sample's channels ({2 * x.shape[-1]}), got {model_output.shape[-1]}")
        t = jnp.asarray(t, jnp.int32)
        prev_t = previous_timestep(state.timesteps, t)
        ac = state.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], jnp.float32(1.0))
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        e = lambda c: common.expand_to(c, x)  # noqa: E731
        x0, _ = common.to_x0_and_eps(self.prediction_type, x, model_output, alpha_prod_t)
        x0 = clip_or_threshold(self, x0)

        x0_coeff = (jnp.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        x_coeff = jnp.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        prev_sample = e(x0_coeff) * x0 + e(x_coeff) * x

        std = self._variance(e(alpha_prod_t), e(alpha_prod_t_prev), e(current_beta_t), predicted_variance)
        z = draw_noise(key, noise, x.shape, cdt, "DDPM step at t > 0 (or a traced t)")
        std = jnp.where(e(t) > 0, std, 0.0)
        prev_sample = prev_sample + std * z
        return StepOutput(prev_sample.astype(out_dtype), x0, state)

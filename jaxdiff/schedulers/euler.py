"""Euler (Karras et al. 2022, Algorithm 2) and Euler ancestral (k-diffusion `sample_euler_ancestral`),
as diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import SchedulerState, StepOutput, draw_noise
from jaxdiff.schedulers.sigmas import SigmaScheduler


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(SigmaScheduler):
    """diffusers `EulerDiscreteScheduler`. `s_churn`, `s_tmin`, `s_tmax`, `s_noise` (arguments of
    diffusers' `step`) are config fields here; with `s_churn` > 0 the step is stochastic."""

    name: ClassVar[str] = "euler"
    diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
    stochastic: ClassVar[bool] = True  # when s_churn > 0
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": common.PREDICTION_TYPES,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _unsupported: ClassVar[dict] = {"use_beta_sigmas": False}

    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise JaxdiffError("use only one of use_karras_sigmas and use_exponential_sigmas")

    def set_timesteps(self, state, num_inference_steps, *, strength=None, shape=None,
                      dtype=jnp.float32) -> SchedulerState:
        n = self._check_steps(num_inference_steps)
        ts, sigmas, train = self._inference_sigmas(n)
        if self.final_sigmas_type == "sigma_min":
            sigma_last = train[0]
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            ts = np.array([np.float32(0.25) * np.log(s) for s in sigmas[:-1]], dtype=np.float32)
        return self._finish_set_timesteps(state, n, ts.astype(np.float32), sigmas,
                                          strength=strength, shape=shape, dtype=dtype)

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """One Euler step from sigmas[step_index] to sigmas[step_index + 1]."""
        self._need_sigmas(state)
        out_dtype = x.dtype
        x = x.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        sigma = self._sigma(state)
        if self.s_churn > 0:
            gamma_max = min(self.s_churn / (state.sigmas.shape[0] - 1), 2 ** 0.5 - 1)
            gamma = jnp.where((self.s_tmin <= sigma) & (sigma <= self.s_tmax), jnp.float32(gamma_max), 0.0)
            sigma_hat = sigma * (gamma + 1)
            z = draw_noise(key, noise, x.shape, jnp.float32, "Euler step with s_churn > 0")
            eps = z * self.s_noise
            x = jnp.where(gamma > 0, x + eps * jnp.sqrt(sigma_hat ** 2 - sigma ** 2), x)
        else:
            sigma_hat = sigma * 1.0
        # diffusers converts eps at the churned sigma_hat and v at sigma.
        x0 = self._x0_from_output(x, model_output, sigma_hat if self.prediction_type == "epsilon" else sigma)
        derivative = (x - x0) / sigma_hat
        dt = state.sigmas[state.step_index + 1] - sigma_hat
        prev_sample = x + derivative * dt
        return StepOutput(prev_sample.astype(out_dtype), x0, state.replace(step_index=state.step_index + 1))


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """diffusers `EulerAncestralDiscreteScheduler`: an Euler step to sigma_down plus fresh noise
    of std sigma_up at every step (pass `key`). `prediction_type="sample"` is supported here
    (diffusers raises for it)."""

    name: ClassVar[str] = "euler_a"
    diffusers_class: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    stochastic: ClassVar[bool] = True
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": common.PREDICTION_TYPES,
    }

    rescale_betas_zero_snr: bool = False

    def set_timesteps(self, state, num_inference_steps, *, strength=None, shape=None,
                      dtype=jnp.float32) -> SchedulerState:
        n = self._check_steps(num_inference_steps)
        ts = common.float_spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        train = self._train_sigmas()
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return self._finish_set_timesteps(state, n, ts, sigmas, strength=strength, shape=shape, dtype=dtype)

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        self._need_sigmas(state)
        out_dtype = x.dtype
        x = x.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        sigma = self._sigma(state)
        x0 = self._x0_from_output(x, model_output, sigma)
        sigma_from = sigma
        sigma_to = state.sigmas[state.step_index + 1]
        sigma_up = jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2)
        sigma_down = jnp.sqrt(sigma_to ** 2 - sigma_up ** 2)
        derivative = (x - x0) / sigma
        dt = sigma_down - sigma
        prev_sample = x + derivative * dt
        z = draw_noise(key, noise, x.shape, jnp.float32, "Euler ancestral step")
        prev_sample = prev_sample + z * sigma_up
        return StepOutput(prev_sample.astype(out_dtype), x0, state.replace(step_index=state.step_index + 1))


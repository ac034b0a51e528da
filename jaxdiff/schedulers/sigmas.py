"""The base of the sigma (k-diffusion style) schedulers: Euler, Euler ancestral, LMS, DPM-Solver.

They step on noise levels `state.sigmas` (N+1 values, the last one the final sigma) indexed by
the step counter `state.step_index`, not by the timestep value; the model sees timesteps
`state.timesteps` (which may be fractional) and, for Euler/LMS, an input scaled by
1/sqrt(sigma² + 1).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import Scheduler, SchedulerState


@dataclasses.dataclass(frozen=True)
class SigmaScheduler(Scheduler):
    """Shared sigma machinery; subclasses build `sigmas` in `set_timesteps` and implement `step`."""

    timestep_spacing: str = "linspace"

    def _zero_snr_clamps_last(self) -> bool:
        return True

    def _train_sigmas(self) -> np.ndarray:
        return common.train_sigmas(self._alphas_cumprod())

    def _inference_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps, sigmas, training sigmas) for `n` steps, without the final sigma: the
        training sigmas interpolated at the spaced timesteps, or Karras / exponential sigmas
        over their range (and the timesteps they map to) when the config asks for them."""
        ts = common.float_spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        train = self._train_sigmas()
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        karras = getattr(self, "use_karras_sigmas", False)
        if karras or getattr(self, "use_exponential_sigmas", False):
            smin, smax = self._config_sigma_range(sigmas)
            sigmas = (common.karras_sigmas if karras else common.exponential_sigmas)(smin, smax, n)
            log_sigmas = np.log(train)
            ts = np.array([common.sigma_to_t(s, log_sigmas) for s in sigmas])
        return ts, sigmas, train

    def _config_sigma_range(self, in_sigmas: np.ndarray) -> tuple[float, float]:
        """(sigma_min, sigma_max) for Karras/exponential schedules: config values when set."""
        smin = getattr(self, "sigma_min", None)
        smax = getattr(self, "sigma_max", None)
        smin = float(in_sigmas[-1]) if smin is None else smin
        smax = float(in_sigmas[0]) if smax is None else smax
        return smin, smax

    def create_state(self) -> SchedulerState:
        """Before `set_timesteps`: every training timestep, sigmas of the training schedule."""
        state = super().create_state()
        sig = self._train_sigmas()
        sigmas = np.concatenate([sig[::-1], [0.0]]).astype(np.float32)
        ts = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[::-1].astype(np.float32)
        return state.replace(timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sigmas))

    # ---- indexing -----------------------------------------------------------------------------

    def _sigma(self, state: SchedulerState, index=None):
        index = state.step_index if index is None else index
        return state.sigmas[index]

    def _sigma_of_timestep(self, state: SchedulerState, t):
        """sigma for timestep(s) t: the loop's own sigma when t is in `state.timesteps` (the
        second match when t appears twice, as diffusers picks), else the training schedule's
        sigma interpolated at t."""
        t = jnp.asarray(t, jnp.float32)
        ts = state.timesteps.astype(jnp.float32)
        matches = ts == t[..., None]
        count = matches.sum(-1)
        first = jnp.argmax(matches, axis=-1)
        second = jnp.argmax(matches & (jnp.arange(ts.shape[0]) > first[..., None]), axis=-1)
        index = jnp.where(count > 1, second, first)
        train = jnp.asarray(self._train_sigmas())
        interp = jnp.interp(t, jnp.arange(train.shape[0], dtype=jnp.float32), train)
        return jnp.where(count > 0, state.sigmas[index], interp)

    # ---- forward process and model input ------------------------------------------------------

    def add_noise(self, state: SchedulerState, x0, noise, t):
        """x0 + sigma_t noise (the VE form these samplers integrate); t: scalar or (B,) loop
        timesteps (img2img: `state.loop_timesteps[0]`)."""
        sigma = self._sigma_of_timestep(state, t).astype(x0.dtype)
        return x0 + noise * common.expand_to(sigma, x0)

    def init_noise_sigma(self, state: SchedulerState):
        max_sigma = jnp.max(state.sigmas)
        if self.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return jnp.sqrt(max_sigma ** 2 + 1)

    def scale_model_input(self, state: SchedulerState, x, t=None):
        """x / sqrt(sigma² + 1) at the current step (the VP-normalised input the network expects)."""
        sigma = self._sigma(state)
        return (x / jnp.sqrt(sigma ** 2 + 1)).astype(x.dtype)

    def _x0_from_output(self, x, model_output, sigma):
        """The x0 estimate of the VE sample x = x0 + sigma·eps (diffusers' Euler/LMS formulas)."""
        x0, _ = common.x0_and_eps(self.prediction_type, x, model_output, 1.0, sigma,
                                  variance_preserving=False)
        return x0

    def _need_sigmas(self, state: SchedulerState) -> None:
        if state.sigmas.shape[0] == 0:
            raise JaxdiffError(f"{type(self).__name__} needs a state from create_state()/set_timesteps()")
        self.check_state(state)

    def _timestep_index(self, state: SchedulerState) -> int:
        return int(np.asarray(state.step_index))

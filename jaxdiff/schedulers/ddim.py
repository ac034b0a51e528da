"""DDIM (Song et al. 2021): the non-Markovian sampler, deterministic at eta = 0, as diffusers'
`DDIMScheduler`. `eta` and `use_clipped_model_output` (arguments of diffusers' `step`) are
config fields here, so one scheduler object describes the whole sampler."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import Scheduler, StepOutput, draw_noise
from jaxdiff.schedulers.ddpm import clip_or_threshold


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(Scheduler):
    """diffusers `DDIMScheduler`. eta = 0 is deterministic; eta > 0 adds noise (pass `key`)."""

    name: ClassVar[str] = "ddim"
    diffusers_class: ClassVar[str] = "DDIMScheduler"
    stochastic: ClassVar[bool] = True  # when eta > 0
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": common.PREDICTION_TYPES,
    }

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.eta, (int, float)) and self.eta >= 0):
            raise JaxdiffError(f"eta must be a number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {self.eta!r}")

    def _final_alpha_cumprod(self, ac: np.ndarray) -> np.float32:
        return np.float32(1.0) if self.set_alpha_to_one else ac[0]

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """DDIM update from timestep t to t - T // num_inference_steps (diffusers' rule, for every
        spacing). t: scalar or (B,) int."""
        n = self._need_timesteps(state)
        out_dtype = x.dtype
        cdt = jnp.promote_types(x.dtype, jnp.float32)
        x = x.astype(cdt)
        model_output = model_output.astype(cdt)
        t = jnp.asarray(t, jnp.int32)
        prev_t = t - self.num_train_timesteps // n
        ac = state.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], state.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        e = lambda c: common.expand_to(c, x)  # noqa: E731
        x0, eps = common.to_x0_and_eps(self.prediction_type, x, model_output, alpha_prod_t)
        x0 = clip_or_threshold(self, x0)

        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * jnp.sqrt(variance)
        if self.use_clipped_model_output:  # the eps the clipped x0 implies
            _, eps = common.to_x0_and_eps("sample", x, x0, alpha_prod_t)
        direction = e(jnp.sqrt(1 - alpha_prod_t_prev - std_dev_t ** 2)) * eps
        prev_sample = e(jnp.sqrt(alpha_prod_t_prev)) * x0 + direction
        if self.eta > 0:
            z = draw_noise(key, noise, x.shape, cdt, f"DDIM step with eta={self.eta}")
            prev_sample = prev_sample + e(std_dev_t) * z
        return StepOutput(prev_sample.astype(out_dtype), x0, state)

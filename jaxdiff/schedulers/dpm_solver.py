"""DPM-Solver++ multistep (Lu et al. 2022), orders 1-3, ODE and SDE variants, as diffusers'
`DPMSolverMultistepScheduler`. The previous x0 predictions and the count of lower-order warm-up
steps live in `state.history`, so one `lax.scan` carries the whole solver."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import SchedulerState, StepOutput, draw_noise
from jaxdiff.schedulers.sigmas import SigmaScheduler


def _alpha_sigma(sigma):
    """VE sigma → (alpha_t, sigma_t) of the VP process: alpha = 1/sqrt(sigma²+1)."""
    alpha_t = 1 / jnp.sqrt(sigma ** 2 + 1)
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t, sigma_t):
    return jnp.log(alpha_t) - jnp.log(sigma_t)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(SigmaScheduler):
    """diffusers `DPMSolverMultistepScheduler` with `algorithm_type` "dpmsolver++" (default, the
    ODE solver) or "sde-dpmsolver++" (stochastic: pass `key`)."""

    name: ClassVar[str] = "dpm++"
    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    stochastic: ClassVar[bool] = True  # for sde-dpmsolver++
    _history_buffer: ClassVar[str] = "model_outputs"
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": common.PREDICTION_TYPES,
        "solver_order": (1, 2, 3),
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _unsupported: ClassVar[dict] = {"use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                                    "use_dynamic_shifting": False, "time_shift_type": "exponential"}

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_lu_lambdas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        # diffusers' own renames when another multistep config (DEIS, UniPC) is loaded as DPM-Solver.
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.variance_type not in ("learned", "learned_range"):
            object.__setattr__(self, "variance_type", None)
        super().__post_init__()
        if sum([self.use_karras_sigmas, self.use_exponential_sigmas, self.use_lu_lambdas]) > 1:
            raise JaxdiffError("use only one of use_karras_sigmas, use_exponential_sigmas and use_lu_lambdas")

    # ---- schedule -----------------------------------------------------------------------------

    def set_timesteps(self, state, num_inference_steps, *, strength=None, shape=None,
                      dtype=jnp.float32) -> SchedulerState:
        n = self._check_steps(num_inference_steps)
        T = self.num_train_timesteps
        ac = self._alphas_cumprod()
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
        clipped_idx = int(np.searchsorted(lambda_t[::-1], self.lambda_min_clipped))
        last = T - clipped_idx
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.steps_offset
        else:  # trailing
            ratio = T / n
            ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            flipped = np.flip(train).copy()
            make = common.karras_sigmas if self.use_karras_sigmas else common.exponential_sigmas
            sigmas = make(float(flipped[-1]), float(flipped[0]), n)
            ts = np.array([common.sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.use_karras_sigmas and self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif self.use_lu_lambdas:
            lambdas = np.flip(log_sigmas.copy())
            lmin, lmax = float(lambdas[-1]), float(lambdas[0])
            lambdas = lmax + np.linspace(0, 1, n) * (lmin - lmax)
            sigmas = np.exp(lambdas)
            ts = np.array([common.sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        sigma_last = train[0] if self.final_sigmas_type == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        ts = ts.astype(np.int64).astype(np.int32)
        return self._finish_set_timesteps(state, len(ts), ts, sigmas, strength=strength,
                                          shape=shape, dtype=dtype)

    def init_history(self, state, shape, dtype=jnp.float32):
        return state.replace(history={
            "model_outputs": jnp.zeros((self.solver_order,) + tuple(shape), jnp.float32),
            "lower_order_nums": jnp.zeros((), jnp.int32),
        })

    # ---- VP view (model input is not rescaled; x_T is unit noise) -------------------------------

    def init_noise_sigma(self, state):
        return jnp.float32(1.0)

    def scale_model_input(self, state, x, t=None):
        return x

    def add_noise(self, state, x0, noise, t):
        """alpha_t x0 + sigma_t noise at the loop's sigma for t."""
        sigma = self._sigma_of_timestep(state, t).astype(x0.dtype)
        alpha_t, sigma_t = _alpha_sigma(common.expand_to(sigma, x0))
        return alpha_t * x0 + sigma_t * noise

    # ---- the solver ---------------------------------------------------------------------------

    def convert_model_output(self, state, model_output, x):
        """The data prediction x0 that DPM-Solver++ integrates."""
        sigma = self._sigma(state)
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.prediction_type == "epsilon" and self.variance_type is not None:
            model_output = model_output[..., : x.shape[-1]]  # drop the learned variance half
        x0, _ = common.x0_and_eps(self.prediction_type, x, model_output, alpha_t, sigma_t)
        if self.thresholding:
            x0 = common.dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        return x0

    def _first_order(self, state, outputs, x, noise):
        si = state.step_index
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[si + 1])
        alpha_s, sigma_s = _alpha_sigma(state.sigmas[si])
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        m0 = outputs[-1]
        if self.algorithm_type == "dpmsolver++":
            return (sigma_t / sigma_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * m0
        return ((sigma_t / sigma_s * jnp.exp(-h)) * x + (alpha_t * (1 - jnp.exp(-2.0 * h))) * m0
                + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)

    def _second_order(self, state, outputs, x, noise):
        si = state.step_index
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[si + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(state.sigmas[si])
        alpha_s1, sigma_s1 = _alpha_sigma(state.sigmas[si - 1])
        lambda_t, lambda_s0, lambda_s1 = (_lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0),
                                          _lambda(alpha_s1, sigma_s1))
        m0, m1 = outputs[-1], outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if self.algorithm_type == "dpmsolver++":
            if self.solver_type == "midpoint":
                return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D0
                        - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * D1)
            return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * D1)
        if self.solver_type == "midpoint":
            return ((sigma_t / sigma_s0 * jnp.exp(-h)) * x + (alpha_t * (1 - jnp.exp(-2.0 * h))) * D0
                    + 0.5 * (alpha_t * (1 - jnp.exp(-2.0 * h))) * D1
                    + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)
        return ((sigma_t / sigma_s0 * jnp.exp(-h)) * x + (alpha_t * (1 - jnp.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)

    def _third_order(self, state, outputs, x, noise):
        si = state.step_index
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[si + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(state.sigmas[si])
        alpha_s1, sigma_s1 = _alpha_sigma(state.sigmas[si - 1])
        alpha_s2, sigma_s2 = _alpha_sigma(state.sigmas[si - 2])
        lambda_t, lambda_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        lambda_s1, lambda_s2 = _lambda(alpha_s1, sigma_s1), _lambda(alpha_s2, sigma_s2)
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        if self.algorithm_type == "dpmsolver++":
            return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * D1
                    - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * D2)
        return ((sigma_t / sigma_s0 * jnp.exp(-h)) * x + (alpha_t * (1.0 - jnp.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                + (alpha_t * ((1.0 - jnp.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
                + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """One multistep update from sigmas[step_index] to sigmas[step_index + 1]; the order
        warms up 1 → solver_order and drops at the end as diffusers does."""
        self._need_timesteps(state)
        state = self._ensure_history(state, x)
        out_dtype = x.dtype
        x = x.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        n = state.timesteps.shape[0]
        si = state.step_index
        final_static = self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        lower_order_final = (si == n - 1) & final_static
        lower_order_second = (si == n - 2) & (self.lower_order_final and n < 15)

        x0 = self.convert_model_output(state, model_output, x)
        outputs = jnp.concatenate([state.history["model_outputs"][1:], x0[None]], axis=0)
        z = None
        if self.algorithm_type == "sde-dpmsolver++":
            z = draw_noise(key, noise, x.shape, jnp.float32, "sde-dpmsolver++ step")
        lon = state.history["lower_order_nums"]
        branches = [self._first_order, self._second_order, self._third_order][: self.solver_order]
        if self.solver_order == 1:
            prev_sample = self._first_order(state, outputs, x, z)
        else:
            use_first = (lon < 1) | lower_order_final
            use_second = (self.solver_order == 2) | (lon < 2) | lower_order_second
            index = jnp.where(use_first, 0, jnp.where(use_second, 1, 2))
            index = jnp.minimum(index, self.solver_order - 1)
            prev_sample = jax.lax.switch(index, [lambda o, xx, zz, f=f: f(state, o, xx, zz) for f in branches],
                                         outputs, x, z)
        history = {"model_outputs": outputs,
                   "lower_order_nums": jnp.minimum(lon + 1, self.solver_order).astype(jnp.int32)}
        new_state = state.replace(step_index=si + 1, history=history)
        return StepOutput(prev_sample.astype(out_dtype), x0, new_state)

"""Linear multistep (k-diffusion `sample_lms`), as diffusers' `LMSDiscreteScheduler` with its
default order 4.

The LMS coefficients are integrals of Lagrange polynomials over [sigma_i, sigma_{i+1}]; they
depend only on the sigmas, so `set_timesteps` computes the whole (N, 4) table on the host, in
float64 with 4-point Gauss-Legendre quadrature (exact for these cubic integrands). diffusers
integrates the same polynomials with `scipy.integrate.quad` on float32 sigmas, so the
coefficients differ in the last float32 bits.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import SchedulerState, StepOutput
from jaxdiff.schedulers.sigmas import SigmaScheduler

LMS_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """(N, order) table: row i holds the weights of the derivatives at steps i, i-1, ...
    (most recent first) for the step from sigmas[i] to sigmas[i+1]; unused orders are 0."""
    sigmas = np.asarray(sigmas, np.float64)
    n = len(sigmas) - 1
    nodes, weights = np.polynomial.legendre.leggauss(4)
    table = np.zeros((n, order))
    for i in range(n):
        cur_order = min(i + 1, order)
        a, b = sigmas[i], sigmas[i + 1]
        tau = 0.5 * (b - a) * nodes + 0.5 * (b + a)
        for j in range(cur_order):
            prod = np.ones_like(tau)
            for k in range(cur_order):
                if k != j:
                    prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
            table[i, j] = 0.5 * (b - a) * np.dot(weights, prod)
    return table.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(SigmaScheduler):
    """diffusers `LMSDiscreteScheduler` (order 4)."""

    name: ClassVar[str] = "lms"
    diffusers_class: ClassVar[str] = "LMSDiscreteScheduler"
    _history_buffer: ClassVar[str] = "derivatives"
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": common.PREDICTION_TYPES,
    }
    _unsupported: ClassVar[dict] = {"use_beta_sigmas": False}

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise JaxdiffError("use only one of use_karras_sigmas and use_exponential_sigmas")

    def _alphas_cumprod(self) -> np.ndarray:
        return common.alphas_cumprod_of(self._betas())  # LMS has no zero-SNR option

    def set_timesteps(self, state, num_inference_steps, *, strength=None, shape=None,
                      dtype=jnp.float32) -> SchedulerState:
        n = self._check_steps(num_inference_steps)
        ts, sigmas, _ = self._inference_sigmas(n)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        coeffs = lms_coefficients(sigmas)
        return self._finish_set_timesteps(state, n, ts.astype(np.float32), sigmas, strength=strength,
                                          shape=shape, dtype=dtype,
                                          history={"lms_coeffs": jnp.asarray(coeffs)})

    def create_state(self) -> SchedulerState:
        """Every training timestep (sigmas of the training schedule) with its LMS coefficients."""
        state = super().create_state()
        sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]]).astype(np.float32)
        coeffs = lms_coefficients(sigmas)
        return state.replace(history={"lms_coeffs": jnp.asarray(coeffs)})

    def init_history(self, state, shape, dtype=jnp.float32):
        history = dict(state.history)
        history["derivatives"] = jnp.zeros((LMS_ORDER,) + tuple(shape), jnp.float32)
        return state.replace(history=history)

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """x_{i+1} = x_i + sum_j c_ij d_{i-j}, d = (x - x0) / sigma, over the last 4 derivatives."""
        self._need_sigmas(state)
        state = self._ensure_history(state, x)
        out_dtype = x.dtype
        x = x.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        si = state.step_index
        sigma = self._sigma(state)
        x0 = self._x0_from_output(x, model_output, sigma)
        derivative = (x - x0) / sigma
        # Most recent first: derivatives[0] is this step's.
        derivatives = jnp.concatenate([derivative[None], state.history["derivatives"][:-1]], axis=0)
        coeffs = state.history["lms_coeffs"][si]
        update = coeffs[0] * derivatives[0]
        for j in range(1, LMS_ORDER):
            update = update + coeffs[j] * derivatives[j]
        prev_sample = x + update
        history = dict(state.history, derivatives=derivatives)
        return StepOutput(prev_sample.astype(out_dtype), x0, state.replace(step_index=si + 1, history=history))

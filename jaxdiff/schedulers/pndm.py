"""PNDM (Liu et al. 2022): pseudo Runge-Kutta warm-up steps then pseudo linear multistep (PLMS),
as diffusers' `PNDMScheduler` (Stable Diffusion 1.x's default, there with `skip_prk_steps`).

The step counter, the last four model outputs and the Runge-Kutta accumulators live in
`state.history`. As in diffusers, `state.timesteps` holds N+1 entries with `skip_prk_steps`
(the second step re-evaluates the first timestep) and N+9 without (12 Runge-Kutta evaluations).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import common
from jaxdiff.schedulers.base import Scheduler, SchedulerState, StepOutput

PNDM_ORDER = 4


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(Scheduler):
    """diffusers `PNDMScheduler`; `pred_original_sample` (which diffusers does not return) is the
    x0 implied by this step's model output at (t, x)."""

    name: ClassVar[str] = "pndm"
    diffusers_class: ClassVar[str] = "PNDMScheduler"
    _history_buffer: ClassVar[str] = "ets"
    _choices: ClassVar[dict] = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": ("epsilon", "v_prediction"),
    }

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    def _final_alpha_cumprod(self, ac: np.ndarray) -> np.float32:
        return np.float32(1.0) if self.set_alpha_to_one else ac[0]

    def _first_step_index(self, begin_index: int) -> int:
        return 0  # the PRK/PLMS counter always starts at 0 (also for img2img), as in diffusers

    def _timestep_index(self, state: SchedulerState) -> int:
        return state.begin_index + int(np.asarray(state.step_index))

    def set_timesteps(self, state, num_inference_steps, *, strength=None, shape=None,
                      dtype=jnp.float32) -> SchedulerState:
        n = self._check_steps(num_inference_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = T // n
            base = (np.arange(0, n) * ratio).round() + self.steps_offset
        else:  # trailing
            ratio = T / n
            base = np.round(np.arange(T, 0, -ratio))[::-1].astype(np.int64) - 1
        if self.skip_prk_steps:
            prk = np.array([])
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            prk = np.array(base[-PNDM_ORDER:]).repeat(2) + np.tile(np.array([0, T // n // 2]), PNDM_ORDER)
            prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        ts = np.concatenate([prk, plms]).astype(np.int64)
        if len(ts) == 0:
            raise JaxdiffError(f"PNDM needs more inference steps than {n}")
        return self._finish_set_timesteps(state, n, ts.astype(np.int32), strength=strength,
                                          shape=shape, dtype=dtype)

    def init_history(self, state, shape, dtype=jnp.float32):
        zeros = jnp.zeros(tuple(shape), jnp.float32)
        return state.replace(history={
            "ets": jnp.zeros((PNDM_ORDER,) + tuple(shape), jnp.float32),  # oldest ... newest
            "num_ets": jnp.zeros((), jnp.int32),
            "cur_sample": zeros,
            "cur_model_output": zeros,
        })

    # ---- the update ---------------------------------------------------------------------------

    def _prev_sample(self, state, x, t, prev_t, model_output):
        """x_{prev_t} from x_t and an (averaged) eps: PNDM's transfer function (eq. 9)."""
        ac = state.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], state.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        _, model_output = common.to_x0_and_eps(self.prediction_type, x, model_output, alpha_prod_t)
        sample_coeff = jnp.sqrt(alpha_prod_t_prev / alpha_prod_t)
        denom = alpha_prod_t * jnp.sqrt(beta_prod_t_prev) + jnp.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        return sample_coeff * x - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom

    @staticmethod
    def _push(ets, num_ets, m):
        return jnp.concatenate([ets[1:], m[None]], axis=0), jnp.minimum(num_ets + 1, PNDM_ORDER)

    def _step_prk(self, state, m, t, x):
        h = state.history
        c = state.step_index
        ratio = self.num_train_timesteps // state.num_inference_steps
        prev_t = t - jnp.where(c % 2 == 1, 0, ratio // 2)
        t_eff = state.timesteps[c // 4 * 4]
        r = c % 4
        weight = jnp.asarray([1 / 6, 1 / 3, 1 / 3, 1 / 6], jnp.float32)[r]
        cmo = h["cur_model_output"]
        model_output = jnp.where(r == 3, cmo + weight * m, m)
        new_cmo = jnp.where(r == 3, jnp.zeros_like(cmo), cmo + weight * m)
        pushed, pushed_n = self._push(h["ets"], h["num_ets"], m)
        ets = jnp.where(r == 0, pushed, h["ets"])
        num_ets = jnp.where(r == 0, pushed_n, h["num_ets"])
        cur_sample = jnp.where(r == 0, x, h["cur_sample"])
        prev = self._prev_sample(state, cur_sample, t_eff, prev_t, model_output)
        history = {"ets": ets, "num_ets": num_ets, "cur_sample": cur_sample, "cur_model_output": new_cmo}
        return prev, history

    def _step_plms(self, state, m, t, x):
        h = state.history
        c = state.step_index
        ratio = self.num_train_timesteps // state.num_inference_steps
        second = c == 1  # the second step re-evaluates at the first timestep (an improved-Euler start)
        pushed, pushed_n = self._push(h["ets"], h["num_ets"], m)
        ets = jnp.where(second, h["ets"], pushed)
        num_ets = jnp.where(second, h["num_ets"], pushed_n)
        prev_t = jnp.where(second, t, t - ratio)
        t_eff = jnp.where(second, t + ratio, t)
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]
        branch = jnp.where((num_ets == 1) & (c == 0), 0,
                           jnp.where((num_ets == 1) & (c == 1), 1, num_ets))
        model_output = jax.lax.switch(branch, [
            lambda: m,
            lambda: (m + e1) / 2,
            lambda: (3 * e1 - e2) / 2,
            lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
            lambda: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
        ])
        sample = jnp.where(branch == 1, h["cur_sample"], x)
        cur_sample = jnp.where(branch == 0, x, h["cur_sample"])
        prev = self._prev_sample(state, sample, t_eff, prev_t, model_output)
        history = dict(h, ets=ets, num_ets=num_ets, cur_sample=cur_sample)
        return prev, history

    def step(self, state, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        """A Runge-Kutta stage while the counter is within the 12 PRK evaluations (unless
        `skip_prk_steps`), else a PLMS step."""
        self._need_timesteps(state)
        state = self._ensure_history(state, x)
        out_dtype = x.dtype
        x = x.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        t = jnp.asarray(t, jnp.int32)
        if self.skip_prk_steps:
            prev, history = self._step_plms(state, m, t, x)
        else:
            prk_steps = 3 * PNDM_ORDER
            prev, history = jax.lax.cond(state.step_index < prk_steps,
                                         lambda: self._step_prk(state, m, t, x),
                                         lambda: self._step_plms(state, m, t, x))
        x0, _ = common.to_x0_and_eps(self.prediction_type, x, m, state.alphas_cumprod[t])
        new_state = state.replace(step_index=state.step_index + 1, history=history)
        return StepOutput(prev.astype(out_dtype), x0, new_state)

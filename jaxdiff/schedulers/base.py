"""The scheduler contract: a frozen, hashable config object with pure methods over an immutable
state pytree.

    sched = DDIMScheduler(beta_schedule="scaled_linear")      # static under jit (hashable)
    state = sched.create_state()                             # SchedulerState pytree
    state = sched.set_timesteps(state, 50)                    # host-side, num steps static
    out = sched.step(state, model_output, t, x, key=key)      # StepOutput(prev_sample, pred_original_sample, state)

Every method is a pure function of its arguments, jittable and usable inside `lax.scan` with
the state carried (multistep schedulers keep their history and counters in `state.history`).
Called outside `jit` (a notebook's Python loop), `step`, `add_noise`, `scale_model_input`, ...
run compiled on first use (`jaxdiff.schedulers.eager`). Randomness is keyword-only: `key=`
(or `noise=`); diffusers' step options (`eta`, `s_churn`, ...) are config fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.schedulers import common, eager


@struct.dataclass
class SchedulerState:
    """Arrays a scheduler steps with. Built by `Scheduler.create_state`, updated by
    `set_timesteps` and `step`; never mutated.

    betas, alphas_cumprod: (T,) float32 training schedule.
    final_alpha_cumprod: () float32, ᾱ used past the last step (1 or ᾱ_0, `set_alpha_to_one`).
    timesteps: (N,) descending; int32 for DDPM/DDIM/PNDM/DPM-Solver, float32 for Euler/LMS
        (diffusers' fractional timesteps). The sampling loop runs over `timesteps[begin_index:]`.
        Never slice it by hand (diffusers' img2img `timesteps[t_start:]`): `step` checks its
        length against `num_inference_steps`; use `set_timesteps(..., strength=)`.
    sigmas: (N+1,) float32 noise levels for the sigma schedulers (Euler, LMS, DPM-Solver), else (0,).
    step_index: () int32 counter of steps taken (sigma schedulers index `sigmas` with it).
    history: scheduler-specific arrays (multistep buffers), {} for single-step schedulers.
    num_inference_steps: static; None until `set_timesteps`.
    begin_index: static; first loop index (img2img `strength`), 0 otherwise.
    num_timesteps: static; len(timesteps) as `set_timesteps` made it (None before).
    """
    betas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    timesteps: jax.Array
    sigmas: jax.Array
    step_index: jax.Array
    history: dict = struct.field(default_factory=dict)
    num_inference_steps: int | None = struct.field(pytree_node=False, default=None)
    begin_index: int = struct.field(pytree_node=False, default=0)
    num_timesteps: int | None = struct.field(pytree_node=False, default=None)

    @property
    def loop_timesteps(self) -> jax.Array:
        """The timesteps a sampling loop visits: `timesteps[begin_index:]`."""
        return self.timesteps[self.begin_index:]


class StepOutput(NamedTuple):
    """prev_sample: x_{t-1}, same shape/dtype as the sample. pred_original_sample: the x0
    estimate of this step (float32). state: the scheduler state to use for the next step."""
    prev_sample: jax.Array
    pred_original_sample: jax.Array
    state: SchedulerState


def _check_choice(cls_name: str, field: str, value, choices) -> None:
    if value not in choices:
        raise unknown_choice(f"{field} for {cls_name}", value, choices)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Config shared by every scheduler (diffusers' keys and defaults). Subclasses add their own
    keys, override `_choices` and implement `set_timesteps` / `step`."""

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    # How many model evaluations a diffusers `order` counts per step (1 for all ours).
    order: ClassVar[int] = 1
    # field -> allowed values (validated in __post_init__).
    _choices: ClassVar[dict[str, tuple]] = {}
    # diffusers keys of this class that jaxdiff does not implement, with the only value accepted.
    _unsupported: ClassVar[dict[str, Any]] = {}
    # True when `step` needs `key=` or `noise=` (for some config).
    stochastic: ClassVar[bool] = False

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in eager.COMPILED_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, eager.compile_on_first_use(cls.__dict__[name]))

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in np.asarray(self.trained_betas).ravel()))
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise JaxdiffError(f"trained_betas has {len(self.trained_betas)} entries but "
                               f"num_train_timesteps is {self.num_train_timesteps}; make them equal")
        cls = type(self).__name__
        if not isinstance(self.num_train_timesteps, (int, np.integer)) or self.num_train_timesteps < 2:
            raise JaxdiffError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.trained_betas is None:
            _check_choice(cls, "beta_schedule", self.beta_schedule, self._choices.get("beta_schedule", ()))
        _check_choice(cls, "timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        for field, choices in self._choices.items():
            if field != "beta_schedule":
                _check_choice(cls, field, getattr(self, field), choices)

    # ---- config -----------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The config as a dict of diffusers keys (plus jaxdiff's step options such as `eta`)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Scheduler":
        return dataclasses.replace(self, **changes)

    # ---- schedule ---------------------------------------------------------------------------

    def _betas(self) -> np.ndarray:
        return _cached_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                             self.beta_end, self.trained_betas,
                             bool(getattr(self, "rescale_betas_zero_snr", False)))

    def _alphas_cumprod(self) -> np.ndarray:
        ac = common.alphas_cumprod_of(self._betas())
        if getattr(self, "rescale_betas_zero_snr", False) and self._zero_snr_clamps_last():
            ac = ac.copy()
            ac[-1] = 2.0 ** -24
        return ac

    def _zero_snr_clamps_last(self) -> bool:
        """Sigma schedulers replace ᾱ_T = 0 (infinite sigma) by 2**-24, as diffusers does."""
        return False

    def _final_alpha_cumprod(self, ac: np.ndarray) -> np.float32:
        return np.float32(1.0)

    def create_state(self) -> SchedulerState:
        """The state before `set_timesteps`: training schedule, timesteps T-1 ... 0."""
        betas = self._betas()
        ac = self._alphas_cumprod()
        return SchedulerState(
            betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(ac),
            final_alpha_cumprod=jnp.asarray(self._final_alpha_cumprod(ac), jnp.float32),
            timesteps=jnp.arange(self.num_train_timesteps - 1, -1, -1, dtype=jnp.int32),
            sigmas=jnp.zeros((0,), jnp.float32), step_index=jnp.zeros((), jnp.int32),
            history={}, num_inference_steps=None, begin_index=0)

    def _check_steps(self, num_inference_steps) -> int:
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
            raise JaxdiffError(f"num_inference_steps must be a Python int (it is static), got "
                               f"{type(num_inference_steps).__name__}")
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise JaxdiffError(f"num_inference_steps={num_inference_steps} must be between 1 and "
                               f"num_train_timesteps={self.num_train_timesteps}")
        return int(num_inference_steps)

    def set_timesteps(self, state: SchedulerState, num_inference_steps: int, *,
                      strength: float | None = None, shape: tuple | None = None,
                      dtype=jnp.float32) -> SchedulerState:
        """A state for `num_inference_steps` (static) steps with the history reset.
        `strength` in (0, 1] starts the loop part-way, as diffusers' img2img does
        (`begin_index = n - int(n * strength)`): loop over `state.loop_timesteps` and start from
        `jaxdiff.sampling.img2img_start`. Do not slice `state.timesteps` (or the list you loop
        over) by hand as diffusers pipelines do: the multistep and sigma schedulers count steps
        in the state, so `step` refuses a state whose timesteps no longer match
        `num_inference_steps` (also under jit) and, outside jit, a `t` that is not the state's
        next timestep. `shape` pre-allocates multistep history.

        This default (DDPM, DDIM): integer timesteps spaced by `timestep_spacing`."""
        n = self._check_steps(num_inference_steps)
        ts = common.spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        return self._finish_set_timesteps(state, n, ts.astype("int32"), strength=strength,
                                          shape=shape, dtype=dtype)

    def _finish_set_timesteps(self, state: SchedulerState, num_inference_steps: int,
                              timesteps, sigmas=None, *, strength=None, shape=None,
                              dtype=jnp.float32, history=None) -> SchedulerState:
        begin = 0
        if strength is not None:
            strength = float(strength)
            if not 0.0 < strength <= 1.0:
                raise JaxdiffError(f"strength must be in (0, 1], got {strength}")
            init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
            begin = max(num_inference_steps - init_timestep, 0) * self.order
            if begin >= len(timesteps):
                raise JaxdiffError(f"strength={strength} with {num_inference_steps} steps leaves no "
                                   "denoising step; raise strength or the number of steps")
        state = state.replace(
            timesteps=jnp.asarray(timesteps),
            sigmas=jnp.zeros((0,), jnp.float32) if sigmas is None else jnp.asarray(sigmas, jnp.float32),
            step_index=jnp.asarray(self._first_step_index(begin), jnp.int32),
            history=dict(history or {}), num_inference_steps=num_inference_steps, begin_index=begin,
            num_timesteps=len(timesteps))
        if shape is not None:
            state = self.init_history(state, shape, dtype)
        return state

    def _first_step_index(self, begin_index: int) -> int:
        return begin_index

    def init_history(self, state: SchedulerState, shape: tuple, dtype=jnp.float32) -> SchedulerState:
        """Zeroed multistep buffers for samples of `shape` (a no-op for single-step schedulers).
        Call before `lax.scan` (the sampling loop does) so the carried state keeps its shape."""
        return state

    # The multistep buffer whose presence says the history is allocated (None: no history).
    _history_buffer: ClassVar[str | None] = None

    def _ensure_history(self, state: SchedulerState, x) -> SchedulerState:
        """Allocate the history on the first step when the caller did not (fine outside scan)."""
        key = self._history_buffer
        if key is None:
            return state
        buf = state.history.get(key)
        if buf is None:
            return self.init_history(state, x.shape)
        if tuple(buf.shape[1:]) != tuple(x.shape):
            raise JaxdiffError(f"{type(self).__name__} history was allocated for samples of shape "
                               f"{tuple(buf.shape[1:])} but got {tuple(x.shape)}; call "
                               "set_timesteps(..., shape=x.shape) or init_history(state, x.shape)")
        return state

    def _need_timesteps(self, state: SchedulerState) -> int:
        if state.num_inference_steps is None:
            raise JaxdiffError(f"{type(self).__name__}.step needs a state from "
                               "set_timesteps(state, num_inference_steps); call it first")
        self.check_state(state)
        return state.num_inference_steps

    def check_state(self, state: SchedulerState) -> None:
        """Refuse a state whose timesteps were changed by hand (e.g. sliced for img2img): their
        length must be what `set_timesteps` made. Shapes are static, so this works under jit."""
        want, got = state.num_timesteps, state.timesteps.shape[0]
        if want is not None and got != want:
            raise JaxdiffError(
                f"this {type(self).__name__} state has {got} timesteps but set_timesteps made {want} "
                f"(num_inference_steps={state.num_inference_steps}): its timesteps were changed by "
                "hand; for img2img use set_timesteps(state, n, strength=s) and loop over "
                "state.loop_timesteps")

    def _timestep_index(self, state: SchedulerState) -> int | None:
        """Index into `state.timesteps` of the timestep the next step expects, for schedulers
        that step by counter (None: the step works from `t` alone). Concrete state only."""
        return None

    def _eager_step_arguments(self, state, model_output, t, x, key=None, noise=None) -> dict:
        """Checks of a `step` call with concrete arguments, before it runs compiled; returns
        arguments to replace (none here)."""
        self.check_state(state)
        index = self._timestep_index(state)
        if index is not None and state.num_inference_steps is not None:
            eager.check_next_timestep(self, state, t, index)
        return {}

    # ---- the forward process and training targets (VP, indexed by integer t) ---------------

    def _alpha_prod(self, state: SchedulerState, t):
        return state.alphas_cumprod[jnp.asarray(t).astype(jnp.int32)]

    def add_noise(self, state: SchedulerState, x0, noise, t):
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise; t: scalar or (B,) integer timesteps."""
        a = self._alpha_prod(state, t).astype(x0.dtype)
        return common.add_noise_vp(x0, noise, a)

    def get_velocity(self, state: SchedulerState, x0, noise, t):
        """v = sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0."""
        a = self._alpha_prod(state, t).astype(x0.dtype)
        return common.v_from(x0, noise, a)

    def training_target(self, state: SchedulerState, x0, noise, t):
        """What the model should output for x_t = add_noise(x0, noise, t): noise, v or x0
        according to `prediction_type`."""
        a = self._alpha_prod(state, t).astype(x0.dtype)
        return common.from_x0_and_eps(self.prediction_type, x0, noise, a)

    # ---- sampling ---------------------------------------------------------------------------

    def init_noise_sigma(self, state: SchedulerState):
        """Standard deviation of x_T: multiply unit Gaussian noise by this."""
        return jnp.float32(1.0)

    def scale_model_input(self, state: SchedulerState, x, t=None):
        """The network's input at this step (identity except for the sigma schedulers)."""
        return x

    def step(self, state: SchedulerState, model_output, t, x, *, key=None, noise=None) -> StepOutput:
        raise NotImplementedError


for _name in eager.COMPILED_METHODS:  # subclasses are wrapped by __init_subclass__
    setattr(Scheduler, _name, eager.compile_on_first_use(Scheduler.__dict__[_name]))


# ---------------------------------------------------------------------------------------------

_BETAS_CACHE: dict = {}


def _cached_betas(schedule, T, start, end, trained, zero_snr) -> np.ndarray:
    k = (schedule, T, start, end, trained, zero_snr)
    if k not in _BETAS_CACHE:
        betas = common.make_betas(schedule, T, start, end, trained)
        if zero_snr:
            betas = common.rescale_zero_terminal_snr(betas)
        betas.setflags(write=False)
        _BETAS_CACHE[k] = betas
    return _BETAS_CACHE[k]


def check_key(key, who: str) -> None:
    """A PRNG key: a typed key (`jax.random.key`) or a legacy uint32 (2,) one."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                              or (dtype == jnp.uint32 and tuple(key.shape) == (2,))):
        return
    shown = f"a {dtype} array of shape {tuple(key.shape)}" if dtype is not None else repr(key)
    raise JaxdiffError(f"{who}: key must be a PRNG key such as jax.random.key(0), got {shown}")


def draw_noise(key, noise, shape, dtype, who: str):
    """The noise of a stochastic step: `noise` when given (tests inject diffusers' draws),
    else a standard normal draw from `key`."""
    if noise is not None:
        return jnp.asarray(noise).astype(dtype)
    if key is None:
        raise JaxdiffError(f"{who} is stochastic: pass key=jax.random.key(...) (or noise=)")
    check_key(key, who)
    return jax.random.normal(key, shape, dtype)


def split_variance(model_output, x, variance_type):
    """Split a (B, H, W, 2C) output of a learned-variance model into (output, predicted_variance)."""
    if variance_type in ("learned", "learned_range") and model_output.shape[-1] == 2 * x.shape[-1]:
        c = x.shape[-1]
        return model_output[..., :c], model_output[..., c:]
    return model_output, None

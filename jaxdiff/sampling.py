"""The sampling loop: any denoiser, any scheduler, one `lax.scan` over the timesteps.

A *denoiser* is `denoise(x, t, cond) -> model_output`: x (B, H, W, C) NHWC, t a scalar timestep
array (int32, or float32 for Euler/LMS), model_output eps / v / x0 as the scheduler's
`prediction_type` says. A UNet's `apply` with its params closed over is one; `cfg(denoise, w)`
is another.

    state = sched.set_timesteps(sched.create_state(), 50)
    x0 = jax.jit(lambda p, x, k: sample(as_denoiser(unet, p), sched, state, x, k))(
        params, jax.random.normal(key, (8, 32, 32, 3)), key)

Everything runs inside one scan: no host round-trip per step, one compilation per
(shapes, scheduler config, number of steps). Guidance scale, prompts and keys are traced.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxdiff.schedulers.base import Scheduler, SchedulerState

Denoiser = Callable[[jax.Array, jax.Array, Any], jax.Array]
# guidance(x, t, model_output, state, key) -> (x, model_output)
Guidance = Callable[[jax.Array, jax.Array, jax.Array, SchedulerState, Optional[jax.Array]],
                    tuple[jax.Array, jax.Array]]


def as_apply_fn(module, **apply_kwargs) -> Callable:
    """A Flax network as `apply(params, x, t, cond=None) -> module.apply({"params": params}, x,
    t, cond, **apply_kwargs)` (cond left out when None): the params-taking form `make_sampler`,
    training losses and jitted functions with params as an argument want."""

    def apply(params, x, t, cond=None):
        args = (x, t) if cond is None else (x, t, cond)
        return module.apply({"params": params}, *args, **apply_kwargs)

    return apply


def as_denoiser(module, params, **apply_kwargs) -> Denoiser:
    """A Flax network with its params closed over as a denoiser `denoise(x, t, cond=None)`
    (`as_apply_fn` with `params` bound). Inside `jax.jit`, pass traced params."""
    apply = as_apply_fn(module, **apply_kwargs)
    return lambda x, t, cond=None: apply(params, x, t, cond)


def sample(denoise: Denoiser, scheduler: Scheduler, state: SchedulerState, x_T: jax.Array,
           key: Optional[jax.Array] = None, cond: Any = None, *, guidance: Optional[Guidance] = None,
           scale_x_T: bool = True, return_trajectory: bool = False,
           num_steps: Optional[int] = None,
           after_step: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
           start_index=None):
    """Run the reverse process from x_T and return x_0 (same shape and dtype as x_T).

    denoise: `denoise(x, t, cond) -> model_output`; it receives
        `scheduler.scale_model_input(state, x, t)`.
    state: from `scheduler.set_timesteps`; the loop visits `state.loop_timesteps`
        (`timesteps[begin_index:]`, i.e. fewer steps for img2img `strength`). A state whose
        timesteps were sliced by hand is refused (`Scheduler.check_state`), before any tracing.
    x_T: (B, H, W, C). With `scale_x_T` (default) it is unit Gaussian noise and is multiplied by
        `scheduler.init_noise_sigma(state)`; pass `scale_x_T=False` when x_T already is a noisy
        sample (img2img: see `img2img_start`).
    key: PRNG key, split once per step (needed by stochastic schedulers and guidance).
    guidance: optional hook run after the denoiser and before the scheduler step:
        `guidance(x, t, model_output, state, key) -> (x, model_output)`. It may nudge x (e.g. by
        `-jax.grad(loss)(x)` of a loss of the x0 it gets from `scheduler.step(state,
        model_output, t, x).pred_original_sample`) and/or change model_output. `state` is the
        scheduler state of this step; `key` is a fresh per-step key (None when key is None).
    return_trajectory: also return the (num_steps, B, H, W, C) stacks of x_{t-1} and x0
        predictions, for plots.
    num_steps: run only the first `num_steps` loop timesteps (static; SDXL's `denoising_end`:
        the base stops part-way and a refiner continues from its latents).
    after_step: optional `after_step(x_prev, i) -> x_prev` run on the scheduler's output of loop
        step i (int32, 0-based; traced): inpainting with a 4-channel UNet blends the known
        region back in here.
    start_index: optional traced int: loop steps before it leave x and the state as they are
        (`lax.cond`, the network is not run): img2img with a traced strength, see
        `strength_start`.
    """
    scheduler.check_state(state)
    x = x_T
    if scale_x_T:
        x = (x * scheduler.init_noise_sigma(state)).astype(x_T.dtype)
    state = scheduler.init_history(state, x.shape, jnp.float32)
    timesteps = state.loop_timesteps
    if num_steps is not None:
        timesteps = timesteps[:num_steps]
    n = timesteps.shape[0]
    keys = None if key is None else jax.random.split(key, n)

    def body(carry, inputs):
        if start_index is None:
            return step(carry, inputs)
        ys_shape = jax.eval_shape(step, carry, inputs)[1]
        skip = lambda c, _: (c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ys_shape))  # noqa: E731
        return jax.lax.cond(inputs[2] >= start_index, step, skip, carry, inputs)

    def step(carry, inputs):
        x, st = carry
        t, k, i = inputs
        k_guide = k_step = None
        if k is not None:
            k_guide, k_step = jax.random.split(k)
        model_output = denoise(scheduler.scale_model_input(st, x, t), t, cond)
        if guidance is not None:
            x_g, model_output = guidance(x, t, model_output, st, k_guide)
            x = x_g.astype(x.dtype)
        out = scheduler.step(st, model_output, t, x, key=k_step)
        x_prev = out.prev_sample.astype(x.dtype)
        if after_step is not None:
            x_prev = after_step(x_prev, i).astype(x.dtype)
        ys = (x_prev, out.pred_original_sample) if return_trajectory else None
        return (x_prev, out.state), ys

    (x, _), trajectory = jax.lax.scan(body, (x, state), (timesteps, keys, jnp.arange(n, dtype=jnp.int32)))
    if return_trajectory:
        return x, trajectory
    return x


def make_sampler(apply_fn: Callable, scheduler: Scheduler, num_inference_steps: int, *,
                 guidance: Optional[Guidance] = None, strength: Optional[float] = None):
    """A jitted `fn(params, x_T, key, cond=None) -> x_0` for `apply_fn(params, x, t, cond)`.

    The scheduler state is built once here (host); `params`, `x_T`, `key` and `cond` are traced,
    so new weights, seeds or prompts reuse the compiled program. With `strength`, x_T must be the
    noisy start of img2img (`img2img_start`)."""
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, strength=strength)

    @jax.jit
    def run(params, x_T, key, cond=None):
        def denoise(x, t, c):
            return apply_fn(params, x, t, c)
        return sample(denoise, scheduler, state, x_T, key, cond, guidance=guidance,
                      scale_x_T=strength is None)

    return run


def img2img_start(scheduler: Scheduler, state: SchedulerState, x0: jax.Array, noise: jax.Array):
    """The noisy sample img2img starts from: `add_noise(x0, noise, t_start)` at the first loop
    timestep of a state made with `set_timesteps(..., strength=s)`; run `sample` on it with
    `scale_x_T=False`."""
    t_start = state.loop_timesteps[0]
    return scheduler.add_noise(state, x0, noise, jnp.broadcast_to(t_start, x0.shape[:1]))


def strength_start(scheduler: Scheduler, state: SchedulerState, init_steps, x0: jax.Array,
                   noise: jax.Array):
    """img2img with a traced strength: `init_steps` = min(int(n · strength), n) (traced int; the
    host computes it from a Python strength exactly as diffusers does). For a state from
    `set_timesteps(state, n)` (no strength) returns `(x_start, start_index, state)`: the image
    latents x0 noised to the first timestep run, the loop index to pass to `sample(...,
    start_index=, scale_x_T=False)`, and the state with its step counter where that step expects
    it. The same images as `set_timesteps(..., strength=)` + `img2img_start`."""
    n = state.num_inference_steps
    begin = (n - jnp.minimum(jnp.asarray(init_steps, jnp.int32), n)) * scheduler.order
    state = state.replace(step_index=jnp.asarray(scheduler._first_step_index(begin), jnp.int32))
    t_start = state.timesteps[jnp.minimum(begin, state.timesteps.shape[0] - 1)]
    x_start = scheduler.add_noise(state, x0, noise, jnp.broadcast_to(t_start, x0.shape[:1]))
    return x_start, begin, state


def rescale_noise_cfg(noise_cfg: jax.Array, noise_pred_text: jax.Array, guidance_rescale):
    """Lin et al. 2023, §3.4 (diffusers' `rescale_noise_cfg`): match the per-sample std of the
    guided prediction to the conditional one, mixed by `guidance_rescale` in [0, 1]."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def cfg(denoise: Denoiser, guidance_scale, guidance_rescale=0.0) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser taking `cond=(cond, uncond)`.

    One batched call on concat([x, x]) with the conditions stacked as diffusers does
    ([uncond, cond] along axis 0 of every leaf of the cond pytrees), then
    `out = out_u + guidance_scale * (out_c - out_u)`, optionally rescaled
    (`guidance_rescale` > 0). `guidance_scale` (and `guidance_rescale`) may be traced arrays:
    changing them does not recompile. A Python 0.0 `guidance_rescale` skips the rescale."""
    skip_rescale = isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0

    def guided(x, t, cond):
        c, u = cond
        both = jax.tree.map(lambda a, b: jnp.concatenate([b, a], axis=0), c, u)
        t2 = t if jnp.ndim(t) == 0 else jnp.concatenate([t, t], axis=0)
        out = denoise(jnp.concatenate([x, x], axis=0), t2, both)
        out_u, out_c = jnp.split(out, 2, axis=0)
        guided_out = out_u + guidance_scale * (out_c - out_u)
        if not skip_rescale:
            guided_out = rescale_noise_cfg(guided_out, out_c, guidance_rescale)
        return guided_out

    return guided

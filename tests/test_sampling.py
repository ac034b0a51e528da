"""The sampling loop, classifier-free guidance, guidance hooks and img2img.

Reference: diffusers' PyTorch schedulers driven by the same deterministic fake model in a Python
loop (the loop a diffusers pipeline runs). Tolerance: 1e-5 relative to the sample's scale
(float32), as for the scheduler parity tests.
"""
from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import helpers
from helpers import TRAJ_SHAPE as SHAPE, assert_close, nchw, nhwc
from jaxdiff.sampling import cfg, img2img_start, make_sampler, rescale_noise_cfg, sample
from jaxdiff.schedulers import create_scheduler

T = 1000


def fake_jax(x, t, cond=None):
    """A deterministic 'denoiser': 0.9 x + 0.1 pattern (1 + t/T) (tests/helpers.py)."""
    return helpers.fake_jax(x, t, T)


def fake_torch(x, t):
    return helpers.fake_torch(x, t, T)


def noise(seed):
    return helpers.x_T(seed)


# ---------------------------------------------------------------------------------------------

def test_sample_runs_the_diffusers_loop():
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(30)
    x = nchw(noise(0)) * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(fake_torch(ref.scale_model_input(x, t), t), t, x).prev_sample

    sched = create_scheduler(dict(ref.config), name="ddim")
    state = sched.set_timesteps(sched.create_state(), 30)
    ours = jax.jit(lambda x: sample(fake_jax, sched, state, x))(jnp.asarray(noise(0)))
    assert ours.shape == SHAPE and ours.dtype == jnp.float32
    assert_close(ours, nhwc(x))


def test_the_loop_compiles_once_and_reuses_the_program():
    traces = []

    def denoise(x, t, cond):
        traces.append(1)
        return fake_jax(x, t) + cond

    sched = create_scheduler("ddpm")
    state = sched.set_timesteps(sched.create_state(), 50)
    run = jax.jit(lambda x, key, cond: sample(denoise, sched, state, x, key, cond))
    a = run(jnp.asarray(noise(0)), jax.random.key(0), 0.0)
    assert len(traces) == 1, "the step body must be traced once (one scan, no per-step retrace)"
    b = run(jnp.asarray(noise(1)), jax.random.key(1), 0.5)
    c = run(jnp.asarray(noise(0)), jax.random.key(0), 0.0)
    assert len(traces) == 1 and run._cache_size() == 1
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a, b)


def test_stochastic_sampling_depends_on_the_key_only():
    sched = create_scheduler("ddim", eta=1.0)
    state = sched.set_timesteps(sched.create_state(), 10)
    run = jax.jit(lambda x, key: sample(fake_jax, sched, state, x, key))
    x = jnp.asarray(noise(0))
    np.testing.assert_array_equal(run(x, jax.random.key(3)), run(x, jax.random.key(3)))
    assert not np.allclose(run(x, jax.random.key(3)), run(x, jax.random.key(4)))


def test_return_trajectory_gives_every_step():
    sched = create_scheduler("ddim")
    state = sched.set_timesteps(sched.create_state(), 7)
    x0, (xs, x0s) = sample(fake_jax, sched, state, jnp.asarray(noise(0)), return_trajectory=True)
    assert xs.shape == (7,) + SHAPE and x0s.shape == (7,) + SHAPE
    np.testing.assert_array_equal(xs[-1], x0)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def _conditioned(calls):
    def denoise(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["scale"][:, None, None, None] + cond["shift"][:, None, None, None]
    return denoise


def test_cfg_is_one_batched_call_with_the_guidance_formula():
    calls = []
    x = jnp.asarray(noise(0))
    c = {"scale": jnp.array([1.0, 2.0]), "shift": jnp.array([0.5, -0.5])}
    u = {"scale": jnp.array([0.3, 0.3]), "shift": jnp.array([0.0, 0.0])}
    out = cfg(_conditioned(calls), 7.5)(x, jnp.int32(500), (c, u))
    assert calls == [2 * SHAPE[0]]
    eps_c = x * c["scale"][:, None, None, None] + c["shift"][:, None, None, None]
    eps_u = x * u["scale"][:, None, None, None] + u["shift"][:, None, None, None]
    np.testing.assert_allclose(out, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)


def test_cfg_guidance_scale_is_traced_no_recompile():
    calls = []
    c = {"scale": jnp.array([1.0, 2.0]), "shift": jnp.array([0.5, -0.5])}
    u = {"scale": jnp.array([0.3, 0.3]), "shift": jnp.array([0.0, 0.0])}
    sched = create_scheduler("ddim", clip_sample=False)
    state = sched.set_timesteps(sched.create_state(), 5)

    @jax.jit
    def run(x, w):
        return sample(cfg(_conditioned(calls), w), sched, state, x, None, (c, u))

    x = jnp.asarray(noise(0))
    a, b = run(x, 1.0), run(x, 7.5)
    assert len(calls) == 1 and run._cache_size() == 1
    assert not np.allclose(a, b)


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref
    guided, text = noise(1) * 3, noise(2)
    expected = nhwc(ref(nchw(guided), nchw(text), guidance_rescale=0.7))
    np.testing.assert_allclose(rescale_noise_cfg(jnp.asarray(guided), jnp.asarray(text), 0.7), expected,
                               rtol=1e-5, atol=1e-6)
    calls = []
    c = {"scale": jnp.array([1.0, 2.0]), "shift": jnp.array([0.5, -0.5])}
    u = {"scale": jnp.array([0.3, 0.3]), "shift": jnp.array([0.0, 0.0])}
    x = jnp.asarray(noise(0))
    plain = cfg(_conditioned(calls), 5.0)(x, 10, (c, u))
    eps_c = x * c["scale"][:, None, None, None] + c["shift"][:, None, None, None]
    rescaled = cfg(_conditioned(calls), 5.0, guidance_rescale=jnp.float32(0.7))(x, 10, (c, u))
    np.testing.assert_allclose(rescaled, rescale_noise_cfg(plain, eps_c, 0.7), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Guidance hook: the course's colour guidance (unit 2) as jax.grad through the x0 formula
# ---------------------------------------------------------------------------------------------

TARGET = (0.1, 0.9, 0.5)


def test_guidance_hook_reproduces_the_course_colour_guidance_loop():
    scale = 40.0
    ref = diffusers.DDIMScheduler(clip_sample=False)
    ref.set_timesteps(20)
    target = torch.tensor(TARGET)[None, :, None, None] * 2 - 1
    x = nchw(noise(0))
    for t in ref.timesteps:
        noise_pred = fake_torch(x, t)
        x = x.detach().requires_grad_()
        x0 = ref.step(noise_pred, t, x).pred_original_sample
        loss = (x0 - target).abs().mean() * scale
        cond_grad = -torch.autograd.grad(loss, x)[0]
        x = x.detach() + cond_grad
        x = ref.step(noise_pred, t, x).prev_sample

    sched = create_scheduler("ddim", clip_sample=False)
    state = sched.set_timesteps(sched.create_state(), 20)
    target_j = jnp.asarray(TARGET) * 2 - 1

    def colour_guidance(x, t, model_output, st, key):
        def loss(x):
            x0 = sched.step(st, model_output, t, x).pred_original_sample
            return jnp.abs(x0 - target_j).mean() * scale
        return x - jax.grad(loss)(x), model_output

    ours = jax.jit(lambda x: sample(fake_jax, sched, state, x, guidance=colour_guidance))(jnp.asarray(noise(0)))
    assert_close(ours, nhwc(x))


# ---------------------------------------------------------------------------------------------
# img2img and make_sampler
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_follows_diffusers_get_timesteps_and_add_noise(strength):
    steps = 25
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = ref.timesteps[t_start:]
    image, eps = noise(5), noise(6)
    x = ref.add_noise(nchw(image), nchw(eps), timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        x = ref.step(fake_torch(x, t), t, x).prev_sample

    sched = create_scheduler(dict(ref.config), name="ddim")
    state = sched.set_timesteps(sched.create_state(), steps, strength=strength)
    np.testing.assert_array_equal(state.loop_timesteps, timesteps.numpy())
    start = img2img_start(sched, state, jnp.asarray(image), jnp.asarray(eps))
    ours = jax.jit(lambda x: sample(fake_jax, sched, state, x, scale_x_T=False))(start)
    assert_close(ours, nhwc(x))


def test_make_sampler_traces_params_keys_and_cond():
    def apply_fn(params, x, t, cond):
        return params["a"] * x + params["b"] * (jnp.asarray(t, jnp.float32) / T) + cond

    run = make_sampler(apply_fn, create_scheduler("ddpm"), 20)
    x = jnp.asarray(noise(0))
    p1 = {"a": jnp.float32(0.9), "b": jnp.float32(0.1)}
    p2 = {"a": jnp.float32(0.8), "b": jnp.float32(0.2)}
    a = run(p1, x, jax.random.key(0), 0.0)
    b = run(p2, x, jax.random.key(0), 0.0)
    run(p1, x, jax.random.key(1), 0.3)
    assert run._cache_size() == 1
    assert a.shape == SHAPE and not np.allclose(a, b)

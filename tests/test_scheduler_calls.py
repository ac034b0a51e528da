"""The scheduler API as a notebook uses it: a plain Python loop, diffusers habits, wrong calls.

Each test is one way a new user porting a diffusers loop could go wrong (or slow), and what
jaxdiff does instead: run compiled, refuse with one clear JaxdiffError, or accept what is safe.
Timing is not asserted here (benchmarks/scheduler_loop.py --python-loop measures it); what is
asserted is that the compiled program is reused, i.e. no step after the first re-traces.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TRAJ_SHAPE as SHAPE, assert_close, fake_jax, x_T
from jaxdiff.errors import JaxdiffError
from jaxdiff.sampling import sample
from jaxdiff.schedulers import SCHEDULER_NAMES, create_scheduler, scheduler_class
from jaxdiff.schedulers.config import _REGISTRY

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def counting(name, traces, **kwargs):
    """`name`'s scheduler as a subclass whose `step` records each time it is traced."""
    cls = scheduler_class(name)

    def step(self, state, model_output, t, x, *, key=None, noise=None):
        traces.append(1)
        return cls.step(self, state, model_output, t, x, key=key, noise=noise)

    sub = type(f"Counting{cls.__name__}", (cls,), {"step": step})
    return sub(**create_scheduler(name, **kwargs).config)


def python_loop(sched, state, x, key):
    """The loop of a diffusers notebook, step by step outside jit (keys split as `sample` does)."""
    x = x * sched.init_noise_sigma(state)
    keys = jax.random.split(key, state.loop_timesteps.shape[0])
    for t, k in zip(state.loop_timesteps, keys):
        out = fake_jax(sched.scale_model_input(state, x, t), t)
        step = sched.step(state, out, t, x, key=jax.random.split(k)[1])
        x, state = step.prev_sample, step.state
    return x


# ---------------------------------------------------------------------------------------------
# Compiled on first use
# ---------------------------------------------------------------------------------------------

def test_scheduler_names_come_from_the_registry():
    assert SCHEDULER_NAMES == tuple(_REGISTRY) == ("ddpm", "ddim", "pndm", "euler", "euler_a", "dpm++", "lms")
    assert all(scheduler_class(n).name == n for n in SCHEDULER_NAMES)


@pytest.mark.parametrize("name,kwargs", [("ddim", {}), ("pndm", {}), ("pndm", {"skip_prk_steps": True}),
                                         ("dpm++", {}), ("euler_a", {}), ("lms", {}), ("ddpm", {})])
def test_a_python_loop_traces_the_step_once_and_matches_the_scan(name, kwargs):
    traces = []
    sched = counting(name, traces, **kwargs)
    state = sched.set_timesteps(sched.create_state(), 12, shape=SHAPE)
    key = jax.random.key(0)
    x = python_loop(sched, state, jnp.asarray(x_T()), key)
    assert len(traces) == 1, f"the step was traced {len(traces)} times for 12 steps"
    assert type(sched).step._compiled._cache_size() == 1

    def denoise(x, t, cond):
        return fake_jax(x, t)

    # The same steps, keys and noise in one jitted scan: the same result up to XLA's fusion.
    scanned = jax.jit(lambda x, k: sample(denoise, sched, state, x, k))(jnp.asarray(x_T()), key)
    assert_close(x, scanned, 1e-6, what=f"{name} python loop vs scan")


def test_add_noise_and_scale_model_input_are_compiled_and_reused():
    sched = create_scheduler("euler")
    state = sched.set_timesteps(sched.create_state(), 10)
    x0, noise = jnp.asarray(x_T(1)), jnp.asarray(x_T(2))
    add_noise = type(sched).add_noise._compiled
    scale = type(sched).scale_model_input._compiled
    before = add_noise._cache_size(), scale._cache_size()
    for t in state.timesteps[:4]:
        sched.add_noise(state, x0, noise, t)
        sched.scale_model_input(state, x0, t)
    assert (add_noise._cache_size(), scale._cache_size()) == (before[0] + 1, before[1] + 1)


def test_inside_a_users_jit_the_step_is_traced_inline():
    sched = create_scheduler("dpm++")
    state = sched.set_timesteps(sched.create_state(), 10, shape=SHAPE)
    compiled = type(sched).step._compiled
    before = compiled._cache_size()
    x = jnp.asarray(x_T())
    jitted = jax.jit(lambda st, x: sched.step(st, fake_jax(x, 999), st.timesteps[0], x).prev_sample)(state, x)
    assert compiled._cache_size() == before  # the outer jit traced step itself, no inner program
    eager = sched.step(state, fake_jax(x, 999), state.timesteps[0], x).prev_sample
    assert_close(jitted, eager, 1e-6)


# ---------------------------------------------------------------------------------------------
# Randomness is keyword-only; diffusers' step options are config fields
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def ddim_eta():
    sched = create_scheduler("ddim", eta=0.5)
    state = sched.set_timesteps(sched.create_state(), 10)
    x = jnp.asarray(x_T())
    return sched, state, x


def test_a_positional_eta_is_a_clear_error(ddim_eta):
    sched, state, x = ddim_eta
    with pytest.raises(JaxdiffError, match="too many positional arguments.*keyword-only.*config fields"):
        sched.step(state, x, state.timesteps[0], x, 0.5)  # diffusers: step(out, t, x, eta)


@pytest.mark.parametrize("kwarg", ["eta", "generator", "use_clipped_model_output"])
def test_diffusers_step_keywords_point_to_the_config(ddim_eta, kwarg):
    sched, state, x = ddim_eta
    with pytest.raises(JaxdiffError, match=f"unexpected keyword argument '{kwarg}'.*create_scheduler"):
        sched.step(state, x, state.timesteps[0], x, **{kwarg: 0.5})


@pytest.mark.parametrize("bad", [0.5, 7, np.zeros(3, np.uint32)])
def test_a_key_that_is_not_a_prng_key_is_named(ddim_eta, bad):
    sched, state, x = ddim_eta
    with pytest.raises(JaxdiffError, match="key must be a PRNG key"):
        sched.step(state, x, state.timesteps[0], x, key=bad)


def test_a_legacy_uint32_key_still_works(ddim_eta):
    sched, state, x = ddim_eta
    out = sched.step(state, x, state.timesteps[0], x, key=jax.random.PRNGKey(0))
    assert out.prev_sample.shape == SHAPE


# ---------------------------------------------------------------------------------------------
# DDPM: the last step adds no noise and needs no key; the others must have one
# ---------------------------------------------------------------------------------------------

def test_ddpm_last_step_needs_no_key_and_equals_the_keyed_step():
    sched = create_scheduler("ddpm")
    state = sched.set_timesteps(sched.create_state(), 10)
    x = jnp.asarray(x_T())
    t = state.timesteps[-1]
    assert int(t) == 0
    keyless = sched.step(state, fake_jax(x, t), t, x)
    keyed = sched.step(state, fake_jax(x, t), t, x, key=jax.random.key(3))
    np.testing.assert_array_equal(keyless.prev_sample, keyed.prev_sample)
    np.testing.assert_array_equal(sched.step(state, fake_jax(x, 0), 0, x).prev_sample, keyless.prev_sample)


def test_ddpm_noisy_step_without_key_is_a_clear_error_eagerly_and_under_jit():
    sched = create_scheduler("ddpm")
    state = sched.set_timesteps(sched.create_state(), 10)
    x = jnp.asarray(x_T())
    with pytest.raises(JaxdiffError, match="DDPM step at t > 0.*key="):
        sched.step(state, x, state.timesteps[0], x)
    with pytest.raises(JaxdiffError, match="DDPM step at t > 0.*key="):
        sched.step(state, x, jnp.asarray([0, 100]), x)  # one sample still gets noise
    with pytest.raises(JaxdiffError, match="traced t.*key="):
        jax.jit(lambda t: sched.step(state, x, t, x).prev_sample)(jnp.int32(0))


# ---------------------------------------------------------------------------------------------
# img2img: slicing timesteps by hand (diffusers' `timesteps[t_start:]`) is refused
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm", "euler", "euler_a", "dpm++", "lms"])
def test_a_state_with_hand_sliced_timesteps_is_refused(name):
    sched = create_scheduler(name, **SD)
    state = sched.set_timesteps(sched.create_state(), 20)
    sliced = state.replace(timesteps=state.timesteps[9:])
    x = jnp.asarray(x_T())
    t = sliced.timesteps[0]
    with pytest.raises(JaxdiffError, match="changed by hand.*strength="):
        sched.step(sliced, x, t, x, key=jax.random.key(0))
    with pytest.raises(JaxdiffError, match="changed by hand"):
        jax.jit(lambda x: sched.step(sliced, x, t, x, key=jax.random.key(0)).prev_sample)(x)
    with pytest.raises(JaxdiffError, match="changed by hand"):
        sample(lambda x, t, c: fake_jax(x, t), sched, sliced, x, jax.random.key(0))


@pytest.mark.parametrize("name", ["pndm", "euler", "euler_a", "dpm++", "lms"])
def test_looping_over_a_sliced_list_with_a_full_state_is_refused(name):
    """The state counts steps; starting the loop at timesteps[t_start] would pair the model's
    t with the noise level of step 0. diffusers calls set_begin_index here; jaxdiff refuses."""
    sched = create_scheduler(name, **SD)
    state = sched.set_timesteps(sched.create_state(), 20)
    x = jnp.asarray(x_T())
    t = state.timesteps[9]
    with pytest.raises(JaxdiffError, match="next timestep is timesteps\\[0\\].*strength="):
        sched.step(state, fake_jax(x, t), t, x, key=jax.random.key(0))
    # The supported way: strength, and the state's own loop timesteps.
    img2img = sched.set_timesteps(sched.create_state(), 20, strength=0.55)
    t0 = img2img.loop_timesteps[0]
    out = sched.step(img2img, fake_jax(x, t0), t0, x, key=jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(out.prev_sample)))

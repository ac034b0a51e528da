"""PNDM, Euler, Euler ancestral, DPM-Solver++ and LMS: whole trajectories against diffusers.

Same protocol as tests/test_schedulers.py (the runners live in tests/helpers.py): a
deterministic fake model drives diffusers' PyTorch scheduler and ours (one jitted `lax.scan`
carrying the multistep state), diffusers' noise draws are replayed into ours through `noise=`,
and every x_{t-1} (and x0 where diffusers returns it) must agree to 1e-5 relative to the
trajectory's scale (LMS included: diffusers integrates its coefficients with
`scipy.integrate.quad` on float32 polynomials, ours exactly in float64; the trajectories still
agree to ~1e-7).
"""
from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (TRAJ_SHAPE as SHAPE, assert_trajectories, jax_trajectory, nchw, nhwc,
                     torch_trajectory, vp_weight, x_T)
from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import create_scheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def run_both(name, kwargs, steps, *, step_kwargs=None, learned=None, rtol=1e-5, x0_weight="vp"):
    ours = create_scheduler(name, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("s_churn", "s_tmin", "s_tmax", "s_noise")}
    ref = getattr(diffusers, ours.diffusers_class)(**ref_kwargs)
    ref.set_timesteps(steps)
    state = ours.set_timesteps(ours.create_state(), steps)
    np.testing.assert_allclose(np.asarray(state.timesteps, np.float64), ref.timesteps.numpy().astype(np.float64),
                               rtol=1e-6, err_msg="timesteps")
    if state.sigmas.shape[0]:
        np.testing.assert_allclose(state.sigmas, ref.sigmas.numpy(), rtol=2e-6, err_msg="sigmas")
    sigma0 = float(ref.init_noise_sigma)
    np.testing.assert_allclose(float(ours.init_noise_sigma(state)), sigma0, rtol=1e-6)
    start = x_T() * np.float32(sigma0)
    xs_ref, x0_ref, noises = torch_trajectory(ref, start, learned=learned, step_kwargs=step_kwargs)
    xs, x0s = jax_trajectory(ours, state, start, noises, learned=learned)
    weight = vp_weight(state) if x0_weight == "vp" else None
    assert_trajectories(xs, xs_ref, x0s, x0_ref, weight, rtol=rtol)
    return state


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,steps", [
    pytest.param(dict(SD, skip_prk_steps=True, steps_offset=1), 50, id="sd1-skip_prk"),
    pytest.param({}, 50, id="defaults-prk"),
    pytest.param(dict(prediction_type="v_prediction", set_alpha_to_one=True), 20, id="prk-v-alpha_one"),
    pytest.param(dict(SD, skip_prk_steps=True, timestep_spacing="trailing"), 25, id="skip_prk-trailing"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), 30, id="prk-cosine-linspace"),
])
def test_pndm_trajectory_matches_diffusers(kwargs, steps):
    state = run_both("pndm", kwargs, steps)
    expected_len = steps + 1 if kwargs.get("skip_prk_steps") else steps + 9
    assert state.timesteps.shape == (expected_len,)


@pytest.mark.parametrize("kwargs,steps", [
    pytest.param({}, 30, id="defaults"),
    pytest.param(dict(SD, timestep_spacing="leading", steps_offset=1), 50, id="sd1-leading"),
    pytest.param(dict(timestep_spacing="trailing", prediction_type="v_prediction"), 25, id="trailing-v"),
    pytest.param(dict(SD, use_karras_sigmas=True), 30, id="karras"),
    pytest.param(dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min"),
                 20, id="karras-range-sigma_min"),
    pytest.param(dict(use_exponential_sigmas=True, prediction_type="sample"), 20, id="exponential-sample"),
    pytest.param(dict(SD, prediction_type="v_prediction", timestep_type="continuous"), 20, id="continuous-v"),
    pytest.param(dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                      timestep_spacing="trailing"), 20, id="zero_snr-v"),
    pytest.param(dict(s_churn=0.5, s_tmin=0.3, s_tmax=5.0, s_noise=1.003), 25, id="churn"),
])
def test_euler_trajectory_matches_diffusers(kwargs, steps):
    churn = {k: kwargs[k] for k in ("s_churn", "s_tmin", "s_tmax", "s_noise") if k in kwargs}
    run_both("euler", kwargs, steps, step_kwargs=churn, x0_weight=None)


@pytest.mark.parametrize("kwargs,steps", [
    pytest.param({}, 30, id="defaults"),
    pytest.param(dict(SD, timestep_spacing="leading", steps_offset=1), 50, id="sd1-leading"),
    pytest.param(dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
                 20, id="trailing-v-zero_snr"),
])
def test_euler_ancestral_trajectory_matches_diffusers(kwargs, steps):
    run_both("euler_a", kwargs, steps, x0_weight=None)


@pytest.mark.parametrize("kwargs,steps", [
    pytest.param({}, 20, id="defaults-2M"),
    pytest.param(dict(SD, use_karras_sigmas=True), 25, id="karras"),
    pytest.param(dict(solver_order=3, solver_type="heun", lower_order_final=False), 20, id="3-heun"),
    pytest.param(dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 10, id="1-leading"),
    pytest.param(dict(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"), 15, id="sde-trailing"),
    pytest.param(dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun",
                      final_sigmas_type="sigma_min"), 12, id="sde-3-heun-sigma_min"),
    pytest.param(dict(prediction_type="v_prediction", euler_at_final=True, rescale_betas_zero_snr=True),
                 10, id="v-euler_at_final-zero_snr"),
    pytest.param(dict(prediction_type="sample", thresholding=True, sample_max_value=1.5), 20, id="sample-threshold"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading"), 20, id="cosine-leading"),
    pytest.param(dict(use_exponential_sigmas=True), 20, id="exponential"),
    pytest.param(dict(use_lu_lambdas=True), 20, id="lu_lambdas"),
    pytest.param(dict(lambda_min_clipped=-5.1, variance_type="learned_range"), 20, id="clipped-learned"),
])
def test_dpm_solver_trajectory_matches_diffusers(kwargs, steps):
    learned = "learned_range" if kwargs.get("variance_type") else None
    run_both("dpm++", kwargs, steps, learned=learned, x0_weight=None)


@pytest.mark.parametrize("kwargs,steps", [
    pytest.param({}, 30, id="defaults"),
    pytest.param(dict(SD, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 25,
                 id="sd-leading-v"),
    pytest.param(dict(SD, use_karras_sigmas=True), 20, id="karras"),
])
def test_lms_trajectory_matches_diffusers(kwargs, steps):
    run_both("lms", kwargs, steps, x0_weight=None)


# ---------------------------------------------------------------------------------------------
# img2img: diffusers' get_timesteps + set_begin_index + add_noise, for every scheduler family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pndm", "euler", "euler_a", "dpm++", "lms", "ddim"])
def test_img2img_start_and_trajectory_match_diffusers(name):
    steps, strength = 20, 0.55
    kwargs = dict(SD, steps_offset=1)
    if name == "pndm":
        kwargs["skip_prk_steps"] = True
    ours = create_scheduler(name, **kwargs)
    ref = getattr(diffusers, ours.diffusers_class)(**kwargs)
    ref.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    image, noise = x_T(7), x_T(8)
    start_ref = ref.add_noise(nchw(image), nchw(noise), timesteps[:1].repeat(SHAPE[0]))

    state = ours.set_timesteps(ours.create_state(), steps, strength=strength)
    np.testing.assert_array_equal(np.asarray(state.loop_timesteps), timesteps.numpy().astype(np.float32)
                                  if state.timesteps.dtype == jnp.float32 else timesteps.numpy())
    t0 = jnp.broadcast_to(state.loop_timesteps[0], (SHAPE[0],))
    start = ours.add_noise(state, jnp.asarray(image), jnp.asarray(noise), t0)
    np.testing.assert_allclose(start, nhwc(start_ref), rtol=1e-6, atol=1e-6)

    xs_ref, _, noises = torch_trajectory(ref, np.asarray(start), timesteps=timesteps)
    xs, _ = jax_trajectory(ours, state, np.asarray(start), noises)
    assert_trajectories(xs, xs_ref, None, None)


# ---------------------------------------------------------------------------------------------
# Config, history and jit behaviour specific to multistep schedulers
# ---------------------------------------------------------------------------------------------

def test_stable_diffusion_scheduler_configs_switch_between_samplers():
    sd_v1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
    pndm = create_scheduler(sd_v1)
    assert (pndm.name, pndm.skip_prk_steps, pndm.steps_offset) == ("pndm", True, 1)
    for name in ("euler", "euler_a", "dpm++", "lms", "ddim"):
        other = create_scheduler(sd_v1, name=name)
        ref = getattr(diffusers, other.diffusers_class).from_config(diffusers.PNDMScheduler.from_config(sd_v1).config)
        for key, value in other.config.items():
            if key in ref.config:
                assert ref.config[key] == value, (name, key, value, ref.config[key])
    sd2 = dict(sd_v1, _class_name="DDIMScheduler", prediction_type="v_prediction", clip_sample=False)
    assert create_scheduler(sd2, name="dpm++").prediction_type == "v_prediction"
    unipc = {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": True,
             "disable_corrector": [], "solver_order": 2}
    assert create_scheduler(unipc, name="dpm++").solver_type == "midpoint"


@pytest.mark.parametrize("name,kwargs,fragment", [
    ("dpm++", dict(algorithm_type="dpmsolver"), "algorithm_type"),
    ("dpm++", dict(solver_order=4), "solver_order"),
    ("dpm++", dict(use_flow_sigmas=True), "not supported"),
    ("euler", dict(use_beta_sigmas=True), "not supported"),
    ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ("pndm", dict(prediction_type="sample"), "prediction_type"),
    ("lms", dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
])
def test_unsupported_multistep_options_are_refused(name, kwargs, fragment):
    with pytest.raises(JaxdiffError, match=fragment):
        create_scheduler(name, **kwargs)


@pytest.mark.parametrize("name", ["pndm", "dpm++", "lms"])
def test_history_is_allocated_by_shape_and_checked(name):
    sched = create_scheduler(name)
    state = sched.set_timesteps(sched.create_state(), 10, shape=SHAPE)
    leaves = jax.tree.leaves(state.history)
    assert any(leaf.shape[-len(SHAPE):] == SHAPE for leaf in leaves)
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(JaxdiffError, match="history was allocated"):
        sched.step(state, x, state.timesteps[0], x)
    # Without `shape`, the first eager step allocates the history itself.
    fresh = sched.set_timesteps(sched.create_state(), 10)
    out = sched.step(fresh, x, fresh.timesteps[0], x)
    assert out.state.history[sched._history_buffer].shape[1:] == x.shape


@pytest.mark.parametrize("name", ["pndm", "euler", "euler_a", "dpm++", "lms"])
def test_step_is_one_compiled_program_for_every_step(name):
    """Stepping a Python loop through one jitted step function: the carried state keeps its
    structure, so the step compiles once for all 12 steps (no per-step retrace)."""
    sched = create_scheduler(name, **({"skip_prk_steps": False} if name == "pndm" else {}))
    state = sched.set_timesteps(sched.create_state(), 12, shape=SHAPE)
    step = jax.jit(lambda st, out, t, x, k: sched.step(st, out, t, x, key=k))
    x = jnp.asarray(x_T())
    key = jax.random.key(0)
    for i, t in enumerate(state.loop_timesteps):
        out = step(state, 0.9 * x, t, x, jax.random.fold_in(key, i))
        x, state = out.prev_sample, out.state
    assert step._cache_size() == 1
    assert np.all(np.isfinite(np.asarray(x)))

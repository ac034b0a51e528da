"""Schedulers: config handling, the shared arithmetic, and DDPM/DDIM parity with diffusers.

Parity: a deterministic fake model (a fixed function of x and t) drives whole trajectories in
diffusers' PyTorch scheduler and in ours (one jitted `lax.scan`), with diffusers' own noise
draws injected through `noise=`. Every x_{t-1} and x0 prediction of every step must agree to
1e-5 relative to the trajectory's scale (float32; the schedules are bit-identical to diffusers',
tests/test_scheduler_betas.py; x0 is compared in the units of x_t, see
`assert_trajectories`). The fake model and both runners live in tests/helpers.py.
"""
from __future__ import annotations

import json
import re

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import (TRAJ_SHAPE, assert_close, assert_trajectories, fake_jax, jax_trajectory, nchw,
                     nhwc, torch_trajectory, vp_weight, x_T)
from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import (SCHEDULER_NAMES, DDIMScheduler, common,
                                create_scheduler)

SHAPE = TRAJ_SHAPE


# ---------------------------------------------------------------------------------------------
# DDPM and DDIM trajectories
# ---------------------------------------------------------------------------------------------

TRAINED = tuple(np.linspace(1e-4, 0.03, 1000) ** 1.1)

DDPM_CASES = [
    pytest.param({}, None, id="defaults-1000"),
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="v_prediction", clip_sample=False), None, id="scaled_linear-v-noclip"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                      clip_sample_range=0.5), None, id="cosine-sample-clip0.5"),
    pytest.param(dict(trained_betas=TRAINED, variance_type="fixed_large"), None, id="trained-fixed_large"),
    pytest.param(dict(variance_type="fixed_small_log", thresholding=True, sample_max_value=1.5),
                 None, id="small_log-thresholding"),
    pytest.param(dict(variance_type="learned_range"), None, id="learned_range"),
    pytest.param(dict(variance_type="learned", clip_sample=False, rescale_betas_zero_snr=True,
                      prediction_type="v_prediction"), None, id="learned-zero_snr"),
    pytest.param(dict(beta_schedule="sigmoid"), None, id="sigmoid"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1), 50, id="leading-offset1-50"),
    pytest.param(dict(timestep_spacing="trailing", clip_sample=False), 37, id="trailing-37"),
    pytest.param(dict(timestep_spacing="linspace"), 20, id="linspace-20"),
]


@pytest.mark.parametrize("kwargs,steps", DDPM_CASES)
def test_ddpm_trajectory_matches_diffusers(kwargs, steps):
    ref = diffusers.DDPMScheduler(**{k: (list(v) if k == "trained_betas" else v) for k, v in kwargs.items()})
    ours = create_scheduler("ddpm", **kwargs)
    state = ours.create_state()
    if steps:
        ref.set_timesteps(steps)
        state = ours.set_timesteps(state, steps)
    assert np.array_equal(state.timesteps, ref.timesteps.numpy())
    learned = kwargs.get("variance_type") if kwargs.get("variance_type", "").startswith("learned") else None
    xs_ref, x0_ref, noises = torch_trajectory(ref, x_T(), learned=learned)
    xs, x0s = jax_trajectory(ours, state, x_T(), noises, learned=learned)
    assert_trajectories(xs, xs_ref, x0s, x0_ref, vp_weight(state))


DDIM_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1), id="sd-like"),
    pytest.param(dict(timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False,
                      rescale_betas_zero_snr=True), id="trailing-v-zero_snr"),
    pytest.param(dict(timestep_spacing="linspace", prediction_type="sample", clip_sample_range=0.7),
                 id="linspace-sample-clip0.7"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", thresholding=True, sample_max_value=2.0),
                 id="cosine-thresholding"),
    pytest.param(dict(trained_betas=TRAINED, clip_sample=False), id="trained"),
    pytest.param(dict(eta=0.5), id="eta0.5"),
    pytest.param(dict(eta=1.0, use_clipped_model_output=True, prediction_type="v_prediction"),
                 id="eta1-clipped_output"),
]


@pytest.mark.parametrize("kwargs", DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(kwargs):
    kwargs = dict(kwargs)
    step_kwargs = {"use_clipped_model_output": kwargs["use_clipped_model_output"]} \
        if "use_clipped_model_output" in kwargs else {}
    eta = kwargs.get("eta", 0.0)
    ref_kwargs = {k: (list(v) if k == "trained_betas" else v) for k, v in kwargs.items()
                  if k not in ("eta", "use_clipped_model_output")}
    ref = diffusers.DDIMScheduler(**ref_kwargs)
    ref.set_timesteps(50)
    ours = create_scheduler("ddim", **kwargs)
    state = ours.set_timesteps(ours.create_state(), 50)
    assert np.array_equal(state.timesteps, ref.timesteps.numpy())
    xs_ref, x0_ref, noises = torch_trajectory(ref, x_T(), eta=eta, step_kwargs=step_kwargs)
    xs, x0s = jax_trajectory(ours, state, x_T(), noises if eta > 0 else None)
    assert_trajectories(xs, xs_ref, x0s, x0_ref, vp_weight(state))


def test_zero_terminal_snr_rescale_matches_diffusers():
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    state = create_scheduler("ddim", beta_schedule="scaled_linear", rescale_betas_zero_snr=True).create_state()
    # torch's vectorised sqrt differs from the correctly rounded one by 1 ulp; the rescale's
    # ratios of near-equal numbers make that a few ulp of the alphas (3e-6 where ᾱ -> 0).
    np.testing.assert_allclose(1 - state.betas, 1 - ref.betas.numpy(), rtol=0, atol=4e-6)
    np.testing.assert_allclose(state.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert float(state.alphas_cumprod[-1]) == 0.0


# ---------------------------------------------------------------------------------------------
# Forward process, training targets, conversions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_velocity_and_training_target(prediction_type):
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    ours = create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    state = ours.create_state()
    x0, noise = x_T(1), x_T(2)
    t = np.array([0, 999], np.int64)
    xt = ours.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert_close(np.asarray(xt), nhwc(ref.add_noise(nchw(x0), nchw(noise), torch.from_numpy(t))), what="add_noise")
    v = ours.get_velocity(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert_close(np.asarray(v), nhwc(ref.get_velocity(nchw(x0), nchw(noise), torch.from_numpy(t))), what="v")
    target = np.asarray(ours.training_target(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    expected = {"epsilon": noise, "sample": x0, "v_prediction": np.asarray(v)}[prediction_type]
    np.testing.assert_allclose(target, expected, rtol=0, atol=0)


def test_conversions_between_eps_x0_and_v_are_consistent():
    x0, eps = jnp.asarray(x_T(3)), jnp.asarray(x_T(4))
    a = jnp.asarray([0.9, 0.05], jnp.float32)  # (B,) ᾱ per sample
    xt = common.add_noise_vp(x0, eps, a)
    v = common.v_from(x0, eps, a)
    for pred_type, out in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        x0_hat, eps_hat = common.to_x0_and_eps(pred_type, xt, out, a)
        np.testing.assert_allclose(x0_hat, x0, atol=3e-5, err_msg=pred_type)
        np.testing.assert_allclose(eps_hat, eps, atol=3e-5, err_msg=pred_type)
        np.testing.assert_allclose(common.from_x0_and_eps(pred_type, x0, eps, a), out, atol=0)
    np.testing.assert_allclose(common.pred_x0_from_eps(xt, eps, a), x0, atol=3e-5)
    np.testing.assert_allclose(common.pred_eps_from_x0(xt, x0, a), eps, atol=3e-5)
    np.testing.assert_allclose(common.pred_x0_from_v(xt, v, a), x0, atol=3e-5)
    np.testing.assert_allclose(common.pred_eps_from_v(xt, v, a), eps, atol=3e-5)


def test_dynamic_threshold_matches_diffusers():
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    x = x_T(5) * 2
    expected = nhwc(ref._threshold_sample(nchw(x)))
    np.testing.assert_allclose(common.dynamic_threshold(jnp.asarray(x), 0.9, 1.7), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config handling
# ---------------------------------------------------------------------------------------------

def test_scheduler_is_a_hashable_frozen_config():
    a = create_scheduler("ddim", beta_schedule="scaled_linear")
    b = DDIMScheduler(beta_schedule="scaled_linear")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(Exception):
        a.eta = 1.0  # type: ignore[misc]
    assert hash(create_scheduler("ddpm", trained_betas=TRAINED)) is not None


def test_defaults_are_diffusers_defaults():
    for name in SCHEDULER_NAMES:
        ours = create_scheduler(name)
        ref_cls = getattr(diffusers, ours.diffusers_class)
        ref_config = dict(ref_cls().config)
        for key, value in ours.config.items():
            if key in ref_config:
                assert ref_config[key] == value, f"{name}.{key}: ours {value!r}, diffusers {ref_config[key]!r}"


def _save_config(tmp_path, ref_scheduler, sub=""):
    folder = tmp_path / sub if sub else tmp_path
    ref_scheduler.save_pretrained(folder)
    return folder


def test_create_from_saved_diffusers_config_file_folder_and_pipeline(tmp_path):
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    folder = _save_config(tmp_path, ref, "pipe/scheduler")
    expected = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    assert create_scheduler(folder / "scheduler_config.json") == expected
    assert create_scheduler(folder) == expected
    assert create_scheduler(tmp_path / "pipe") == expected
    assert create_scheduler(dict(ref.config), name="ddim") == expected  # a live .config has no _class_name


def test_flax_class_names_and_switching_sampler_keep_the_schedule():
    sd_v1 = {"_class_name": "FlaxPNDMScheduler", "_diffusers_version": "0.7.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None, "clip_sample": False}
    ddim = create_scheduler(sd_v1, name="ddim")
    assert ddim == DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    ddpm = create_scheduler(sd_v1, name="ddpm", prediction_type="v_prediction")
    assert (ddpm.beta_schedule, ddpm.prediction_type, ddpm.steps_offset) == ("scaled_linear", "v_prediction", 1)


def test_old_predict_epsilon_key_is_understood():
    cfg = {"_class_name": "DDPMScheduler", "predict_epsilon": False, "tensor_format": "pt"}
    assert create_scheduler(cfg).prediction_type == "sample"


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(prediction_type="eps"), "v_prediction"),
    (dict(timestep_spacing="uniform"), "trailing"),
    (dict(variance_type="fixed_large_log"), "fixed_small"),
    (dict(beta_shedule="linear"), "beta_schedule"),
    (dict(skip_prk_steps=True), "unknown ddpm scheduler option"),
    (dict(num_train_timesteps="1000"), "integer"),
    (dict(clip_sample="yes"), "true or false"),
    (dict(trained_betas=[0.1, 0.2]), "num_train_timesteps"),
])
def test_bad_options_raise_one_clear_error(kwargs, fragment):
    with pytest.raises(JaxdiffError, match=fragment):
        create_scheduler("ddpm", **kwargs)


def test_bad_names_and_classes_raise_clear_errors(tmp_path):
    with pytest.raises(JaxdiffError, match="choose one of: .*ddim"):
        create_scheduler("ddmi")
    with pytest.raises(JaxdiffError, match="not implemented in jaxdiff"):
        create_scheduler({"_class_name": "UniPCMultistepScheduler"})
    with pytest.raises(JaxdiffError, match="no scheduler_config.json"):
        create_scheduler(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{oops")
    with pytest.raises(JaxdiffError, match="not valid JSON"):
        create_scheduler(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler",
                                                                "beta_schedule": "cosine"}))
    with pytest.raises(JaxdiffError, match=f"{re.escape(str(tmp_path))}.*beta_schedule"):
        create_scheduler(tmp_path)


def test_step_needs_set_timesteps_and_stochastic_steps_need_a_key():
    ddim = create_scheduler("ddim")
    x = jnp.zeros(SHAPE)
    with pytest.raises(JaxdiffError, match="set_timesteps"):
        ddim.step(ddim.create_state(), x, 999, x)
    ddpm = create_scheduler("ddpm")
    with pytest.raises(JaxdiffError, match="key="):
        ddpm.step(ddpm.create_state(), x, 999, x)
    with pytest.raises(JaxdiffError, match="num_inference_steps"):
        ddim.set_timesteps(ddim.create_state(), 2000)
    with pytest.raises(JaxdiffError, match="eta"):
        create_scheduler("ddim", eta=-1.0)


def test_step_accepts_per_sample_timesteps():
    ours = create_scheduler("ddim")
    state = ours.set_timesteps(ours.create_state(), 50)
    x = jnp.asarray(x_T())
    out = fake_jax(x, 0, 1000)
    both = ours.step(state, out, jnp.asarray([981, 501]), x).prev_sample
    first = ours.step(state, out[:1], 981, x[:1]).prev_sample
    second = ours.step(state, out[1:], 501, x[1:]).prev_sample
    np.testing.assert_allclose(both, jnp.concatenate([first, second]), atol=1e-6)

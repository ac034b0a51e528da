"""Beta schedules and alphas_cumprod: bit for bit what diffusers' PyTorch schedulers build.

Tolerance: none. diffusers builds `linear`/`scaled_linear` with `torch.linspace(..., float32)`
(fused multiply-adds on x86), `sigmoid` with `torch.sigmoid` (SLEEF's expf), the cosine schedule
in float64 then float32, and `torch.cumprod` (float64 accumulator); jaxdiff reproduces each
operation on the host, so every bit must agree — a 1-ulp difference in the betas is enough to
move a whole Euler-ancestral trajectory past diffusers' own test tolerance. (PyTorch forced to
its scalar kernels, ATEN_CPU_CAPABILITY=default, rounds linspace twice and differs from itself.)
"""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from jaxdiff.schedulers import common, create_scheduler

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
RANGES = {"default": {}, "sd": dict(beta_start=0.00085, beta_end=0.012)}


def _equal_bits(ours, ref, what):
    ours, ref = np.asarray(ours), ref.numpy()
    assert ours.dtype == ref.dtype == np.float32, what
    differ = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert differ.size == 0, f"{what}: {differ.size} entries differ, first at t={differ[:5].tolist()}"


@pytest.mark.parametrize("range_name", list(RANGES))
@pytest.mark.parametrize("T", [1000, 1100])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_and_alphas_cumprod_are_diffusers_bits(schedule, T, range_name):
    kwargs = dict(beta_schedule=schedule, num_train_timesteps=T, **RANGES[range_name])
    ref = diffusers.DDPMScheduler(**kwargs)
    state = create_scheduler("ddpm", **kwargs).create_state()
    _equal_bits(state.betas, ref.betas, "betas")
    _equal_bits(state.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler_a", "dpm++", "lms"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_every_scheduler_builds_the_same_bits(name, schedule):
    ours = create_scheduler(name, beta_schedule=schedule, num_train_timesteps=1100)
    ref = getattr(diffusers, ours.diffusers_class)(beta_schedule=schedule, num_train_timesteps=1100)
    state = ours.create_state()
    _equal_bits(state.betas, ref.betas, f"{name} betas")
    _equal_bits(state.alphas_cumprod, ref.alphas_cumprod, f"{name} alphas_cumprod")


@pytest.mark.parametrize("T", [1000, 1100])
def test_trained_betas_pass_through_unchanged(T):
    trained = (np.linspace(1e-4, 0.03, T) ** 1.1).tolist()  # float64 values, rounded once
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=trained)
    state = create_scheduler("ddpm", num_train_timesteps=T, trained_betas=trained).create_state()
    _equal_bits(state.betas, ref.betas, "betas")
    _equal_bits(state.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")


@pytest.mark.parametrize("start,end", [(1e-4, 0.02), (0.00085 ** 0.5, 0.012 ** 0.5), (-6.0, 6.0), (0.0, 999.0)])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 33, 999, 1000, 1001, 1100, 5000])
def test_linspace_is_torch_linspace_float32(start, end, steps):
    _equal_bits(common.torch_linspace_f32(start, end, steps),
                torch.linspace(start, end, steps, dtype=torch.float32), f"linspace({start}, {end}, {steps})")

"""Noise schedulers as pure functions: a frozen config object + an immutable state pytree.

    from jaxdiff.schedulers import create_scheduler
    sched = create_scheduler("ddim")                 # or a diffusers scheduler_config.json / folder
    state = sched.set_timesteps(sched.create_state(), 50)
    out = sched.step(state, model_output, t, x, key=key)   # StepOutput(prev_sample, pred_original_sample, state)

See `jaxdiff.schedulers.base` for the contract and `jaxdiff.sampling` for the loop.
"""
from jaxdiff.schedulers.base import Scheduler, SchedulerState, StepOutput
from jaxdiff.schedulers.common import (add_noise_vp, dynamic_threshold, from_x0_and_eps,
                                       pred_eps_from_v, pred_eps_from_x0, pred_x0_from_eps,
                                       pred_x0_from_v, to_x0_and_eps, v_from, x0_and_eps)
from jaxdiff.schedulers.config import (create_scheduler, read_scheduler_config, register,
                                       scheduler_class, scheduler_names)
from jaxdiff.schedulers.ddim import DDIMScheduler
from jaxdiff.schedulers.ddpm import DDPMScheduler
from jaxdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from jaxdiff.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from jaxdiff.schedulers.lms import LMSDiscreteScheduler
from jaxdiff.schedulers.pndm import PNDMScheduler

register(DDPMScheduler)
register(DDIMScheduler)
register(PNDMScheduler, "plms")
register(EulerDiscreteScheduler)
register(EulerAncestralDiscreteScheduler, "euler_ancestral", "euler-a")
register(DPMSolverMultistepScheduler, "dpm", "dpmsolver++", "dpm++2m", "dpm-solver++")
register(LMSDiscreteScheduler)

# The registered names in registration order (call scheduler_names() for classes registered later).
SCHEDULER_NAMES = scheduler_names()

__all__ = [
    "SCHEDULER_NAMES", "Scheduler", "SchedulerState", "StepOutput", "create_scheduler",
    "read_scheduler_config", "scheduler_class", "scheduler_names", "register",
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
    "add_noise_vp", "dynamic_threshold", "from_x0_and_eps", "pred_eps_from_v", "pred_eps_from_x0",
    "pred_x0_from_eps", "pred_x0_from_v", "to_x0_and_eps", "v_from", "x0_and_eps",
]

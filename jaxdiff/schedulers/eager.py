"""Schedulers in a plain Python loop: per-step methods compiled on first use, calls checked.

A notebook porting a diffusers loop calls `sched.step(...)` once per step outside `jit`. Run op
by op, a PNDM or DPM-Solver step costs ~0.5 s on a small CPU; so `Scheduler` subclasses get their
`COMPILED_METHODS` wrapped: called with concrete arrays they run as one `jax.jit` program keyed
on the (hashable, frozen) scheduler config, the argument shapes and the state's structure, and
later steps reuse it. Called with tracers (inside a user's `jit`, `scan` or `grad`) the method
is traced inline as before.

The wrapper also turns wrong calls into one clear `JaxdiffError`: diffusers-style positional
`eta`/`generator` arguments, unknown keywords, and (eagerly, where the values are concrete) a
timestep that is not the state's next one — the sign of a hand-sliced timestep list.
"""
from __future__ import annotations

import functools
import inspect

import jax
import numpy as np

from jaxdiff.errors import JaxdiffError

COMPILED_METHODS = ("step", "add_noise", "get_velocity", "training_target", "scale_model_input",
                    "init_noise_sigma")


def is_traced(tree) -> bool:
    """True when any leaf of `tree` is a JAX tracer (the call is inside jit/scan/grad)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _call_error(sched, name: str, signature: inspect.Signature, error: TypeError) -> JaxdiffError:
    params = list(signature.parameters.values())[1:]
    shown = signature.replace(parameters=params, return_annotation=inspect.Signature.empty)
    hint = ""
    if name == "step":
        hint = ("; key= and noise= are keyword-only, and diffusers' step options (eta, "
                "use_clipped_model_output, s_churn, generator, ...) are config fields: "
                f"create_scheduler({sched.name!r}, eta=...) / jax.random.key(seed) as key=")
    return JaxdiffError(f"{type(sched).__name__}.{name}{shown}: {error}{hint}")


def compile_on_first_use(fn):
    """Wrap a scheduler method `fn(self, ...)`: argument check, then jitted with `self` static
    for concrete arguments, or a plain call for traced ones."""
    if getattr(fn, "_compiled", None) is not None:
        return fn
    jitted = jax.jit(fn, static_argnums=0)
    signature = inspect.signature(fn)
    name = fn.__name__

    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise _call_error(self, name, signature, e) from None
        if is_traced((args, kwargs)):
            return fn(self, *args, **kwargs)
        if name == "step":
            bound.arguments.update(self._eager_step_arguments(**{
                k: v for k, v in bound.arguments.items() if k != "self"}))
        return jitted(*bound.args, **bound.kwargs)

    method._compiled = jitted
    return method


def check_next_timestep(sched, state, t, index) -> None:
    """Eager check for the schedulers that step by counter: `t` must be `timesteps[index]`.

    A loop over a hand-sliced list (diffusers' img2img idiom `timesteps[t_start:]`) with a state
    from `set_timesteps(state, n)` would step the counter from 0 while the model sees later
    timesteps: silently wrong, so it is refused here."""
    timesteps = np.asarray(state.timesteps)
    if index >= timesteps.shape[0]:
        raise JaxdiffError(f"{type(sched).__name__}.step: all {timesteps.shape[0]} timesteps of this "
                           "state are done; call set_timesteps again for a new loop")
    want = timesteps[index]
    got = np.asarray(t)
    if not np.all(got == want):
        raise JaxdiffError(
            f"{type(sched).__name__}.step got t={got.tolist()} but the state's next timestep is "
            f"timesteps[{index}]={want.item()}: step once per timestep of state.loop_timesteps, in "
            "order; for img2img use set_timesteps(state, n, strength=s) instead of slicing timesteps")

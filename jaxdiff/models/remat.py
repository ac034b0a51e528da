"""Gradient checkpointing (rematerialisation) of the UNets' ResNet and transformer blocks: their
activations are recomputed in the backward pass instead of kept from the forward pass.

    with gradient_checkpointing("full"):        # or "matmuls": keep the matmul/conv outputs
        out = unet.apply({"params": params}, x, t, context)

It is switched on while the model is traced (the blocks read it when they are built inside
`apply`), so a program wraps its denoiser's `apply` (`checkpointed(apply_fn, policy)`) and
nothing else changes: parameter names, numbers and the inference path stay as they are.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import flax.linen as nn
import jax

from jaxdiff.errors import unknown_choice

# What a rematerialised block keeps from its forward pass.
POLICIES = {
    "full": None,  # nothing but its inputs: the least memory
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs: less recompute
}
_policy: contextvars.ContextVar = contextvars.ContextVar("jaxdiff_gradient_checkpointing", default=None)


@contextlib.contextmanager
def gradient_checkpointing(policy: str | None = "full"):
    """Blocks built inside this context are rematerialised with `policy` (None: off)."""
    if policy is not None and policy not in POLICIES:
        raise unknown_choice("gradient checkpointing policy", policy, tuple(POLICIES))
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


def remat_block(cls, static_argnums: tuple = (3,)):
    """`cls` (a block whose `__call__(self, x, cond, deterministic)` takes `deterministic`, a
    Python bool, third) under `nn.remat` when gradient checkpointing is on, else `cls`."""
    policy = _policy.get()
    if policy is None:
        return cls
    return nn.remat(cls, static_argnums=static_argnums, policy=POLICIES[policy])


def checkpointed(apply_fn: Callable, policy: str | None = "full") -> Callable:
    """`apply_fn` that builds (traces) its model with gradient checkpointing `policy`."""
    if policy is None:
        return apply_fn
    if policy not in POLICIES:
        raise unknown_choice("gradient checkpointing policy", policy, tuple(POLICIES))

    def apply(*args, **kwargs):
        with gradient_checkpointing(policy):
            return apply_fn(*args, **kwargs)

    return apply

"""The training state and the pure step: `TrainState` (params, optimizer state, EMA, step, PRNG
key), diffusers' EMA decay rule, and `make_train_step(loss_fn, tx) -> train_step(state, batch)`.

Randomness is a function of (state.rng, state.step, example index in the global batch), so a run
resumed from a checkpoint, or split over any number of devices, draws the same noise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel.pmap import AXIS

PyTree = Any
Metrics = dict
LossFn = Callable[[PyTree, Mapping, jax.Array], "tuple[jax.Array, Metrics]"]


@flax.struct.dataclass
class TrainState:
    """`step` int32 (), `rng` a raw uint32 (2,) PRNG key, `ema_params` None when EMA is off."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    ema_params: PyTree | None = None


def create_train_state(params: PyTree, tx: optax.GradientTransformation, rng: jax.Array, *,
                       ema: bool = False) -> TrainState:
    """A fresh state at step 0; with `ema`, the average starts as a copy of `params`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jnp.asarray(rng, jnp.uint32),
                      ema_params=jax.tree.map(jnp.array, params) if ema else None)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EMA:
    """The decay rule of diffusers' `EMAModel`: after `update_after_step`, either
    ``(1 + s) / (10 + s)`` or, with `use_warmup`, ``1 - (1 + s / inv_gamma) ** -power``,
    clipped to [`min_decay`, `decay`]."""

    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3

    def decay_at(self, optimization_step: jax.Array) -> jax.Array:
        """Decay for the update made by the `optimization_step`-th step (1-based)."""
        s = jnp.maximum(0, optimization_step - self.update_after_step - 1).astype(jnp.float32)
        if self.use_warmup:
            value = 1.0 - (1.0 + s / self.inv_gamma) ** -self.power
        else:
            value = (1.0 + s) / (10.0 + s)
        value = jnp.clip(value, self.min_decay, self.decay)
        return jnp.where(s <= 0, 0.0, value)


def keep_unless(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """`new` where the scalar `ok` is true, else `old` (leaf by leaf, inside a compiled step)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def ema_update(ema_params: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

EXAMPLE_INDEX = "example_index"  # a batch entry: the examples' indices in the global batch (b,)
SHARED_ENTRIES = ("encoders",)  # batch entries every example uses (frozen encoder params): not split


def micro_batches(batch: Mapping, grad_accum: int, *, first: jax.Array | int = 0,
                  shared: tuple = SHARED_ENTRIES) -> dict:
    """Split this device's batch (b, ...) into `grad_accum` micro-batches (K, b / K, ...):
    micro-batch k holds rows k, k + K, k + 2K, ... (strided, so under `jit` over a sharded batch
    each device keeps its own rows and no data moves). Each micro-batch gets the `EXAMPLE_INDEX`
    of its rows (`first` + row), so its random draws are those of the whole batch. Entries
    named in `shared` are not split (`micro_batches(...)` leaves them out; pass them along)."""
    split = {k: v for k, v in batch.items() if k not in shared}
    sizes = {x.shape[0] for x in jax.tree.leaves(split)}
    if len(sizes) != 1:
        raise ValueError(f"batch entries have different leading sizes {sorted(sizes)}")
    b = sizes.pop()
    if b % grad_accum:
        raise JaxdiffError(f"a batch of {b} per device does not split into {grad_accum} micro-batches; "
                           f"use a batch size divisible by {grad_accum} x the devices")
    m = b // grad_accum

    def strided(x):
        return x.reshape((m, grad_accum) + x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(strided, split)
    index = batch.get(EXAMPLE_INDEX)
    micro[EXAMPLE_INDEX] = strided(first + jnp.arange(b, dtype=jnp.int32) if index is None else index)
    return micro


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    axis_name: str | None = AXIS, ema: EMA | None = None,
                    grad_accum: int = 1, shared: tuple = SHARED_ENTRIES) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, pure. `loss_fn(params, batch, key)`
    returns (mean loss over its batch, metrics). Under `pmap` over `axis_name` the gradients,
    loss and metrics are averaged across devices (`lax.pmean`), so with equal per-device batches
    the update equals one device's on the whole global batch; `axis_name=None` for plain `jit`
    (also over a sharded global batch: XLA then reduces the gradients).

    `grad_accum` K > 1: the same update from K micro-batches of each device's batch, one after
    the other inside the one compiled step (`lax.scan`; gradients and metrics are averaged),
    so only a K-th of the activations is alive at a time. The examples keep their random draws
    (each micro-batch carries its rows' `EXAMPLE_INDEX`), so the update equals the K = 1 update
    up to float rounding. `shared`: batch entries that are not per-example (not split).

    A step whose loss, gradient norm or update is not finite changes neither the params, the
    optimizer state nor the EMA (the step counter still advances, so the next step draws new
    noise); `metrics["nonfinite"]` is 1.0 for such a step, else 0.0."""
    ema = ema or EMA()
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise JaxdiffError(f"--grad-accum must be a positive integer, got {grad_accum}")
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch, key):
        if grad_accum == 1:
            (loss, metrics), grads = value_and_grad(params, batch, key)
            return grads, {**metrics, "loss": loss}
        local = {k: v for k, v in batch.items() if k not in shared}
        b = jax.tree.leaves(local)[0].shape[0]
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
        micro = micro_batches(batch, grad_accum, first=first, shared=shared)
        common = {k: v for k, v in batch.items() if k in shared}

        def one(carry, mb):
            (loss, metrics), grads = value_and_grad(params, {**mb, **common}, key)
            return jax.tree.map(jnp.add, carry, (grads, {**metrics, "loss": loss})), None

        shapes = jax.eval_shape(lambda mb: gradients_shape(params, {**mb, **common}, key),
                                jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(one, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum, total)

    def gradients_shape(params, batch, key):
        (loss, metrics), grads = value_and_grad(params, batch, key)
        return grads, {**metrics, "loss": loss}

    def train_step(state: TrainState, batch: Mapping) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = gradients(state.params, batch, key)
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & \
            jnp.isfinite(optax.global_norm(updates))
        params = keep_unless(finite, optax.apply_updates(state.params, updates), state.params)
        opt_state = keep_unless(finite, opt_state, state.opt_state)
        step = state.step + 1
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = keep_unless(finite, ema_update(ema_params, params, ema.decay_at(step)), ema_params)
        metrics["grad_norm"] = grad_norm
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return train_step

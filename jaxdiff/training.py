"""Training: the state, a pure `train_step(state, batch) -> (state, metrics)`, EMA, the diffusion
loss, and orbax checkpoints of the whole state.

The state holds everything a resumed run needs besides the data position (which the
checkpoint's metadata carries): params, optimizer state, step, the PRNG key every step's
randomness derives from, and an optional exponential moving average of the params.
Randomness is a function of (state.rng, state.step, example index in the global batch), so a run
resumed from a checkpoint, or split over any number of devices, draws the same noise.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import AXIS, example_keys

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


def ema_update(ema_params: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    axis_name: str | None = AXIS, ema: EMA | None = None) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, pure. `loss_fn(params, batch, key)`
    returns (mean loss over its batch, metrics). Under `pmap` over `axis_name` the gradients,
    loss and metrics are averaged across devices (`lax.pmean`), so with equal per-device batches
    the update equals one device's on the whole global batch; `axis_name=None` for plain `jit`."""
    ema = ema or EMA()

    def train_step(state: TrainState, batch: Mapping) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        metrics = {**metrics, "loss": loss}
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = ema_update(ema_params, params, ema.decay_at(step))
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return train_step


def diffusion_loss(apply_fn: Callable, scheduler, scheduler_state, *, cfg_dropout: float = 0.0,
                   null_label: int | None = None, axis_name: str | None = AXIS) -> LossFn:
    """The denoising loss as `loss_fn(params, batch, key)`.

    `batch["images"]`: uint8 (B, H, W, C) 0..255 or floats in [-1, 1]; `batch["labels"]` int (B,)
    or absent. Each example gets its own timestep t ~ U{0..T-1} and Gaussian noise from a key
    made of its index in the global batch; with `cfg_dropout` p its label becomes `null_label`
    with probability p (classifier-free guidance training). The target (eps, v or x0) is the
    scheduler's `training_target`; the loss is the mean squared error.
    `apply_fn(params, x_t, t, labels)` → model output like `x_t`."""
    if cfg_dropout > 0 and null_label is None:
        raise ValueError("cfg_dropout needs a null_label for the dropped conditioning")
    num_train_timesteps = int(scheduler_state.alphas_cumprod.shape[0])

    def draw(key, shape):
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        return (jax.random.normal(k_noise, shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps),
                jax.random.bernoulli(k_drop, cfg_dropout))

    def loss_fn(params, batch, key):
        images = batch["images"]
        x0 = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0) if images.dtype == jnp.uint8 \
            else images.astype(jnp.float32)
        keys = example_keys(key, x0.shape[0], axis_name)
        noise, t, drop = jax.vmap(draw, in_axes=(0, None))(keys, x0.shape[1:])
        x_t = scheduler.add_noise(scheduler_state, x0, noise, t)
        target = scheduler.training_target(scheduler_state, x0, noise, t)
        labels = batch.get("labels")
        if labels is not None and cfg_dropout > 0:
            labels = jnp.where(drop, null_label, labels)
        pred = apply_fn(params, x_t, t, labels)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
        return loss, {}

    return loss_fn


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def fingerprint(tree: PyTree) -> str:
    """CRC32 over every leaf's bytes, in tree order: written beside a checkpoint and checked on
    restore, so a file damaged after it was written is noticed rather than trained on."""
    crc = 0
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(str((a.dtype.str, a.shape)).encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return f"{crc:08x}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Checkpointer:
    """Orbax checkpoints of a whole `TrainState` plus JSON metadata (data position, config)
    in `directory/<step>/`. Each save is written to a temporary folder and renamed when complete
    (orbax's atomic commit); the last `max_to_keep` are kept. `restore_latest` walks back from the
    newest step and skips (with a warning) any checkpoint that fails to read or whose fingerprint
    does not match, moving it aside as `<step>.corrupt`."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, save_async: bool = True,
                 create: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        if not create and not self.directory.is_dir():
            raise JaxdiffError(f"no checkpoints: {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=save_async,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    @property
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, metadata: Mapping | None = None, *, force: bool = True) -> int:
        """Save `state` (unreplicated) at its own step; returns the step."""
        ocp = self._ocp
        host_state = jax.device_get(state)
        step = int(host_state.step)
        meta = {**dict(metadata or {}), "step": step, "fingerprint": fingerprint(host_state)}
        if step in self.manager.all_steps():
            self.manager.delete(step)  # a re-run over the same step replaces it
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=force)
        return step

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        """The checkpoint at `step` shaped like `template` (arrays or ShapeDtypeStructs).
        Raises JaxdiffError when it cannot be read or fails its fingerprint."""
        ocp = self._ocp
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), template)
        where = self.directory / str(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise JaxdiffError(f"checkpoint {where} cannot be read ({msg})") from None
        meta, state = dict(restored.meta or {}), restored.state
        if "fingerprint" in meta and fingerprint(state) != meta["fingerprint"]:
            raise JaxdiffError(f"checkpoint {where} does not match its fingerprint (damaged files)")
        return state, meta

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint, or None when the folder has none. Damaged ones are
        skipped with a warning; if every one is damaged, raises JaxdiffError."""
        steps = self.steps
        last_error = None
        for step in reversed(steps):
            try:
                return self.restore(step, template)
            except JaxdiffError as e:
                last_error = e
                _warn(f"{e}; skipping it in favour of an earlier one")
                self._move_aside(step)
        if last_error is not None:
            raise JaxdiffError(f"no usable checkpoint in {self.directory} (newest problem: {last_error})")
        return None

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory / f"{step}.corrupt"
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            src.rename(dst)
        self.manager.reload()

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_checkpoint_meta(directory: str | Path, step: int) -> dict:
    """The JSON metadata of one checkpoint, without reading its arrays."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxdiffError(f"checkpoint metadata {path} cannot be read ({e})") from None

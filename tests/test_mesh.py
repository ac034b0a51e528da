"""Memory levers and the device mesh: gradient accumulation (K micro-batches in one compiled
step equal one step on the whole batch), rematerialisation, the sharding rule, and `jit` over
a (data, fsdp) mesh reaching the same parameters as one device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxdiff import parallel
from jaxdiff.errors import JaxdiffError
from jaxdiff.schedulers import create_scheduler
from jaxdiff.training import EMA, create_train_state, diffusion_loss, make_train_step


class Denoiser(nn.Module):
    """A small conv denoiser conditioned on t and a label (fast to compile; the loss is the real one)."""

    @nn.compact
    def __call__(self, x, t, y):
        h = nn.Conv(8, (3, 3))(x)
        h = h + nn.Dense(8)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0))[:, None, None]
        h = h + nn.Embed(11, 8)(y)[:, None, None]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


@pytest.fixture(scope="module")
def tiny():
    model = Denoiser()
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16, 8, 8, 1)).astype(np.uint8),
             "labels": rng.integers(0, 10, (16,)).astype(np.int32)}
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    sched = create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")
    return model, params, sched, batch


def _loss(model, sched, axis_name):
    return diffusion_loss(lambda p, x, t, y: model.apply({"params": p}, x, t, y), sched, sched.create_state(),
                          cfg_dropout=0.25, null_label=10, snr_gamma=5.0, axis_name=axis_name)


def _update(tiny, grad_accum, axis_name=None, tx=None):
    """The first update (params after one SGD step of rate 1 minus the params: -gradients), the
    step's loss and the EMA."""
    model, params, sched, batch = tiny
    tx = tx or optax.sgd(1.0)
    step = make_train_step(_loss(model, sched, axis_name), tx, axis_name=axis_name, ema=EMA(decay=0.9),
                           grad_accum=grad_accum)
    state = create_train_state(params, tx, jax.random.PRNGKey(1), ema=True)
    state = state.replace(step=jnp.int32(3))  # the EMA's decay is > 0 from its second update
    if axis_name is None:
        new, metrics = jax.jit(step)(state, batch)
        loss = float(metrics["loss"])
    else:
        new, metrics = parallel.pmap(step, donate_state=False)(parallel.replicate(state), parallel.shard(batch))
        new, loss = parallel.unreplicate(new), float(metrics["loss"][0])
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new.params, params)
    return delta, loss, new.ema_params


def _max_abs(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_grad_accum_equals_one_step_on_the_whole_batch(tiny, grad_accum):
    """K micro-batches of 16 / K in one compiled step (lax.scan): the same gradients within 1e-6
    (float summation order only; the examples keep their noise, timesteps and label dropout),
    the same loss and EMA."""
    plain, loss, ema = _update(tiny, 1)
    accumulated, loss_k, ema_k = _update(tiny, grad_accum)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(plain))
    assert scale > 1e-3  # the gradients are not trivially zero
    assert _max_abs(accumulated, plain) <= 1e-6 * max(1.0, scale)
    assert abs(loss_k - loss) <= 1e-6 * abs(loss)
    assert _max_abs(ema_k, ema) <= 1e-6


def test_grad_accum_under_pmap_equals_one_device(tiny):
    """8 devices x 2 micro-batches of 1 example: the examples are numbered in the global batch."""
    plain, loss, _ = _update(tiny, 1)
    accumulated, loss_k, _ = _update(tiny, 2, axis_name=parallel.AXIS)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(plain))
    assert _max_abs(accumulated, plain) <= 1e-6 * max(1.0, scale)
    assert abs(loss_k - loss) <= 1e-6 * abs(loss)


def test_grad_accum_is_one_compiled_scan_and_checks_the_split(tiny):
    model, params, sched, batch = tiny
    tx = optax.adam(1e-3)
    step = make_train_step(_loss(model, sched, None), tx, axis_name=None, grad_accum=4)
    state = create_train_state(params, tx, jax.random.PRNGKey(1))
    text = jax.jit(step).lower(state, batch).as_text()
    assert text.count("stablehlo.while") >= 1  # one loop over the micro-batches, not K host calls
    with pytest.raises(JaxdiffError, match="divisible by 3"):
        jax.jit(make_train_step(_loss(model, sched, None), tx, axis_name=None, grad_accum=3)).lower(state, batch)
    with pytest.raises(JaxdiffError, match="--grad-accum must be a positive integer"):
        make_train_step(_loss(model, sched, None), tx, grad_accum=0)


def test_shared_batch_entries_are_not_split():
    """`encoders` (frozen parameters every example uses) reach every micro-batch whole."""
    def loss_fn(params, batch, key):
        pred = batch["x"] @ params["w"] * batch["encoders"]["scale"]
        return jnp.mean(jnp.square(pred - batch["y"])), {}

    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.normal(size=(8, 2)).astype(np.float32),
             "encoders": {"scale": np.float32(1.5) * np.ones((8,), np.float32)[:2]}}
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    tx = optax.sgd(1.0)
    out = [jax.jit(make_train_step(loss_fn, tx, axis_name=None, grad_accum=k))(
        create_train_state(params, tx, jax.random.PRNGKey(0)), batch)[0].params for k in (1, 2, 8)]
    assert _max_abs(out[1], out[0]) <= 1e-6 and _max_abs(out[2], out[0]) <= 1e-6

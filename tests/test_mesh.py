"""Memory levers and the device mesh: gradient accumulation (K micro-batches in one compiled
step equal one step on the whole batch), rematerialisation, the sharding rule, and `jit` over
a (data, fsdp) mesh reaching the same parameters as one device."""
from __future__ import annotations

import json

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


# ------------------------------------------------------------------------------------------------
# The mesh: the rule, and jit over (data, fsdp) reaching what one device reaches
# ------------------------------------------------------------------------------------------------

def test_mesh_flags_and_the_one_sharding_rule():
    from jax.sharding import PartitionSpec as P

    from jaxdiff.parallel.mesh import MeshShape, make_mesh, parse_mesh, spec_for

    assert parse_mesh(None) == MeshShape() and parse_mesh("data=2,fsdp=4") == MeshShape(2, 4)
    assert parse_mesh("fsdp=2") == MeshShape(None, 2)
    assert dict(make_mesh("fsdp=2").shape) == {"data": 4, "fsdp": 2}
    assert dict(make_mesh(None).shape) == {"data": 8, "fsdp": 1}
    for bad, message in (("data=3,fsdp=2", "needs 6 devices but the run has 8"), ("model=2", "write data=D,fsdp=F"),
                         ("fsdp=3", "needs 6 devices"), ("data=0", "positive")):
        with pytest.raises(JaxdiffError, match=message):
            make_mesh(bad)
    # Along the largest dimension divisible by fsdp (the last of equals); else replicated.
    assert spec_for((3, 3, 320, 640), 8) == P(None, None, None, "fsdp")
    assert spec_for((3, 3, 640, 320), 8) == P(None, None, "fsdp")
    assert spec_for((320, 320), 4) == P(None, "fsdp")
    assert spec_for((77, 5), 4) == P() and spec_for((), 4) == P() and spec_for((2,), 4) == P()
    assert spec_for((1024,), 1) == P()


def _mesh_run(tiny, mesh_text, steps, *, devices=None, state=None, start=0):
    """`steps` Adam steps of the denoising loss under `jit` over a mesh (`mesh_text` "pmap":
    the pmap engine); batches by step."""
    from jaxdiff.parallel.engine import MeshEngine, PmapEngine

    model, params, sched, batch = tiny
    engine = PmapEngine() if mesh_text == "pmap" else MeshEngine(mesh_text, devices)
    tx = optax.adam(1e-2)
    step = engine.compile(make_train_step(_loss(model, sched, engine.axis_name), tx, axis_name=engine.axis_name,
                                          ema=EMA(decay=0.9)))
    if state is None:
        state = create_train_state(params, tx, jax.random.PRNGKey(1), ema=True)
    state = engine.place_state(state)
    for i in range(start, start + steps):
        rolled = {k: np.roll(v, i, axis=0) for k, v in batch.items()}  # a different batch every step
        state, _ = step(state, engine.place_batch(rolled))
    return engine, state


@pytest.fixture(scope="module")
def mesh_runs(tiny):
    return {name: _mesh_run(tiny, text, 3, devices=jax.devices()[:n])
            for name, text, n in (("one", None, 1), ("data8", None, 8), ("fsdp4", "data=2,fsdp=4", 8),
                                  ("pmap", "pmap", 8))}


def test_data_8_and_data_2_x_fsdp_4_reach_what_one_device_reaches(mesh_runs):
    """3 Adam steps: the same parameters within 1e-5 (only the order of the gradient sums differs),
    as the pmap engine's."""
    one = mesh_runs["one"][1]
    for name in ("data8", "fsdp4", "pmap"):
        engine, state = mesh_runs[name]
        host = engine.host_copy(state)
        assert int(host.step) == 3
        for part in ("params", "ema_params"):
            assert _max_abs(getattr(host, part), jax.device_get(getattr(one, part))) <= 1e-5, (name, part)


def test_fsdp_4_holds_under_0_3_of_the_data_only_bytes_per_device(mesh_runs):
    from jaxdiff.parallel.mesh import device_bytes

    def worst(state):
        held = device_bytes((state.params, state.opt_state, state.ema_params))
        assert len(held) == 8
        return max(held.values())

    data_only, fsdp = worst(mesh_runs["data8"][1]), worst(mesh_runs["fsdp4"][1])
    assert fsdp <= 0.3 * data_only, (fsdp, data_only)
    spec = mesh_runs["fsdp4"][1].params["Conv_0"]["kernel"].sharding.spec
    assert "fsdp" in tuple(spec)


def test_a_checkpoint_resumes_on_another_mesh(tiny, mesh_runs, tmp_path):
    """Saved after 2 steps on data=2 x fsdp=4 (8 devices), resumed on data=2 x fsdp=2 (4 devices):
    step 3 equals the uninterrupted 8-device run within float tolerance."""
    from jaxdiff.training import Checkpointer

    engine, state = _mesh_run(tiny, "data=2,fsdp=4", 2, devices=jax.devices())
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(engine.host_copy(state), {"data": {"epoch": 0, "index": 2}})
    ckpt.wait()
    template = jax.device_get(mesh_runs["one"][1])
    restored, _ = ckpt.restore(2, template)
    ckpt.close()
    engine4, resumed = _mesh_run(tiny, "data=2,fsdp=2", 1, devices=jax.devices()[:4], state=restored, start=2)
    assert len(resumed.params["Conv_0"]["kernel"].sharding.device_set) == 4
    host = engine4.host_copy(resumed)
    uninterrupted = mesh_runs["fsdp4"][0].host_copy(mesh_runs["fsdp4"][1])
    assert int(host.step) == 3
    assert _max_abs(host.params, uninterrupted.params) <= 1e-5
    assert _max_abs(host.opt_state, uninterrupted.opt_state) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ------------------------------------------------------------------------------------------------

@pytest.mark.extended  # three compilations of a UNet's backward pass
def test_gradient_checkpointing_gives_the_same_gradients():
    """ResNet and transformer blocks of a (tiny) SD UNet rematerialised, with either policy:
    the same gradients within 1e-6, and the program really recomputes (a remat in its jaxpr)."""
    from jaxdiff.models.remat import checkpointed
    from jaxdiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel, init_params

    config = UNet2DConditionConfig(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(config)
    params = init_params(unet, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x, ctx = rng.normal(size=(2, 8, 8, 4)).astype(np.float32), rng.normal(size=(2, 3, 8)).astype(np.float32)
    t = np.array([10, 500], np.int32)

    def apply(p, x, t, ctx):
        return unet.apply({"params": p}, x, t, ctx, train=True)

    def grads(fn):
        loss = lambda p: jnp.mean(jnp.square(fn(p, x, t, ctx)))  # noqa: E731
        return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    plain, text = grads(apply)
    assert "remat" not in text and "checkpoint" not in text
    for policy in ("full", "matmuls"):
        remat, text = grads(checkpointed(apply, policy))
        assert "remat" in text or "checkpoint" in text
        scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(plain))
        assert _max_abs(remat, plain) <= 1e-6 * max(1.0, scale), policy


# ------------------------------------------------------------------------------------------------
# Programs on a mesh (extended: each starts train.mnist in subprocesses)
# ------------------------------------------------------------------------------------------------

def _mnist(out, devices, *extra, steps=4):
    import subprocess
    import sys

    from subprocesses import ROOT, TINY, subprocess_env

    args = [sys.executable, "-m", "train.mnist", "--out", str(out), "--steps", str(steps), "--checkpoint-every", "2",
            "--no-samples", "--no-progress", "--log-backend", "jsonl", *TINY, *extra]
    proc = subprocess.run(args, cwd=ROOT, env=subprocess_env(devices), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.extended
def test_train_mnist_resumes_on_a_smaller_mesh(tmp_path, mnist_dir):
    """8 devices, data=2 x fsdp=4, stopped at step 2; resumed on 4 devices, data=2 x fsdp=2, to
    step 4. Float tolerance, stated as a noise floor: the resumed run is no further from the
    uninterrupted 8-device run than a whole run on the 4-device mesh is (the per-device gradient
    sums round differently, and Adam normalises near-zero gradients to full-size updates)."""
    from subprocesses import final_params

    data = ["--data-dir", str(mnist_dir)]
    _mnist(tmp_path / "whole8", 8, *data, "--mesh", "data=2,fsdp=4")
    _mnist(tmp_path / "whole4", 4, *data, "--mesh", "data=2,fsdp=2")
    _mnist(tmp_path / "moved", 8, *data, "--mesh", "data=2,fsdp=4", steps=2)
    resumed = _mnist(tmp_path / "moved", 4, *data, "--mesh", "data=2,fsdp=2", "--resume")
    assert "mesh data=2 x fsdp=2" in resumed.stderr
    for part in ("params", "ema_params", "opt_state"):
        moved, meta_a, step_a = final_params(tmp_path / "moved", part)
        whole8, meta_b, step_b = final_params(tmp_path / "whole8", part)
        whole4, _, _ = final_params(tmp_path / "whole4", part)
        assert step_a == step_b == 4 and meta_a["data"] == meta_b["data"]
        floor = _max_abs(whole4, whole8)
        assert floor < 1e-3, part  # the meshes themselves agree to float noise
        assert _max_abs(moved, whole8) <= 2 * floor + 1e-6, (part, floor)


@pytest.mark.extended
def test_two_processes_with_4_devices_train_as_one_process_with_8(tmp_path, mnist_dir):
    """Multi-host on the mesh: 2 processes x 4 CPU devices (gloo) against 1 process x 8, the same
    flags (data=4 x fsdp=2): the same checkpoints within float tolerance. gloo sums the 8 devices'
    gradients in another order than one process does, and Adam (lr 1e-3) turns that rounding of
    near-zero gradient elements into updates of up to lr per step: 1e-4 is a tenth of one step's
    largest update (measured: 4.2e-5 after 4 steps)."""
    from subprocesses import TINY, final_params, run_processes

    common = ["--data-dir", str(mnist_dir), "--steps", "4", "--checkpoint-every", "2", "--no-samples",
              "--no-progress", "--log-backend", "jsonl", "--mesh", "data=4,fsdp=2", *TINY]
    import sys

    results = run_processes([sys.executable, "-m", "train.mnist", "--out", str(tmp_path / "multi"), *common],
                            timeout=900, devices=4)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    report = [line for line in results[0].stdout.splitlines() if line.startswith("{")]
    assert json.loads(report[-1])["processes"] == 2 and json.loads(report[-1])["devices"] == 8
    _mnist(tmp_path / "single", 8, *common[:2], "--mesh", "data=4,fsdp=2")
    for part in ("params", "ema_params"):
        a, meta_a, step_a = final_params(tmp_path / "multi", part)
        b, meta_b, step_b = final_params(tmp_path / "single", part)
        assert step_a == step_b == 4 and meta_a["data"] == meta_b["data"]
        assert _max_abs(a, b) <= 1e-4, part


@pytest.mark.extended
def test_generate_sharded_over_the_mesh_equals_one_device(sd):
    """8 prompts split over 8 devices by `jit` (no pmap, no hand-replicated latents): the images
    of the one-device program within float tolerance, laid out over the devices."""
    from jaxdiff.pipelines.stable_diffusion import GenerateConfig, generate, generate_sharded, tokenize_prompts

    pipe, params = sd
    ids, neg = tokenize_prompts(pipe, [f"a photo of {i}" for i in range(8)])
    config = GenerateConfig(num_inference_steps=2, height=64, width=64)
    key = jax.random.PRNGKey(3)
    one = generate(pipe, params, ids, neg, key, 5.0, config=config)
    sharded = generate_sharded(pipe, params, ids, neg, key, 5.0, config=config)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-5)
    with pytest.raises(JaxdiffError, match="split evenly over the mesh's 8 devices"):
        generate_sharded(pipe, params, ids[:3], neg[:3], key, 5.0, config=config)

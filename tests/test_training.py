"""TrainState, the pure train step (pmap = one device), EMA (= diffusers' EMAModel), the diffusion
loss, and orbax checkpoints (round trip, keep-last-N, damaged checkpoints skipped)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import parallel
from jaxdiff.errors import JaxdiffError
from jaxdiff.models.class_conditioned import ClassConditionedUnet
from jaxdiff.schedulers import create_scheduler
from jaxdiff.training import (EMA, Checkpointer, create_train_state, diffusion_loss, ema_update,
                              make_train_step)

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def toy_state(seed=0, ema=True):
    k = jax.random.PRNGKey(seed)
    params = {"dense": {"kernel": jax.random.normal(k, (64, 64)), "bias": jnp.zeros(64)}}
    return create_train_state(params, optax.adam(1e-3), jax.random.PRNGKey(seed + 1), ema=ema)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(decay=0.999), dict(decay=0.99, use_warmup=True, power=0.75),
                                    dict(decay=0.9, update_after_step=3, min_decay=0.1)])
def test_ema_follows_diffusers_ema_model(kwargs):
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    sequence = [rng.normal(size=(5,)).astype(np.float32) for _ in range(12)]
    param = torch.nn.Parameter(torch.tensor(sequence[0]))
    reference = EMAModel([param], decay=kwargs["decay"], min_decay=kwargs.get("min_decay", 0.0),
                         update_after_step=kwargs.get("update_after_step", 0),
                         use_ema_warmup=kwargs.get("use_warmup", False),
                         power=kwargs.get("power", 2 / 3))
    ema = EMA(**kwargs)
    ours = jnp.asarray(sequence[0])
    for step, value in enumerate(sequence[1:], start=1):
        with torch.no_grad():
            param.copy_(torch.tensor(value))
        reference.step([param])
        ours = ema_update(ours, jnp.asarray(value), ema.decay_at(jnp.int32(step)))
        np.testing.assert_allclose(np.asarray(ours), reference.shadow_params[0].numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The step: pmap over 8 devices equals one device on the same global batch
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup():
    model = ClassConditionedUnet.create(null_class=True, **TINY_UNET)
    params = model.init_weights(jax.random.PRNGKey(0))
    sched = create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")
    rng = np.random.default_rng(0)
    batches = [{"images": rng.integers(0, 256, (16, 28, 28, 1)).astype(np.uint8),
                "labels": rng.integers(0, 10, (16,)).astype(np.int32)} for _ in range(2)]
    return model, params, sched, batches


def _run(model, params, sched, batches, axis_name, tx):
    loss_fn = diffusion_loss(lambda p, x, t, y: model.apply({"params": p}, x, t, y), sched,
                             sched.create_state(), cfg_dropout=0.25, null_label=model.null_label,
                             axis_name=axis_name)
    step = make_train_step(loss_fn, tx, axis_name=axis_name, ema=EMA(decay=0.9))
    state = create_train_state(params, tx, jax.random.PRNGKey(1), ema=True)
    losses = []
    if axis_name is None:
        step = jax.jit(step)
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        return state, losses
    p_step = parallel.pmap(step)
    p_state = parallel.replicate(state)
    for b in batches:
        p_state, m = p_step(p_state, parallel.shard(b))
        assert np.ptp(np.asarray(m["loss"])) == 0  # every device reports the global mean
        losses.append(float(m["loss"][0]))
    return parallel.unreplicate(p_state), losses


def test_pmap_over_8_devices_equals_one_device_on_the_same_global_batch(tiny_setup):
    assert jax.local_device_count() == 8
    model, params, sched, batches = tiny_setup
    tx = optax.sgd(0.1)  # linear in the gradients, so parameter differences show gradient differences
    one, losses_one = _run(model, params, sched, batches, None, tx)
    eight, losses_eight = _run(model, params, sched, batches, parallel.AXIS, tx)
    # Same per-example noise, timesteps and label dropout; only float summation order differs.
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert int(eight.step) == int(one.step) == 2


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_setup):
    model, params, sched, batches = tiny_setup
    batch = batches[0]
    loss_fn = diffusion_loss(lambda p, x, t, y: model.apply({"params": p}, x, t, y), sched,
                             sched.create_state(), axis_name=None)
    tx = optax.adam(3e-3)
    step = jax.jit(make_train_step(loss_fn, tx, axis_name=None))
    state = create_train_state(params, tx, jax.random.PRNGKey(0))
    # The same step index draws the same noise: hold it fixed to see the fit improve.
    state0 = state
    losses = []
    for _ in range(15):
        state, m = step(state.replace(step=state0.step), batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_label_dropout_uses_the_null_label_at_the_requested_rate(tiny_setup):
    _, _, sched, _ = tiny_setup
    seen = []

    def spy(params, x, t, y):
        seen.append(np.asarray(y))
        return x

    batch = {"images": jnp.zeros((4000, 2, 2, 1)), "labels": jnp.zeros((4000,), jnp.int32)}
    for p in (0.2, 0.0):
        loss_fn = diffusion_loss(spy, sched, sched.create_state(), cfg_dropout=p, null_label=10,
                                 axis_name=None)
        loss_fn(None, batch, jax.random.PRNGKey(0))
    with_dropout, without = seen
    assert set(np.unique(with_dropout).tolist()) == {0, 10}
    assert abs(np.mean(with_dropout == 10) - 0.2) < 0.03  # 4000 draws: 3 sigma is 0.019
    assert np.all(without == 0)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_is_exact_and_keeps_the_last_n(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    state = toy_state()
    for step in (1, 2, 3):
        ckpt.save(state.replace(step=jnp.int32(step)), {"data": {"epoch": 0, "index": step}})
    ckpt.wait()
    assert ckpt.steps == [2, 3]
    restored, meta = ckpt.restore_latest(toy_state(seed=5))
    assert_trees_equal(restored, state.replace(step=jnp.int32(3)))
    assert meta["data"] == {"epoch": 0, "index": 3}
    params, _ = ckpt.restore_part(3, "ema_params")
    assert_trees_equal(params, state.ema_params)
    ckpt.close()


def test_state_without_ema_round_trips(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    state = toy_state(ema=False)
    ckpt.save(state)
    ckpt.wait()
    restored, _ = ckpt.restore_latest(toy_state(seed=3, ema=False))
    assert restored.ema_params is None
    assert_trees_equal(restored, state)


def _damage(step_dir):
    """Truncate every data file of a checkpoint, as a crash of the disk or a bad copy would."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])


def _flip_a_byte(step_dir):
    """Change one byte of stored array data without changing any size: only the fingerprint sees it."""
    files = sorted((f for f in (step_dir / "state" / "ocdbt.process_0").rglob("*")
                    if f.is_file() and f.parent.name == "d"), key=lambda f: -f.stat().st_size)
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage, _flip_a_byte])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, capsys, damage):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    good = toy_state()
    ckpt.save(good.replace(step=jnp.int32(1)))
    ckpt.save(toy_state(seed=9).replace(step=jnp.int32(2)))
    ckpt.wait()
    damage(tmp_path / "ckpt" / "2")
    restored, _ = ckpt.restore_latest(toy_state(seed=4))
    assert_trees_equal(restored, good.replace(step=jnp.int32(1)))
    assert "warning: checkpoint" in capsys.readouterr().err
    assert ckpt.steps == [1] and (tmp_path / "ckpt" / "2.corrupt").is_dir()
    ckpt.save(good.replace(step=jnp.int32(2)))  # a resumed run can write step 2 again
    ckpt.wait()
    assert ckpt.steps == [1, 2]


def _restore_from_a_wholly_damaged_folder(tmp_path):
    """One checkpoint, damaged; restoring it is one clear error."""
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(toy_state())
    ckpt.wait()
    _damage(tmp_path / "ckpt" / "0")
    with pytest.raises(JaxdiffError, match="no usable checkpoint"):
        ckpt.restore_latest(toy_state(), move_aside=False)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    _restore_from_a_wholly_damaged_folder(tmp_path)


def test_abandoned_reads_of_a_failed_restore_are_not_printed_but_other_task_errors_are(tmp_path, capsys):
    """After a failed restore, a collected read task of that checkpoint makes asyncio log "Task
    exception was never retrieved" with a traceback; that one is dropped, any other is kept."""
    import asyncio
    import gc
    import logging

    _restore_from_a_wholly_damaged_folder(tmp_path)
    handler = logging.StreamHandler()  # stderr as the test sees it, like Python's last resort
    logging.getLogger("asyncio").addHandler(handler)
    try:
        loop = asyncio.new_event_loop()
        for message in (f'Error reading local file "{tmp_path / "ckpt" / "0" / "state"}/d/abc"',
                        "an unrelated task failure"):
            async def fail(message=message):
                raise ValueError(message)

            task = loop.create_task(fail())
            loop.run_until_complete(asyncio.sleep(0))
            del task
            gc.collect()
        loop.close()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    err = capsys.readouterr().err
    assert "an unrelated task failure" in err and "Task exception was never retrieved" in err
    assert "state/d/abc" not in err


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(toy_state().replace(step=jnp.int32(1)))
    ckpt.wait()
    ckpt.close()
    # What a process killed during a save leaves: orbax's temporary folder, never renamed.
    (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234").mkdir()
    reopened = Checkpointer(tmp_path / "ckpt")
    assert reopened.steps == [1]
    restored, _ = reopened.restore_latest(toy_state())
    assert int(restored.step) == 1


def test_a_checkpoint_of_another_model_does_not_restore(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(toy_state())
    ckpt.wait()
    other = create_train_state({"dense": {"kernel": jnp.zeros((5, 64)), "bias": jnp.zeros(64)}},
                               optax.adam(1e-3), jax.random.PRNGKey(0), ema=True)
    with pytest.raises(JaxdiffError):
        ckpt.restore(0, other)


# ------------------------------------------------------------------------------------------------
# The run folder: one record for every program; earlier versions' files still read
# ------------------------------------------------------------------------------------------------

def test_run_record_round_trips_and_names_its_program(tmp_path):
    from jaxdiff.training.run_folder import RUN_FILE, RunRecord, holds_run, read_run, write_run

    assert not holds_run(tmp_path)
    record = RunRecord("train.mnist", {"lr": 1e-3, "seed": 0}, 40, {"source": "here"}, {"a": 1}, {"b": 2})
    write_run(tmp_path, record)
    assert json.loads((tmp_path / RUN_FILE).read_text())["format"] == "jaxdiff-run-1"
    assert read_run(tmp_path) == record == read_run(tmp_path, "train.mnist")
    assert holds_run(tmp_path)
    with pytest.raises(JaxdiffError, match="holds a train.mnist run, not a train.text_to_image run folder"):
        read_run(tmp_path, "train.text_to_image")
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(JaxdiffError, match="is damaged"):
        read_run(tmp_path)


def test_run_folders_of_earlier_versions_are_read(tmp_path):
    from jaxdiff.pipelines.class_conditioned import RunConfig, is_run_folder
    from jaxdiff.training.run_folder import read_run

    mnist, sd, unet = tmp_path / "mnist", tmp_path / "sd", tmp_path / "unet"
    for d in (mnist, sd, unet):
        d.mkdir()
    (mnist / "config.json").write_text(json.dumps({"model": {"m": 1}, "scheduler": {"s": 2},
                                                   "train": {"lr": 0.5, "data": "MNIST test split"}}))
    (sd / "train_config.json").write_text(json.dumps({"train": {"lr": 1e-5}, "total_steps": 9,
                                                      "data": {"fingerprint": "f", "images": 3}}))
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "model": {}, "scheduler": {}}))
    old = read_run(mnist, "train.mnist")
    assert (old.train, old.data, old.total_steps) == ({"lr": 0.5}, {"source": "MNIST test split"}, None)
    assert RunConfig.read(mnist) == RunConfig(model={"m": 1}, scheduler={"s": 2}, train={"lr": 0.5})
    assert is_run_folder(mnist) and not is_run_folder(sd) and not is_run_folder(unet)
    assert not is_run_folder(tmp_path / "nowhere")
    assert read_run(sd, "train.text_to_image").total_steps == 9
    with pytest.raises(JaxdiffError, match="is not a run folder"):
        read_run(unet)  # a diffusers model's config.json is no run record


def test_resume_keeps_the_run_config_and_refuses_other_flag_values():
    import argparse

    from jaxdiff.training.configs import MNIST_MISSING, MnistConfig
    from jaxdiff.training.program import run_config

    flags = argparse.Namespace(model=None, batch_size=None, lr=0.5, seed=None, cfg_dropout=None,
                               ema_decay=None, snr_gamma=None)
    assert run_config(MnistConfig, flags, None) == MnistConfig(lr=0.5)
    saved = {"model": "tiny", "batch_size": 16, "lr": 0.5, "seed": 0, "cfg_dropout": 0.1, "ema_decay": 0.9}
    resumed = run_config(MnistConfig, flags, saved, missing=MNIST_MISSING)
    assert resumed == MnistConfig(model="tiny", batch_size=16, lr=0.5, ema_decay=0.9, snr_gamma=0.0)
    with pytest.raises(JaxdiffError, match=r"--lr 0.5 differs from the run's 0.001; --resume keeps"):
        run_config(MnistConfig, flags, {**saved, "lr": 0.001})

"""Text-to-image fine-tuning, the library: caption data, the loss (caption dropout, noise offset,
min-SNR, v target) against diffusers' definitions, the latent cache, pmap = one device,
checkpoints kept by a metric, logging. The program itself: test_program_text_to_image.py.

Everything runs on the tiny SD1 fixture (`tiny-sd-pt-v1`, a VAE that downsamples 2×) and a
16-image captioned folder made here: coloured squares on white, captions "a red square", ...
Tolerances are stated where float32 round-off enters; equal runs are compared bit for bit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OFFSET_SNR, RES, cached_batch, make_caption_folder, tok_fn

from jaxdiff import parallel
from jaxdiff.data.captions import (CaptionBatches, load_captions, load_imagefolder, pick_caption,
                              pixel_fetcher, prepare_image)
from jaxdiff.data.batches import DataPosition
from jaxdiff.errors import JaxdiffError
from jaxdiff.data.latent_cache import LatentCache
from jaxdiff.training.run_log import RunLog, read_jsonl
from jaxdiff.schedulers import create_scheduler
from jaxdiff.training.losses import min_snr_weights, snr
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.text_to_image import LossConfig, per_example_draws, sd_encoders, text_to_image_loss
from jaxdiff.training import create_train_state, make_train_step


def pixel_batch(sd, folder, ids):
    pipe, params = sd
    data = load_imagefolder(folder)
    fetch = pixel_fetcher(data, RES, tok_fn(pipe), workers=1)
    caps = np.array([data.caption_ids[i][0] for i in ids])
    batch = fetch(np.asarray(ids), caps)
    return {"pixels": batch["pixels"], "input_ids": batch["input_ids"],
            "encoders": {"vae": params["vae"], "text_encoder": params["text_encoder"]}}


# ------------------------------------------------------------------------------------------------
# Caption data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_reads_captions_from_metadata(tmp_path, fmt):
    folder = make_caption_folder(tmp_path, n=6, fmt=fmt)
    data = load_captions(folder, verbose=False)
    assert len(data) == 6
    assert data.captions[0] == ("a red square",) and data.captions[5] == ("a green square",)
    assert data.caption_strings == ["a red square", "a green square", "a blue square", "a yellow square"]
    assert data.image(1).size == (24, 20)


def test_several_captions_per_image_are_picked_per_epoch_deterministically(tmp_path):
    folder = make_caption_folder(tmp_path, n=4)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ["first", "second", "third"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_imagefolder(folder)
    assert data.captions[0] == ("first", "second", "third")
    picks = {pick_caption(3, seed=0, epoch=e, example=0) for e in range(30)}
    assert picks == {0, 1, 2}
    assert pick_caption(3, 0, 7, 0) == pick_caption(3, 0, 7, 0)


@pytest.mark.parametrize("problem, message", [
    ("no_metadata", "no metadata.jsonl or metadata.csv"),
    ("missing_image", "does not exist"),
    ("bad_json", "line 2 is not JSON"),
    ("no_caption_column", "no caption column"),
])
def test_bad_caption_folders_give_one_clear_error(tmp_path, problem, message):
    folder = make_caption_folder(tmp_path, n=3)
    meta = folder / "metadata.jsonl"
    if problem == "no_metadata":
        meta.unlink()
    elif problem == "missing_image":
        (folder / "images" / "001.png").unlink()
    elif problem == "bad_json":
        lines = meta.read_text().splitlines()
        meta.write_text(lines[0] + "\n{not json\n")
    else:
        meta.write_text('{"file_name": "images/000.png", "label": 3}\n')
    with pytest.raises(JaxdiffError, match=message):
        load_imagefolder(folder)


def test_a_missing_folder_that_is_no_hub_name_is_an_error(tmp_path):
    with pytest.raises(JaxdiffError, match="does not exist"):
        load_captions(tmp_path / "nowhere", verbose=False)


def test_prepare_image_resizes_the_short_side_and_crops_the_centre():
    from PIL import Image

    im = np.zeros((40, 80, 3), np.uint8)
    im[:, 20:60] = 255  # the centre square is white, the sides black
    out = prepare_image(Image.fromarray(im), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 1:-1].min() > 200  # the centre survived, the black sides were cropped
    gray = prepare_image(Image.fromarray(im[..., 0], "L"), 8)
    assert gray.shape == (8, 8, 3)


def test_batches_resume_exactly_and_hosts_read_their_own_rows(caption_folder):
    data = load_imagefolder(caption_folder)

    def fetch(ids, caps):
        return {"index": ids, "caption": caps}

    full = CaptionBatches(data, 4, fetch, seed=3, workers=0)
    seen = [next(full)["index"] for _ in range(9)]  # 4 batches per epoch: crosses two epochs
    assert full.position == DataPosition(2, 4)
    assert sorted(np.concatenate(seen[:4]).tolist()) == list(range(16))  # each epoch: every image once

    resumed = CaptionBatches(data, 4, fetch, seed=3, position=DataPosition(1, 8), workers=2)
    for expected in seen[6:]:
        np.testing.assert_array_equal(next(resumed)["index"], expected)
    resumed.close()

    hosts = [CaptionBatches(data, 4, fetch, seed=3, process_index=i, process_count=2, workers=0)
             for i in range(2)]
    for expected in seen[:5]:
        np.testing.assert_array_equal(np.concatenate([next(h)["index"] for h in hosts]), expected)


# ------------------------------------------------------------------------------------------------
# The loss, on cached latents (the UNet only: cheap to compile) and on the fly
# ------------------------------------------------------------------------------------------------

def draws_of(key, batch_size, p=0.0, offset=0.0, latent_shape=(8, 8, 4)):
    keys = parallel.example_keys(key, batch_size, None)
    return jax.vmap(lambda k: per_example_draws(k, latent_shape, 1000, p, offset))(keys)


def test_caption_dropout_replaces_the_caption_by_the_empty_prompt(sd, cache, losses):
    params = sd[1]["unet"]
    batch = cached_batch(cache, range(8))
    key = jax.random.PRNGKey(4)
    drop = np.asarray(draws_of(key, 8, p=0.3)["drop"])  # the same per-example keys decide
    assert 0 < drop.sum() < 8
    by_hand = dict(batch, context=np.where(drop[:, None, None], cache[1].null_context[None], batch["context"]))
    np.testing.assert_allclose(float(losses["dropout"](params, batch, key)[0]),
                               float(losses["plain"](params, by_hand, key)[0]), rtol=1e-6)
    rate = np.mean(draws_of(jax.random.PRNGKey(0), 4000, p=0.1, latent_shape=(1, 1, 4))["drop"])
    assert abs(rate - 0.1) < 0.015  # 4000 draws: 3 sigma is 0.014


def test_cached_latents_give_the_on_the_fly_loss(sd, caption_folder, cache, losses):
    ids = [3, 0, 7, 12]
    key = jax.random.PRNGKey(2)
    a = losses["dropout_on_the_fly"](sd[1]["unet"], pixel_batch(sd, caption_folder, ids), key)[0]
    b = losses["dropout"](sd[1]["unet"], cached_batch(cache, ids), key)[0]
    # float32 cache: the same numbers up to the encoders' batch-size-dependent round-off
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_noise_offset_adds_one_constant_per_channel():
    key = jax.random.PRNGKey(0)
    plain = per_example_draws(key, (8, 8, 4), 1000, 0.0, 0.0)["noise"]
    offset = per_example_draws(key, (8, 8, 4), 1000, 0.0, 0.1)["noise"]
    diff = np.asarray(offset - plain)
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:1, :1], diff.shape), atol=1e-6)  # (a + c) - a round-off
    assert np.all(np.abs(diff[0, 0]) > 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_and_v_target_match_diffusers(sd, cache, losses, model_dir, prediction_type):
    """The loss against diffusers' own pieces, given the same latents, noise and timesteps:
    DDPMScheduler.add_noise / get_velocity, the PyTorch UNet2DConditionModel, and
    training_utils.compute_snr with the min-SNR weights of train_text_to_image.py."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr

    from jaxdiff.models.autoencoder_kl import DiagonalGaussianDistribution, scale_latents

    pipe, params = sd
    batch = cached_batch(cache, range(4))
    key = jax.random.PRNGKey(1)
    ours, metrics = losses["plain" if prediction_type == "epsilon" else "v"](params["unet"], batch, key)

    ref = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", prediction_type=prediction_type)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    post = DiagonalGaussianDistribution.from_moments(jnp.asarray(batch["moments"]))
    d = draws_of(key, 4, offset=0.05)
    latents = scale_latents(pipe.vae.config, post.mean + post.std * d["latent"])

    def nchw(x):
        return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)

    t = torch.tensor(np.asarray(d["t"]))
    noise = nchw(d["noise"])
    with torch.no_grad():
        pred = unet(ref.add_noise(nchw(latents), noise, t), t, torch.tensor(batch["context"])).sample
    target = noise if prediction_type == "epsilon" else ref.get_velocity(nchw(latents), noise, t)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr_t = compute_snr(ref, t)
    w = torch.stack([snr_t, 5.0 * torch.ones_like(snr_t)], dim=1).min(dim=1)[0]
    w = w / snr_t if prediction_type == "epsilon" else w / (snr_t + 1)
    # float32 PyTorch vs XLA UNets: ~1e-6 relative per output
    np.testing.assert_allclose(float(ours), float((mse * w).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mse"]), float(mse.mean()), rtol=1e-5)
    sched = create_scheduler(model_dir / "scheduler", name="ddpm")
    np.testing.assert_allclose(np.asarray(min_snr_weights(snr(sched.create_state().alphas_cumprod, d["t"]), 5.0,
                                                          prediction_type)), w.numpy(), rtol=1e-5)


def test_optimizer_warms_up_clips_and_decays():
    tx, lr = make_optimizer(1e-3, total_steps=100, warmup_steps=10, schedule="cosine", max_grad_norm=1.0)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4) and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
    params = {"w": jnp.zeros(3)}
    huge = {"w": jnp.array([3e3, 4e3, 0.0])}
    clip = optax.clip_by_global_norm(1.0)
    np.testing.assert_allclose(np.asarray(clip.update(huge, clip.init(params))[0]["w"]), [0.6, 0.8, 0.0], rtol=1e-6)
    updates, _ = tx.update(huge, tx.init(params), params)  # first step: lr(0) = 0, nothing moves
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    with pytest.raises(JaxdiffError, match="unknown learning-rate schedule"):
        make_optimizer(1e-3, total_steps=10, schedule="step")


def test_the_cache_is_reused_and_rebuilt_when_its_inputs_change(sd, cache, capsys):
    pipe, params = sd
    data, c = cache
    again = LatentCache.build_or_open(c.folder, data, pipe, params, resolution=RES, tokenize=tok_fn(pipe),
                                      dtype="float32", verbose=True, **sd_encoders(pipe))
    assert "reusing" in capsys.readouterr().err
    other = LatentCache.build_or_open(c.folder.with_name("d"), data, pipe, params, resolution=RES,
                                      tokenize=tok_fn(pipe), dtype="float16", verbose=False, **sd_encoders(pipe))
    np.testing.assert_allclose(other.fetch(np.arange(16), np.zeros(16, int))["moments"],
                               again.fetch(np.arange(16), np.zeros(16, int))["moments"], rtol=2e-3, atol=2e-3)
    rebuilt = LatentCache.build_or_open(c.folder.with_name("d"), data, pipe, params, resolution=2 * RES,
                                        tokenize=tok_fn(pipe), dtype="float16", verbose=True,
                                        **sd_encoders(pipe))
    assert "rebuilding" in capsys.readouterr().err
    assert rebuilt.latent_shape == (16, 16, 8)


def test_pmap_over_8_devices_equals_one_device_on_the_same_global_batch(sd, cache):
    assert jax.local_device_count() == 8
    pipe, params = sd
    sched = create_scheduler(Path(pipe.folder) / "scheduler", name="ddpm")
    cfg = LossConfig(cfg_dropout=0.25, **OFFSET_SNR)
    tx = optax.sgd(0.1)  # linear in the gradients (Adam would magnify round-off in tiny gradients)
    batches = [cached_batch(cache, np.arange(8)), cached_batch(cache, np.arange(8, 16))]
    state = create_train_state(params["unet"], tx, jax.random.PRNGKey(5), ema=True)

    def run(axis_name):
        loss_fn = text_to_image_loss(pipe, sched, cfg, null_context=cache[1].null_context, axis_name=axis_name)
        step = make_train_step(loss_fn, tx, axis_name=axis_name)
        if axis_name is None:
            s, out, step = state, [], jax.jit(step)
            for b in batches:
                s, m = step(s, b)
                out.append((float(m["loss"]), float(m["grad_norm"])))
            return s, out
        s, out, step = parallel.replicate(state), [], parallel.pmap(step, donate_state=False)
        for b in batches:
            s, m = step(s, parallel.shard(b))
            out.append((float(m["loss"][0]), float(m["grad_norm"][0])))
        return parallel.unreplicate(s), out

    one, m1 = run(None)
    eight, m8 = run(parallel.AXIS)
    # Same noise, timesteps and dropout per example; only the order of float sums differs.
    np.testing.assert_allclose(m8, m1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight.ema_params), jax.tree.leaves(one.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Checkpoints: keep-last-N plus the best by a metric
# ------------------------------------------------------------------------------------------------

def test_checkpoints_keep_the_last_n_and_the_best_by_the_metric(tmp_path):
    from jaxdiff.training import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2, best_metric="eval_loss")
    state = create_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.PRNGKey(0))
    for step, loss in enumerate([0.5, 0.1, 0.4, float("nan"), 0.2], start=1):
        ckpt.save(state.replace(step=jnp.int32(step)), metrics={"eval_loss": loss, "train_loss": 1.0})
    ckpt.wait()
    assert ckpt.steps == [2, 4, 5]  # the last two, and step 2 (the lowest eval loss; NaN ranks last)
    assert ckpt.best_step() == 2
    _, meta = ckpt.restore_latest(state)
    assert meta["step"] == 5 and meta["metrics"] == {"eval_loss": 0.2, "train_loss": 1.0}
    ckpt.close()


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

def test_jsonl_log_records_scalars_and_images_and_drops_records_after_a_resume(tmp_path):
    log = RunLog(tmp_path, total_steps=30, images_per_step=4, progress=False, backend="jsonl")
    log.start_timing(0)
    for step in (10, 20, 30):
        log.scalars(step, {"loss": 1.0 / step})
    log.image(30, "samples", np.zeros((8, 8, 3), np.uint8))
    log.close()
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 30]
    assert records[0]["loss"] == pytest.approx(0.1) and "images_per_s" in records[1]
    assert (tmp_path / "logs" / records[-1]["path"]).is_file()
    resumed = RunLog(tmp_path, total_steps=30, initial_step=20, progress=False, backend="jsonl")
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl")] == [10, 20]


def test_tensorboard_log_writes_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    log = RunLog(tmp_path, total_steps=10, progress=False, backend="tensorboard")
    log.scalars(5, {"loss": 0.5})
    log.image(5, "samples", np.zeros((8, 8, 3), np.uint8))
    log.close()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------
# The program
# ------------------------------------------------------------------------------------------------

def test_a_hub_dataset_name_without_the_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(JaxdiffError, match="needs the datasets package"):
        load_captions("lambdalabs/naruto-blip-captions", verbose=False)



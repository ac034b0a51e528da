"""Text-to-image fine-tuning (train.text_to_image): caption data, the loss (caption dropout, noise
offset, min-SNR, v target) against diffusers' definitions, the latent cache, pmap = one device,
the program end to end (loss decreases, EMA, export that diffusers' PyTorch UNet loads and runs
identically), SIGTERM mid-run + a damaged checkpoint + resume = an uninterrupted run, logging.

Everything runs on the tiny SD1 fixture (`tiny-sd-pt-v1`, a VAE that downsamples 2×) and a
16-image captioned folder made here: coloured squares on white, captions "a red square", ...
Tolerances are stated where float32 round-off enters; equal runs are compared bit for bit.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from subprocesses import subprocess_env

from jaxdiff import parallel
from jaxdiff.data.captions import (CaptionBatches, load_captions, load_imagefolder, pick_caption,
                              pixel_fetcher, prepare_image)
from jaxdiff.data.batches import DataPosition
from jaxdiff.errors import JaxdiffError
from jaxdiff.data.latent_cache import LatentCache
from jaxdiff.pipelines.stable_diffusion import load_pipeline
from jaxdiff.training.run_log import RunLog, read_jsonl
from jaxdiff.schedulers import create_scheduler
from jaxdiff.training.losses import min_snr_weights, snr
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.text_to_image import LossConfig, per_example_draws, text_to_image_loss
from jaxdiff.tokenizer import tokenize
from jaxdiff.training import create_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
RES = 16  # pixels: 8×8 latents with the fixture's 2× VAE
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_caption_folder(folder: Path, n: int = 16, fmt: str = "jsonl", seed: int = 0) -> Path:
    """`n` images of one coloured square each (sizes vary, not square) with captions."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = list(COLORS)[i % 4]
        w, h = (24, 20) if i % 2 else (20, 28)
        im = np.full((h, w, 3), 245, np.uint8)
        y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
        im[y:y + h // 2, x:x + w // 2] = COLORS[name]
        Image.fromarray(im).save(folder / "images" / f"{i:03d}.png")
        rows.append({"file_name": f"images/{i:03d}.png", "text": f"a {name} square"})
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(
            f"{r['file_name']},{r['text']}\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    return make_caption_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def model_dir(fixtures_dir):
    return fixtures_dir / "tiny-sd-pt-v1"


@pytest.fixture(scope="module")
def sd(model_dir):
    """The fixture pipeline in float32 (exact comparisons), its data and helpers."""
    pipe, params = load_pipeline(model_dir, dtype=jnp.float32)
    return pipe, params


def tok_fn(pipe):
    return lambda strings: tokenize(pipe.tokenizer, list(strings), pipe.max_length)


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

@pytest.fixture(scope="module")
def cache(sd, caption_folder, tmp_path_factory):
    pipe, params = sd
    data = load_imagefolder(caption_folder)
    folder = tmp_path_factory.mktemp("cache") / "c"
    return data, LatentCache.build_or_open(folder, data, pipe, params, resolution=RES, tokenize=tok_fn(pipe),
                                           dtype="float32", batch_size=8, verbose=False)


def cached_batch(cache, ids):
    data, c = cache
    ids = np.asarray(ids)
    b = c.fetch(ids, np.array([data.caption_ids[i][0] for i in ids]))
    return {"moments": b["moments"], "context": b["context"]}


OFFSET_SNR = dict(noise_offset=0.05, snr_gamma=5.0)


@pytest.fixture(scope="module")
def losses(sd, cache):
    """Jitted losses shared by the tests below: cached plain / with caption dropout / v target,
    and on the fly with caption dropout."""
    pipe, _ = sd
    null_context = cache[1].null_context
    folder = Path(pipe.folder) / "scheduler"
    eps = create_scheduler(folder, name="ddpm")
    v = create_scheduler(folder, name="ddpm", prediction_type="v_prediction")
    null_ids = tok_fn(pipe)([""])[0]
    return {
        "plain": jax.jit(text_to_image_loss(pipe, eps, LossConfig(**OFFSET_SNR), axis_name=None)),
        "dropout": jax.jit(text_to_image_loss(pipe, eps, LossConfig(cfg_dropout=0.3, **OFFSET_SNR),
                                              null_context=null_context, axis_name=None)),
        "v": jax.jit(text_to_image_loss(pipe, v, LossConfig(**OFFSET_SNR), axis_name=None)),
        "dropout_on_the_fly": jax.jit(text_to_image_loss(pipe, eps, LossConfig(cfg_dropout=0.3, **OFFSET_SNR),
                                                         null_ids=null_ids, axis_name=None)),
    }


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
                                      dtype="float32", verbose=True)
    assert "reusing" in capsys.readouterr().err
    other = LatentCache.build_or_open(c.folder.with_name("d"), data, pipe, params, resolution=RES,
                                      tokenize=tok_fn(pipe), dtype="float16", verbose=False)
    np.testing.assert_allclose(other.fetch(np.arange(16), np.zeros(16, int))["moments"],
                               again.fetch(np.arange(16), np.zeros(16, int))["moments"], rtol=2e-3, atol=2e-3)
    rebuilt = LatentCache.build_or_open(c.folder.with_name("d"), data, pipe, params, resolution=2 * RES,
                                        tokenize=tok_fn(pipe), dtype="float16", verbose=True)
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

def run_args(model_dir, data, out, *extra):
    return ["--model-dir", str(model_dir), "--train-data", str(data), "--out", str(out),
            "--resolution", str(RES), "--batch-size", "8", "--no-progress", "--log-backend", "jsonl", *extra]


@pytest.fixture(scope="module")
def trained(model_dir, caption_folder, tmp_path_factory):
    """One in-process run of the program on 8 devices, with EMA, on the fly."""
    from train.text_to_image import main

    out = tmp_path_factory.mktemp("run") / "run"
    main(run_args(model_dir, caption_folder, out, "--no-compile-cache", "--steps", "40", "--lr", "3e-3", "--warmup-steps", "5",
                  "--ema-decay", "0.9", "--checkpoint-every", "20", "--eval-every", "20",
                  "--sample-steps", "3", "--samples-per-prompt", "1", "--snr-gamma", "5"))
    return out


def fixed_eval_loss(losses, cache, unet_params):
    """The plain loss over all 16 cached examples and 4 fixed keys."""
    batch = cached_batch(cache, range(16))
    return np.mean([float(losses["plain"](unet_params, batch, jax.random.PRNGKey(k))[0]) for k in range(4)])


def test_training_lowers_the_loss(trained, sd, losses, cache):
    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition

    _, after = load_unet_2d_condition(trained / "unet")
    assert fixed_eval_loss(losses, cache, after) < 0.8 * fixed_eval_loss(losses, cache, sd[1]["unet"])
    records = read_jsonl(trained / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_loss" in r] == [20]
    assert any(r.get("image") == "samples" for r in records)


def test_the_export_holds_the_ema_weights_and_loads_in_diffusers_with_the_same_output(trained):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition
    from jaxdiff.training import Checkpointer

    module, exported = load_unet_2d_condition(trained / "unet")
    ckpt = Checkpointer(trained / "checkpoints", create=False)
    ema, meta = ckpt.restore_part(40, "ema_params")
    params, _ = ckpt.restore_part(40, "params")
    ckpt.close()
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))

    ref = UNet2DConditionModel.from_pretrained(trained / "unet").eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 77, 32)).astype(np.float32)
    t = np.array([3, 700])
    ours = np.asarray(module.apply({"params": exported}, x, t, ctx))
    with torch.no_grad():
        theirs = ref(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(ctx)).sample
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-5)  # float32 round-off
    pipe = StableDiffusionPipeline.from_pretrained(trained)  # RUN is a whole pipeline folder
    assert isinstance(pipe.unet, UNet2DConditionModel)
    load_pipeline(trained, dtype=jnp.float32)


@pytest.mark.parametrize("change, message", [
    (["--resolution", "15"], "multiple of 2"),
    (["--cfg-dropout", "1.5"], "must be in"),
    (["--train-data", "/nonexistent/folder"], "does not exist"),
])
def test_bad_input_is_one_error_line(model_dir, caption_folder, tmp_path, change, message):
    args = run_args(model_dir, caption_folder, tmp_path / "r", "--steps", "1")
    flag = change[0]
    i = args.index(flag) if flag in args else None
    args = args[:i] + change + args[i + 2:] if i is not None else args + change
    proc = subprocess.run([sys.executable, "-m", "train.text_to_image", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=subprocess_env(1))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_with_a_different_setting_or_changed_data_is_refused(trained, caption_folder, capsys, tmp_path):
    import shutil

    from train.text_to_image import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(trained), "--resume", "--lr", "1.0", "--no-compile-cache"])
    assert e.value.code == 2 and "--lr 1.0 differs from the run's" in capsys.readouterr().err
    run = tmp_path / "run"  # the same run, but one caption of its data edited since
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints", "cache", "unet", "vae", "text_encoder"))
    data = tmp_path / "data"
    shutil.copytree(caption_folder, data)
    meta = data / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a red square", "a crimson square", 1))
    config = json.loads((run / "train_config.json").read_text())
    config["train"]["train_data"] = str(data)
    (run / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(["--out", str(run), "--resume", "--no-compile-cache"])
    assert "the training data changed since this run started" in capsys.readouterr().err


def test_a_hub_dataset_name_without_the_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(JaxdiffError, match="needs the datasets package"):
        load_captions("lambdalabs/naruto-blip-captions", verbose=False)


TRAIN = [sys.executable, "-m", "train.text_to_image"]
# The runs compared bit for bit: cached float32 latents, EMA, a checkpoint every 6 steps, kept.
REFERENCE_FLAGS = ["--checkpoint-every", "6", "--lr", "1e-3", "--ema-decay", "0.9", "--cache-latents",
                   "--cache-dtype", "float32", "--no-samples", "--best-metric", "none", "--keep-checkpoints", "5"]
_REFERENCE: dict = {}  # one reference run per session, shared with test_distributed.py


@pytest.fixture
def reference_run(fixtures_dir, tmp_path_factory):
    """(data folder, run folder) of 24 uninterrupted steps on one process with 2 devices, in a
    subprocess: the baseline of the SIGTERM test here and of the multi-host test."""
    if "run" not in _REFERENCE:
        data = make_caption_folder(tmp_path_factory.mktemp("reference_data"))
        out = tmp_path_factory.mktemp("reference") / "run"
        proc = subprocess.run(TRAIN + run_args(fixtures_dir / "tiny-sd-pt-v1", data, out, "--steps", "24",
                                               *REFERENCE_FLAGS),
                              cwd=ROOT, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCE["run"] = (data, out)
    return _REFERENCE["run"]


def checkpoint_part(out, step, part="params"):
    from jaxdiff.training import Checkpointer

    ckpt = Checkpointer(out / "checkpoints", create=False)
    tree, meta = ckpt.restore_part(step, part)
    ckpt.close()
    return tree, meta


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_mid_run_then_a_damaged_checkpoint_then_resume_equals_an_uninterrupted_run(
        model_dir, reference_run, tmp_path):
    """Killed with SIGTERM after step 6: it saves a checkpoint at the step it stopped and exits
    143. The newest checkpoint is then damaged: --resume warns, goes back to the previous good
    one, and the finished run is bit for bit the run that was never stopped."""
    data, reference = reference_run
    env = subprocess_env(2)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(TRAIN + run_args(model_dir, data, out, "--steps", "24", *REFERENCE_FLAGS), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "6").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(err.split("stopped at step ")[1].split(";")[0])
    assert 6 < stopped_at < 24
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped_at  # nothing lost: the stop step itself was saved

    newest = out / "checkpoints" / str(steps[-1]) / "state"
    for f in newest.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    resumed = subprocess.run(TRAIN + ["--out", str(out), "--resume", "--no-progress"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning:" in resumed.stderr and f"resumed from step {steps[-2]}" in resumed.stderr
    for part in ("params", "ema_params", "opt_state"):
        assert_trees_equal(checkpoint_part(out, 24, part)[0], checkpoint_part(reference, 24, part)[0])

"""Fine-tuning UNet2DModel pipelines (train.finetune, jaxdiff.training.finetune, jaxdiff.data.images)
on tiny diffusers folders built here and a few tiny PNGs: the image-folder layouts and their
deterministic crops/flips, the loss going down, K-step gradient accumulation equal to the one
batch update, the export that PyTorch's DDPMPipeline loads and samples like jaxdiff, a class-
conditional UNet on class sub-folders, SIGTERM + resume equal to an uninterrupted run, and bad
input as one line. Program runs are `extended`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import assert_close, assert_trees_equal, checkpoint_part, nchw, nhwc, perturb
from subprocesses import subprocess_env

from jaxdiff.errors import JaxdiffError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8  # the tiny UNet's sample_size
TRAIN = [sys.executable, "-m", "train.finetune"]


def tiny_pipeline(folder: Path, num_class_embeds=None, seed=0) -> Path:
    """A DDPMPipeline folder (unet/ + scheduler/ + model_index.json) with an 8×8 RGB UNet whose
    weights are perturbed (so no weight is zero and every path matters)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                       num_class_embeds=num_class_embeds)
    perturb(unet)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def tiny_images(folder: Path, n: int = 16, classes: int = 0, seed: int = 0) -> Path:
    """`n` small PNGs of varied, non-square sizes: flat, or in `classes` sub-folders. Each class
    is a colour, so a model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % max(1, classes)
        h, w = (10, 12) if i % 2 else (12, 9)
        im = rng.integers(0, 60, (h, w, 3)).astype(np.uint8) + np.uint8(60 * c)
        im[h // 4:h // 2, w // 4:3 * w // 4] = 255
        target = folder / f"class_{c}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(target / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe")


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("flat") / "flat")


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("classes") / "classes", n=12, classes=3)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def test_the_three_folder_layouts(flat, classes, tmp_path):
    from jaxdiff.data.images import load_image_folder

    data = load_image_folder(flat)
    assert len(data) == 16 and data.labels is None and data.num_classes is None
    data = load_image_folder(classes)
    assert data.class_names == ("class_0", "class_1", "class_2")
    assert [int(data.labels[data.names.index(str(classes / f"class_{i % 3}" / f"{i:03d}.png"))])
            for i in range(12)] == [i % 3 for i in range(12)]
    rows = [{"file_name": f"{i:03d}.png", "label": ["cat", "dog"][i % 2]} for i in range(16)]
    (tmp_path / "meta").mkdir()
    tiny_images(tmp_path / "meta")
    (tmp_path / "meta" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_image_folder(tmp_path / "meta")
    assert data.class_names == ("cat", "dog") and list(data.labels[:4]) == [0, 1, 0, 1]
    (tmp_path / "meta" / "metadata.jsonl").unlink()
    (tmp_path / "meta" / "metadata.csv").write_text("file_name,label\n" + "".join(
        f"{i:03d}.png,{i % 3}\n" for i in range(16)))
    data = load_image_folder(tmp_path / "meta")
    assert data.num_classes == 3 and list(data.labels[:4]) == [0, 1, 2, 0]


def test_a_folder_mixing_layouts_or_without_images_is_one_error(flat, tmp_path):
    from jaxdiff.data.images import load_image_folder

    tiny_images(tmp_path / "mixed", n=2)
    tiny_images(tmp_path / "mixed", n=2, classes=2)
    with pytest.raises(JaxdiffError, match="both at its top level and in sub-folders"):
        load_image_folder(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxdiffError, match="no images in"):
        load_image_folder(tmp_path / "empty")


def test_crops_and_flips_are_a_function_of_seed_epoch_and_example_so_batches_resume_exactly(flat):
    from jaxdiff.data.batches import DataPosition
    from jaxdiff.data.images import ImageBatches, ImageFetcher, Preprocess, load_image_folder

    data = load_image_folder(flat)
    prep = Preprocess((SIZE, SIZE), 3, random_crop=True, random_flip=True)

    def batches(position=DataPosition()):
        return ImageBatches(data, 4, ImageFetcher(data, prep, seed=3, workers=2), seed=3, position=position)

    whole = batches()
    run = [next(whole) for _ in range(10)]  # 2.5 epochs
    assert all(b["images"].shape == (4, SIZE, SIZE, 3) and b["images"].dtype == np.uint8 for b in run)
    resumed = batches(DataPosition(1, 8))  # after batch 6
    for b in run[6:]:
        np.testing.assert_array_equal(next(resumed)["images"], b["images"])
    # The augmentation varies: the same example in two epochs is cropped or flipped differently.
    draws = {prep.draws(3, epoch, 0) for epoch in range(8)}
    assert len(draws) == 8 and {d[2] for d in draws} == {True, False}
    centre = Preprocess((SIZE, SIZE), 3).crop_flip(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3), 0, 0, 0)
    assert centre[0, 0, 0] == (2 * 10 + 1) * 3  # the centre 8×8 window of a 12×10 image


# ------------------------------------------------------------------------------------------------
# The loss and the step (library, plain jit)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(pipe_dir, flat):
    """The tiny UNet, a fixed batch of 8 images, the loss, the program's AdamW step and plain
    SGD(1) steps with K = 1 and 2 micro-batches (their update is minus the gradient)."""
    import optax

    from jaxdiff.data.images import ImageFetcher, Preprocess, load_image_folder
    from jaxdiff.training import create_train_state, make_train_step
    from jaxdiff.training.finetune import (FinetuneConfig, finetune_loss, new_model, train_step_for,
                                           training_scheduler)

    config = FinetuneConfig(model_dir=str(pipe_dir), train_data=str(flat), lr=1e-3)
    model = new_model(config)
    loss_fn = finetune_loss(model.module, training_scheduler(model.scheduler_config), axis_name=None)
    data = load_image_folder(flat)
    batch = {"images": ImageFetcher(data, Preprocess(model.size, 3), workers=1)(np.arange(8), 0)["images"]}
    adamw, tx, _ = train_step_for(config, loss_fn, 100, axis_name=None)
    sgd = {k: jax.jit(make_train_step(loss_fn, optax.sgd(1.0), axis_name=None, grad_accum=k)) for k in (1, 2)}
    return model, jax.jit(loss_fn), batch, jax.jit(adamw), create_train_state(model.params, tx, jax.random.PRNGKey(1)), sgd


def test_training_lowers_the_loss(setup):
    _, loss_fn, batch, step, state, _ = setup
    keys = [jax.random.PRNGKey(k) for k in range(4)]

    def fixed_loss(params):
        return np.mean([float(loss_fn(params, batch, k)[0]) for k in keys])

    before = fixed_loss(state.params)
    for _ in range(30):
        state, metrics = step(state, batch)
    assert float(metrics["nonfinite"]) == 0.0
    assert fixed_loss(state.params) < 0.8 * before


def test_k_micro_batches_give_the_update_of_the_whole_batch(setup):
    """--grad-accum 2 on a batch of 8 = one update from all 8 (each example keeps its noise and
    timestep): with SGD(1) the update is the gradient, equal to float32 rounding (1e-5 of the
    largest gradient entry)."""
    import optax

    from jaxdiff.training import create_train_state

    model, _, batch, _, _, sgd = setup
    state = create_train_state(model.params, optax.sgd(1.0), jax.random.PRNGKey(1))
    one, _ = sgd[1](state, batch)
    two, metrics = sgd[2](state, batch)
    assert float(metrics["nonfinite"]) == 0.0
    grads = [np.asarray(a) - np.asarray(b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one.params))]
    scale = max(float(np.abs(g).max()) for g in grads)
    assert scale > 1e-3
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
        assert_close(a, b, 1e-5, scale=scale)


def test_the_export_is_a_pipeline_folder_the_guidance_loader_reads(setup, tmp_path):
    from jaxdiff.pipelines.unet_2d import load_denoiser
    from jaxdiff.training.finetune import export_pipeline

    model = setup[0]
    export_pipeline(tmp_path / "run", model.module, model.params, model.scheduler_config)
    index = json.loads((tmp_path / "run" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    loaded = load_denoiser(tmp_path / "run", "ddim")  # what sample.color_guidance / clip_guidance do
    assert loaded.sample_shape == (SIZE, SIZE, 3) and loaded.num_classes is None
    assert loaded.scheduler.num_train_timesteps == 100
    assert_trees_equal(loaded.params, model.params)


# ------------------------------------------------------------------------------------------------
# Bad input (in process; nothing is compiled)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda a, p, d, c: a[:2] + a[4:], "--train-data is required"),
    (lambda a, p, d, c: a[2:], "give --model-dir"),
    (lambda a, p, d, c: a + ["--config", str(p / "unet" / "config.json")], "give --model-dir"),
    (lambda a, p, d, c: ["--model-dir", str(p / "nope")] + a[2:], "does not exist"),
    (lambda a, p, d, c: a[:3] + [str(d / "nope")] + a[4:], "does not exist"),
    (lambda a, p, d, c: a + ["--batch-size", "17"], "larger than the data set"),
    (lambda a, p, d, c: a + ["--resolution", "7"], "must be a multiple of 2"),
    (lambda a, p, d, c: a + ["--beta-schedule", "linear"], "--beta-schedule is for a new model"),
    (lambda a, p, d, c: a + ["--sample-scheduler", "ddmi"], "unknown scheduler"),
    (lambda a, p, d, c: a + ["--lr", "0"], "--lr must be > 0"),
    (lambda a, p, d, c: ["--model-dir", str(c)] + a[2:], "has no labels"),
])
def test_bad_input_is_one_error_line(pipe_dir, flat, tmp_path_factory, capsys, change, message):
    from train.finetune import main

    cls = tmp_path_factory.getbasetemp() / "cls_pipe"
    if not cls.exists():
        tiny_pipeline(cls, num_class_embeds=3)
    out = tmp_path_factory.mktemp("bad") / "run"
    args = ["--model-dir", str(pipe_dir), "--train-data", str(flat), "--out", str(out), "--no-compile-cache"]
    with pytest.raises(SystemExit) as e:
        main(change(args, pipe_dir, flat, cls))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or err[0].startswith("data:"), err
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# The program (extended)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(pipe_dir, flat, tmp_path_factory):
    """One in-process run on 8 devices: batch 16 in 2 micro-batches, EMA, random crops and
    flips, a sample grid at step 10."""
    from train.finetune import main

    out = tmp_path_factory.mktemp("run") / "run"
    main(["--model-dir", str(pipe_dir), "--train-data", str(flat), "--out", str(out), "--no-compile-cache",
          "--steps", "20", "--batch-size", "16", "--grad-accum", "2", "--lr", "2e-3", "--ema-decay", "0.9",
          "--random-crop", "--random-flip", "--eval-every", "10", "--sample-steps", "3", "--num-samples", "4",
          "--no-progress", "--log-backend", "jsonl"])
    return out


@pytest.mark.extended
def test_the_run_logs_samples_and_exports_its_ema_weights(trained, capsys):
    from jaxdiff.models.unet_2d import load_unet_2d
    from jaxdiff.training.run_log import read_jsonl

    records = read_jsonl(trained / "logs" / "metrics.jsonl")
    assert sorted(r["step"] for r in records if r.get("image") == "samples") == [10, 20]
    assert (trained / "samples.png").is_file()
    _, exported = load_unet_2d(trained)
    assert_trees_equal(exported, checkpoint_part(trained, 20, "ema_params")[0])


@pytest.mark.extended
def test_the_export_loads_in_pytorch_ddpm_pipeline_and_samples_as_jaxdiff(trained):
    """DDPMPipeline.from_pretrained(RUN) with a DDIM scheduler (deterministic, eta 0) from the
    same initial noise as jaxdiff's sampler of the loaded folder: the same images (float32;
    1e-4 of the [0, 1] range covers 4 steps of a float32 UNet on two runtimes)."""
    import torch
    from diffusers import DDIMScheduler, DDPMPipeline

    from jaxdiff.pipelines.unet_2d import load_denoiser
    from jaxdiff.sampling import as_apply_fn, make_sampler

    pipe = DDPMPipeline.from_pretrained(trained)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    want = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                output_type="np").images
    model = load_denoiser(trained, "ddim")
    x0 = make_sampler(as_apply_fn(model.module), model.scheduler, 4)(model.params, nhwc(noise), jax.random.PRNGKey(0))
    got = np.clip(np.asarray(x0) * 0.5 + 0.5, 0, 1)
    assert float(np.abs(want).max()) > 0.1
    assert_close(got, want, 1e-4, scale=1.0)
    assert nchw(got).shape == (2, 3, SIZE, SIZE)


@pytest.mark.extended
def test_a_class_conditional_unet_trains_on_class_sub_folders(classes, tmp_path):
    from train.finetune import main

    from jaxdiff.models.unet_2d import load_unet_2d

    folder = tiny_pipeline(tmp_path / "cls_pipe", num_class_embeds=3)
    out = tmp_path / "run"
    main(["--model-dir", str(folder), "--train-data", str(classes), "--out", str(out), "--no-compile-cache",
          "--steps", "6", "--batch-size", "8", "--lr", "1e-2", "--sample-steps", "2", "--num-samples", "3",
          "--no-progress", "--log-backend", "jsonl"])
    record = json.loads((out / "jaxdiff_run.json").read_text())
    assert record["data"]["images"] == 12 and "labelled" in record["data"]["source"]
    module, after = load_unet_2d(out)
    _, before = load_unet_2d(folder)
    assert module.config.num_class_embeds == 3
    # The label embedding rows of the three classes were trained.
    moved = np.abs(np.asarray(after["class_embedding"]["embedding"]) - np.asarray(before["class_embedding"]["embedding"]))
    assert (moved.max(axis=1) > 1e-4).all()


@pytest.mark.extended
def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(pipe_dir, flat, tmp_path):
    """Stopped by SIGTERM once its first checkpoint is written, the run saves the step it
    stopped at and exits 143; --resume finishes it bit for bit like a run never stopped
    (params, EMA and optimizer state; data order, crops, flips and noise continue exactly)."""
    env = subprocess_env(1)
    common = ["--model-dir", str(pipe_dir), "--train-data", str(flat), "--steps", "120", "--batch-size", "4",
              "--lr", "1e-3", "--ema-decay", "0.9", "--random-crop", "--random-flip", "--no-samples",
              "--log-backend", "jsonl", "--no-progress"]
    whole = subprocess.run(TRAIN + common + ["--out", str(tmp_path / "whole"), "--checkpoint-every", "1000"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen(TRAIN + common + ["--out", str(out), "--checkpoint-every", "5", "--keep-checkpoints", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "5").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(err.split("stopped at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 120
    resumed = subprocess.run(TRAIN + ["--out", str(out), "--resume", "--no-progress"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["global_step"] == 120
    for part in ("params", "ema_params", "opt_state"):
        assert_trees_equal(checkpoint_part(out, 120, part)[0], checkpoint_part(tmp_path / "whole", 120, part)[0])

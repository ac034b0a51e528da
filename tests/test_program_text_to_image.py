"""The text-to-image fine-tuning program (train.text_to_image) end to end, on the tiny SD1
fixture and a 16-image captioned folder: the loss decreases, EMA, the export that diffusers'
PyTorch UNet loads and runs identically, bad input, --resume refusing other settings or changed
data, and SIGTERM mid-run + a damaged checkpoint + resume = an uninterrupted run.
Equal runs are compared bit for bit."""
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
import pytest
from helpers import RES, TRAIN, REFERENCE_FLAGS, assert_trees_equal, cached_batch, checkpoint_part, run_args  # noqa: F401
from subprocesses import subprocess_env

from jaxdiff.pipelines.stable_diffusion import load_pipeline
from jaxdiff.training.run_log import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


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
    config = json.loads((run / "jaxdiff_run.json").read_text())
    config["train"]["train_data"] = str(data)
    (run / "jaxdiff_run.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(["--out", str(run), "--resume", "--no-compile-cache"])
    assert "the training data changed since this run started" in capsys.readouterr().err


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

"""The MNIST programs end to end (train.mnist, sample.mnist): the summary, checkpoints and
sample grids, exact resume, SIGTERM / Ctrl-C, two processes = one process with two devices,
bad input, run folders of the earlier format, and (slow) the quality bar judged by the digit
classifier."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_trees_equal
from subprocesses import (STOPPABLE, TINY, final_params, run_cli, run_processes, start_training, stop_mid_run,
                          subprocess_env, train_in_process)

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_dir):
    """A tiny run of 3 steps with label dropout and EMA, through the command line."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = run_cli("train.mnist", "--data-dir", mnist_dir, "--out", out, "--steps", 3,
                   "--checkpoint-every", 2, "--eval-every", 2, "--log-every", 1, "--log-backend", "jsonl", *TINY)
    return out, proc


def test_train_prints_one_json_summary_and_writes_checkpoints_and_samples(trained_run):
    out, proc = trained_run
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    summary = json.loads(lines[0])
    assert summary["steps"] == 3 and summary["global_step"] == 3
    assert summary["train_seconds"] > 0 and summary["images_per_s"] > 0
    assert np.isfinite(summary["final_loss"]) and 0 < summary["final_loss"] < 5
    assert "data: MNIST test split" in proc.stderr and "loss=" not in proc.stdout
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 3]
    from PIL import Image

    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * (1 * 30 + 2), 2 * (10 * 30 + 2))  # 1 column, 10 rows, 2x enlarged


def test_eval_every_logs_sample_grids_and_the_loss(trained_run):
    from jaxdiff.training.run_log import read_jsonl

    out, _ = trained_run
    records = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # --eval-every 2 at step 2, and the final grid at step 3: the same grid as samples.png
    assert [(r["step"], r["path"]) for r in records if "image" in r] == \
        [(2, "samples-0000002.png"), (3, "samples-0000003.png")]
    from PIL import Image

    final = np.asarray(Image.open(out / "logs" / "samples-0000003.png"))
    assert np.array_equal(np.asarray(Image.open(out / "samples.png"))[::2, ::2], final)


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, mnist_dir):
    common = ["--data-dir", mnist_dir, "--model", "tiny", "--batch-size", 16, "--no-samples",
              "--cfg-dropout", 0.1, "--ema-decay", 0.9, "--checkpoint-every", 100]
    train_in_process("--out", tmp_path / "straight", "--steps", 4, *common)
    train_in_process("--out", tmp_path / "split", "--steps", 2, *common)
    summary = train_in_process("--out", tmp_path / "split", "--steps", 4, "--resume", *common)
    assert summary["steps"] == 2 and summary["global_step"] == 4
    for part in ("params", "ema_params"):
        straight, meta_a, _ = final_params(tmp_path / "straight", part)
        split, meta_b, _ = final_params(tmp_path / "split", part)
        assert_trees_equal(split, straight)  # same data order, noise and optimizer state: bitwise
        assert meta_a["data"] == meta_b["data"]


def test_sigterm_mid_run_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path, mnist_dir):
    out = tmp_path / "run"
    common = ["--data-dir", mnist_dir, *STOPPABLE]
    proc = start_training(out, "--steps", 100000, "--checkpoint-every", 100000, "--log-every", 1, *common)
    stderr = stop_mid_run(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "continue with --resume" in stderr
    _, _, stopped_at = final_params(out)
    assert stopped_at >= 1  # the step it was on when the signal came, saved although no checkpoint was due
    run_cli("train.mnist", "--out", out, "--steps", stopped_at + 1, "--resume", *common, "--no-progress")
    run_cli("train.mnist", "--out", tmp_path / "straight", "--steps", stopped_at + 1, *common, "--no-progress")
    assert_trees_equal(final_params(out)[0], final_params(tmp_path / "straight")[0])


def test_ctrl_c_mid_run_checkpoints_and_exits_130(tmp_path, mnist_dir):
    out = tmp_path / "run"
    proc = start_training(out, "--data-dir", mnist_dir, "--steps", 100000, "--checkpoint-every", 100000,
                           "--log-every", 1, *STOPPABLE)
    stderr = stop_mid_run(proc, signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert final_params(out)[2] >= 1


def test_two_processes_train_exactly_as_one_process_with_two_devices(tmp_path, mnist_dir):
    """Multi-host: two processes on localhost with one CPU device each (gloo collectives), against
    one process with two devices, same flags: the same checkpoints bit for bit, written once."""
    common = ["--data-dir", mnist_dir, "--steps", 4, "--checkpoint-every", 2, "--no-samples", "--no-progress",
              "--log-backend", "jsonl", *TINY]

    def command(out, *extra):
        return [sys.executable, "-m", "train.mnist", "--out", str(out), *map(str, common), *extra]

    single = subprocess.Popen(command(tmp_path / "single"), cwd=ROOT, env=subprocess_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = run_processes(command(tmp_path / "multi"))
        single_out, single_err = single.communicate(timeout=300)
    finally:
        if single.poll() is None:
            single.kill()
    assert single.returncode == 0, single_err[-3000:]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    outs = [(result.stdout, result.stderr) for result in results]
    reports = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    assert len(reports[0]) == 1 and reports[1] == []  # process 0 reports, logs and writes
    assert json.loads(reports[0][0])["devices"] == 2 == json.loads(single_out.strip().splitlines()[-1])["devices"]
    for part in ("params", "ema_params"):
        a, meta_a, step_a = final_params(tmp_path / "multi", part)
        b, meta_b, step_b = final_params(tmp_path / "single", part)
        assert step_a == step_b == 4 and meta_a["data"] == meta_b["data"]
        assert_trees_equal(a, b)


def test_sample_writes_a_grid_and_the_arrays(trained_run, tmp_path):
    run, _ = trained_run
    proc = run_cli("sample.mnist", "--run", run, "--out", tmp_path / "grid.png", "--steps", 3,
                   "--per-class", 2, "--guidance-scale", 3, "--save-array", tmp_path / "s.npz")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 20 and result["steps"] == 3 and result["sample_seconds"] > 0
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    assert (tmp_path / "grid.png").is_file()


def test_sampling_is_deterministic_for_a_seed_and_ddpm_runs_too(trained_run, tmp_path):
    from jaxdiff.pipelines.class_conditioned import load_run, sample_grid

    model, params, run = load_run(trained_run[0])
    a, _ = sample_grid(model, params, run.sampler("ddpm"), num_inference_steps=3, per_class=1, seed=1)
    b, _ = sample_grid(model, params, run.sampler("ddpm"), num_inference_steps=3, per_class=1, seed=1)
    c, _ = sample_grid(model, params, run.sampler("ddpm"), num_inference_steps=3, per_class=1, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ddim_from_a_clipping_config_pairs_the_clipped_x0_with_its_noise(trained_run):
    from jaxdiff.pipelines.class_conditioned import RunConfig

    run = RunConfig.read(trained_run[0])
    assert run.scheduler["clip_sample"] is True  # the course's DDPM config
    assert run.sampler("ddim").use_clipped_model_output is True
    assert run.sampler("ddim", use_clipped_model_output=False).use_clipped_model_output is False
    assert run.sampler("ddim", clip_sample=False).use_clipped_model_output is False


def test_a_run_folder_of_the_earlier_format_still_loads(trained_run, tmp_path):
    """Runs written before RUN/jaxdiff_run.json kept RUN/config.json ({model, scheduler, train});
    load_run (sample.mnist) reads them as before."""
    from jaxdiff.pipelines.class_conditioned import is_run_folder, load_run

    run, _ = trained_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    record = json.loads((old / "jaxdiff_run.json").read_text())
    (old / "jaxdiff_run.json").unlink()
    (old / "config.json").write_text(json.dumps({"model": record["model"], "scheduler": record["scheduler"],
                                                 "train": {**record["train"], "data": record["data"]["source"]}}))
    assert is_run_folder(old)
    model, params, config = load_run(old)
    new_model, new_params, new_config = load_run(run)
    assert model.to_config() == new_model.to_config() and config == new_config
    assert_trees_equal(params, new_params)


def test_a_run_folder_is_a_denoiser_for_the_guidance_programs(trained_run, tmp_path, capsys):
    """`load_denoiser` (sample.color_guidance / clip_guidance --model-dir) reads a train.mnist run
    as sample.mnist does: its model, EMA weights and sampler, one grey channel, 10 classes."""
    from jaxdiff.pipelines.class_conditioned import load_run
    from jaxdiff.pipelines.unet_2d import load_denoiser
    from sample import color_guidance

    run, _ = trained_run
    model = load_denoiser(run, "ddim")
    module, params, config = load_run(run)
    assert model.module == module and model.scheduler == config.sampler("ddim")
    assert model.sample_shape == (28, 28, 1) and model.num_classes == 10
    assert_trees_equal(model.params, params)
    np.testing.assert_array_equal(model.labels(12), np.arange(12) % 10)
    color_guidance.main(["--model-dir", str(run), "--color", "0.8", "--class-label", "3", "--steps", "2",
                         "--batch-size", "2", "--out", str(tmp_path / "bright3.png"), "--no-compile-cache"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["color"] == [0.8] and (tmp_path / "bright3.png").is_file()


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return copy


@pytest.mark.parametrize("case", [
    "train_empty_data_dir", "train_missing_data_dir", "train_unknown_scheduler", "train_wrong_image_size",
    "train_existing_run", "train_resume_other_lr", "train_resume_missing_run",
    "sample_unknown_scheduler", "sample_missing_run", "sample_no_checkpoint", "sample_damaged_checkpoints",
])
def test_bad_input_is_one_clear_error_line_with_exit_code_2(case, trained_run, tmp_path):
    run, _ = trained_run
    data = tmp_path / "data"
    data.mkdir()
    args = {
        "train_empty_data_dir": ("train.mnist", "--data-dir", data, "--out", tmp_path / "r", "--steps", 1),
        "train_missing_data_dir": ("train.mnist", "--data-dir", tmp_path / "nope", "--out", tmp_path / "r"),
        "train_unknown_scheduler": ("train.mnist", "--sample-scheduler", "ddmi", "--out", tmp_path / "r", *TINY),
        "train_wrong_image_size": ("train.mnist", "--data-dir", data, "--out", tmp_path / "r", *TINY),
        "train_existing_run": ("train.mnist", "--out", run, "--steps", 1, *TINY),
        "train_resume_other_lr": ("train.mnist", "--out", run, "--resume", "--lr", 0.5),
        "train_resume_missing_run": ("train.mnist", "--out", tmp_path / "nope", "--resume"),
        "sample_unknown_scheduler": ("sample.mnist", "--run", run, "--out", tmp_path / "g.png", "--scheduler", "ddmi"),
        "sample_missing_run": ("sample.mnist", "--run", tmp_path / "nope", "--out", tmp_path / "g.png"),
        "sample_no_checkpoint": ("sample.mnist", "--run", tmp_path / "nockpt", "--out", tmp_path / "g.png"),
        "sample_damaged_checkpoints": ("sample.mnist", "--run", None, "--out", tmp_path / "g.png"),
    }[case]
    expected = {
        "train_empty_data_dir": "no MNIST IDX files", "train_missing_data_dir": "does not exist",
        "train_unknown_scheduler": "unknown scheduler 'ddmi'", "train_wrong_image_size": "27x27",
        "train_existing_run": "already holds a run", "train_resume_other_lr": "--lr 0.5 differs",
        "train_resume_missing_run": "does not exist", "sample_unknown_scheduler": "unknown scheduler 'ddmi'",
        "sample_missing_run": "does not exist", "sample_no_checkpoint": "no checkpoints",
        "sample_damaged_checkpoints": "no usable checkpoint",
    }[case]
    if case == "train_wrong_image_size":
        from jaxdiff.data.mnist import write_idx

        write_idx(data / "t10k-images-idx3-ubyte", np.zeros((20, 27, 27), np.uint8))
        write_idx(data / "t10k-labels-idx1-ubyte", np.zeros((20,), np.uint8))
    if case == "sample_no_checkpoint":
        (tmp_path / "nockpt").mkdir()
        shutil.copy(run / "jaxdiff_run.json", tmp_path / "nockpt" / "jaxdiff_run.json")
    if case == "sample_damaged_checkpoints":
        args = tuple(_damaged_copy(run, tmp_path) if a is None else a for a in args)
    proc = run_cli(args[0], *args[1:], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cpu_training_reaches_90_percent_class_accuracy(tmp_path, mnist_dir):
    """The issue's bar: >= 90% of 100 class-conditional samples classified as the requested digit,
    after at most ~20 minutes of training on a 2-core CPU. Run: pytest -m slow -k reaches_90.

    The defaults (small model, batch 64, min-SNR 5, EMA, label dropout 0.1) for 3000 steps
    (~13 minutes on an idle 2-core CPU), sampled with the defaults (DDIM 40 steps, guidance 3):
    99% measured; the 2000-step README run reads 82%, 1000 steps 43%."""
    from jaxdiff.data.mnist import load_idx_folder
    from jaxdiff.eval.digit_classifier import accuracy, load_or_train

    out = tmp_path / "run"
    steps = int(os.environ.get("JAXDIFF_QUALITY_STEPS", "3000"))
    run_cli("train.mnist", "--data-dir", mnist_dir, "--out", out, "--steps", steps, "--no-samples",
            timeout=3600)
    proc = run_cli("sample.mnist", "--run", out, "--out", tmp_path / "grid.png", "--per-class", 10,
                   "--save-array", tmp_path / "samples.npz")
    with np.load(tmp_path / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    classifier, holdout = load_or_train(load_idx_folder(mnist_dir))
    assert holdout > 0.98
    acc = accuracy(classifier, images, labels)
    print(json.dumps({"class_accuracy": acc, "steps": steps, "sample": json.loads(proc.stdout)}))
    assert acc >= 0.9

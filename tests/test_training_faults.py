"""Faults a long training run must survive or report in one line: a non-finite step, a second
writer on the same folder, a failed file operation, a failure on process 0 alone."""
from __future__ import annotations

import errno
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_equal
from jaxdiff.errors import JaxdiffError, cli_main
from jaxdiff.parallel import distributed
from jaxdiff.training import create_train_state, make_train_step
from jaxdiff.data.folder_lock import FolderLock


def _quadratic_loss(params, batch, key):
    """Deterministic (ignores the key): mean((x·w − y)²)."""
    pred = batch["x"] @ params["w"]
    return jnp.mean(jnp.square(pred - batch["y"])), {}


def _batch(value=1.0):
    x = jnp.full((4, 3), value, jnp.float32)
    return {"x": x, "y": jnp.ones((4, 2), jnp.float32)}


@pytest.fixture(scope="module")
def step_fn():
    return jax.jit(make_train_step(_quadratic_loss, optax.adam(1e-2), axis_name=None))


def _fresh_state(ema=True):
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(3, 2) / 10}
    return create_train_state(params, optax.adam(1e-2), jax.random.PRNGKey(0), ema=ema)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_batch_changes_nothing_but_the_step_counter(step_fn, bad):
    state = _fresh_state()
    after, metrics = step_fn(state, _batch(bad))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(after.step) == 1
    assert_trees_equal((after.params, after.opt_state, after.ema_params),
                       (state.params, state.opt_state, state.ema_params))


def test_after_a_skipped_step_training_goes_on_as_if_it_never_happened(step_fn):
    state = _fresh_state()
    skipped, _ = step_fn(state, _batch(np.nan))
    resumed, metrics = step_fn(skipped, _batch(1.0))
    direct, _ = step_fn(state, _batch(1.0))
    assert float(metrics["nonfinite"]) == 0.0
    assert np.isfinite(float(metrics["loss"]))
    # The loss ignores the key, so only the optimizer state could tell the two apart.
    assert_trees_equal((resumed.params, resumed.opt_state), (direct.params, direct.opt_state))


def test_a_finite_step_reports_zero_nonfinite_and_updates(step_fn):
    state = _fresh_state(ema=False)
    after, metrics = step_fn(state, _batch(1.0))
    assert float(metrics["nonfinite"]) == 0.0
    assert not np.array_equal(np.asarray(after.params["w"]), np.asarray(state.params["w"]))


# ------------------------------------------------------------------------------------------------
# One writer per folder
# ------------------------------------------------------------------------------------------------

def test_a_second_writer_gets_one_clear_error(tmp_path):
    with FolderLock(tmp_path / "run", purpose="training run", hint=" or choose another --out"):
        with pytest.raises(JaxdiffError, match=r"in use by another training run \(host .* pid \d+\); "
                                               r"wait for it to finish or choose another --out"):
            FolderLock(tmp_path / "run", purpose="training run", hint=" or choose another --out").acquire()
    FolderLock(tmp_path / "run").acquire().release()  # released on exit


def test_a_lock_left_by_a_killed_process_is_free(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from jaxdiff.data.folder_lock import FolderLock; "
            f"FolderLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(JaxdiffError, match="in use"):
            FolderLock(folder).acquire()
    finally:
        proc.kill()
        proc.wait()
    FolderLock(folder).acquire().release()


def test_a_waiting_writer_gets_the_lock_when_the_holder_lets_go(tmp_path):
    holder = FolderLock(tmp_path).acquire()
    t0 = time.monotonic()
    import threading

    threading.Timer(0.5, holder.release).start()
    with FolderLock(tmp_path, wait_s=10):
        assert time.monotonic() - t0 >= 0.4


# ------------------------------------------------------------------------------------------------
# Failed file operations and process-0-only steps end in one line
# ------------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_error_line(capsys):
    @cli_main
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/7")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No space left on device: /runs/x/checkpoints/7; free some space (or choose "
                   "a folder on another disk) and run again"]


def test_on_main_process_reports_a_failure_as_one_jaxdiff_error():
    def write_config():
        raise OSError(errno.EACCES, "Permission denied", "/runs/x/run.json")

    with pytest.raises(JaxdiffError, match=r"^writing the run config failed: Permission denied: /runs/x/run.json$"):
        distributed.on_main_process(write_config, "writing the run config")
    assert distributed.on_main_process(lambda: 42, "answering") == 42


# ------------------------------------------------------------------------------------------------
# The same faults in a real program run (train.mnist, tiny model): marked `faults` (about 4 minutes
# on 2 cores), run by .ci/run after the default suite, and by `pytest -m faults`
# ------------------------------------------------------------------------------------------------

def _mnist_flags(mnist_dir, *extra):
    return ["--data-dir", mnist_dir, "--model", "tiny", "--batch-size", 16, "--no-samples",
            "--cfg-dropout", 0.1, "--ema-decay", 0.9, *extra]


def _poison_steps(monkeypatch, poisoned):
    """train.mnist's train step, with the loss made NaN at the steps `poisoned(step)` says."""
    import jaxdiff.training as training

    real = training.make_train_step

    def make_poisoned_step(loss_fn, tx, **kwargs):
        def loss(params, batch, key):
            value, metrics = loss_fn(params, {k: v for k, v in batch.items() if k != "poison"}, key)
            return value + batch["poison"], metrics

        step_fn = real(loss, tx, **kwargs)

        def train_step(state, batch):
            return step_fn(state, {**batch, "poison": jnp.where(poisoned(state.step + 1), jnp.nan, 0.0)})

        return train_step

    monkeypatch.setattr(training, "make_train_step", make_poisoned_step)


def _mnist_fails(argv: list, capsys) -> list[str]:
    """Run train.mnist in this process expecting one clean failure: its `error:` lines."""
    from train.mnist import main

    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, argv), "--no-progress", "--no-compile-cache"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _resumed_equals_uninterrupted(tmp_path, flags, steps, parts=("params",)) -> None:
    """--resume of tmp_path/run to `steps` reaches the params of an uninterrupted run, bit for bit."""
    from subprocesses import final_params, train_in_process

    train_in_process("--out", tmp_path / "run", "--steps", steps, "--resume", *flags)
    train_in_process("--out", tmp_path / "straight", "--steps", steps, *flags)
    for part in parts:
        assert_trees_equal(final_params(tmp_path / "run", part)[0], final_params(tmp_path / "straight", part)[0])


def _finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


@pytest.mark.faults
def test_a_nan_step_in_a_run_is_skipped_counted_and_the_run_finishes(tmp_path, mnist_dir, monkeypatch):
    from subprocesses import final_params, train_in_process

    _poison_steps(monkeypatch, lambda step: step == 2)
    summary = train_in_process("--out", tmp_path / "run", "--steps", 4, "--checkpoint-every", 2,
                               *_mnist_flags(mnist_dir))
    assert summary["global_step"] == 4 and summary["skipped_steps"] == 1
    assert np.isfinite(summary["final_loss"])
    for part in ("params", "ema_params"):
        params, _, step = final_params(tmp_path / "run", part)
        assert step == 4 and _finite(params)


@pytest.mark.faults
def test_non_finite_steps_in_a_row_end_the_run_in_one_line_with_the_last_step_saved(
        tmp_path, mnist_dir, monkeypatch, capsys):
    from subprocesses import final_params

    _poison_steps(monkeypatch, lambda step: step >= 3)
    errors = _mnist_fails(["--out", tmp_path / "run", "--steps", 50, "--checkpoint-every", 100,
                           "--max-nonfinite-steps", 3, *_mnist_flags(mnist_dir)], capsys)
    assert len(errors) == 1, errors
    assert "3 steps in a row (up to step 5) had a non-finite loss" in errors[0]
    assert "--max-nonfinite-steps" in errors[0] and "continue with --resume" in errors[0]
    params, _, step = final_params(tmp_path / "run")
    assert step >= 5 and _finite(params)  # never a non-finite state on disk


@pytest.mark.faults
def test_an_exception_mid_run_saves_the_last_step_and_resume_equals_an_uninterrupted_run(
        tmp_path, mnist_dir, monkeypatch, capsys):
    from subprocesses import final_params

    from jaxdiff.data.batches import BatchIterator

    flags = _mnist_flags(mnist_dir, "--checkpoint-every", 100)
    real_next = BatchIterator.__next__
    served = []

    def failing_next(self):
        if len(served) == 3:
            raise OSError(errno.EIO, "Input/output error", "/data/mnist/t10k-images-idx3-ubyte.gz")
        served.append(1)
        return real_next(self)

    monkeypatch.setattr(BatchIterator, "__next__", failing_next)
    errors = _mnist_fails(["--out", tmp_path / "run", "--steps", 6, *flags], capsys)
    assert errors == [f"error: Input/output error: /data/mnist/t10k-images-idx3-ubyte.gz (step 3 is saved "
                      f"in {tmp_path / 'run' / 'checkpoints'}: continue with --resume)"]
    assert final_params(tmp_path / "run")[2] == 3
    monkeypatch.setattr(BatchIterator, "__next__", real_next)
    _resumed_equals_uninterrupted(tmp_path, flags, 6, parts=("params", "ema_params"))


@pytest.mark.faults
def test_a_full_disk_while_checkpointing_is_one_error_line_and_the_earlier_checkpoint_resumes(
        tmp_path, mnist_dir, monkeypatch, capsys):
    from subprocesses import final_params

    from jaxdiff.training.checkpoint import Checkpointer

    flags = _mnist_flags(mnist_dir, "--checkpoint-every", 2)
    real_save = Checkpointer.save

    def save(self, state, *args, **kwargs):
        if int(jax.device_get(state.step)) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "4"))
        return real_save(self, state, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    errors = _mnist_fails(["--out", tmp_path / "run", "--steps", 6, *flags], capsys)
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free some space" in errors[0], errors
    monkeypatch.setattr(Checkpointer, "save", real_save)
    assert final_params(tmp_path / "run")[2] == 2
    _resumed_equals_uninterrupted(tmp_path, flags, 6)


@pytest.mark.faults
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_trains(tmp_path, mnist_dir):
    from subprocesses import STOPPABLE, read_until, run_cli, start_training

    out = tmp_path / "run"
    first = start_training(out, "--data-dir", mnist_dir, "--steps", 100000, "--checkpoint-every", 100000,
                           *STOPPABLE)
    try:
        read_until(first, "loss=", timeout=400)
        for extra in ([], ["--resume"]):
            proc = run_cli("train.mnist", "--out", out, "--data-dir", mnist_dir, "--steps", 5, *extra,
                           *STOPPABLE, check=False)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
            assert "is in use by another training run" in errors[0] and "choose another --out" in errors[0]
    finally:
        first.kill()
        first.wait()
    # The lock went with the killed process: the run resumes.
    run_cli("train.mnist", "--out", out, "--data-dir", mnist_dir, "--steps", 1, "--resume", *STOPPABLE,
            "--no-progress")


@pytest.mark.faults
def test_sigterm_twice_still_saves_the_step_and_resume_loses_nothing(tmp_path, mnist_dir):
    import signal

    from subprocesses import STOPPABLE, final_params, read_until, run_cli, start_training

    out = tmp_path / "run"
    common = ["--data-dir", mnist_dir, *STOPPABLE]
    proc = start_training(out, "--steps", 100000, "--checkpoint-every", 100000, *common)
    try:
        read_until(proc, "loss=", timeout=400)
        proc.send_signal(signal.SIGTERM)
        seen = read_until(proc, "stopping after this step", timeout=60)
        proc.send_signal(signal.SIGTERM)  # while it stops and saves
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = seen + rest.decode(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    _, _, stopped_at = final_params(out)
    assert stopped_at >= 1
    run_cli("train.mnist", "--out", out, "--steps", stopped_at + 1, "--resume", *common, "--no-progress")
    run_cli("train.mnist", "--out", tmp_path / "straight", "--steps", stopped_at + 1, *common, "--no-progress")
    assert_trees_equal(final_params(out)[0], final_params(tmp_path / "straight")[0])


@pytest.mark.faults
def test_resume_with_other_data_is_refused(tmp_path, mnist_dir):
    from subprocesses import run_cli

    from jaxdiff.data.mnist import load_idx_folder, write_idx

    run_cli("train.mnist", "--out", tmp_path / "run", "--data-dir", mnist_dir, "--steps", 1, "--model", "tiny",
            "--batch-size", 16, "--no-samples", "--no-progress")
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    data = load_idx_folder(mnist_dir)
    write_idx(fewer / "t10k-images-idx3-ubyte", data.images[:5000, ..., 0])
    write_idx(fewer / "t10k-labels-idx1-ubyte", data.labels[:5000].astype(np.uint8))
    proc = run_cli("train.mnist", "--out", tmp_path / "run", "--data-dir", fewer, "--steps", 2, "--resume",
                   "--no-progress", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the training data changed since this run started")


@pytest.mark.faults
def test_a_failure_on_process_0_alone_ends_both_processes_with_its_error(tmp_path, mnist_dir):
    """Only process 0 writes samples.png; here it cannot (a folder has that name). Both processes
    must exit with that error, quickly, instead of process 1 waiting for a heartbeat time-out."""
    from subprocesses import TINY, run_processes

    out = tmp_path / "run"
    (out / "samples.png").mkdir(parents=True)
    # A heartbeat time-out far longer than the test allows: waiting for it would fail the test.
    flags = ["--out", out, "--data-dir", mnist_dir, "--steps", 1, "--no-progress", *TINY, "--heartbeat-timeout", 600]
    results = run_processes([sys.executable, "-m", "train.mnist", *flags])
    for i, result in enumerate(results):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
        assert "writing samples.png failed: Is a directory" in errors[0]
        assert errors[0].startswith("error: process 0: ") == (i == 1)
    # Measured here: both end within a second of each other, 35-45 s after the start (mostly
    # compilation, less with a warm cache); the bound leaves room for a cold cache on a busy machine.
    assert abs(results[1].seconds - results[0].seconds) <= 15
    assert max(r.seconds for r in results) <= 120, [round(r.seconds) for r in results]


@pytest.mark.parametrize("program, flag", [
    ("train.mnist", "--epochs"), ("train.mnist", "--snr-gamma"), ("train.mnist", "--guidance-scale"),
    ("train.mnist", "--lr"), ("train.text_to_image", "--weight-decay"), ("train.text_to_image", "--epochs"),
    ("train.text_to_image", "--guidance-scale"), ("train.text_to_image", "--snr-gamma"),
])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_when_the_flags_are_read(program, flag, value, capsys):
    import importlib

    parse_args = importlib.import_module(program).parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args([f"{flag}={value}"])  # "=": argparse reads a bare "-inf" as an option
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"python -m {program}: error: argument {flag}: must be a finite number, got '{value}'"]


def test_a_lock_on_a_new_folder_left_empty_takes_the_folder_away_too(tmp_path):
    FolderLock(tmp_path / "new").acquire().release()
    assert not (tmp_path / "new").exists()  # a run that failed its checks leaves nothing behind
    lock = FolderLock(tmp_path / "used").acquire()
    (tmp_path / "used" / "jaxdiff_run.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == [".jaxdiff.lock", "jaxdiff_run.json"]
    FolderLock(tmp_path).acquire().release()
    assert tmp_path.is_dir()  # a folder that was there before stays

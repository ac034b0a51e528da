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
from jaxdiff.training.run_lock import FolderLock


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
    code = ("import sys, time; from jaxdiff.training.run_lock import FolderLock; "
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

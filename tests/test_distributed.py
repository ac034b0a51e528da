"""Multi-host start-up (jaxdiff.parallel.distributed) and the multi-host training run: two processes on
localhost (one CPU device each, gloo collectives) train exactly as one process with two devices
on the same global batches; process 0 alone writes the run folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REFERENCE_FLAGS, TRAIN, assert_trees_equal, checkpoint_part, run_args
from subprocesses import free_port, run_processes, subprocess_env

from jaxdiff.parallel import distributed
from jaxdiff.parallel.distributed import DistributedConfig
from jaxdiff.errors import JaxdiffError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config, message", [
    (DistributedConfig("127.0.0.1:1234", 2, None), "--process-id"),
    (DistributedConfig("localhost", 2, 0), "must be HOST:PORT"),
    (DistributedConfig("10.0.0.1:99", 2, 2), r"must be in \[0, 2\)"),
    (DistributedConfig(None, None, 1), "needs --coordinator-address"),
])
def test_incomplete_or_wrong_settings_are_one_clear_error(config, message):
    with pytest.raises(JaxdiffError, match=message):
        config.validate()


def test_flags_win_over_the_environment(monkeypatch):
    import argparse

    monkeypatch.setenv(distributed.ENV_ADDRESS, "10.0.0.1:1000")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    config = distributed.config_from_args(parser.parse_args(["--process-id", "1"]))
    assert config == DistributedConfig("10.0.0.1:1000", 4, 1)
    assert config.multi_process
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "four")
    with pytest.raises(JaxdiffError, match="not an integer"):
        distributed.config_from_args(None)


def test_a_single_process_run_needs_no_setup():
    assert distributed.initialize(DistributedConfig()) is False
    assert distributed.process_count() == 1 and distributed.is_main_process()
    assert distributed.host_slice(8) == slice(0, 8)
    assert distributed.check_batch_size(16) == 2  # 8 devices
    with pytest.raises(JaxdiffError, match="multiple of the 8 devices"):
        distributed.check_batch_size(12)
    tree = {"a": np.arange(3)}
    assert distributed.broadcast_from_main(tree) is tree
    distributed.sync("nothing to wait for")
    distributed.all_equal("x", "anything")


def test_an_unreachable_coordinator_is_one_clear_error():
    cmd = [sys.executable, "-c", "from jaxdiff.parallel import distributed; from jaxdiff.errors import cli_main; "
           "cli_main(lambda: distributed.initialize(distributed.DistributedConfig("
           f"'127.0.0.1:{free_port()}', 2, 1, timeout_s=2)))()"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the coordinator")


def test_two_processes_train_exactly_as_one_process_with_two_devices(fixtures_dir, reference_run, tmp_path):
    """Two processes with one device each, 6 steps, against the one-process two-device
    reference run at its step-6 checkpoint (the same flags; a constant learning rate, so the
    run's length does not change its first steps)."""
    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition

    data, reference = reference_run
    multi = tmp_path / "multi"
    args = run_args(fixtures_dir / "tiny-sd-pt-v1", data, multi, "--steps", "6", *REFERENCE_FLAGS)
    results = run_processes(TRAIN + args)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    outs = [(result.stdout, result.stderr) for result in results]
    reports = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    assert len(reports[0]) == 1 and reports[1] == []  # only process 0 reports (gloo prints too)
    summary = json.loads(reports[0][0])
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert len(list((multi / "cache").glob("moments-*.npy"))) == 2  # each process encoded half

    # A pmean over two values is a + b either way: the runs agree bit for bit.
    for part in ("params", "ema_params", "opt_state"):
        (a, meta_multi), (b, meta_single) = checkpoint_part(multi, 6, part), checkpoint_part(reference, 6, part)
        assert_trees_equal(a, b)
    assert meta_multi["data"] == meta_single["data"]
    _, exported = load_unet_2d_condition(multi / "unet")  # the EMA weights, written by process 0
    assert_trees_equal(exported, checkpoint_part(reference, 6, "ema_params")[0])

"""What the tests that start programs share: an environment with a given number of CPU devices
and the test session's compilation cache, a free localhost port, and ways to run train.mnist
(a child process, in this process, stopped by a signal) and read its checkpoints."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(devices: int) -> dict:
    """os.environ with `devices` host CPU devices, the tests' XLA cache, the repo importable and
    Hugging Face offline."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if not f.startswith("--xla_force_host_platform_device_count")]
                                + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAXDIFF_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


class ProcessResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from the start until this process had exited


def run_processes(command: list, num_processes: int = 2, timeout: float = 300,
                  devices: int = 1) -> list[ProcessResult]:
    """`command` (argv) as a multi-host run of `num_processes` processes on localhost, `devices`
    CPU devices each: how each process ended, in process order."""
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as logs:  # files, not pipes: a chatty process cannot block
        files = [(open(Path(logs) / f"{i}.out", "w+"), open(Path(logs) / f"{i}.err", "w+"))
                 for i in range(num_processes)]
        procs = [subprocess.Popen([*map(str, command), "--coordinator-address", address, "--num-processes",
                                   str(num_processes), "--process-id", str(i), "--distributed-timeout", "60"],
                                  cwd=ROOT, env=subprocess_env(devices), stdout=out, stderr=err, text=True)
                 for i, (out, err) in enumerate(files)]
        ended = [None] * num_processes
        try:
            while None in ended:
                for i, p in enumerate(procs):
                    if ended[i] is None and p.poll() is not None:
                        ended[i] = time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"the {num_processes} processes did not end within {timeout} s")
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = []
        for p, (out, err), seconds in zip(procs, files, ended):
            out.seek(0)
            err.seek(0)
            results.append(ProcessResult(p.returncode, out.read(), err.read(), seconds))
            out.close()
            err.close()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One tiny configuration for every program run, so they share compiled programs (XLA cache).
TINY = ["--model", "tiny", "--batch-size", "16", "--sample-steps", "2", "--per-class", "1",
        "--cfg-dropout", "0.1", "--ema-decay", "0.99"]


def run_cli(module: str, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_in_process(*args) -> dict:
    from train.mnist import parse_args, train

    # --no-compile-cache: keep the test session's cache (conftest) rather than switch to the user's.
    return train(parse_args(["--no-progress", "--no-compile-cache", *map(str, args)]))


def final_params(run_dir: Path, part="params"):
    from jaxdiff.training import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", create=False)
    try:
        return ckpt.restore_part(ckpt.steps[-1], part) + (ckpt.steps[-1],)
    finally:
        ckpt.close()


def read_until(proc, pattern: str, timeout: float) -> str:
    """Read the child's stderr until `pattern` shows up (tqdm writes progress there)."""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            chunk = b""
        seen += chunk.decode(errors="replace")
        if pattern in seen:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} from the training process:\n{seen[-2000:]}")


def start_training(out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.mnist", "--out", str(out), *map(str, args)],
                            cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_mid_run(proc, signum) -> str:
    """Send `signum` once the child reports training progress; its stderr."""
    try:
        seen = read_until(proc, "loss=", timeout=400)
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen + rest.decode(errors="replace")


STOPPABLE = [*TINY, "--no-samples"]  # progress bar on: the tests wait for it

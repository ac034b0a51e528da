"""Multi-host start-up in one place: join the run, say which process this is, take this host's
share of each global batch, synchronise, and let only the main process write.

    parser = argparse.ArgumentParser(); distributed.add_arguments(parser)
    args = parser.parse_args()
    distributed.initialize(distributed.config_from_args(args))   # before anything touches a device
    rows = distributed.host_slice(global_batch_size)             # this host's rows of every batch

A run is multi-process when a coordinator is configured, by flags (``--coordinator-address
HOST:PORT --num-processes N --process-id I``), by the environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or by ``--distributed auto`` (JAX's cluster
auto-detection: Cloud TPU pods, SLURM, Open MPI, Kubernetes). Otherwise nothing happens and the
run is one process. On CPU the cross-process collectives are gloo, so a multi-host run can be
tried on one machine with several processes on 127.0.0.1.

Data parallelism across hosts is `pmap` over each host's local devices: `lax.pmean` inside the
step reduces over every device of every host, and `lax.axis_index` numbers them globally
(process 0's devices first), so a run's result does not depend on how many hosts share it.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from typing import Any, Callable, Optional, TypeVar

from jaxdiff.errors import JaxdiffError, describe_os_error

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's own default: a process silent this long ends the run
MESSAGE_BYTES = 2048  # the longest error line one process can send the others

PyTree = Any
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process run. All None and `auto` False: a single-process run.
    `auto`: let JAX detect the cluster (TPU pod, SLURM, ...) and fill in what is None."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    auto: bool = False
    timeout_s: int = DEFAULT_TIMEOUT_S
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    @property
    def multi_process(self) -> bool:
        return self.auto or self.coordinator_address is not None or \
            (self.num_processes is not None and self.num_processes > 1)

    def validate(self) -> None:
        if self.timeout_s < 1:
            raise JaxdiffError(f"--distributed-timeout must be >= 1 second, got {self.timeout_s}")
        if self.heartbeat_timeout_s < 1:
            raise JaxdiffError(f"--heartbeat-timeout must be >= 1 second, got {self.heartbeat_timeout_s}")
        if not self.multi_process:
            if self.process_id not in (None, 0):
                raise JaxdiffError(f"--process-id {self.process_id} needs --coordinator-address and "
                                   "--num-processes (a multi-process run)")
            return
        if self.auto:
            return
        missing = [flag for flag, v in (("--coordinator-address", self.coordinator_address),
                                        ("--num-processes", self.num_processes),
                                        ("--process-id", self.process_id)) if v is None]
        if missing:
            raise JaxdiffError(f"a multi-process run needs {', '.join(missing)} too (or the "
                               f"{ENV_ADDRESS}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} environment "
                               "variables), or --distributed auto on a TPU pod / SLURM cluster")
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise JaxdiffError(f"coordinator address {self.coordinator_address!r} must be HOST:PORT, "
                               "e.g. 10.0.0.1:1234 (the address of process 0)")
        if self.num_processes < 1:
            raise JaxdiffError(f"--num-processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise JaxdiffError(f"--process-id {self.process_id} must be in [0, {self.num_processes})")


def add_arguments(parser) -> None:
    """The multi-host flags of every training program."""
    g = parser.add_argument_group("multi-host (one process per host; all flags the same except --process-id)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"address of process 0 (default ${ENV_ADDRESS})")
    g.add_argument("--num-processes", type=int, default=None, help=f"processes in the run (default ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, help=f"this process, 0-based (default ${ENV_PROCESS_ID})")
    g.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: let JAX detect the cluster (Cloud TPU pod, SLURM, Open MPI, Kubernetes)")
    g.add_argument("--distributed-timeout", type=int, default=DEFAULT_TIMEOUT_S,
                   help="seconds to wait for every process to join")
    g.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                   help="seconds without a heartbeat after which JAX ends the whole run when a "
                        f"process died (default {DEFAULT_HEARTBEAT_TIMEOUT_S})")


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise JaxdiffError(f"${name}={value!r} is not an integer") from None


def config_from_args(args=None) -> DistributedConfig:
    """Flags (from `add_arguments`) over environment variables."""
    def flag(name):
        return getattr(args, name, None) if args is not None else None

    return DistributedConfig(
        coordinator_address=flag("coordinator_address") or os.environ.get(ENV_ADDRESS) or None,
        num_processes=flag("num_processes") if flag("num_processes") is not None else _env_int(ENV_NUM_PROCESSES),
        process_id=flag("process_id") if flag("process_id") is not None else _env_int(ENV_PROCESS_ID),
        auto=flag("distributed") == "auto",
        timeout_s=flag("distributed_timeout") or DEFAULT_TIMEOUT_S,
        heartbeat_timeout_s=flag("heartbeat_timeout") or DEFAULT_HEARTBEAT_TIMEOUT_S)


def _already_initialized() -> bool:
    from jax._src import distributed as jax_distributed  # no public query in jax 0.10

    return jax_distributed.global_state.client is not None


def initialize(config: DistributedConfig | None = None) -> bool:
    """Join the multi-process run `config` describes (default: from the environment) before any
    device is used; returns True when this is a multi-process run. A single-process config does
    nothing. Calling it again after joining does nothing."""
    import jax

    config = config or config_from_args(None)
    config.validate()
    if not config.multi_process:
        return False
    if _already_initialized():
        return True
    # CPU collectives across processes (the default in recent jax; explicit so it cannot regress).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not config.auto:
        # JAX aborts the whole process (no Python exception) when the coordinator cannot be
        # reached or bound: check first, so the user gets one clear line instead.
        if config.process_id == 0:
            _check_port_free(config.coordinator_address)
        else:
            _wait_for_coordinator(config.coordinator_address, config.timeout_s)
    options = {"initialization_timeout": config.timeout_s}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        options["heartbeat_timeout_seconds"] = config.heartbeat_timeout_s
    if not config.auto:
        options["cluster_detection_method"] = "deactivate"
    try:
        jax.distributed.initialize(config.coordinator_address, config.num_processes,
                                   config.process_id, **options)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        where = config.coordinator_address or "the auto-detected coordinator"
        raise JaxdiffError(f"cannot join the multi-process run at {where} ({first}); start every "
                           "process with the same --coordinator-address and --num-processes, "
                           "process 0 first, within --distributed-timeout seconds") from None
    return True


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_port_free(address: str) -> None:
    import socket

    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise JaxdiffError(f"process 0 cannot listen on port {port} of --coordinator-address "
                               f"{address} ({e.strerror or e}); choose a free port") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    import socket
    import time

    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise JaxdiffError(f"cannot reach the coordinator at {address} within {timeout_s} s "
                                   f"({e.strerror or e}); start process 0 first, with the same "
                                   "--coordinator-address, or raise --distributed-timeout") from None
            time.sleep(0.25)


def shutdown() -> None:
    """Leave the multi-process run (only needed before starting another in the same process)."""
    import jax

    if _already_initialized():
        jax.distributed.shutdown()


# --------------------------------------------------------------------------------------------
# Who is who
# --------------------------------------------------------------------------------------------

def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_main_process() -> bool:
    """The one process that writes logs, checkpoints, exports and images."""
    return process_index() == 0


def global_device_count() -> int:
    import jax

    return jax.device_count()


def host_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch: process p takes the p-th of `process_count()`
    equal slices (its local devices then split that slice in order), matching the global device
    numbering `lax.axis_index` uses."""
    n = process_count()
    if global_batch_size % n:
        raise JaxdiffError(f"batch size {global_batch_size} does not split over {n} processes; "
                           f"use a multiple of {n}")
    local = global_batch_size // n
    start = process_index() * local
    return slice(start, start + local)


def check_batch_size(global_batch_size: int) -> int:
    """`global_batch_size` checked to split evenly over every device of every host; returns the
    per-device batch."""
    n = global_device_count()
    if global_batch_size < 1 or global_batch_size % n:
        raise JaxdiffError(f"--batch-size {global_batch_size} must be a positive multiple of the "
                           f"{n} devices ({process_count()} process(es) × {n // process_count()} local)")
    return global_batch_size // n


# --------------------------------------------------------------------------------------------
# Talking across hosts
# --------------------------------------------------------------------------------------------

def sync(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in a single process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(tree: PyTree) -> PyTree:
    """Process 0's value of `tree` (numpy/jax leaves) on every process, as host numpy arrays."""
    if process_count() == 1:
        return tree
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def _send_text_from_main(text: str) -> str:
    """Process 0's `text` (UTF-8, at most MESSAGE_BYTES bytes) on every process."""
    import numpy as np

    data = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    raw = text.encode()[:MESSAGE_BYTES]
    data[0] = 1 if raw else 0
    data[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    data = broadcast_from_main(data)
    return bytes(data[1:]).rstrip(b"\0").decode(errors="replace") if data[0] else ""


def on_main_process(fn: Callable[[], T], what: str) -> Optional[T]:
    """Run `fn` on the main process only (writing a config, restoring, exporting), then tell
    every process whether it worked, so a failure there ends every process with the same
    `JaxdiffError` line instead of leaving the others blocked in the next collective until the
    heartbeat kills them. Returns `fn()` on the main process, None elsewhere. `what` names the
    step in the error ("writing the run config")."""
    result, error = None, ""
    if is_main_process():
        try:
            result = fn()
        except JaxdiffError as e:
            error = str(e)
        except OSError as e:
            error = f"{what} failed: {describe_os_error(e)}"
    if process_count() > 1:
        error = _send_text_from_main(error)
    if error:
        raise JaxdiffError(error if is_main_process() else f"process 0: {error}")
    return result


def all_equal(value: str, what: str) -> None:
    """Raise JaxdiffError unless every process holds the same string `value` (e.g. a config
    fingerprint), so a mis-started host fails at once instead of training on different data."""
    if process_count() == 1:
        return
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    crc = np.array([zlib.crc32(value.encode())], np.int64)
    every = np.asarray(multihost_utils.process_allgather(crc)).reshape(-1)
    if not (every == every[0]).all():
        odd = [i for i, c in enumerate(every) if c != every[0]]
        raise JaxdiffError(f"{what} differs between processes (processes {odd} disagree with "
                           "process 0); start every process with the same flags and data")


def log(message: str) -> None:
    """Print a line on stderr from the main process only."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)

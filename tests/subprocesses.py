"""What the tests that start programs in child processes share: an environment with a given
number of CPU devices and the test session's compilation cache, and a free localhost port."""
from __future__ import annotations

import os
import socket
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

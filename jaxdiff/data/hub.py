"""Is the Hugging Face Hub usable? The offline switches and a quick reachability probe, so
loaders fall back at once instead of hanging without a network."""
from __future__ import annotations

import os
import socket

HF_HOST = "huggingface.co"


def hf_offline() -> bool:
    """The user asked Hugging Face libraries to stay offline."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def can_reach(host: str, timeout: float) -> bool:
    """A TCP connection to `host`:443 opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False

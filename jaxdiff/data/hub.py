"""Is the Hugging Face Hub usable? The offline switches and a quick reachability probe, so
loaders fall back at once instead of hanging without a network; and `load_dataset`, the one
call into `datasets`, which never runs a dataset repository's own Python code."""
from __future__ import annotations

import inspect
import os
import re
import socket

HF_HOST = "huggingface.co"
# `load_dataset(..., trust_remote_code=False)` exists from datasets 2.16 on; older versions run a
# dataset's loading script without asking. From 4.0 on scripts are gone (and so is the keyword).
DATASETS_MIN_VERSION = (2, 16)


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


def _version(text: str) -> tuple[int, ...]:
    """'2.16.1' / '3.0.0.dev0' → (2, 16, 1) / (3, 0, 0); unparsable → ()."""
    m = re.match(r"\d+(\.\d+)*", str(text).strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def check_datasets_version(datasets_module) -> None:
    """JaxdiffError unless the installed `datasets` is at least DATASETS_MIN_VERSION."""
    from jaxdiff.errors import JaxdiffError

    found = getattr(datasets_module, "__version__", "")
    if _version(found)[:2] < DATASETS_MIN_VERSION:
        floor = ".".join(map(str, DATASETS_MIN_VERSION))
        raise JaxdiffError(f"datasets {found or '(unknown version)'} can run a dataset's own loading "
                           f"script unasked; jaxdiff needs datasets>={floor} "
                           f"(pip install -U 'datasets>={floor}')")


def load_dataset(name: str, **kwargs):
    """`datasets.load_dataset(name, **kwargs)` with `trust_remote_code=False` where that
    version takes the keyword (2.16 ≤ version < 4.0; 4.0 removed both scripts and keyword).
    ImportError when `datasets` is absent; JaxdiffError when it is older than 2.16."""
    import datasets

    check_datasets_version(datasets)
    params = inspect.signature(datasets.load_dataset).parameters
    if "trust_remote_code" in params:
        kwargs["trust_remote_code"] = False
    return datasets.load_dataset(name, **kwargs)


def open_dataset(name: str, split: str, timeout: float):
    """The `split` of Hub dataset `name` for a training program: only the local cache when
    offline (no route to the Hub within `timeout` seconds, or the offline switches), so this never
    hangs; every failure (datasets missing, network, cache, format) is one JaxdiffError line."""
    from jaxdiff.errors import JaxdiffError

    try:
        import datasets  # noqa: F401
    except ImportError:
        raise JaxdiffError(f"training data {name!r}: no such folder, and loading it as a Hugging Face "
                           "dataset needs the datasets package (pip install datasets)") from None
    offline = hf_offline() or not can_reach(HF_HOST, timeout)
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    try:
        if offline:
            os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        return load_dataset(name, split=split)
    except JaxdiffError:
        raise
    except Exception as e:  # network, cache and format errors: one line for the user
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = " (the Hub is unreachable and it is not in the local cache)" if offline else ""
        raise JaxdiffError(f"cannot load the dataset {name!r} split {split!r}{hint}: {msg}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

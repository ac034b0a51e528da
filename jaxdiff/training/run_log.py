"""What a training run shows and records: a progress bar (loss, images/s, ETA) on stderr, and
scalars and image grids written to TensorBoard when `tensorboardX` (or `tensorboard` for
PyTorch's writer) is importable, else to `RUN/logs/metrics.jsonl` and PNG files.

    log = RunLog(run_dir, total_steps=10_000, initial_step=0, images_per_step=64)
    log.step(step, {"loss": 0.12})               # every step: the bar
    log.scalars(step, {"loss": 0.12, "lr": 1e-5})  # every --log-every steps: the record
    log.image(step, "samples", grid_uint8)
    log.close()

Only the main process of a multi-host run writes (pass `enabled=False` elsewhere). On resume,
records past the resumed step (written after the checkpoint a killed run went back to) are
dropped, so the record reads as one run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

BACKENDS = ("auto", "tensorboard", "jsonl", "none")


def _tensorboard_writer(log_dir: Path, purge_step: Optional[int]):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class RunLog:
    """See the module docstring. `backend`: "auto" (TensorBoard when importable, else JSONL),
    "tensorboard" (error when not importable), "jsonl", "none" (the bar only)."""

    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, initial_step: int = 0,
                 images_per_step: int = 1, enabled: bool = True, progress: bool = True,
                 backend: str = "auto"):
        from jaxdiff.errors import JaxdiffError, unknown_choice

        if backend not in BACKENDS:
            raise unknown_choice("log backend", backend, BACKENDS)
        self.enabled = enabled
        self.dir = Path(run_dir) / "logs"
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self._t0 = time.perf_counter()
        self._timed_from = (initial_step, None)  # (step, time) of the first step after compiling
        self._last: dict = {}
        self.writer = None
        self.jsonl = None
        self.backend = "none"
        if enabled and backend != "none":
            self.dir.mkdir(parents=True, exist_ok=True)
            if backend in ("auto", "tensorboard"):
                self.writer = _tensorboard_writer(self.dir, purge_step=initial_step + 1 if initial_step else None)
                if self.writer is None and backend == "tensorboard":
                    raise JaxdiffError("--log-backend tensorboard needs tensorboardX (pip install "
                                       "tensorboardX) or tensorboard; or use --log-backend jsonl")
            if self.writer is not None:
                self.backend = "tensorboard"
            else:
                self.backend = "jsonl"
                path = self.dir / "metrics.jsonl"
                _truncate_after(path, initial_step)
                self.jsonl = open(path, "a", buffering=1)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=initial_step, file=sys.stderr, dynamic_ncols=True,
                        unit="step", disable=not (enabled and progress), smoothing=0.1)

    # ------------------------------------------------------------------------------ progress

    def start_timing(self, step: int) -> None:
        """Mark the first step after compilation: images/s counts from here."""
        self._timed_from = (step, time.perf_counter())

    def images_per_s(self, step: int) -> Optional[float]:
        s0, t0 = self._timed_from
        if t0 is None or step <= s0:
            return None
        return (step - s0) * self.images_per_step / max(time.perf_counter() - t0, 1e-9)

    def step(self, step: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        """Advance the bar to `step`, showing `metrics` (e.g. the loss) and images/s."""
        if metrics:
            self._last = {k: float(v) for k, v in metrics.items()}
        post = {}
        if "loss" in self._last:
            post["loss"] = f"{self._last['loss']:.4f}"
        rate = self.images_per_s(step)
        if rate is not None:
            post["img/s"] = f"{rate:.1f}"
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)

    def eta_seconds(self, step: int) -> Optional[float]:
        s0, t0 = self._timed_from
        if t0 is None or step <= s0:
            return None
        per_step = (time.perf_counter() - t0) / (step - s0)
        return per_step * (self.total_steps - step)

    # ------------------------------------------------------------------------------ records

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record scalars (plus images/s and ETA) at `step`."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items() if v is not None}
        rate, eta = self.images_per_s(step), self.eta_seconds(step)
        if rate is not None:
            values["images_per_s"] = rate
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        elif self.jsonl is not None:
            record = {"step": int(step), "time": round(time.time(), 3),
                      **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
            if eta is not None:
                record["eta_s"] = round(eta, 1)
            self.jsonl.write(json.dumps(record) + "\n")

    def image(self, step: int, tag: str, image: np.ndarray) -> Optional[Path]:
        """Record a uint8 (H, W, C) image (e.g. a sample grid); also kept as
        `logs/<tag>-<step>.png`. Returns the PNG's path."""
        if not self.enabled:
            return None
        from jaxdiff.images import save_png

        path = save_png(np.asarray(image), self.dir / f"{tag}-{step:07d}.png")
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": int(step), "image": tag, "path": path.name}) + "\n")
        return path

    def write(self, message: str) -> None:
        """A line for people, above the bar."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with step > `step` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
            continue  # a line cut by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

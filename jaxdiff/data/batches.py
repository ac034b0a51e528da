"""Shuffled, epoch-aware batches whose position is saved with the checkpoint: an epoch's order
is a function of (seed, epoch), and each process reads its own slice of every global batch."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxdiff.data.mnist import Dataset
from jaxdiff.errors import JaxdiffError


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a `BatchIterator` stands: `epoch` (0-based) and `index`, the examples of that
    epoch's permutation already handed out. Saved in checkpoints; restores exactly."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["index"]))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a function of (seed, epoch) only, so any process can
    recompute it and resuming needs only the position."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def check_global_batch(global_batch_size: int, num_examples: int, process_count: int,
                       more_data: str = "") -> None:
    """A global batch must be positive, no larger than the data and split evenly over the
    processes; otherwise one clear error. `more_data`: a hint appended to the too-large case."""
    if global_batch_size <= 0:
        raise JaxdiffError(f"batch size must be positive, got {global_batch_size}")
    if global_batch_size > num_examples:
        raise JaxdiffError(f"batch size {global_batch_size} is larger than the data set "
                           f"({num_examples} images); use a smaller --batch-size{more_data}")
    if global_batch_size % process_count:
        raise JaxdiffError(f"batch size {global_batch_size} does not split over {process_count} processes")


class EpochOrder:
    """The order of one epoch for batch iterators that have `data`, `global_batch_size`, `seed`
    (and start with `_perm_epoch = -1`): a permutation per epoch, computed once per epoch."""

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(len(self.data), self.seed, epoch), epoch
        return self._perm  # type: ignore[return-value]


class BatchIterator(EpochOrder):
    """Shuffled batches of `global_batch_size` examples, a new permutation each epoch; the
    last partial batch of an epoch is dropped so every step sees the same shapes.

    With several processes (hosts), each yields its own `process_index`-th slice of every
    global batch. Yields dicts ``{"images": uint8 (B, H, W, C), "labels": int32 (B,)}``.
    `position` after k batches is where batch k+1 starts; pass it back to resume."""

    def __init__(self, data: Dataset, global_batch_size: int, *, seed: int = 0,
                 position: DataPosition = DataPosition(), process_index: int = 0,
                 process_count: int = 1):
        check_global_batch(global_batch_size, len(data), process_count)
        self.data = data
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.position = position
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        epoch, index = self.position.epoch, self.position.index
        if index + self.global_batch_size > len(self.data):
            epoch, index = epoch + 1, 0
        start = index + self._offset
        ids = self._permutation(epoch)[start:start + self._local]
        self.position = DataPosition(epoch, index + self.global_batch_size)
        return {"images": self.data.images[ids], "labels": self.data.labels[ids]}

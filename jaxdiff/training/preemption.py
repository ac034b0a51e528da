"""Stopping a training run cleanly: SIGTERM (a preempted VM, a cluster scheduler, `kill`) or
Ctrl-C asks the loop to stop after the current step; the loop saves a checkpoint and exits, so
`--resume` continues as if nothing happened.

    with StopRequests() as stop:
        for step in ...:
            state = train_step(state, batch)
            if stop.should_stop(step):     # the same answer on every host
                save(state); break

In a multi-host run a signal may reach only some hosts; every host must stop at the same step
(or the others hang in the next all-reduce), so `should_stop` agrees across processes with one
small all-gather every `sync_every` steps.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional

import numpy as np

from jaxdiff.parallel import distributed


class StopRequests:
    """While active, SIGTERM and the first Ctrl-C only set `signum`; a second Ctrl-C
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self, sync_every: int = 10):
        self.signum: Optional[int] = None
        self.sync_every = max(1, sync_every)
        self._agreed: Optional[int] = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @property
    def requested(self) -> bool:
        """A stop was requested on this process (or agreed on by all)."""
        return self.signum is not None or self._agreed is not None

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step`: at once in a single process; in a multi-host run at the
        next multiple of `sync_every` after any host was signalled, on every host alike."""
        if distributed.process_count() == 1:
            return self.signum is not None
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(
            np.array([0 if self.signum is None else self.signum], np.int32))).reshape(-1)
        if flags.any():
            self._agreed = int(flags[flags > 0][0])
            if self.signum is None:
                self.signum = self._agreed
            return True
        return False

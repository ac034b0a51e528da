"""The step loop every training program runs: pmapped steps until the last step or a stop
request, with checkpoints and evaluations on the way and the training time measured apart.

Per-step metrics are read on the host one step late (after the next step is dispatched), so the
device never waits for the host. The first call compiles (a multi-host `pmap` is lowered for the
global shapes, so not ahead of time) and runs one step; training time and images/s count from
the second step. Checkpoint writes and evaluations are not counted as training time.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax


@dataclasses.dataclass
class LoopResult:
    state: Any             # the replicated train state after the last step run
    step: int              # the last step run
    train_seconds: float   # from the end of the first (compiling) step, without checkpoints/evals
    compile_seconds: float  # the first step: compilation and one step
    timed_from: int        # the step the timing starts after
    stopped_by: Optional[int]  # the signal that stopped the run early, or None


def summary(start_step: int, step: int, timed_from: int, train_seconds: float, batch_size: int,
            losses: list[float], final_loss_window: int = 50) -> dict:
    """The common part of a training program's one-line JSON report: steps run, the final
    global step, training seconds, images/s (from `timed_from`) and the mean of the last
    `final_loss_window` losses."""
    import numpy as np

    return {
        "steps": step - start_step,
        "global_step": step,
        "train_seconds": round(train_seconds, 3),
        "images_per_s": round((step - timed_from) * batch_size / train_seconds, 2) if train_seconds > 0 else None,
        "final_loss": round(float(np.mean(losses[-final_loss_window:])), 5) if losses else None,
    }


@dataclasses.dataclass
class _Progress:
    """The newest completed step and its state, and the newest checkpointed step."""

    state: Any
    step: int
    saved_step: int


def run_steps(step_fn: Callable, state: Any, next_batch: Callable[[], Any], *, start_step: int,
              total_steps: int, checkpoint_every: int, eval_every: int, stop,
              on_metrics: Callable[[int, Mapping], None],
              on_checkpoint: Callable[[Any, int], None],
              on_eval: Callable[[Any, int], None] = lambda state, step: None,
              on_timing_start: Callable[[int], None] = lambda step: None) -> LoopResult:
    """Run `state, metrics = step_fn(state, next_batch())` from `start_step` (< `total_steps`).

    `on_metrics(step, metrics)` gets every step's (device) metrics, one step late;
    `on_checkpoint(state, step)` runs every `checkpoint_every` steps, at the last step and when
    `stop` (a `jaxdiff.training.preemption.StopRequests`) asks to stop; `on_eval(state, step)` every
    `eval_every` steps (0: never) before the last. Both see every earlier step's metrics first.

    When anything raises an `Exception` on the way (an unreadable batch, a full disk, a callback
    that gives up), the newest completed step is checkpointed first, unless it already was, and
    the exception then goes on to the caller: no completed step is lost.
    """
    progress = _Progress(state, start_step, start_step)

    def checkpoint(state, step):
        on_checkpoint(state, step)
        progress.saved_step = step

    try:
        return _loop(step_fn, progress, next_batch, total_steps, checkpoint_every, eval_every, stop,
                     on_metrics, checkpoint, on_eval, on_timing_start)
    except Exception as error:
        if progress.step > progress.saved_step:
            _save_after_failure(progress, on_checkpoint, error)
        raise


def _save_after_failure(progress: _Progress, on_checkpoint, error: Exception) -> None:
    print(f"warning: stopping at step {progress.step} ({type(error).__name__}); saving a checkpoint "
          "of it first", file=sys.stderr, flush=True)
    try:
        on_checkpoint(progress.state, progress.step)
        progress.saved_step = progress.step
    except Exception as save_error:  # the original error is the one to report
        print(f"warning: the checkpoint of step {progress.step} could not be saved either "
              f"({type(save_error).__name__}: {save_error})", file=sys.stderr, flush=True)


def _loop(step_fn, progress: _Progress, next_batch, total_steps, checkpoint_every, eval_every, stop,
          on_metrics, on_checkpoint, on_eval, on_timing_start) -> LoopResult:
    t0 = time.perf_counter()
    state, metrics = step_fn(progress.state, next_batch())
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - t0
    step = timed_from = progress.step + 1
    progress.state, progress.step = state, step
    on_timing_start(step)
    pending = (step, metrics)
    stopped_by, train_seconds = None, 0.0
    t_last = time.perf_counter()
    while True:
        stopping = stop.should_stop(step)
        checkpointing = step % checkpoint_every == 0 or step == total_steps or stopping
        evaluating = bool(eval_every) and step % eval_every == 0 and step < total_steps
        if checkpointing or evaluating:
            jax.block_until_ready(state)
            train_seconds += time.perf_counter() - t_last
            if pending is not None:
                on_metrics(*pending)
                pending = None
            if evaluating:
                on_eval(state, step)
            if checkpointing:
                on_checkpoint(state, step)
            t_last = time.perf_counter()
        if stopping:
            stopped_by = stop.signum
            break
        if step >= total_steps:
            break
        state, metrics = step_fn(state, next_batch())
        step += 1
        progress.state, progress.step = state, step
        if pending is not None:
            on_metrics(*pending)
        pending = (step, metrics)
    jax.block_until_ready(state)
    train_seconds += time.perf_counter() - t_last
    if pending is not None:
        on_metrics(*pending)
    return LoopResult(state, step, train_seconds, compile_seconds, timed_from, stopped_by)

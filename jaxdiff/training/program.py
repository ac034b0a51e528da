"""The skeleton every training program shares (the part of Flax's `train_and_evaluate` that is
the same for every model): the run folder and `--resume`, the run's length, checkpoints, the
pmapped step loop with its log, stop requests and evaluations, and the one-line summary.

    run = TrainingRun("train.mnist", MnistConfig, settings, run_dir, flags=vars(args))
    data = ...; total_steps = run.plan_steps(len(data), config.batch_size, DEFAULT_STEPS)
    state = run.start(template_state, record)               # fresh, or the newest checkpoint
    trained = run.train(train_step, lambda: parallel.shard(next(batches)), batches.position)
    summary = run.summary(trained); run.close()

A program supplies its config (a frozen dataclass: the run's settings, saved in
RUN/jaxdiff_run.json and fixed on --resume), its data, model, loss and evaluation; this module
does the rest the same way for all. See `jaxdiff.training.run_folder` for the folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from jaxdiff.cli import at_least, finite_float, flag, one_of, positive
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import distributed
from jaxdiff.training.run_folder import CHECKPOINTS, RunRecord, holds_run, read_run, write_run

FINAL_LOSS_WINDOW = 50  # the summary's final_loss: the mean of the last steps' losses


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How this invocation trains (not part of the run's record): the run's length (`steps` or
    `epochs`; None: the run's planned length, else the program's default), `resume`,
    checkpoints every `checkpoint_every` steps (the last `keep_checkpoints` kept), an evaluation
    every `eval_every` steps (0 = never), the loss logged every `log_every` steps to
    `log_backend`, a progress bar."""

    steps: Optional[int] = None
    epochs: Optional[float] = None
    resume: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    log_every: int = 10
    log_backend: str = "auto"
    progress: bool = True


def add_loop_flags(parser: argparse.ArgumentParser, default_steps: int, *, eval_help: str) -> None:
    """The flags of `LoopSettings`."""
    g = parser.add_argument_group("length, checkpoints and logging")
    g.add_argument("--steps", type=int, default=None,
                   help=f"train until this step (default: the run's length, {default_steps} for a new run)")
    g.add_argument("--epochs", type=finite_float, default=None,
                   help="train for this many passes over the data instead")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    g.add_argument("--eval-every", type=int, default=0, help=eval_help)
    g.add_argument("--log-every", type=int, default=10, help="steps between logged losses")
    g.add_argument("--log-backend", choices=("auto", "tensorboard", "jsonl", "none"), default="auto",
                   help="RUN/logs: TensorBoard when installed (auto), else JSONL (metrics.jsonl + PNGs)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_loop_flags(args: argparse.Namespace) -> None:
    at_least(args, 1, "steps", "checkpoint_every", "keep_checkpoints", "log_every")
    at_least(args, 0, "eval_every")
    one_of(args, "steps", "epochs")
    positive(args, "epochs")


def from_flags(cls, args: argparse.Namespace, **overrides):
    """An instance of the dataclass `cls` from the parsed flags of the same names (a flag left
    out or None takes the field's default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if getattr(args, f.name, None) is not None}
    return cls(**{**values, **overrides})


def run_config(cls, args: argparse.Namespace, saved: Optional[Mapping], *, missing: Mapping = {}):
    """The run's config: from the flags for a new run (`saved` None), else from the saved
    settings, where a flag given with another value is an error. `missing`: values for
    settings that runs of earlier versions did not record (else the field's default)."""
    if saved is None:
        return from_flags(cls, args)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None and given != saved.get(f.name):
            name = flag(f.name)
            raise JaxdiffError(f"{name} {given} differs from the run's {saved.get(f.name)}; --resume keeps "
                               f"the run's settings (drop {name}, or start a new --out)")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in missing.items() if k not in saved},
                  **{k: v for k, v in saved.items() if k in names}})


def sampling_params(state):
    """The weights to sample and export: the EMA when the run keeps one, else the params."""
    return state.ema_params if state.ema_params is not None else state.params


@dataclasses.dataclass
class Trained:
    """The step loop's outcome: the replicated state after `step`, the losses of the steps run."""

    state: Any
    start_step: int
    step: int
    timed_from: int
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    losses: list = dataclasses.field(default_factory=list)


class TrainingRun:
    """One invocation of a training program on its run folder (see the module docstring)."""

    def __init__(self, program: str, config_cls, settings: LoopSettings, run_dir: str | Path,
                 args: argparse.Namespace, *, missing: Mapping = {}):
        self.program, self.settings = program, settings
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self.main = distributed.is_main_process()
        self.record: Optional[RunRecord] = read_run(self.run_dir, program) if settings.resume else None
        if self.record is None and holds_run(self.run_dir):
            raise JaxdiffError(f"{run_dir} already holds a run; pass --resume to continue it or "
                               "choose a new --out")
        self.config = run_config(config_cls, args, self.record.train if self.record else None, missing=missing)
        distributed.all_equal(repr(self.config), "the run's settings")
        self.checkpointer = self.log = None
        self.total_steps = 0

    @property
    def resuming(self) -> bool:
        return self.record is not None

    def check_same_data(self, fingerprint: Optional[str], images: int) -> None:
        """--resume continues exactly only on the data the run started with."""
        saved = self.record.data if self.record else {}
        if saved.get("fingerprint") not in (None, fingerprint):
            raise JaxdiffError(f"the training data changed since this run started ({saved.get('images')} "
                               f"images then, {images} now, or files/captions edited); --resume needs "
                               "the same data, or start a new --out")

    def plan_steps(self, num_examples: int, batch_size: int, default_steps: int, *,
                   fixed_length: Optional[str] = None) -> int:
        """The step to train until: from --epochs, --steps, the run's planned length, or
        `default_steps`. `fixed_length` (e.g. "cosine learning-rate schedule"): what makes the
        run's length unchangeable on --resume."""
        s = self.settings
        planned = self.record.total_steps if self.record else None
        if s.epochs is not None:
            total = max(1, math.ceil(s.epochs * (num_examples // batch_size)))
        else:
            total = s.steps or planned or default_steps
        if fixed_length and planned is not None and total != planned:
            raise JaxdiffError(f"this run's {fixed_length} ends at step {planned}; --resume cannot change "
                               "its length (drop --steps/--epochs, or start a new --out)")
        self.total_steps = total
        return total

    def start(self, template, record: RunRecord, *, batch_size: int, best_metric: Optional[str] = None):
        """The state to train from (`template` for a new run, the newest good checkpoint on
        --resume); writes the run's `record` (its total_steps set) on process 0; opens the
        checkpoints and the log. Every process returns the same state."""
        from jaxdiff.data.batches import DataPosition
        from jaxdiff.training.checkpoint import Checkpointer, resume_everywhere
        from jaxdiff.training.run_log import RunLog

        s = self.settings
        record = record.replace(program=self.program, total_steps=self.total_steps)
        # Process 0 reads and writes checkpoints; the others get the state from it.
        self.checkpointer = Checkpointer(self.ckpt_dir, max_to_keep=s.keep_checkpoints, best_metric=best_metric,
                                         primary_only=True) if self.main else None
        self.position = DataPosition()
        state = template
        if self.resuming:
            state, self.position = resume_everywhere(self.checkpointer, template, self.ckpt_dir)
            if self.main and self.record.total_steps != self.total_steps:
                write_run(self.run_dir, record)  # a run extended or shortened
        elif self.main:
            write_run(self.run_dir, record)
        distributed.sync("run-folder-ready")
        self.start_step = int(state.step)
        self.log = RunLog(self.run_dir, total_steps=self.total_steps, initial_step=self.start_step,
                          images_per_step=batch_size, enabled=self.main, progress=s.progress,
                          backend=s.log_backend)
        return state

    def train(self, step_fn: Callable, p_state, next_batch: Callable[[], Any], position: Callable[[], Any], *,
              scalars: Optional[Callable[[int, Mapping], dict]] = None,
              checkpoint_metrics: Optional[Callable[[Any, list], dict]] = None,
              evaluate: Callable[[Any, int], None] = lambda p_state, step: None,
              close_data: Callable[[], None] = lambda: None) -> Trained:
        """Run `step_fn` (pmapped) from the start step to `total_steps`: every step's loss to the
        progress bar, `scalars(step, metrics)` (default: the loss) every `log_every` steps,
        a checkpoint (with `position()`, the data position, and `checkpoint_metrics(p_state,
        losses since the last checkpoint)`) every `checkpoint_every` steps and at the end,
        `evaluate(p_state, step)` every `eval_every` steps. SIGTERM / Ctrl-C: checkpoint the
        current step and exit with 128 + the signal."""
        from jaxdiff import parallel
        from jaxdiff.training.loop import run_steps
        from jaxdiff.training.preemption import StopRequests

        s, log, start = self.settings, self.log, self.start_step
        trained = Trained(p_state, start, start, start)
        if start >= self.total_steps:
            log.write(f"the run is already at step {start}; nothing to train (raise --steps)")
            return trained
        window: list[float] = []  # the losses since the last checkpoint

        def record(step, metrics):
            value = float(metrics["loss"][0])
            trained.losses.append(value)
            window.append(value)
            if step % s.log_every == 0:
                log.scalars(step, scalars(step, metrics) if scalars else {"loss": value})
            log.step(step, {"loss": value})

        def checkpoint(p_state, step):
            metrics = checkpoint_metrics(p_state, list(window)) if checkpoint_metrics else None
            window.clear()
            if self.checkpointer is not None:
                self.checkpointer.save(parallel.host_copy(p_state), {"data": position().to_dict()},
                                       metrics=metrics)

        with StopRequests() as stop:
            result = run_steps(step_fn, p_state, next_batch, start_step=start, total_steps=self.total_steps,
                               checkpoint_every=s.checkpoint_every, eval_every=s.eval_every, stop=stop,
                               on_metrics=record, on_checkpoint=checkpoint, on_eval=evaluate,
                               on_timing_start=log.start_timing)
        close_data()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        if result.stopped_by is not None:
            self.close(finished=False)
            distributed.log(f"stopped at step {result.step}; checkpoint saved in {self.ckpt_dir}; "
                            "continue with --resume")
            raise SystemExit(128 + int(result.stopped_by))
        return dataclasses.replace(trained, state=result.state, step=result.step, timed_from=result.timed_from,
                                   train_seconds=result.train_seconds, compile_seconds=result.compile_seconds)

    def summary(self, trained: Trained, batch_size: int) -> dict:
        """The common part of the program's one-line JSON report."""
        from jaxdiff.training.loop import summary

        return {**summary(trained.start_step, trained.step, trained.timed_from, trained.train_seconds,
                          batch_size, trained.losses, FINAL_LOSS_WINDOW),
                "devices": distributed.global_device_count(), "processes": distributed.process_count(),
                "batch_size": batch_size}

    def close(self, finished: bool = True) -> None:
        """Close the log and the checkpoints; at the end of a run, wait for every process."""
        if self.log is not None:
            self.log.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if finished:
            distributed.sync("run-finished")

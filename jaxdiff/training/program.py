"""The skeleton every training program shares (the part of Flax's `train_and_evaluate` that is
the same for every model): the run folder and `--resume`, the run's length, checkpoints, the
pmapped step loop with its log, stop requests and evaluations, and the one-line summary.

    run = TrainingRun("train.mnist", MnistConfig, settings, run_dir, flags=vars(args))
    data = ...; total_steps = run.plan_steps(len(data), config.batch_size, DEFAULT_STEPS)
    state = run.start(template_state, record)               # fresh, or the newest checkpoint
    engine = run.engine                                     # mesh (jit, default) or pmap
    trained = run.train(engine.compile(train_step), engine.place_state(state),
                        lambda: engine.place_batch(next(batches)), lambda: batches.position)
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

from jaxdiff.cli import at_least, enable_compile_cache, finite_float, flag, one_of, positive
from jaxdiff.errors import JaxdiffError, describe_os_error
from jaxdiff.parallel import distributed
from jaxdiff.training.run_folder import CHECKPOINTS, RunRecord, holds_run, read_run, write_run
from jaxdiff.data.folder_lock import FolderLock

FINAL_LOSS_WINDOW = 50  # the summary's final_loss: the mean of the last steps' losses
MAX_NONFINITE_STEPS = 20  # non-finite steps in a row (each skipped) before a run gives up


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How this invocation trains (not part of the run's record): the run's length (`steps` or
    `epochs`; None: the run's planned length, else the program's default), `resume`,
    checkpoints every `checkpoint_every` steps (the last `keep_checkpoints` kept), an evaluation
    every `eval_every` steps (0 = never), the loss logged every `log_every` steps to
    `log_backend`, a progress bar. A run stops with an error after `max_nonfinite_steps` steps
    in a row whose loss or gradients were not finite (their updates are skipped). `grad_accum`
    K: each update from K micro-batches of the batch, in one compiled step (a memory lever: the
    update is the same up to float rounding, so it may change on --resume). `parallel`: "mesh"
    (`jit` over a device mesh, `mesh` "data=D,fsdp=F", default every device on data) or "pmap"
    (`jaxdiff.parallel.engine`); a run may resume on another mesh. `gradient_checkpointing`
    "full" or "matmuls" (what the blocks keep, `jaxdiff.models.remat`), None: off."""

    steps: Optional[int] = None
    epochs: Optional[float] = None
    resume: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    log_every: int = 10
    log_backend: str = "auto"
    progress: bool = True
    max_nonfinite_steps: int = MAX_NONFINITE_STEPS
    grad_accum: int = 1
    parallel: str = "mesh"
    mesh: Optional[str] = None
    gradient_checkpointing: Optional[str] = None


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
    g.add_argument("--max-nonfinite-steps", type=int, default=MAX_NONFINITE_STEPS,
                   help="steps in a row with a non-finite loss or gradient (each one's update is "
                        f"skipped) before the run stops with an error (default {MAX_NONFINITE_STEPS})")
    g = parser.add_argument_group("memory and devices")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="compute each update from K micro-batches of --batch-size / K, one after the "
                        "other inside the compiled step: a K-th of the activation memory, the same "
                        "update (default 1)")
    g.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh",
                   help="mesh: one jit over a device mesh, state split by --mesh (default); pmap: the "
                        "state replicated on every device")
    g.add_argument("--mesh", default=None, metavar="data=D,fsdp=F",
                   help="devices on the data axis (batch split) x the fsdp axis (batch, params, optimizer "
                        "moments and EMA split); default: every device on data")
    g.add_argument("--gradient-checkpointing", nargs="?", const="full", choices=("full", "matmuls"), default=None,
                   help="recompute the UNet's ResNet and transformer blocks in the backward pass instead of "
                        "keeping their activations (full: keep nothing; matmuls: keep matmul outputs)")


def check_loop_flags(args: argparse.Namespace) -> None:
    at_least(args, 1, "steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite_steps",
             "grad_accum")
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


def check_batch_split(batch_size: int, grad_accum: int = 1) -> int:
    """The micro-batch per device: `batch_size` checked to split over every device and into
    `grad_accum` micro-batches."""
    n = distributed.global_device_count()
    if batch_size < 1 or batch_size % (n * grad_accum):
        what = f"{n} devices x --grad-accum {grad_accum}" if grad_accum > 1 else f"{n} devices"
        raise JaxdiffError(f"--batch-size {batch_size} must be a positive multiple of the {what} "
                           f"({n * grad_accum}); change --batch-size" + (" or --grad-accum" if grad_accum > 1 else ""))
    return batch_size // (n * grad_accum)


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
    skipped_steps: int = 0  # steps whose loss or gradients were not finite (update skipped)


class TrainingRun:
    """One invocation of a training program on its run folder (see the module docstring).
    The main process holds the folder's lock (`FolderLock`) from before it looks into the
    folder until `close`: a second run (or `--resume`) on the same folder gets one error line.
    Use it as a context manager so the lock is let go however the run ends."""

    def __init__(self, program: str, config_cls, settings: LoopSettings, run_dir: str | Path,
                 args: argparse.Namespace, *, missing: Mapping = {}):
        self.program, self.settings = program, settings
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self.main = distributed.is_main_process()
        self.checkpointer = self.log = None
        self.total_steps = 0
        from jaxdiff.parallel.engine import make_engine

        self.engine = make_engine(settings.parallel, settings.mesh)
        if settings.resume and not self.run_dir.is_dir():
            read_run(self.run_dir, program)  # the one error for a run folder that does not exist
        self.lock = distributed.on_main_process(
            lambda: FolderLock(self.run_dir, purpose="training run", hint=" or choose another --out").acquire(),
            f"locking the run folder {run_dir}")
        try:
            self.record: Optional[RunRecord] = read_run(self.run_dir, program) if settings.resume else None
            if self.record is None and holds_run(self.run_dir):
                raise JaxdiffError(f"{run_dir} already holds a run; pass --resume to continue it or "
                                   "choose a new --out")
            self.config = run_config(config_cls, args, self.record.train if self.record else None,
                                     missing=missing)
            distributed.all_equal(repr(self.config), "the run's settings")
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Let go of the run folder (also done by `close`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def resuming(self) -> bool:
        return self.record is not None

    def check_same_data(self, fingerprint: Optional[str], images: int) -> None:
        """Every process must read the same data, and --resume continues exactly only on the
        data the run started with."""
        distributed.all_equal(str(fingerprint), "the training data")
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
        check_batch_split(batch_size, s.grad_accum)
        record = record.replace(program=self.program, total_steps=self.total_steps)
        # Process 0 reads and writes checkpoints; the others get the state from it.
        self.checkpointer = Checkpointer(self.ckpt_dir, max_to_keep=s.keep_checkpoints, best_metric=best_metric,
                                         primary_only=True) if self.main else None
        self.position = DataPosition()
        state = template
        if self.resuming:
            state, self.position = resume_everywhere(self.checkpointer, template, self.ckpt_dir)
        if not self.resuming or self.record.total_steps != self.total_steps:  # new, extended or shortened
            distributed.on_main_process(lambda: write_run(self.run_dir, record), "writing the run record")
        distributed.sync("run-folder-ready")
        distributed.log(f"devices: {self.engine.describe()}")
        if getattr(self.engine, "mesh", None) is not None and self.engine.mesh.shape["fsdp"] > 1:
            distributed.log(self.engine.table(state, limit=12))
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
        from jaxdiff.training.loop import run_steps
        from jaxdiff.training.preemption import StopRequests

        s, log, start = self.settings, self.log, self.start_step
        trained = Trained(p_state, start, start, start)
        if start >= self.total_steps:
            log.write(f"the run is already at step {start}; nothing to train (raise --steps)")
            return trained
        window: list[float] = []  # the losses since the last checkpoint
        nonfinite_in_a_row = 0
        saved = [start]  # the newest checkpointed step

        def record(step, metrics):
            nonlocal nonfinite_in_a_row
            if float(metrics.get("nonfinite", [0.0])[0]):
                trained.skipped_steps += 1
                nonfinite_in_a_row += 1
                log.write(f"warning: step {step}: non-finite loss or gradients; its update was skipped")
                log.scalars(step, {"skipped_steps": trained.skipped_steps})
                if nonfinite_in_a_row >= s.max_nonfinite_steps:
                    raise JaxdiffError(
                        f"{nonfinite_in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                        "gradients, so their updates were skipped; lower --lr, check the data, or raise "
                        "--max-nonfinite-steps")
                return
            nonfinite_in_a_row = 0
            value = float(metrics["loss"][0])
            trained.losses.append(value)
            window.append(value)
            if step % s.log_every == 0:
                log.scalars(step, scalars(step, metrics) if scalars else {"loss": value})
            log.step(step, {"loss": value})

        engine = self.engine

        def checkpoint(p_state, step):
            metrics = checkpoint_metrics(p_state, list(window)) if checkpoint_metrics else None
            window.clear()
            host = engine.host_copy(p_state) if engine.copy_is_collective(p_state) else None
            distributed.on_main_process(
                lambda: self.checkpointer.save(host if host is not None else engine.host_copy(p_state),
                                               {"data": position().to_dict()}, metrics=metrics),
                f"saving the checkpoint of step {step}")
            saved[0] = step

        # The signal handlers stay until the last save is on disk: a second SIGTERM cannot cut it.
        with StopRequests() as stop:
            try:
                result = run_steps(step_fn, p_state, next_batch, start_step=start, total_steps=self.total_steps,
                                   checkpoint_every=s.checkpoint_every, eval_every=s.eval_every, stop=stop,
                                   on_metrics=record, on_checkpoint=checkpoint, on_eval=evaluate,
                                   on_timing_start=log.start_timing)
            except (JaxdiffError, OSError) as e:
                self._finish_saves(close_data)
                message = str(e) if isinstance(e, JaxdiffError) else describe_os_error(e)
                if saved[0] > start:
                    message += f" (step {saved[0]} is saved in {self.ckpt_dir}: continue with --resume)"
                raise JaxdiffError(message) from None
            except BaseException:
                self._finish_saves(close_data)
                raise
            self._finish_saves(close_data)
        if result.stopped_by is not None:
            self.close(finished=False)
            distributed.log(f"stopped at step {result.step}; checkpoint saved in {self.ckpt_dir}; "
                            "continue with --resume")
            raise SystemExit(128 + int(result.stopped_by))
        return dataclasses.replace(trained, state=result.state, step=result.step, timed_from=result.timed_from,
                                   train_seconds=result.train_seconds, compile_seconds=result.compile_seconds)

    def _finish_saves(self, close_data: Callable[[], None]) -> None:
        """Stop the data workers and wait until every checkpoint is on disk."""
        try:
            close_data()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.wait()

    def summary(self, trained: Trained, batch_size: int) -> dict:
        """The common part of the program's one-line JSON report."""
        from jaxdiff.training.loop import summary

        return {**summary(trained.start_step, trained.step, trained.timed_from, trained.train_seconds,
                          batch_size, trained.losses, FINAL_LOSS_WINDOW),
                "devices": distributed.global_device_count(), "processes": distributed.process_count(),
                "batch_size": batch_size, "skipped_steps": trained.skipped_steps}

    def close(self, finished: bool = True) -> None:
        """Close the log and the checkpoints; at the end of a run, wait for every process."""
        if self.log is not None:
            self.log.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.release()
        if finished:
            distributed.sync("run-finished")


def start_run(program: str, config_cls, settings_cls, args: argparse.Namespace, *,
              check: Callable[[argparse.Namespace], None], missing: Mapping = {}, **overrides) -> TrainingRun:
    """How every training program starts: `check` its flags, join the multi-host run, turn on
    the compilation cache, and open the run folder `args.out` (locked) with the run's config
    (`config_cls`) and this invocation's settings (`settings_cls` from the flags, with
    `overrides`; `run.settings`)."""
    check(args)
    distributed.initialize(distributed.config_from_args(args))
    enable_compile_cache(args)
    settings = from_flags(settings_cls, args, **overrides)
    return TrainingRun(program, config_cls, settings, args.out, args, missing=missing)

"""Orbax checkpoints of a whole `TrainState` plus JSON metadata, written atomically, with
fingerprints checked on restore; damaged checkpoints skipped; resuming every process of a run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.training.state import TrainState

PyTree = Any


def fingerprint(tree: PyTree) -> str:
    """CRC32 over every leaf's bytes, in tree order: written beside a checkpoint and checked on
    restore, so a file damaged after it was written is noticed rather than trained on."""
    crc = 0
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(str((a.dtype.str, a.shape)).encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return f"{crc:08x}"


def _fields(state) -> dict:
    """Top-level parts of a TrainState (or of its raw dict form read back without a template)."""
    if isinstance(state, Mapping):
        return dict(state)
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def state_fingerprints(state) -> dict[str, str]:
    """`fingerprint` of each part (params, opt_state, ...) that is not None."""
    return {k: fingerprint(v) for k, v in _fields(state).items() if v is not None}


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"params/conv_in/kernel": shape, ...} for a state, its raw dict form or orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path):
            tuple(leaf.shape) for path, leaf in leaves}


class CheckpointMismatch(JaxdiffError):
    """A readable checkpoint of a different model or optimizer: not skipped, since every older
    checkpoint of the same run would not fit either."""


_QUIET_CHECKPOINT_DIRS: set[str] = set()
_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def _quiet_abandoned_reads(directory: Path) -> None:
    """When an orbax restore fails, tensorstore finishes the reads orbax abandoned, and Python
    would print each as a traceback: posted to the event loop orbax already closed ("Event loop
    is closed", an unraisable exception), or logged by asyncio as "Task exception was never
    retrieved" when the failed read task is collected. Drop exactly those — the second kind only
    when its error names a file under `directory` — for the rest of the process; everything else
    goes to the previous hook and to asyncio's logger as before."""
    directory = Path(directory)
    _QUIET_CHECKPOINT_DIRS.update({str(directory.absolute()), str(directory.resolve())})
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_jaxdiff_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxdiff_quiet = True
    sys.unraisablehook = hook


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for a read of a checkpoint whose restore
    already failed (and was reported as one error line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_NEVER_RETRIEVED) or not record.exc_info:
            return True
        text = str(record.exc_info[1])
        return not any(d in text for d in _QUIET_CHECKPOINT_DIRS)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Checkpointer:
    """Orbax checkpoints of a whole `TrainState` plus JSON metadata (data position, config)
    in `directory/<step>/`. Each save is written to a temporary folder and renamed when complete
    (orbax's atomic commit); the last `max_to_keep` are kept, and with `best_metric` also the
    best by that metric of the `metrics` given to `save`. `restore_latest` walks back from the
    newest step and skips (with a warning) any checkpoint that fails to read or whose fingerprint
    does not match, moving it aside as `<step>.corrupt`."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, save_async: bool = True,
                 create: bool = True, best_metric: str | None = None, best_mode: str = "min",
                 keep_best: int = 1, primary_only: bool = False):
        """`best_metric`: also keep the `keep_best` checkpoints best by this entry of the
        `metrics` given to `save` (lower is better with `best_mode` "min"). `primary_only`: in a
        multi-process run only this process saves and restores (the caller sends the restored
        state to the others); otherwise orbax expects every process to take part."""
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        if not create and not self.directory.is_dir():
            raise JaxdiffError(f"no checkpoints: {self.directory} does not exist")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode {best_mode!r}; choose one of: max, min")
        keep = [policies.LatestN(n=max_to_keep)]
        if best_metric is not None:
            worst = float("inf") if best_mode == "min" else float("-inf")

            def metric(m, name=best_metric, worst=worst):
                value = (m or {}).get(name)
                value = worst if value is None else float(value)
                return value if np.isfinite(value) else worst

            keep.append(policies.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        self.best_metric, self._best_mode = best_metric, best_mode
        extra = {}
        if primary_only and jax.process_count() > 1:
            me = jax.process_index()
            extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jaxdiff-{me}")
            if create:  # orbax does not create the folder for a subset of processes
                self.directory.mkdir(parents=True, exist_ok=True)
                create = False
        options = ocp.CheckpointManagerOptions(
            create=create, enable_async_checkpointing=save_async, cleanup_tmp_directories=True,
            preservation_policy=policies.AnyPreservationPolicy(keep), **extra)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    @property
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, metadata: Mapping | None = None, *, force: bool = True,
             metrics: Mapping[str, float] | None = None) -> int:
        """Save `state` (unreplicated) at its own step; returns the step. `metrics` (floats)
        rank the checkpoint for `best_metric`."""
        ocp = self._ocp
        host_state = jax.device_get(state)
        step = int(host_state.step)
        meta = {**dict(metadata or {}), "step": step, "fingerprints": state_fingerprints(host_state)}
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            meta["metrics"] = {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}
        if step in self.manager.all_steps():
            self.manager.delete(step)  # a re-run over the same step replaces it
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=force, metrics=metrics)
        return step

    def best_step(self) -> int | None:
        """The step of the best checkpoint by `best_metric` (None without one)."""
        if self.best_metric is None:
            return None
        self.wait()
        best, best_value = None, None
        for step in self.steps:
            try:
                value = read_checkpoint_meta(self.directory, step).get("metrics", {}).get(self.best_metric)
            except JaxdiffError:
                continue
            if value is None or not np.isfinite(value):
                continue
            if best_value is None or (value < best_value if self._best_mode == "min" else value > best_value):
                best, best_value = step, value
        return best

    def _read(self, step: int, state_args) -> tuple[Any, dict]:
        ocp = self._ocp
        where = self.directory / str(step)
        _quiet_abandoned_reads(self.directory)  # before: the abandoned reads may finish before `except` runs
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise JaxdiffError(f"checkpoint {where} cannot be read ({msg})") from None
        return restored.state, dict(restored.meta or {})

    def _check(self, step: int, parts: Mapping, meta: Mapping) -> None:
        expected = meta.get("fingerprints")
        if not isinstance(expected, Mapping):
            raise JaxdiffError(f"checkpoint {self.directory / str(step)} has no fingerprints in its metadata")
        for name, value in parts.items():
            if value is not None and fingerprint(value) != expected.get(name):
                raise JaxdiffError(f"checkpoint {self.directory / str(step)}: {name} does not match "
                                   "its fingerprint (damaged files)")

    def _check_shapes(self, step: int, abstract) -> None:
        where = self.directory / str(step)
        _quiet_abandoned_reads(self.directory)
        try:
            stored = _leaf_shapes(self.manager.item_metadata(step)["state"].tree)
        except Exception as e:  # unreadable metadata: a damaged checkpoint
            raise JaxdiffError(f"checkpoint {where} cannot be read ({type(e).__name__})") from None
        wanted = _leaf_shapes(abstract)
        for name in sorted(set(stored) | set(wanted)):
            if stored.get(name) != wanted.get(name):
                have = "nothing" if name not in stored else f"shape {stored[name]}"
                want = "nothing" if name not in wanted else f"shape {wanted[name]}"
                raise CheckpointMismatch(
                    f"checkpoint {where} holds {have} for {name} where this run expects {want}: "
                    "it was written for another model or optimizer configuration")

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        """The checkpoint at `step` shaped like `template` (arrays or ShapeDtypeStructs).
        Raises JaxdiffError when it cannot be read, does not fit `template` or fails its
        fingerprint."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), template)
        self._check_shapes(step, abstract)
        state, meta = self._read(step, self._ocp.args.StandardRestore(abstract))
        self._check(step, _fields(state), meta)
        return state, meta

    def restore_part(self, step: int, name: str = "params") -> tuple[PyTree, dict]:
        """One part of the state (e.g. "params", "ema_params") as nested dicts of arrays, without
        knowing the optimizer: what sampling needs. Raises JaxdiffError as `restore` does."""
        state, meta = self._read(step, self._ocp.args.StandardRestore())
        part = state.get(name) if isinstance(state, Mapping) else None
        if part is None:
            raise JaxdiffError(f"checkpoint {self.directory / str(step)} holds no {name}")
        self._check(step, {name: part}, meta)
        return part, meta

    def restore_latest(self, template: TrainState | None = None, *, part: str = "params",
                       move_aside: bool = True) -> tuple[Any, dict] | None:
        """The newest readable checkpoint (the whole state shaped like `template`, or else only
        `part`), or None when there is none. Damaged ones are skipped with a warning (and, with
        `move_aside`, renamed `<step>.corrupt` so a resumed run can write that step again);
        if every one is damaged, raises JaxdiffError."""
        last_error = None
        for step in reversed(self.steps):
            try:
                if template is not None:
                    return self.restore(step, template)
                return self.restore_part(step, part)
            except CheckpointMismatch:
                raise
            except JaxdiffError as e:
                last_error = e
                _warn(f"{e}; skipping it in favour of an earlier one")
                if move_aside:
                    self._move_aside(step)
        if last_error is not None:
            raise JaxdiffError(f"no usable checkpoint in {self.directory} (newest problem: {last_error})")
        return None

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory / f"{step}.corrupt"
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            src.rename(dst)
        self.manager.reload()

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resume_everywhere(checkpointer: "Checkpointer | None", template: TrainState, directory: str | Path
                      ) -> tuple[TrainState, Any]:
    """(state, data position) to resume a run from: the newest good checkpoint (damaged ones
    skipped with a warning) read by the process that holds `checkpointer` (process 0; the
    others pass None) and sent to every process; `template` and a fresh position when there is
    no checkpoint yet. When process 0 cannot restore, every process raises its error."""
    from jaxdiff.data.batches import DataPosition
    from jaxdiff.parallel import distributed

    found = distributed.on_main_process(
        lambda: checkpointer.restore_latest(template) if checkpointer is not None else None,
        f"restoring the newest checkpoint in {directory}")
    header = np.zeros(3, np.int64)
    if found is not None:
        state, meta = found
        pos = DataPosition.from_dict(meta["data"])
        header[:] = (1, pos.epoch, pos.index)
    header = distributed.broadcast_from_main(header)
    if not header[0]:
        distributed.log(f"--resume: no checkpoint in {directory} yet; starting the run from step 0")
        return template, DataPosition()
    state = distributed.broadcast_from_main(state if found is not None else template)
    distributed.log(f"resumed from step {int(state.step)} ({directory})")
    return state, DataPosition(int(header[1]), int(header[2]))


def read_checkpoint_meta(directory: str | Path, step: int) -> dict:
    """The JSON metadata of one checkpoint, without reading its arrays."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxdiffError(f"checkpoint metadata {path} cannot be read ({e})") from None

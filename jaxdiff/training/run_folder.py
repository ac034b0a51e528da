"""The run folder every training program writes: one record of what the run is, beside its
checkpoints and logs.

    RUN/jaxdiff_run.json   {"format": "jaxdiff-run-1", "program": "train.mnist",
                            "train": {the run's settings}, "total_steps": 2000,
                            "data": {"source": ..., "fingerprint": ..., "images": ...},
                            "model": {...}, "scheduler": {...}}    # model/scheduler: when the
                                                                   # program builds its own model
    RUN/checkpoints/       orbax checkpoints (`jaxdiff.training.checkpoint`)
    RUN/logs/              TensorBoard events or metrics.jsonl, and sample grids

The name is not `config.json`: a text-to-image RUN is also a diffusers pipeline folder
(model_index.json, unet/config.json, ...). Folders of earlier versions are still read:
train.mnist wrote RUN/config.json ({model, scheduler, train}), train.text_to_image
RUN/train_config.json ({train, total_steps, data}).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from jaxdiff.errors import JaxdiffError

RUN_FILE = "jaxdiff_run.json"
FORMAT = "jaxdiff-run-1"
CHECKPOINTS = "checkpoints"
# Earlier versions' run files: (file name, program).
LEGACY_FILES = (("config.json", "train.mnist"), ("train_config.json", "train.text_to_image"))


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What RUN/jaxdiff_run.json holds. `train`: the run's settings (a program's config as a
    dict); `total_steps`: the planned length (None in folders of earlier train.mnist versions);
    `data`: what it trains on; `model`, `scheduler`: the configs of a model the program built
    (None when it fine-tunes a model folder)."""

    program: str
    train: dict
    total_steps: Optional[int] = None
    data: dict = dataclasses.field(default_factory=dict)
    model: Optional[dict] = None
    scheduler: Optional[dict] = None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=2, sort_keys=True) + "\n"

    def replace(self, **changes) -> "RunRecord":
        return dataclasses.replace(self, **changes)


def _legacy(path: Path, program: str) -> Optional[RunRecord]:
    """An earlier version's run file as a record; None when the file is something else (e.g. a
    diffusers model's config.json)."""
    d = json.loads(path.read_text())
    if not isinstance(d, dict) or "_class_name" in d:
        return None
    if program == "train.mnist":
        if not {"model", "scheduler"} <= d.keys():
            return None
        train = dict(d.get("train", {}))
        source = train.pop("data", None)
        return RunRecord(program, train, None, {"source": source} if source is not None else {},
                         dict(d["model"]), dict(d["scheduler"]))
    if "train" not in d:
        return None
    return RunRecord(program, dict(d["train"]), d.get("total_steps"), dict(d.get("data") or {}))


def _run_file(run_dir: Path) -> Optional[tuple[Path, Optional[str]]]:
    """(path, program of a legacy file or None) of the folder's run file, if it has one."""
    if (run_dir / RUN_FILE).is_file():
        return run_dir / RUN_FILE, None
    for name, program in LEGACY_FILES:
        path = run_dir / name
        if path.is_file():
            try:
                if _legacy(path, program) is not None:
                    return path, program
            except (OSError, ValueError):
                continue
    return None


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a training run's record (this format or an earlier one)."""
    path = Path(path)
    return path.is_dir() and _run_file(path) is not None


def holds_run(run_dir: str | os.PathLike) -> bool:
    """A run record or any checkpoint: starting a new run there would mix two runs."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINTS
    return _run_file(run_dir) is not None or (ckpt.is_dir() and any(ckpt.iterdir()))


def read_run(run_dir: str | os.PathLike, program: Optional[str] = None) -> RunRecord:
    """The record of the run in `run_dir`; with `program`, it must be that program's run."""
    run_dir = Path(run_dir)
    what = f"a {program} run folder" if program else "a run folder"
    if not run_dir.is_dir():
        raise JaxdiffError(f"run folder {run_dir} does not exist; pass the --out folder of "
                           f"{program or 'a training program'}")
    found = _run_file(run_dir)
    if found is None:
        raise JaxdiffError(f"{run_dir} is not {what} (no {RUN_FILE})")
    path, legacy_program = found
    try:
        if legacy_program is not None:
            record = _legacy(path, legacy_program)
        else:
            d = json.loads(path.read_text())
            record = RunRecord(program=str(d["program"]), train=dict(d["train"]),
                               total_steps=d.get("total_steps"), data=dict(d.get("data") or {}),
                               model=d.get("model"), scheduler=d.get("scheduler"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise JaxdiffError(f"{path} is damaged ({type(e).__name__}: {e}); start a new --out") from None
    if program is not None and record.program != program:
        raise JaxdiffError(f"{run_dir} holds a {record.program} run, not {what}; choose another folder")
    return record


def write_run(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write RUN/jaxdiff_run.json atomically (a temporary file renamed into place)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(record.to_json())
    tmp.replace(path)
    return path

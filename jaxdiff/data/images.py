"""Image folders for unconditional and class-conditional training (`train.finetune`): the
images, optional integer labels, the resize / crop / flip that brings them to the model's
sample size, and shuffled batches whose position is saved with the checkpoint.

    data = load_images("my_images/")           # flat, class sub-folders, or metadata with `label`
    prep = Preprocess((32, 32), channels=3, random_crop=False, random_flip=True)
    batches = ImageBatches(data, 64, prep, seed=0)
    batch = next(batches)   # {"images": uint8 (64, 32, 32, 3), "labels": int32 (64,)  # labelled data only}

Folder layouts: images directly in the folder (unlabelled); one sub-folder per class
(`cats/`, `dogs/`: labels 0, 1, ... in sorted name order); or a `metadata.jsonl` / `metadata.csv`
with a `file_name` column and, for labels, a `label` column (integers, or names numbered in
sorted order). A Hugging Face dataset name (user/name) is read through `datasets` when online
or cached, its `image` and `label` columns by default.

Augmentation is a function of (seed, epoch, example): a resumed run crops and flips exactly as
the uninterrupted one. Image reading reuses the guards of `jaxdiff.data.captions` (files inside
the folder unless allowed, a pixel limit read from the header, unreadable images skipped or an
error).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from jaxdiff.data.batches import DataPosition, EpochOrder, check_global_batch
from jaxdiff.data.captions import (HUB_ID, MAX_IMAGE_PIXELS, METADATA_FILES, ON_BAD_IMAGE, BadImageError,
                                   _inside, _outside_error, _read_metadata, allow_in_pil, check_max_image_pixels,
                                   check_on_bad_image, open_image)
from jaxdiff.errors import JaxdiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABEL_COLUMN = "label"
IMAGE_COLUMNS = ("image", "img", "pixel_values")
DECODED_CACHE_BYTES = 1 << 30  # resized images kept in memory (the first epoch fills it)


class ImageDataset:
    """`len(data)` images; `data.image(i)` → a PIL image; `labels` int32 (N,) or None;
    `class_names` the label names (None for unlabelled data); `fingerprint` changes when a
    file name, size, label or the order changes."""

    def __init__(self, names: Sequence[str], load_image: Callable[[int], Any], source: str, fingerprint: str,
                 labels: Optional[np.ndarray] = None, class_names: Optional[Sequence[str]] = None):
        if not len(names):
            raise JaxdiffError(f"{source} holds no images")
        self.names = list(names)
        self._load = load_image
        self.source, self.fingerprint = source, fingerprint
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.class_names = None if class_names is None else tuple(class_names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.labels is None else len(self.class_names)

    def image(self, i: int):
        return self._load(int(i))


def _label_ids(values: Sequence, where: str) -> tuple[np.ndarray, list[str]]:
    """Labels as ids: integers as they are (classes 0..max), names numbered in sorted order."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ids = np.asarray(values, np.int64)
        if ids.min() < 0:
            raise JaxdiffError(f"{where}: integer labels must be >= 0, found {ids.min()}")
        return ids.astype(np.int32), [str(i) for i in range(int(ids.max()) + 1)]
    texts = [str(v) for v in values]
    if all(t.strip().lstrip("-").isdigit() for t in texts):  # a CSV's integers arrive as text
        return _label_ids([int(t) for t in texts], where)
    names = sorted(set(texts))
    table = {n: i for i, n in enumerate(names)}
    return np.asarray([table[t] for t in texts], np.int32), names


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def load_image_folder(folder: str | os.PathLike, *, label_column: str = LABEL_COLUMN,
                      allow_outside_paths: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageDataset:
    """An image folder in one of the three layouts of the module docstring. Every file must
    resolve (symlinks followed) inside `folder` unless `allow_outside_paths`; `data.image(i)`
    raises BadImageError for an image over `max_image_pixels` or unreadable."""
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    root = Path(folder).expanduser()
    if not root.exists():
        raise JaxdiffError(f"training data {root} does not exist")
    if not root.is_dir():
        raise JaxdiffError(f"training data {root} is not a folder; pass a folder of images")
    real_root = os.path.realpath(root)
    metas = [root / m for m in METADATA_FILES if (root / m).is_file()]
    labels = class_names = None
    if len(metas) > 1:
        raise JaxdiffError(f"{root} has both metadata.jsonl and metadata.csv; keep one")
    if metas:
        meta = metas[0]
        columns, rows = _read_metadata(meta)
        if "file_name" not in columns:
            raise JaxdiffError(f"{meta} has no file_name column; its columns are: {', '.join(columns)}")
        paths = []
        for n, row in enumerate(rows, start=1):
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                raise JaxdiffError(f"{meta} row {n}: file_name is empty")
            paths.append(root / name)
            if not paths[-1].is_file():
                raise JaxdiffError(f"{meta} row {n}: image {paths[-1]} does not exist")
        if label_column in columns:
            values = [row.get(label_column) for row in rows]
            if any(v is None or v == "" for v in values):
                n = next(i for i, v in enumerate(values, start=1) if v is None or v == "")
                raise JaxdiffError(f"{meta} row {n}: no {label_column!r}; give every image a label or none")
            labels, class_names = _label_ids(values, str(meta))
        where = str(meta)
    else:
        top = sorted(p for p in root.iterdir() if _is_image(p))
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        classes = [(d, sorted(p for p in d.rglob("*") if _is_image(p))) for d in subdirs]
        classes = [(d, files) for d, files in classes if files]
        if top and classes:
            raise JaxdiffError(f"{root} holds images both at its top level and in sub-folders "
                               f"({classes[0][0].name}/); use one layout: all images in the folder, or one "
                               "sub-folder per class")
        if classes:
            paths = [p for _, files in classes for p in files]
            class_names = [d.name for d, _ in classes]
            labels = np.concatenate([np.full(len(files), i, np.int32) for i, (_, files) in enumerate(classes)])
        else:
            paths = top
        where = str(root)
    if not paths:
        raise JaxdiffError(f"no images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files, class "
                           "sub-folders, or a metadata.jsonl/csv with a file_name column)")
    reals, crc = [], 0
    for i, path in enumerate(paths):
        real = os.path.realpath(path)
        if not allow_outside_paths and not _inside(real, real_root):
            raise _outside_error(where, f"image {path.name!r}", real, root)
        reals.append(real)
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        label = None if labels is None else int(labels[i])
        crc = zlib.crc32(json.dumps([rel, path.stat().st_size, label]).encode(), crc)
    allow_in_pil(max_image_pixels)
    opened = paths if allow_outside_paths else reals  # a link swapped later cannot lead out

    def load(i: int):
        return open_image(opened[i], max_image_pixels, name=paths[i])

    kind = "labelled " if labels is not None else ""
    return ImageDataset([str(p) for p in paths], load, f"{kind}image folder {root}", f"{len(paths)}-{crc:08x}",
                        labels, class_names)


def load_hf_images(name: str, *, split: str = "train", image_column: Optional[str] = None,
                   label_column: str = LABEL_COLUMN, timeout: float = 3.0,
                   max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageDataset:
    """A Hugging Face dataset of images (labels from `label_column` when it has one); only the
    local cache when offline; its own loading code never runs (`jaxdiff.data.hub`)."""
    from jaxdiff.data.captions import check_image_size
    from jaxdiff.data.hub import open_dataset

    max_image_pixels = check_max_image_pixels(max_image_pixels)
    ds = open_dataset(name, split, timeout)
    columns = list(ds.column_names)
    col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if col not in columns:
        raise JaxdiffError(f"dataset {name!r} has no image column {col or '(image)'}; its columns are: "
                           f"{', '.join(columns)}; name it with --image-column")
    labels = class_names = None
    if label_column in columns:
        labels, class_names = _label_ids(list(ds[label_column]), f"dataset {name!r}")
        feature = getattr(ds, "features", {}).get(label_column)
        if getattr(feature, "names", None):
            class_names = list(feature.names)
    images = ds.select_columns([col])
    allow_in_pil(max_image_pixels)

    def load(i):
        im = images[i][col]
        if not hasattr(im, "size"):
            raise BadImageError(f"dataset {name!r} row {i}: {col} is not an image")
        check_image_size(im.size, f"dataset {name!r} row {i}", max_image_pixels)
        return im

    fp = getattr(ds, "_fingerprint", None) or f"{len(ds)}"
    return ImageDataset([f"{name}[{i}]" for i in range(len(ds))], load, f"Hugging Face dataset {name} ({split})",
                        f"{len(ds)}-{fp}", labels, class_names)


def load_images(train_data: str | os.PathLike, *, split: str = "train", image_column: Optional[str] = None,
                label_column: str = LABEL_COLUMN, verbose: bool = True, allow_outside_paths: bool = False,
                max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageDataset:
    """A folder → `load_image_folder`; a Hub name (user/name) that is no folder →
    `load_hf_images`. Prints one line naming what was loaded."""
    path = Path(train_data).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(train_data)) or "/" not in str(train_data):
        data = load_image_folder(path, label_column=label_column, allow_outside_paths=allow_outside_paths,
                                 max_image_pixels=max_image_pixels)
    else:
        data = load_hf_images(str(train_data), split=split, image_column=image_column, label_column=label_column,
                              max_image_pixels=max_image_pixels)
    if verbose:
        classes = f", {data.num_classes} classes" if data.labels is not None else ""
        print(f"data: {data.source}, {len(data)} images{classes}", file=sys.stderr)
    return data


# --------------------------------------------------------------------------------------------
# Resize, crop, flip
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Images to the model's input: converted to `channels` (1 grey, 3 RGB, 4 RGBA), resized so
    they cover `size` (H, W) (bilinear, as diffusers' train_unconditional.py), cropped to it
    (centre, or a random window with `random_crop`) and, with `random_flip`, mirrored left–right
    with probability ½. The random draws of an example are a function of (seed, epoch, example)."""

    size: tuple[int, int]
    channels: int = 3
    random_crop: bool = False
    random_flip: bool = False

    def resize(self, image) -> np.ndarray:
        """PIL image → uint8 (h, w, C) covering `size` (before the crop)."""
        from PIL import Image

        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(self.channels)
        if mode is None:
            raise JaxdiffError(f"images for a model with {self.channels} input channels cannot be read "
                               "from picture files; use a model with 1, 3 or 4 channels")
        if image.mode != mode:
            image = image.convert(mode)
        h, w = self.size
        scale = max(h / image.height, w / image.width)
        new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        if new != image.size:
            image = image.resize(new, Image.Resampling.BILINEAR)
        array = np.asarray(image, np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def draws(self, seed: int, epoch: int, example: int) -> tuple[float, float, bool]:
        """(crop position y, x in [0, 1), flip) of one example in one epoch."""
        u = np.random.default_rng([seed, epoch, example, 0x1A6E]).random(3)
        return float(u[0]), float(u[1]), bool(u[2] < 0.5)

    def crop_flip(self, array: np.ndarray, seed: int, epoch: int, example: int) -> np.ndarray:
        h, w = self.size
        extra_y, extra_x = array.shape[0] - h, array.shape[1] - w
        uy, ux, flip = self.draws(seed, epoch, example)
        if self.random_crop:
            top, left = int(uy * (extra_y + 1)), int(ux * (extra_x + 1))
        else:
            top, left = extra_y // 2, extra_x // 2
        out = array[top:top + h, left:left + w]
        if self.random_flip and flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


class ImageFetcher:
    """`fetch(ids, epoch) -> {"images": uint8 (b, H, W, C)[, "labels": int32 (b,)], "index": (b,)}`
    on `workers` threads. Resized images are kept in memory up to `cache_bytes`, so later
    epochs of a small data set decode nothing. An unreadable image stops the run
    (`on_bad_image="error"`) or is replaced by the next readable one of its batch (`"skip"`,
    a warning names it once)."""

    def __init__(self, data: ImageDataset, preprocess: Preprocess, *, seed: int = 0, workers: int = 4,
                 on_bad_image: str = ON_BAD_IMAGE, cache_bytes: int = DECODED_CACHE_BYTES):
        self.data, self.preprocess, self.seed = data, preprocess, seed
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.bad_images: dict[str, str] = {}
        self._cache: dict[int, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if workers > 1 else None

    def _resized(self, i: int):
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        try:
            array = self.preprocess.resize(self.data.image(i))
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            self._note(i, e)
            return e
        with self._lock:
            if array.nbytes <= self._cache_left:
                self._cache[i] = array
                self._cache_left -= array.nbytes
        return array

    def _note(self, i: int, error: BadImageError) -> None:
        name = self.data.names[i]
        with self._lock:
            if name in self.bad_images:
                return
            self.bad_images[name] = str(error)
        print(f"warning: {error} [skipped: replaced by another image of its batch; --on-bad-image error "
              "stops instead]", file=sys.stderr)

    def __call__(self, ids: np.ndarray, epoch: int) -> dict:
        ids = np.asarray(ids, np.int64).copy()
        arrays = list(self._pool.map(self._resized, ids) if self._pool else map(self._resized, ids))
        bad = [j for j, a in enumerate(arrays) if isinstance(a, BaseException)]
        if len(bad) == len(arrays):
            raise BadImageError(f"no image of a batch of {len(ids)} could be read (e.g. {arrays[0]}); check "
                                "the training images")
        for j in bad:
            k = next(k % len(arrays) for k in range(j + 1, j + len(arrays))
                     if not isinstance(arrays[k % len(arrays)], BaseException))
            arrays[j], ids[j] = arrays[k], ids[k]
        try:
            images = np.stack([self.preprocess.crop_flip(a, self.seed, epoch, int(i)) for a, i in zip(arrays, ids)])
        except ValueError:
            raise JaxdiffError("the training images have different numbers of channels; convert them to one "
                               "mode") from None
        batch = {"images": images, "index": ids}
        if self.data.labels is not None:
            batch["labels"] = self.data.labels[ids]
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ImageBatches(EpochOrder):
    """Shuffled batches of `global_batch_size` images (a new permutation each epoch, a
    function of (seed, epoch); the last partial batch of an epoch dropped), prepared
    `prefetch` batches ahead; each process fetches its `process_index`-th slice of every global
    batch. `position` is where the batch after the last one returned starts: save it, pass it
    back to resume. `skipped_images` counts the replaced images of the batches handed out."""

    def __init__(self, data: ImageDataset, global_batch_size: int, fetch: ImageFetcher, *, seed: int = 0,
                 position: DataPosition = DataPosition(), process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2):
        check_global_batch(global_batch_size, len(data), process_count, " or more images")
        self.data, self.global_batch_size, self.fetch, self.seed = data, global_batch_size, fetch, seed
        self.position = self._next_position = position
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        self._perm_epoch, self._perm = -1, None
        self._ahead = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
        self._queue: collections.deque = collections.deque()
        self._prefetch = prefetch
        self.skipped_images = 0

    def _submit(self) -> None:
        epoch, index = self._next_position.epoch, self._next_position.index
        if index + self.global_batch_size > len(self.data):
            epoch, index = epoch + 1, 0
        start = index + self._offset
        ids = self._permutation(epoch)[start:start + self._local].astype(np.int64)
        self._next_position = DataPosition(epoch, index + self.global_batch_size)
        if self._ahead is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(self.fetch(ids, epoch))
        else:
            fut = self._ahead.submit(self.fetch, ids, epoch)
        self._queue.append((fut, self._next_position, ids))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self._queue) < 1 + self._prefetch:
            self._submit()
        fut, pos, ids = self._queue.popleft()
        batch = fut.result()
        self.skipped_images += int(np.count_nonzero(batch["index"] != ids))
        self.position = pos
        return batch

    def close(self) -> None:
        if self._ahead is not None:
            for fut, _, _ in self._queue:
                fut.cancel()
            self._ahead.shutdown(wait=False, cancel_futures=True)
            self._ahead = None
        self._queue.clear()
        self.fetch.close()

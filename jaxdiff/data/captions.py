"""Image–caption data for text-to-image training: a Hugging Face *imagefolder* (images beside a
`metadata.jsonl` or `metadata.csv` with a `file_name` column and a caption column) or a Hugging
Face `datasets` dataset; images resized and centre-cropped to a square resolution; shuffled
batches whose position is saved with the checkpoint; each host reads only its rows.

    data = load_captions("my_images/")                        # or "lambdalabs/naruto-blip-captions"
    batches = CaptionBatches(data, 64, seed=0, resolution=512, tokenizer=tok, max_length=77,
                             process_index=0, process_count=1)
    batch = next(batches)   # {"pixels": uint8 (64, 512, 512, 3), "input_ids": int32 (64, 77), "index": int64 (64,)}

An example may have several captions (a JSON list in the caption column); each epoch picks one
of them as a function of (seed, epoch, example), so a resumed run picks the same ones.

Guards: an imagefolder's files must resolve (symlinks followed) inside the folder unless
`allow_outside_paths=True`; an image over `max_image_pixels` is refused from its header, before
it is decoded; an unreadable image is skipped (`on_bad_image="skip"`, replaced by another image
of its batch, see `PixelFetcher`) or stops the run (`"error"`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import json
import os
import re
import struct
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from jaxdiff.data.batches import DataPosition, EpochOrder, check_global_batch
from jaxdiff.data.hub import open_dataset
from jaxdiff.errors import JaxdiffError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
IMAGE_COLUMNS = ("image", "img", "file_name")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# PIL's own default limit (Image.MAX_IMAGE_PIXELS): a 9459² image, 268 MB decoded as RGB — far
# above any source a ≤1024-pixel training resolution needs; a larger file is refused unread.
MAX_IMAGE_PIXELS = 89_478_485
ON_BAD_IMAGE = "skip"  # what a training run does with an unreadable image by default
ON_BAD_IMAGE_CHOICES = ("skip", "error")


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------

class CaptionDataset:
    """`len(data)` examples; `data.image(i)` → a PIL image; `data.captions[i]` → a tuple of
    one or more caption strings. `caption_strings` lists every distinct caption once and
    `caption_ids[i]` indexes it (what a cache of text embeddings stores). `fingerprint` changes
    when a file name, file size, caption or the order changes (not with file times, so copies of
    the same data on several hosts agree); `local_fingerprint` also changes when a file is
    rewritten (file times: what a cache on this machine checks)."""

    def __init__(self, captions: Sequence[Sequence[str]], load_image: Callable[[int], Any],
                 source: str, fingerprint: str, names: Optional[Sequence[str]] = None,
                 local_fingerprint: Optional[str] = None):
        if not captions:
            raise JaxdiffError(f"{source} holds no examples")
        self.captions = tuple(tuple(c) for c in captions)
        self._load = load_image
        self.source = source
        self.fingerprint = fingerprint
        self.local_fingerprint = local_fingerprint or fingerprint
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.captions))]
        table: dict[str, int] = {}
        ids = []
        for caps in self.captions:
            ids.append(tuple(table.setdefault(c, len(table)) for c in caps))
        self.caption_strings = list(table)
        self.caption_ids = tuple(ids)

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int):
        return self._load(int(i))


def _caption_value(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ("",)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise JaxdiffError(f"{where}: a caption must be a string or a non-empty list of strings, got {value!r}")


def _pick_column(columns: Sequence[str], wanted: Optional[str], defaults: Sequence[str], what: str,
                 where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise JaxdiffError(f"{where} has no column {wanted!r} for the {what}; its columns are: "
                               f"{', '.join(columns)}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise JaxdiffError(f"{where} has no {what} column (looked for {', '.join(defaults)}); its columns "
                       f"are: {', '.join(columns)}; name it with --caption-column")


def _read_metadata(path: Path) -> tuple[list[str], list[dict]]:
    """Columns and rows of one metadata.jsonl / metadata.csv."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxdiffError(f"{path} cannot be read ({e})") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxdiffError(f"{path} line {n} is not JSON ({e.msg}); each line must be one "
                                   'object such as {"file_name": "0001.png", "text": "a red apple"}') from None
            if not isinstance(row, dict):
                raise JaxdiffError(f"{path} line {n} is not a JSON object")
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, rows
    reader = csv.DictReader(text.splitlines())
    rows = [dict(r) for r in reader]
    return list(reader.fieldnames or []), rows


class BadImageError(JaxdiffError):
    """An image that cannot be decoded or is over the pixel limit (what `on_bad_image` governs)."""


# What decoding a broken file raises (OSError covers PIL's UnidentifiedImageError and truncated
# files); PIL's DecompressionBombError is handled apart.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


_PIL_LIMIT = threading.Lock()


def allow_in_pil(max_image_pixels: int) -> None:
    """Raise PIL's process-wide `Image.MAX_IMAGE_PIXELS` to at least `max_image_pixels` (never
    lower it), so PIL itself neither warns about nor refuses images the caller allowed; jaxdiff
    checks every image against its own limit. Called by the loaders, before any image is read."""
    from PIL import Image

    with _PIL_LIMIT:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_image_pixels:
            Image.MAX_IMAGE_PIXELS = max_image_pixels


def check_max_image_pixels(max_image_pixels) -> int:
    """`max_image_pixels` as an int, or one JaxdiffError unless it is a positive whole number."""
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, (int, np.integer)) \
            or max_image_pixels <= 0:
        raise JaxdiffError(f"max_image_pixels must be a positive whole number of pixels, got "
                           f"{max_image_pixels!r}")
    return int(max_image_pixels)


def check_image_size(size: tuple[int, int], name, max_image_pixels: int) -> None:
    """BadImageError when a (width, height) is over `max_image_pixels` (read from the header)."""
    w, h = size
    if w * h > max_image_pixels:
        raise BadImageError(f"image {name} is {w}x{h} = {w * h:,} pixels, more than the limit of "
                            f"{max_image_pixels:,} (a decompression bomb, or a needlessly large image); "
                            "shrink or remove it, or raise --max-image-pixels")


def open_image(path: str | os.PathLike, max_image_pixels: int = MAX_IMAGE_PIXELS, *, name=None):
    """A PIL image, fully read; its size is checked from the header before decoding. Any
    failure is one BadImageError naming `name` (default `path`) and the fix."""
    from PIL import Image

    name = path if name is None else name
    try:
        with Image.open(path) as im:
            check_image_size(im.size, name, max_image_pixels)
            im.load()
            return im.copy()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, *UNREADABLE) as e:
        raise _bad_image(e, f"image {name}", bomb_fix="shrink or remove it, or raise --max-image-pixels",
                         fix="fix or remove it from the metadata") from None


def _bad_image(error: Exception, subject: str, *, bomb_fix: str, fix: str = "") -> BadImageError:
    """One line for an image PIL refuses as a decompression bomb or cannot read."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        return BadImageError(f"{subject} is refused as a decompression bomb ({error}); {bomb_fix}")
    return BadImageError(f"{subject} cannot be read ({error}){'; ' + fix if fix else ''}")


def _inside(path: str, real_root: str) -> bool:
    return os.path.commonpath([path, real_root]) == real_root


def _outside_error(where: str, what: str, real: str, root: Path) -> JaxdiffError:
    return JaxdiffError(f"{where}: {what} resolves to {real}, outside the data folder {root}; move it "
                        "into the folder, or pass --allow-outside-paths (allow_outside_paths=True) "
                        "to read it anyway")


def load_imagefolder(folder: str | os.PathLike, *, caption_column: Optional[str] = None,
                     allow_outside_paths: bool = False,
                     max_image_pixels: int = MAX_IMAGE_PIXELS) -> CaptionDataset:
    """An imagefolder: every `metadata.jsonl` / `metadata.csv` under `folder` (file names are
    relative to the metadata file's own folder), in path order, rows in file order.

    Every metadata file and image must resolve (symlinks followed) inside `folder`; a
    `../x.png`, an absolute path or a link leading out is refused unless `allow_outside_paths`.
    `data.image(i)` raises BadImageError for an image over `max_image_pixels` or unreadable."""
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    root = Path(folder).expanduser()
    if not root.exists():
        raise JaxdiffError(f"training data {root} does not exist")
    if not root.is_dir():
        raise JaxdiffError(f"training data {root} is not a folder; pass an image folder with a "
                           "metadata.jsonl or metadata.csv")
    metas = sorted(p for name in METADATA_FILES for p in root.rglob(name))
    if not metas:
        raise JaxdiffError(f"no metadata.jsonl or metadata.csv in {root}: put one beside the images, "
                           'one row per image, e.g. {"file_name": "0001.png", "text": "a red apple"}')
    by_dir = collections.Counter(p.parent for p in metas)
    for d, n in by_dir.items():
        if n > 1:
            raise JaxdiffError(f"{d} has both metadata.jsonl and metadata.csv; keep one")
    real_root = os.path.realpath(root)
    paths, reals, captions, crc, crc_times = [], [], [], 0, 0
    for meta in metas:
        if not allow_outside_paths and not _inside(os.path.realpath(meta), real_root):
            raise _outside_error(str(meta), "this metadata file", os.path.realpath(meta), root)
        columns, rows = _read_metadata(meta)
        if not rows:
            continue
        if "file_name" not in columns:
            raise JaxdiffError(f"{meta} has no file_name column; its columns are: {', '.join(columns)}")
        col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(meta))
        for n, row in enumerate(rows, start=1):
            name = row.get("file_name")
            where = f"{meta} row {n}"
            if not isinstance(name, str) or not name:
                raise JaxdiffError(f"{where}: file_name is empty")
            path = (meta.parent / name)
            try:
                stat = path.stat()
            except OSError:
                raise JaxdiffError(f"{where}: image {path} does not exist") from None
            real = os.path.realpath(path)
            if not allow_outside_paths and not _inside(real, real_root):
                raise _outside_error(where, f"file_name {name!r}", real, root)
            caps = _caption_value(row.get(col), where)
            paths.append(path)
            reals.append(real)
            captions.append(caps)
            rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            crc = zlib.crc32(json.dumps([rel, stat.st_size, caps]).encode(), crc)
            crc_times = zlib.crc32(str(stat.st_mtime_ns).encode(), crc_times)
    if not paths:
        raise JaxdiffError(f"the metadata files in {root} list no images")
    allow_in_pil(max_image_pixels)
    opened = paths if allow_outside_paths else reals  # a link swapped later cannot lead out

    def load(i: int):
        return open_image(opened[i], max_image_pixels, name=paths[i])

    return CaptionDataset(captions, load, f"image folder {root}",
                          f"{len(paths)}-{crc:08x}", names=[str(p) for p in paths],
                          local_fingerprint=f"{len(paths)}-{crc:08x}-{crc_times:08x}")


def load_hf_dataset(name: str, *, split: str = "train", caption_column: Optional[str] = None,
                    image_column: Optional[str] = None, timeout: float = 3.0,
                    allow_outside_paths: bool = False,
                    max_image_pixels: int = MAX_IMAGE_PIXELS) -> CaptionDataset:
    """A Hugging Face `datasets` dataset with an image column and a caption column. Offline
    (no route to the Hub within `timeout` seconds, or HF_DATASETS_OFFLINE=1) only the local
    cache is tried, so this never hangs. The dataset's own loading script is never run
    (`trust_remote_code=False`). An image column of file paths (which the dataset, not the
    user, chose on this disk) is refused unless `allow_outside_paths`."""
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    ds = open_dataset(name, split, timeout)
    columns = list(ds.column_names)
    where = f"dataset {name!r}"
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", where)
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where)
    captions = [_caption_value(c, f"{where} row {i}") for i, c in enumerate(ds[cap_col])]
    feature = getattr(ds, "features", {}).get(image_col)
    if getattr(feature, "dtype", None) == "string" and not allow_outside_paths:
        raise _paths_refused(where, image_col)
    images = ds.select_columns([image_col])
    allow_in_pil(max_image_pixels)

    def load(i):
        from PIL import Image

        try:
            im = images[i][image_col]  # datasets decodes it here
        except JaxdiffError:
            raise
        except (Image.DecompressionBombError, *UNREADABLE) as e:
            raise _bad_image(e, f"{where} row {i}: the image",
                             bomb_fix="raise --max-image-pixels if it is genuine") from None
        if isinstance(im, str):
            if not allow_outside_paths:
                raise _paths_refused(where, image_col)
            return open_image(Path(im), max_image_pixels, name=f"{im} ({where} row {i})")
        check_image_size(im.size, f"{where} row {i}", max_image_pixels)
        return im

    fp = getattr(ds, "_fingerprint", None) or f"{zlib.crc32(json.dumps(captions).encode()):08x}"
    return CaptionDataset(captions, load, f"Hugging Face dataset {name} ({split})", f"{len(ds)}-{fp}")


def _paths_refused(where: str, column: str) -> JaxdiffError:
    return JaxdiffError(f"{where}: its image column {column!r} holds file paths, which would be read "
                        "from anywhere on this machine; pass --allow-outside-paths "
                        "(allow_outside_paths=True) if you trust them, or use a dataset of images")


def load_captions(train_data: str | os.PathLike, *, split: str = "train",
                  caption_column: Optional[str] = None, image_column: Optional[str] = None,
                  verbose: bool = True, allow_outside_paths: bool = False,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> CaptionDataset:
    """A folder → `load_imagefolder`; anything else that looks like a Hub name (`user/name`)
    → `load_hf_dataset`. Prints one line naming what was loaded. `allow_outside_paths` and
    `max_image_pixels`: see `load_imagefolder`."""
    path = Path(train_data).expanduser()
    guards = dict(allow_outside_paths=allow_outside_paths, max_image_pixels=max_image_pixels)
    if path.exists() or not HUB_ID.fullmatch(str(train_data)):
        data = load_imagefolder(path, caption_column=caption_column, **guards)
    else:
        data = load_hf_dataset(str(train_data), split=split, caption_column=caption_column,
                               image_column=image_column, **guards)
    if verbose:
        n_caps = sum(len(c) for c in data.captions)
        print(f"data: {data.source}, {len(data)} images, {n_caps} captions", file=sys.stderr)
    return data


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def prepare_image(image, resolution: int) -> np.ndarray:
    """A PIL image → uint8 (resolution, resolution, 3): RGB, the shorter side resized to
    `resolution` (Lanczos, as diffusers' training scripts), then the centre square cropped."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def pick_caption(num_captions: int, seed: int, epoch: int, example: int) -> int:
    """Which of an example's captions epoch `epoch` uses: a function of its arguments only."""
    if num_captions == 1:
        return 0
    return zlib.crc32(np.array([seed, epoch, example], np.int64).tobytes()) % num_captions


class CaptionBatches(EpochOrder):
    """Shuffled batches of `global_batch_size` examples (a new permutation of the whole data
    set each epoch, a function of (seed, epoch); the last partial batch of an epoch dropped).
    Each process fetches only its own `process_index`-th slice of every global batch.

    `fetch(indices, caption_ids) -> dict` builds the arrays of a batch from example indices
    and the caption (an index into `data.caption_strings`) chosen for each; `pixel_fetcher`
    makes the usual one. Batches are prepared ahead on `workers` threads; `position` is
    where the batch after the last one returned starts — save it, pass it back to resume.

    A fetch that replaces an unreadable example says so in its `index` (the examples actually
    used); `skipped_images` counts the replaced examples of the batches this process has
    handed out (not those prepared ahead), so it is the same however far ahead it reads."""

    def __init__(self, data: CaptionDataset, global_batch_size: int, fetch: Callable[..., dict], *,
                 seed: int = 0, position: DataPosition = DataPosition(), process_index: int = 0,
                 process_count: int = 1, workers: int = 4, prefetch: int = 2):
        check_global_batch(global_batch_size, len(data), process_count, " or more images")
        self.data = data
        self.global_batch_size = global_batch_size
        self.fetch = fetch
        self.seed = seed
        self.position = position
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        self._next_position = position
        self._perm_epoch, self._perm = -1, None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if workers else None
        self._queue: collections.deque = collections.deque()
        self._prefetch = max(0, prefetch)
        self.skipped_images = 0

    def _plan(self) -> tuple[np.ndarray, np.ndarray, DataPosition]:
        """The next local batch's example and caption indices, and the position after it."""
        epoch, index = self._next_position.epoch, self._next_position.index
        if index + self.global_batch_size > len(self.data):
            epoch, index = epoch + 1, 0
        start = index + self._offset
        ids = self._permutation(epoch)[start:start + self._local].astype(np.int64)
        caps = np.array([self.data.caption_ids[i][pick_caption(len(self.data.caption_ids[i]),
                                                                 self.seed, epoch, int(i))]
                         for i in ids], np.int64)
        self._next_position = DataPosition(epoch, index + self.global_batch_size)
        return ids, caps, self._next_position

    def _submit(self) -> None:
        ids, caps, pos = self._plan()
        if self._pool is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(self.fetch(ids, caps))
        else:
            fut = self._pool.submit(self.fetch, ids, caps)
        self._queue.append((fut, pos, ids))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self._queue) < 1 + self._prefetch:
            self._submit()
        fut, pos, ids = self._queue.popleft()
        batch = fut.result()
        if "index" in batch:
            self.skipped_images += int(np.count_nonzero(np.asarray(batch["index"]) != ids))
        self.position = pos
        return batch

    def close(self) -> None:
        if self._pool is not None:
            for fut, _, _ in self._queue:
                fut.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._queue.clear()


def check_on_bad_image(on_bad_image: str) -> str:
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        raise JaxdiffError(f"unknown on_bad_image {on_bad_image!r}; choose one of: "
                           f"{', '.join(ON_BAD_IMAGE_CHOICES)}")
    return on_bad_image


class PixelFetcher:
    """`fetch` for `CaptionBatches` that loads and prepares the images (on `workers` threads)
    and tokenizes the chosen captions: ``{"pixels": uint8 (b, R, R, 3), "input_ids": int32
    (b, L), "index": int64 (b,)}``.

    An image that raises BadImageError (unreadable, or over the pixel limit) stops the run with
    that error when `on_bad_image="error"`. With `"skip"` it is replaced by the next readable
    example of the same batch, cyclically in batch order — its pixels, caption and `index` —
    so a batch is a function of (ids, the files) alone and resumes identically; a warning names
    each bad image once, `bad_images` maps its name to the reason, and a batch with no readable
    image at all is an error."""

    def __init__(self, data: CaptionDataset, resolution: int, tokenize: Callable[[list[str]], np.ndarray],
                 workers: int = 4, on_bad_image: str = ON_BAD_IMAGE):
        self.data = data
        self.resolution = resolution
        self.tokenize = tokenize
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.bad_images: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

    def _one(self, i):
        try:
            return prepare_image(self.data.image(int(i)), self.resolution)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            return e

    def _note(self, i: int, error: BadImageError) -> None:
        name = self.data.names[i]
        with self._lock:
            if name in self.bad_images:
                return
            self.bad_images[name] = str(error)
        print(f"warning: {error} [skipped: replaced by another image of its batch; "
              "--on-bad-image error stops instead]", file=sys.stderr)

    def __call__(self, ids: np.ndarray, caption_ids: np.ndarray) -> dict:
        ids = np.asarray(ids, np.int64)
        caption_ids = np.asarray(caption_ids, np.int64)
        images = list(self._pool.map(self._one, ids))
        good = [j for j, im in enumerate(images) if not isinstance(im, BaseException)]
        if len(good) < len(images):
            for j, im in enumerate(images):
                if isinstance(im, BaseException):
                    self._note(int(ids[j]), im)
            if not good:
                raise BadImageError(f"no image of a batch of {len(ids)} could be read (e.g. "
                                    f"{images[0]}); check the training images")
            ids, caption_ids = ids.copy(), caption_ids.copy()
            for j, im in enumerate(images):
                if isinstance(im, BaseException):
                    k = next(k % len(images) for k in range(j + 1, j + len(images))
                             if not isinstance(images[k % len(images)], BaseException))
                    images[j], ids[j], caption_ids[j] = images[k], ids[k], caption_ids[k]
        input_ids = self.tokenize([self.data.caption_strings[c] for c in caption_ids])
        return {"pixels": np.stack(images), "input_ids": np.asarray(input_ids, np.int32), "index": ids}


def pixel_fetcher(data: CaptionDataset, resolution: int, tokenize: Callable[[list[str]], np.ndarray],
                  workers: int = 4, on_bad_image: str = ON_BAD_IMAGE) -> PixelFetcher:
    """The usual `fetch` for `CaptionBatches`: see `PixelFetcher`."""
    return PixelFetcher(data, resolution, tokenize, workers=workers, on_bad_image=on_bad_image)

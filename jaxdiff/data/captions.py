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
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from jaxdiff.data.batches import DataPosition, EpochOrder, check_global_batch
from jaxdiff.data.hub import HF_HOST, can_reach, hf_offline
from jaxdiff.errors import JaxdiffError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
IMAGE_COLUMNS = ("image", "img", "file_name")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise JaxdiffError(f"image {path} cannot be read ({e}); fix or remove it from the metadata") from None


def load_imagefolder(folder: str | os.PathLike, *, caption_column: Optional[str] = None) -> CaptionDataset:
    """An imagefolder: every `metadata.jsonl` / `metadata.csv` under `folder` (file names are
    relative to the metadata file's own folder), in path order, rows in file order."""
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
    paths, captions, crc, crc_times = [], [], 0, 0
    for meta in metas:
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
            caps = _caption_value(row.get(col), where)
            paths.append(path)
            captions.append(caps)
            rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            crc = zlib.crc32(json.dumps([rel, stat.st_size, caps]).encode(), crc)
            crc_times = zlib.crc32(str(stat.st_mtime_ns).encode(), crc_times)
    if not paths:
        raise JaxdiffError(f"the metadata files in {root} list no images")
    return CaptionDataset(captions, lambda i: _open_image(paths[i]), f"image folder {root}",
                          f"{len(paths)}-{crc:08x}", names=[str(p) for p in paths],
                          local_fingerprint=f"{len(paths)}-{crc:08x}-{crc_times:08x}")


def load_hf_dataset(name: str, *, split: str = "train", caption_column: Optional[str] = None,
                    image_column: Optional[str] = None, timeout: float = 3.0) -> CaptionDataset:
    """A Hugging Face `datasets` dataset with an image column and a caption column. Offline
    (no route to the Hub within `timeout` seconds, or HF_DATASETS_OFFLINE=1) only the local
    cache is tried, so this never hangs."""
    try:
        import datasets
    except ImportError:
        raise JaxdiffError(f"training data {name!r}: no such folder, and loading it as a Hugging "
                           "Face Hub dataset needs the datasets package (pip install datasets)") from None
    offline = hf_offline() or not can_reach(HF_HOST, timeout)
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    try:
        if offline:
            os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, cache and format errors: one line for the user
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = " (the Hub is unreachable and it is not in the local cache)" if offline else ""
        raise JaxdiffError(f"cannot load the dataset {name!r} split {split!r}{hint}: {msg}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    columns = list(ds.column_names)
    where = f"dataset {name!r}"
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", where)
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where)
    captions = [_caption_value(c, f"{where} row {i}") for i, c in enumerate(ds[cap_col])]
    images = ds.select_columns([image_col])

    def load(i):
        im = images[i][image_col]
        if isinstance(im, str):
            return _open_image(Path(im))
        return im

    fp = getattr(ds, "_fingerprint", None) or f"{zlib.crc32(json.dumps(captions).encode()):08x}"
    return CaptionDataset(captions, load, f"Hugging Face dataset {name} ({split})", f"{len(ds)}-{fp}")


def load_captions(train_data: str | os.PathLike, *, split: str = "train",
                  caption_column: Optional[str] = None, image_column: Optional[str] = None,
                  verbose: bool = True) -> CaptionDataset:
    """A folder → `load_imagefolder`; anything else that looks like a Hub name (`user/name`)
    → `load_hf_dataset`. Prints one line naming what was loaded."""
    path = Path(train_data).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(train_data)):
        data = load_imagefolder(path, caption_column=caption_column)
    else:
        data = load_hf_dataset(str(train_data), split=split, caption_column=caption_column,
                               image_column=image_column)
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
    where the batch after the last one returned starts — save it, pass it back to resume."""

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
        self._queue.append((fut, pos))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self._queue) < 1 + self._prefetch:
            self._submit()
        fut, pos = self._queue.popleft()
        batch = fut.result()
        self.position = pos
        return batch

    def close(self) -> None:
        if self._pool is not None:
            for fut, _ in self._queue:
                fut.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._queue.clear()


def pixel_fetcher(data: CaptionDataset, resolution: int, tokenize: Callable[[list[str]], np.ndarray],
                  workers: int = 4) -> Callable[[np.ndarray, np.ndarray], dict]:
    """`fetch` for `CaptionBatches` that loads and prepares the images (on `workers` threads)
    and tokenizes the chosen captions: ``{"pixels": uint8 (b, R, R, 3), "input_ids": int32
    (b, L), "index": int64 (b,)}``."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

    def one(i):
        return prepare_image(data.image(int(i)), resolution)

    def fetch(ids: np.ndarray, caption_ids: np.ndarray) -> dict:
        pixels = np.stack(list(pool.map(one, ids)))
        input_ids = tokenize([data.caption_strings[c] for c in caption_ids])
        return {"pixels": pixels, "input_ids": np.asarray(input_ids, np.int32), "index": ids}

    return fetch

"""Training data: MNIST from IDX files, Hugging Face `datasets`, or the copy shipped with jaxdiff.

Images are kept as uint8 ``(N, 28, 28, 1)`` (NHWC, 0..255) with int32 labels ``(N,)``; the train
step turns them into floats in [-1, 1] on the device, so the host sends a quarter of the bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import struct
import sys
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from jaxdiff.data.hub import HF_HOST, can_reach, check_datasets_version, hf_offline, load_dataset
from jaxdiff.errors import JaxdiffError

# IDX file stems by split, as LeCun's site and torchvision name them.
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HF_DATASET = "ylecun/mnist"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """`images` uint8 (N, H, W, C) in 0..255, `labels` int32 (N,), `source` a line for people."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels {self.labels.shape} do not match {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @functools.cached_property
    def fingerprint(self) -> str:
        """CRC32 of the images and labels: the same data on every host, and on --resume."""
        crc = zlib.crc32(np.ascontiguousarray(self.images).tobytes())
        return f"{zlib.crc32(np.ascontiguousarray(self.labels, np.int32).tobytes(), crc):08x}"


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

# IDX files jaxdiff reads hold at most this many data bytes unless `max_bytes` says otherwise:
# 4× the largest IDX data set in use (EMNIST ByClass training images, 0.55 GB).
MAX_IDX_BYTES = 1 << 31
# Deflate never expands more than 1032:1, so a gzip file of n bytes holds < 1032·n bytes: a
# header declaring more is lying, and is refused before anything is decompressed.
GZIP_MAX_RATIO = 1032
_CHUNK = 1 << 22


def _read_exactly(f, out: np.ndarray) -> int:
    """Fill the uint8 array `out` from the stream `f`; the number of bytes it got."""
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:got + _CHUNK])
        if not n:
            break
        got += n
    return got


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An IDX file (gzipped or raw) as a numpy array of its declared shape (uint8 data only).

    Only the declared bytes are read (plus one, to catch trailing data), so a gzip bomb is
    never decompressed whole; a declared size above `max_bytes`, or above what the file can
    hold (its size raw, 1032× its size gzipped), is refused before reading."""
    path = Path(path)
    gz = path.suffix == ".gz"
    redownload = "re-download the MNIST files"
    try:
        file_size = path.stat().st_size
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise JaxdiffError(f"{path} is not an IDX file (bad magic number); {redownload}")
            type_code, ndim = head[2], head[3]
            if type_code != 0x08:
                raise JaxdiffError(f"{path}: IDX element type 0x{type_code:02x} is not supported "
                                   "(expected uint8)")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise JaxdiffError(f"{path} is truncated; {redownload}")
            shape = struct.unpack(f">{ndim}I", dims)
            count = math.prod(shape)  # Python ints: no overflow however large the declared shape
            header = 4 + 4 * ndim
            if count > max_bytes:
                raise JaxdiffError(f"{path} declares shape {shape} = {count:,} bytes, more than the "
                                   f"{max_bytes:,} an IDX file may hold here (max_bytes); the header is "
                                   f"corrupt or hostile: {redownload}")
            if gz and count > GZIP_MAX_RATIO * file_size:
                raise JaxdiffError(f"{path} declares shape {shape} = {count:,} bytes, more than a "
                                   f"{file_size:,}-byte gzip file can hold; the header is corrupt: "
                                   f"{redownload}")
            if not gz and file_size != header + count:
                raise JaxdiffError(f"{path} holds {file_size - header:,} bytes of data, expected "
                                   f"{count:,} for shape {shape}; the file is "
                                   f"{'truncated' if file_size < header + count else 'corrupt'}: "
                                   f"{redownload}")
            array = np.empty(count, np.uint8)
            got = _read_exactly(f, array)
            if got < count:
                raise JaxdiffError(f"{path} holds {got:,} bytes of data, expected {count:,} for shape "
                                   f"{shape}; the file is truncated: {redownload}")
            if f.read(1):
                raise JaxdiffError(f"{path} holds more than the {count:,} bytes of data its shape "
                                   f"{shape} declares; the file is corrupt: {redownload}")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise JaxdiffError(f"{path} cannot be read ({e}); {redownload}") from None
    return array.reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file, gzipped when `path` ends in .gz."""
    path = Path(path)
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _from_idx_pair(images_path: Path, labels_path: Path, source: str) -> Dataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise JaxdiffError(f"{images_path} {images.shape} and {labels_path} {labels.shape} are not a "
                           "matching (N, H, W) image file and (N,) label file")
    return Dataset(np.ascontiguousarray(images[..., None]), labels.astype(np.int32), source)


def load_idx_folder(folder: str | os.PathLike, split: str | None = None) -> Dataset:
    """MNIST from a folder of IDX files. `split` None takes the train split when present and
    the test split otherwise; a missing folder or one without IDX files is an error."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise JaxdiffError(f"data folder {folder} does not exist; pass --data-dir with the MNIST IDX files")
    if not folder.is_dir():
        raise JaxdiffError(f"{folder} is not a folder; pass --data-dir with the MNIST IDX files")
    splits = [split] if split else ["train", "test"]
    for name in splits:
        if name not in IDX_NAMES:
            raise JaxdiffError(f"unknown split {name!r}; choose one of: {', '.join(IDX_NAMES)}")
        img_stem, lab_stem = IDX_NAMES[name]
        images, labels = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
        if images and labels:
            return _from_idx_pair(images, labels, f"MNIST {name} split from {folder}")
        if images or labels:
            have, want = (images, lab_stem) if images else (labels, img_stem)
            raise JaxdiffError(f"{folder} has {have.name} but no {want}[.gz]; add the matching file")
    wanted = " or ".join(f"{IDX_NAMES[s][0]}[.gz] + {IDX_NAMES[s][1]}[.gz]" for s in splits)
    raise JaxdiffError(f"no MNIST IDX files in {folder} (expected {wanted})")


# --------------------------------------------------------------------------------------------
# The other sources
# --------------------------------------------------------------------------------------------

def load_embedded() -> Dataset:
    """The MNIST test set (10,000 digits) shipped inside jaxdiff: needs no network."""
    assets = resources.files("jaxdiff") / "assets"
    img_stem, lab_stem = IDX_NAMES["test"]
    with resources.as_file(assets / f"{img_stem}.gz") as images, \
            resources.as_file(assets / f"{lab_stem}.gz") as labels:
        return _from_idx_pair(Path(images), Path(labels),
                              "MNIST test split (10,000 digits) shipped with jaxdiff")


def load_hf(split: str = "train", timeout: float = 3.0) -> Dataset | None:
    """MNIST through Hugging Face `datasets` (from its cache when offline), or None when
    `datasets` is not installed, the network is unreachable or the download fails."""
    try:
        import datasets
    except ImportError:
        return None
    try:
        check_datasets_version(datasets)
    except JaxdiffError as e:
        print(f"{e}; using the embedded MNIST copy", file=sys.stderr)
        return None
    if not hf_offline() and not can_reach(HF_HOST, timeout):
        return None
    try:
        ds = load_dataset(HF_DATASET, split=split)
        images = np.stack([np.asarray(im, np.uint8) for im in ds["image"]])[..., None]
        labels = np.asarray(ds["label"], np.int32)
    except Exception as e:  # network, cache and format errors all mean "use another source"
        print(f"Hugging Face datasets MNIST unavailable ({type(e).__name__}); using the embedded copy",
              file=sys.stderr)
        return None
    return Dataset(images, labels, f"MNIST {split} split from Hugging Face datasets ({HF_DATASET})")


def load_mnist(data_dir: str | os.PathLike | None = None, *, split: str | None = None,
               use_hf: bool = True, verbose: bool = True) -> Dataset:
    """MNIST from `data_dir` (IDX files) when given; else Hugging Face `datasets` when installed
    and reachable; else the test set shipped with jaxdiff. Prints one line naming the source."""
    if data_dir is not None:
        data = load_idx_folder(data_dir, split)
    else:
        data = (load_hf(split or "train") if use_hf else None) or load_embedded()
    if verbose:
        print(f"data: {data.source}, {len(data)} images {'x'.join(map(str, data.image_shape))}",
              file=sys.stderr)
    return data

"""Data faults, provoked one by one: file names that lead out of the data folder (`../`, an
absolute path, a symlink), a decompression-bomb image, an image over the pixel limit, corrupt
images (skipped deterministically, or an error), a gzip-bomb IDX file, IDX headers declaring
absurd or overflowing shapes, and `datasets` kept from running a dataset's own code. Each ends in
one clear JaxdiffError or the documented skip; nothing large is ever decoded or allocated.
"""
from __future__ import annotations

import gzip
import json
import resource
import struct
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import hub
from jaxdiff.data.batches import DataPosition
from jaxdiff.data.captions import (MAX_IMAGE_PIXELS, ON_BAD_IMAGE, BadImageError, CaptionBatches,
                                   allow_in_pil, load_captions, load_imagefolder, open_image,
                                   pixel_fetcher)
from jaxdiff.data.mnist import GZIP_MAX_RATIO, load_mnist, read_idx, write_idx
from jaxdiff.errors import JaxdiffError

RES = 8


def write_folder(folder: Path, names: list[str], n_images: int = 4) -> Path:
    """`n_images` small PNGs images/000.png ... and a metadata.jsonl listing `names` in order."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        im = np.full((12, 10, 3), 20 * i, np.uint8)
        Image.fromarray(im).save(folder / "images" / f"{i:03d}.png")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": name, "text": f"caption {k}"}) + "\n" for k, name in enumerate(names)))
    return folder


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of `width`×`height` zeros, written row block by row block:
    20000² pixels (400 MP) compress to ~50 KB and never exist decoded here."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = 1 + (width + 7) // 8  # a filter byte, then 8 pixels a byte
    block, comp = bytes(row * 500), zlib.compressobj(9)
    idat = b"".join(comp.compress(block[:row * min(500, height - y)])
                    for y in range(0, height, 500)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def tok(strings):
    return np.array([[len(s), sum(map(ord, s)) % 1000] for s in strings], np.int32)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# Paths stay inside their folder
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """An image beside, not inside, the data folder `tmp_path / "data"`."""
    path = tmp_path / "secret.png"
    Image.fromarray(np.full((6, 6, 3), 7, np.uint8)).save(path)
    return path


def _leading_out(kind: str, folder: Path, outside: Path) -> str:
    if kind == "dotdot":
        return "../secret.png"
    if kind == "absolute":
        return str(outside)
    (folder / "images" / "link.png").symlink_to(outside)
    return "images/link.png"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_file_name_leading_out_of_the_folder_is_refused(tmp_path, outside, kind):
    folder = write_folder(tmp_path / "data", [])
    name = _leading_out(kind, folder, outside)
    write_folder(folder, ["images/000.png", name])
    with pytest.raises(JaxdiffError, match=r"row 2: file_name .* resolves to .*secret\.png, outside the "
                                           r"data folder .*--allow-outside-paths"):
        load_imagefolder(folder)
    with pytest.raises(JaxdiffError, match="outside the data folder"):
        load_captions(folder, verbose=False)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_allow_outside_paths_reads_them(tmp_path, outside, kind):
    folder = write_folder(tmp_path / "data", [])
    name = _leading_out(kind, folder, outside)
    write_folder(folder, ["images/000.png", name])
    data = load_captions(folder, verbose=False, allow_outside_paths=True)
    assert len(data) == 2 and np.asarray(data.image(1)).max() == 7


def test_links_and_dots_that_stay_inside_are_fine(tmp_path):
    folder = write_folder(tmp_path / "data", [])
    (folder / "images" / "link.png").symlink_to(folder / "images" / "001.png")
    (folder / "sub").mkdir()
    write_folder(folder, ["images/000.png", "images/link.png", "sub/../images/002.png"])
    linked = tmp_path / "linked-data"  # the data folder itself reached through a link
    linked.symlink_to(folder)
    for root in (folder, linked):
        data = load_imagefolder(root)
        assert len(data) == 3 and np.asarray(data.image(1)).max() == 20


def test_a_metadata_file_linked_from_outside_is_refused(tmp_path):
    folder = write_folder(tmp_path / "data", ["images/000.png"])
    elsewhere = tmp_path / "elsewhere.jsonl"
    (folder / "metadata.jsonl").rename(elsewhere)
    (folder / "metadata.jsonl").symlink_to(elsewhere)
    with pytest.raises(JaxdiffError, match="this metadata file resolves to .*outside the data folder"):
        load_imagefolder(folder)
    assert len(load_imagefolder(folder, allow_outside_paths=True)) == 1


# ------------------------------------------------------------------------------------------------
# Images: the pixel limit, decompression bombs, corrupt files
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """bomb.png 20000² (400 MP: over twice PIL's limit), big.png 10000² (100 MP: between PIL's
    limit and twice it), ok.png 12×10, in one folder with its metadata."""
    folder = write_folder(tmp_path_factory.mktemp("bombs"), ["images/000.png", "bomb.png", "big.png"], 1)
    png_of_zeros(folder / "bomb.png", 20000, 20000)
    png_of_zeros(folder / "big.png", 10000, 10000)
    return folder


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, for big.png
@pytest.mark.parametrize("row, message", [
    (1, r"bomb\.png is refused as a decompression bomb .*raise --max-image-pixels"),
    (2, r"big\.png is 10000x10000 = 100,000,000 pixels, more than the limit of 89,478,485"),
])
def test_a_decompression_bomb_is_one_error_and_is_never_decoded(bombs, row, message):
    assert (bombs / "bomb.png").stat().st_size < 200_000
    data = load_imagefolder(bombs)
    before, start = peak_rss_mb(), time.perf_counter()
    with pytest.raises(BadImageError, match=message):
        data.image(row)
    assert time.perf_counter() - start < 1.0
    assert peak_rss_mb() - before < 50  # decoded, either would take 100-400 MB
    assert isinstance(BadImageError("x"), JaxdiffError)
    assert np.asarray(data.image(0)).shape == (12, 10, 3)


def test_the_pixel_limit_is_configurable(tmp_path):
    folder = write_folder(tmp_path, ["images/000.png"], 1)  # 12×10 = 120 pixels
    with pytest.raises(BadImageError, match=r"12x10|10x12"):
        load_captions(folder, verbose=False, max_image_pixels=119).image(0)
    assert load_captions(folder, verbose=False, max_image_pixels=120).image(0).size == (10, 12)
    for bad in (0, -5, 1.5, True, "many"):
        with pytest.raises(JaxdiffError, match="max_image_pixels must be a positive whole number"):
            load_imagefolder(folder, max_image_pixels=bad)
    assert MAX_IMAGE_PIXELS == 89_478_485  # PIL's own default


def test_a_limit_above_pils_raises_pils_never_lowers_it(tmp_path, monkeypatch):
    folder = write_folder(tmp_path, ["images/000.png"], 1)  # 120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL alone: warns over 50, refuses over 100
    with pytest.raises(BadImageError, match="refused as a decompression bomb"):
        open_image(folder / "images" / "000.png", max_image_pixels=500)
    data = load_imagefolder(folder, max_image_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == 500 and data.image(0).size == (10, 12)
    allow_in_pil(10)
    assert Image.MAX_IMAGE_PIXELS == 500


@pytest.fixture
def corrupt_folder(tmp_path) -> Path:
    """8 images; 003.png is garbage and 005.png a PNG cut short."""
    folder = write_folder(tmp_path, [f"images/{i:03d}.png" for i in range(8)], 8)
    (folder / "images" / "003.png").write_bytes(b"not an image at all")
    good = (folder / "images" / "005.png").read_bytes()
    (folder / "images" / "005.png").write_bytes(good[:len(good) // 2])
    return folder


def test_a_corrupt_image_with_on_bad_image_error_stops_with_one_line(corrupt_folder):
    data = load_imagefolder(corrupt_folder)
    fetch = pixel_fetcher(data, RES, tok, workers=2, on_bad_image="error")
    with pytest.raises(BadImageError, match=r"image .*003\.png cannot be read .*fix or remove it"):
        fetch(np.array([1, 3]), np.array([0, 0]))
    with pytest.raises(BadImageError, match=r"00[35]\.png cannot be read"):
        next(CaptionBatches(data, 8, fetch, seed=0, workers=0))
    with pytest.raises(JaxdiffError, match="unknown on_bad_image 'ignore'; choose one of: skip, error"):
        pixel_fetcher(data, RES, tok, on_bad_image="ignore")


def test_corrupt_images_are_skipped_deterministically_and_resume_identically(corrupt_folder, capsys):
    assert ON_BAD_IMAGE == "skip"
    data = load_imagefolder(corrupt_folder)
    fetch = pixel_fetcher(data, RES, tok, workers=2)
    plan = CaptionBatches(data, 4, lambda ids, caps: {"index": ids, "caps": caps}, seed=5, workers=0)
    planned = [next(plan) for _ in range(6)]  # 2 batches an epoch: 3 epochs
    full = CaptionBatches(data, 4, fetch, seed=5, workers=0)
    got = [next(full) for _ in range(6)]
    for p, g in zip(planned, got):
        ids, used = p["index"], g["index"]
        for j in range(4):
            if ids[j] in (3, 5):  # replaced by the next readable example of its batch, cyclically
                k = next(k % 4 for k in range(j + 1, j + 4) if ids[k % 4] not in (3, 5))
                assert used[j] == ids[k]
                np.testing.assert_array_equal(g["pixels"][j], g["pixels"][k])
                np.testing.assert_array_equal(g["input_ids"][j], g["input_ids"][k])
            else:
                assert used[j] == ids[j]
        assert g["pixels"].shape == (4, RES, RES, 3)
    assert full.skipped_images == 6  # two bad images, once each per epoch
    assert sorted(Path(n).name for n in fetch.bad_images) == ["003.png", "005.png"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("skipped" in w and "--on-bad-image error" in w for w in warnings)

    resumed = CaptionBatches(data, 4, pixel_fetcher(data, RES, tok, workers=1), seed=5,
                             position=DataPosition(1, 4), workers=2)  # after 3 batches, reading ahead
    for g in got[3:]:
        r = next(resumed)
        for key in ("pixels", "input_ids", "index"):
            np.testing.assert_array_equal(r[key], g[key])
    resumed.close()  # it had read two batches ahead: not counted
    assert resumed.skipped_images == sum(int(np.isin(p["index"], [3, 5]).sum()) for p in planned[3:])


def test_a_batch_with_no_readable_image_is_an_error(corrupt_folder):
    data = load_imagefolder(corrupt_folder)
    with pytest.raises(BadImageError, match="no image of a batch of 2 could be read"):
        pixel_fetcher(data, RES, tok, workers=1)(np.array([3, 5]), np.array([0, 0]))


# ------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------

def idx_header(shape) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def test_a_gzip_bomb_idx_is_not_decompressed(tmp_path):
    """A header declaring 10 bytes, then 256 MB of zeros (64 gzip members of 4 MB, 256 KB in
    all), the last member cut short: reading it all would end in the gzip error; reading only
    what the header declares (plus one byte) finds the trailing data at once."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    zeros = gzip.compress(bytes(1 << 22), compresslevel=9)
    path.write_bytes((gzip.compress(idx_header((10,)) + bytes(range(10))) + zeros * 64)[:-1000])
    assert path.stat().st_size < 400_000
    start = time.perf_counter()
    with pytest.raises(JaxdiffError, match=r"holds more than the 10 bytes of data its shape \(10,\) declares"):
        read_idx(path)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("gz", [False, True])
def test_an_idx_declaring_more_than_its_file_can_hold_is_refused_unread(tmp_path, gz):
    path = tmp_path / ("images-idx3-ubyte" + (".gz" if gz else ""))
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(idx_header((60000, 28, 28)) + bytes(100))
    if gz:
        assert 47_040_000 > GZIP_MAX_RATIO * path.stat().st_size
    message = ("more than a .*-byte gzip file can hold" if gz
               else "holds 100 bytes of data, expected 47,040,000 .*truncated")
    with pytest.raises(JaxdiffError, match=message):
        read_idx(path)


@pytest.mark.parametrize("shape", [(1 << 16,) * 4, (0xFFFFFFFF,) * 3, (1 << 31, 1 << 31)])
def test_an_absurd_or_overflowing_idx_shape_is_refused(tmp_path, shape):
    """(2¹⁶)⁴ = 2⁶⁴ wraps to 0 in numpy's int64; (2³²-1)³ ≈ 8e28 wraps to a wrong size."""
    count = 1
    for d in shape:
        count *= d
    path = tmp_path / "x-idx-ubyte"
    path.write_bytes(idx_header(shape))
    with pytest.raises(JaxdiffError, match=rf"declares shape .* = {count:,} bytes, more than the "
                                           r"2,147,483,648 an IDX file may hold"):
        read_idx(path)
    with pytest.raises(JaxdiffError, match=rf"holds 0 bytes of data, expected {count:,} .*truncated"):
        read_idx(path, max_bytes=1 << 100)  # sizes in Python ints: exact, never wrapped


def test_idx_trailing_data_and_the_limit_itself(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        path = write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(path, max_bytes=24), array)
        with pytest.raises(JaxdiffError, match="= 24 bytes, more than the 23"):
            read_idx(path, max_bytes=23)
    raw = tmp_path / "a-idx3-ubyte"
    raw.write_bytes(raw.read_bytes() + b"x")
    with pytest.raises(JaxdiffError, match="holds 25 bytes of data, expected 24 .*corrupt"):
        read_idx(raw)


# ------------------------------------------------------------------------------------------------
# datasets: never a dataset's own code (datasets is not installed here: stand-ins with the
# signatures of its versions)
# ------------------------------------------------------------------------------------------------

def datasets_stand_in(version: str, takes_trust_remote_code: bool, dataset=None):
    calls = []
    module = types.ModuleType("datasets")
    module.__version__ = version
    if takes_trust_remote_code:  # 2.16 ≤ version < 4
        def load_dataset(path, name=None, split=None, trust_remote_code=None):
            calls.append({"path": path, "split": split, "trust_remote_code": trust_remote_code})
            return dataset
    else:  # 4.x: scripts and the keyword are gone
        def load_dataset(path, name=None, split=None, **config_kwargs):
            assert "trust_remote_code" not in config_kwargs
            calls.append({"path": path, "split": split})
            return dataset
    module.load_dataset = load_dataset
    return module, calls


@pytest.mark.parametrize("version, takes", [("2.16.0", True), ("3.6.0", True), ("4.1.1", False)])
def test_load_dataset_never_trusts_remote_code(monkeypatch, version, takes):
    module, calls = datasets_stand_in(version, takes, dataset="ds")
    monkeypatch.setitem(sys.modules, "datasets", module)
    assert hub.load_dataset("user/data", split="train") == "ds"
    assert calls == [{"path": "user/data", "split": "train", **({"trust_remote_code": False} if takes else {})}]


def test_a_datasets_older_than_the_floor_is_refused(monkeypatch, capsys):
    module, calls = datasets_stand_in("2.14.7", False)
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no network probe
    with pytest.raises(JaxdiffError, match=r"datasets 2\.14\.7 can run a dataset's own loading script.*"
                                           r"datasets>=2\.16"):
        hub.load_dataset("user/data")
    with pytest.raises(JaxdiffError, match="datasets>=2.16"):
        load_captions("user/data", verbose=False)
    assert calls == []
    assert "shipped with jaxdiff" in load_mnist(verbose=False).source  # MNIST falls back, saying why
    assert "datasets>=2.16" in capsys.readouterr().err


class _Rows:
    """The parts of a `datasets.Dataset` the caption loader uses."""

    def __init__(self, columns: dict, features: dict):
        self._columns, self.features = columns, features
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self._columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._columns[key]
        return {c: v[key] for c, v in self._columns.items()}

    def select_columns(self, names):
        return _Rows({c: self._columns[c] for c in names}, {c: self.features[c] for c in names})


def test_a_hub_dataset_of_image_paths_is_refused_unless_allowed(monkeypatch, outside):
    string = types.SimpleNamespace(dtype="string")
    rows = _Rows({"image": [str(outside)], "text": ["a secret"]}, {"image": string, "text": string})
    module, calls = datasets_stand_in("3.0.1", True, rows)
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no network probe
    with pytest.raises(JaxdiffError, match="image column 'image' holds file paths.*--allow-outside-paths"):
        load_captions("user/data", verbose=False)
    data = load_captions("user/data", verbose=False, allow_outside_paths=True, max_image_pixels=36)
    assert np.asarray(data.image(0)).max() == 7
    assert all(c["trust_remote_code"] is False for c in calls)
    with pytest.raises(BadImageError, match="more than the limit of 35"):
        load_captions("user/data", verbose=False, allow_outside_paths=True, max_image_pixels=35).image(0)


class _Decoding(list):
    """An image column that decodes on access, as `datasets` does; row 1's file is broken."""

    def __getitem__(self, i):
        if i == 1:
            raise OSError("cannot identify image file 'broken.jpg'")  # what PIL raises: an OSError
        return Image.fromarray(np.full((6, 6, 3), 9 + i, np.uint8))


def test_hub_images_that_fail_to_decode_or_are_too_large_are_bad_images(monkeypatch):
    rows = _Rows({"image": _Decoding([None] * 4), "text": ["a", "b", "c", "d"]},
                 {"image": types.SimpleNamespace(dtype="PIL.Image.Image"), "text": None})
    monkeypatch.setitem(sys.modules, "datasets", datasets_stand_in("4.0.0", False, rows)[0])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = load_captions("user/data", verbose=False)
    with pytest.raises(BadImageError, match=r"dataset 'user/data' row 1: the image cannot be read \(cannot identify"):
        data.image(1)
    batch = pixel_fetcher(data, RES, tok, workers=1)(np.array([0, 1, 2]), np.array([0, 1, 2]))
    assert batch["index"].tolist() == [0, 2, 2] and batch["pixels"][1].max() == 11
    with pytest.raises(BadImageError, match="row 0 is 6x6 = 36 pixels, more than the limit of 35"):
        load_captions("user/data", verbose=False, max_image_pixels=35).image(0)

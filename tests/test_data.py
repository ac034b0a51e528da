"""MNIST loading (IDX gz/raw, the embedded copy, the source line) and the resumable batch iterator."""
from __future__ import annotations

import gzip
import shutil
import sys

import numpy as np
import pytest

from jaxdiff.data.batches import BatchIterator, DataPosition
from jaxdiff.data.mnist import Dataset, load_embedded, load_idx_folder, load_mnist, read_idx, write_idx
from jaxdiff.errors import JaxdiffError

# Class counts of the MNIST test set (shared/README.md).
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> Dataset:
    return load_idx_folder(mnist_dir)


def test_reads_the_shared_test_set(mnist):
    assert mnist.images.shape == (10000, 28, 28, 1) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == TEST_CLASS_COUNTS
    assert "test split" in mnist.source


def test_write_idx_round_trips(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (4, 5, 6)).astype(np.uint8)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / name, array)), array)


def test_raw_and_gzipped_idx_read_the_same(mnist_dir, tmp_path):
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz").read())
    np.testing.assert_array_equal(read_idx(raw), read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


def test_embedded_copy_is_the_mnist_test_set(mnist):
    embedded = load_embedded()
    np.testing.assert_array_equal(embedded.images, mnist.images)
    np.testing.assert_array_equal(embedded.labels, mnist.labels)
    assert "shipped with jaxdiff" in embedded.source


def test_train_split_is_preferred_and_raw_files_work(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, (7,)))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (3,)))
    assert len(load_idx_folder(tmp_path)) == 7
    assert len(load_idx_folder(tmp_path, split="test")) == 3


def test_without_data_dir_and_without_datasets_uses_the_embedded_copy(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    data = load_mnist()
    assert len(data) == 10000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data: MNIST test split") and "shipped with jaxdiff" in err[0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no MNIST IDX files"),
    ("half", "but no t10k-labels-idx1-ubyte"),
    ("truncated", "truncated"),
    ("not_idx", "not an IDX file"),
    ("bad_gzip", "cannot be read"),
])
def test_bad_data_folders_raise_one_clear_error(tmp_path, mnist_dir, case, message):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    images = folder / "t10k-images-idx3-ubyte.gz"
    if case in ("half", "truncated", "not_idx", "bad_gzip"):
        shutil.copy(mnist_dir / "t10k-images-idx3-ubyte.gz", images)
    if case in ("truncated", "not_idx", "bad_gzip"):
        labels = folder / "t10k-labels-idx1-ubyte"
        content = gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz").read()
        labels.write_bytes({"truncated": content[:-10], "not_idx": b"hello world!" + content,
                            "bad_gzip": content}[case])
        if case == "bad_gzip":
            labels.rename(labels.with_suffix(".gz"))
    with pytest.raises(JaxdiffError, match=message):
        load_idx_folder(folder)


def _tiny_dataset(n=10) -> Dataset:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    return Dataset(images, np.arange(n, dtype=np.int32), "tiny")


def test_batches_cover_each_example_once_per_epoch_and_reshuffle():
    it = BatchIterator(_tiny_dataset(10), 3, seed=1)
    epoch0 = np.concatenate([next(it)["labels"] for _ in range(3)])  # 9 of 10: the rest is dropped
    epoch1 = np.concatenate([next(it)["labels"] for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not np.array_equal(epoch0, epoch1)
    assert it.position == DataPosition(epoch=1, index=9)


def test_resuming_from_a_position_continues_the_same_sequence():
    data = _tiny_dataset(10)
    straight = BatchIterator(data, 4, seed=3)
    expected = [next(straight)["labels"] for _ in range(7)]
    first = BatchIterator(data, 4, seed=3)
    got = [next(first)["labels"] for _ in range(3)]
    position = DataPosition.from_dict(first.position.to_dict())
    second = BatchIterator(data, 4, seed=3, position=position)
    got += [next(second)["labels"] for _ in range(4)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_processes_take_disjoint_slices_of_the_same_global_batch():
    data = _tiny_dataset(10)
    whole = next(BatchIterator(data, 4, seed=0))["labels"]
    parts = [next(BatchIterator(data, 4, seed=0, process_index=i, process_count=2))["labels"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_batch_larger_than_the_data_is_an_error():
    with pytest.raises(JaxdiffError, match="larger than the data set"):
        BatchIterator(_tiny_dataset(10), 11)

"""IDX files (MNIST format) written by the tests themselves, and the built-in digits."""

import gzip
import struct

import numpy as np
import pytest

from engine.data import IDXFormatError, load_digits, load_idx, load_mnist
from engine.errors import EngineError

_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path, array, compress=False):
    """The IDX layout written independently: magic, big-endian dims, big-endian data."""
    array = np.asarray(array)
    header = bytes([0, 0, _TYPE_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("dtype", list(_TYPE_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trips_every_type(tmp_path, dtype, compress):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    loaded = load_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative and loaded.shape == (3, 4, 5)
    np.testing.assert_array_equal(loaded, array)


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    np.testing.assert_array_equal(load_idx(write_idx(tmp_path / "plain-name", labels, compress=True)), labels)


def test_load_idx_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file .*missing.idx"):
        load_idx(tmp_path / "missing.idx")
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(IDXFormatError, match=r"text\.idx.* is not an IDX file \(magic number 68656c6c"):
        load_idx(tmp_path / "text.idx")
    (tmp_path / "type.idx").write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 0))
    with pytest.raises(IDXFormatError, match="type.idx.*unknown IDX type code 0x07"):
        load_idx(tmp_path / "type.idx")
    full = write_idx(tmp_path / "full.idx", np.arange(100, dtype=np.uint8).reshape(10, 10)).read_bytes()
    (tmp_path / "short.idx").write_bytes(full[:-7])
    with pytest.raises(IDXFormatError, match=r"short\.idx.* is truncated: shape \(10, 10\) of uint8 needs 100 data "
                                             r"bytes, found 93"):
        load_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(full + b"\x00")
    with pytest.raises(IDXFormatError, match="long.idx.* is longer than its header says"):
        load_idx(tmp_path / "long.idx")
    (tmp_path / "header.idx").write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00")
    with pytest.raises(IDXFormatError, match="header.idx.* truncated: its header declares 3 dimensions"):
        load_idx(tmp_path / "header.idx")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(full)[:-10])
    with pytest.raises(IDXFormatError, match="cut.gz.* damaged or truncated gzip"):
        load_idx(tmp_path / "cut.gz")


def _mnist_files(root, kind="train", n=7, compress=True, dotted=False):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    sep = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    write_idx(root / f"{kind}-images{sep}idx3-ubyte{suffix}", images, compress)
    write_idx(root / f"{kind}-labels{sep}idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress, dotted", [(True, False), (False, False), (False, True)])
def test_load_mnist_finds_the_files(tmp_path, compress, dotted):
    images, labels = _mnist_files(tmp_path, "t10k", compress=compress, dotted=dotted)
    x, y = load_mnist(tmp_path, kind="t10k")
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28) and y.shape == (7,)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images file for kind='train'.*tried train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    _mnist_files(tmp_path, n=7)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6, np.uint8), compress=True)
    with pytest.raises(IDXFormatError, match="7 images but 6 labels"):
        load_mnist(tmp_path)
    with pytest.raises(EngineError, match="kind must be one of"):
        load_mnist(tmp_path, kind="test")


# ---- the built-in digits --------------------------------------------------------------------------

def test_load_digits_shape_dtype_range_and_classes():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0 and x.max() == 16 and np.all(x == np.round(x))
    np.testing.assert_array_equal(np.bincount(y), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    images, _ = load_digits(as_images=True)
    np.testing.assert_array_equal(images.reshape(1797, 64), x)


def test_load_digits_equals_scikit_learns_copy():
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    x, y = load_digits()
    np.testing.assert_array_equal(x, reference.data)
    np.testing.assert_array_equal(y, reference.target)


def test_digits_file_has_no_pickled_objects():
    from engine.data.digits import DIGITS_FILE

    with np.load(DIGITS_FILE, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["images", "labels"]
        assert archive["images"].dtype == np.uint8 and archive["labels"].dtype == np.uint8

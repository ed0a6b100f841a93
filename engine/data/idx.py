"""Reading IDX files: the format of MNIST, Fashion-MNIST, EMNIST and KMNIST (no network needed).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimension sizes, then the data in C order, big-endian. The files are often gzipped; gzip is
recognised by its own magic bytes, whatever the file is called.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.io import open_regular_file

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_MAX_INFLATION = 1032  # deflate's largest ratio: a gzip file cannot hold more than this times its size
_READ_CHUNK = 16 << 20


class IDXFormatError(EngineError):
    """A file that is not a well-formed IDX file (bad magic number, truncated, wrong size)."""


def load_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array in native byte order.

    The header is read and checked first; the data is then read (or inflated) in pieces, never
    more than the header's checked size, so a file that claims a huge array, or a gzip bomb, fails
    without allocating what it claims (see docs/data.md).

    Args:
        path: the file (str or os.PathLike).

    Returns:
        The array with the file's dimensions and dtype (uint8 for MNIST images and labels).

    Raises:
        FileNotFoundError: no such file.
        IDXFormatError: not a regular file, bad magic number, unknown type code, too many
            dimensions or a size that overflows, truncated data or trailing bytes, a damaged
            gzip stream; the message names the file.

    Example:
        >>> labels = load_idx("t10k-labels-idx1-ubyte.gz")   # doctest: +SKIP
    """
    path = Path(os.fspath(path))
    with open_regular_file(path, "load_idx", IDXFormatError) as file:
        size = os.fstat(file.fileno()).st_size
        gzipped = file.read(2) == _GZIP_MAGIC
        file.seek(0)
        if not gzipped:
            return _read_idx(file, path, size, None)
        with gzip.GzipFile(fileobj=file, mode="rb") as stream:
            return _read_idx(stream, path, None, size)


def _read_idx(stream, path: Path, raw_size: int | None, gzip_size: int | None) -> np.ndarray:
    """The array in ``stream``: ``raw_size`` is the file's size (raw files), ``gzip_size`` the
    compressed size (gzipped files), which bounds what the header may claim."""
    name = str(path)
    magic = _read(stream, 4, path)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise IDXFormatError(f"load_idx: {name!r} is not an IDX file (magic number {magic[:4].hex() or 'missing'}; "
                             "expected 0000 followed by a type and a dimension count)")
    type_code, ndim = magic[2], magic[3]
    if type_code not in _IDX_DTYPES:
        raise IDXFormatError(f"load_idx: {name!r} has unknown IDX type code 0x{type_code:02x}; known: "
                             f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
    if ndim > _MAX_DIMS:
        raise IDXFormatError(f"load_idx: {name!r} declares {ndim} dimensions; numpy arrays have at most {_MAX_DIMS}")
    dims = _read(stream, 4 * ndim, path)
    if len(dims) < 4 * ndim:
        raise IDXFormatError(f"load_idx: {name!r} is truncated: its header declares {ndim} dimensions but the "
                             f"file has only {4 + len(dims)} bytes")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = _IDX_DTYPES[type_code]
    # Python ints: the product cannot wrap around as an int64 product would.
    if math.prod(d for d in shape if d) * dtype.itemsize > sys.maxsize:
        raise IDXFormatError(f"load_idx: {name!r} declares shape {shape} of {dtype.name}, whose size overflows "
                             "this platform's index range")
    expected = math.prod(shape) * dtype.itemsize
    header = 4 + 4 * ndim
    if raw_size is not None and raw_size - header != expected:
        _size_error(path, shape, dtype, expected, raw_size - header)
    if gzip_size is not None and expected > gzip_size * _MAX_INFLATION + 1024:
        raise IDXFormatError(f"load_idx: {name!r} is truncated: shape {shape} of {dtype.name} needs {expected} data "
                             f"bytes, more than a {gzip_size}-byte gzip file can inflate to")
    data = _read(stream, expected, path)
    if len(data) < expected:
        _size_error(path, shape, dtype, expected, len(data))
    if _read(stream, 1, path):
        _size_error(path, shape, dtype, expected, None)
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _size_error(path: Path, shape: tuple, dtype: np.dtype, expected: int, found: int | None):
    problem = "truncated" if found is not None and found < expected else "longer than its header says"
    found_text = "more" if found is None else found
    raise IDXFormatError(f"load_idx: {str(path)!r} is {problem}: shape {shape} of {dtype.name} needs {expected} "
                         f"data bytes, found {found_text}")


def _read(stream, size: int, path: Path) -> bytearray:
    """Up to ``size`` bytes, read in pieces: the buffer grows with the data actually there."""
    data = bytearray()
    try:
        while len(data) < size:
            chunk = stream.read(min(_READ_CHUNK, size - len(data)))
            if not chunk:
                break
            data += chunk
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IDXFormatError(f"load_idx: {str(path)!r} is a damaged or truncated gzip file ({exc})") from exc
    return data


_KINDS = ("train", "t10k")


def load_mnist(root, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST-format images and labels (MNIST, Fashion-MNIST ...) from files already on disk.

    Looks in ``root`` for ``{kind}-images-idx3-ubyte`` and ``{kind}-labels-idx1-ubyte``, each
    optionally gzipped (``.gz``) and also under the ``{kind}-images.idx3-ubyte`` spelling.

    Args:
        root: the folder holding the files.
        kind: "train" (60,000 images) or "t10k" (the 10,000 test images).

    Returns:
        ``(images, labels)``: uint8 (N, rows, cols) and uint8 (N,).

    Raises:
        FileNotFoundError: a file is missing; the message lists the names tried.
        IDXFormatError: a malformed file, or images and labels that do not match.

    Example:
        >>> x_train, y_train = load_mnist("~/data/fashion", kind="train")   # doctest: +SKIP
    """
    if kind not in _KINDS:
        raise EngineError(f"load_mnist: kind must be one of {_KINDS}, got {kind!r}")
    root = Path(os.path.expanduser(os.fspath(root)))
    images = load_idx(_find(root, kind, "images", 3))
    labels = load_idx(_find(root, kind, "labels", 1))
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IDXFormatError(f"load_mnist: expected uint8 images (N, rows, cols) and uint8 labels (N,) in "
                             f"{str(root)!r}, got images {images.dtype}{images.shape} and labels "
                             f"{labels.dtype}{labels.shape}")
    if len(images) != len(labels):
        raise IDXFormatError(f"load_mnist: {len(images)} images but {len(labels)} labels for kind={kind!r} in "
                             f"{str(root)!r}; the files do not belong together")
    return images, labels


def _find(root: Path, kind: str, what: str, ndim: int) -> Path:
    names = [f"{kind}-{what}-idx{ndim}-ubyte", f"{kind}-{what}.idx{ndim}-ubyte"]
    candidates = [root / (name + suffix) for name in names for suffix in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"load_mnist: no {what} file for kind={kind!r} in {str(root)!r}; tried "
                            f"{', '.join(c.name for c in candidates)}. Download MNIST or Fashion-MNIST there first "
                            "(this engine does not download)")

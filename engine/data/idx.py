"""Reading IDX files: the format of MNIST, Fashion-MNIST, EMNIST and KMNIST (no network needed).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimension sizes, then the data in C order, big-endian. The files are often gzipped; gzip is
recognised by its own magic bytes, whatever the file is called.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from engine.errors import EngineError

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(EngineError):
    """A file that is not a well-formed IDX file (bad magic number, truncated, wrong size)."""


def load_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array in native byte order.

    Args:
        path: the file (str or os.PathLike).

    Returns:
        The array with the file's dimensions and dtype (uint8 for MNIST images and labels).

    Raises:
        FileNotFoundError: no such file.
        IDXFormatError: bad magic number, unknown type code, truncated data or trailing bytes;
            the message names the file.

    Example:
        >>> labels = load_idx("t10k-labels-idx1-ubyte.gz")   # doctest: +SKIP
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"load_idx: no file {str(path)!r}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(f"load_idx: {str(path)!r} is not an IDX file (magic number {raw[:4].hex() or 'missing'}; "
                             "expected 0000 followed by a type and a dimension count)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise IDXFormatError(f"load_idx: {str(path)!r} has unknown IDX type code 0x{type_code:02x}; known: "
                             f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"load_idx: {str(path)!r} is truncated: its header declares {ndim} dimensions but the "
                             f"file has only {len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise IDXFormatError(f"load_idx: {str(path)!r} is {problem}: shape {shape} of {dtype.name} needs {expected} "
                             f"data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IDXFormatError(f"load_idx: {str(path)!r} is a damaged or truncated gzip file ({exc})") from exc


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

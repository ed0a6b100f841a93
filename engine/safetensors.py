"""The safetensors format, read and written without torch or the ``safetensors`` library.

Names as ``safetensors.torch``: :func:`save_file`, :func:`load_file`, :func:`save` (to bytes),
:func:`load` (from bytes) and :class:`safe_open` (one tensor at a time). ``engine.save(obj, path,
format="safetensors")`` and ``engine.load(path)`` (which recognises the file by its contents) use
this module too, as do ``engine.io.save_safetensors`` / ``load_safetensors``.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}, ...}`` (padded with spaces), then the tensors' little-endian
bytes, C order, back to back; offsets count from the end of the header. The reader checks
everything the file claims against the file's real size before it allocates anything (the
header is at most 100 MB, as in the reference library; the data areas must tile the rest of the
file exactly), so a malformed or hostile file gives a :class:`CheckpointError` naming the file
and the entry, never a huge allocation. Nothing is ever unpickled or executed.

bfloat16 (``BF16``) and float16 (``F16``) load as ``engine.bfloat16`` / ``engine.float16``; the
float8 types as ml_dtypes' ``float8_e4m3fn`` / ``float8_e5m2`` arrays (the engine computes in
none of them, but they load and save).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from engine import backend, dlpack, dtypes
from engine.errors import DTypeError
from engine.io import CheckpointError, Placement, _file_label, _parse_map_location, open_regular_file, write_atomically
from engine.tensor import Tensor

__all__ = ["save_file", "load_file", "save", "load", "safe_open", "CheckpointError"]

MAX_HEADER_SIZE = 100_000_000  # the reference library's limit
METADATA = "__metadata__"
_ALIGNMENT = 8  # the header is padded so that the data starts 8-byte aligned, as the reference writer does
_READ_CHUNK = 16 << 20

# dtype code -> numpy dtype (little-endian)
DTYPES = {"BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "I16": np.dtype("<i2"),
          "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"),
          "U64": np.dtype("<u8"), "F16": np.dtype("<f2"), "BF16": np.dtype(dtypes.bfloat16), "F32": np.dtype("<f4"),
          "F64": np.dtype("<f8"), "C64": np.dtype("<c8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
          "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_CODES = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}


# ---- writing ----------------------------------------------------------------------------------

def save_file(tensors: dict, filename, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> Tensor, numpy/cupy array or torch tensor) to ``filename``.

    Atomic, as ``engine.save``: a temporary file in the same directory, fsynced, renamed over the
    target. Tensors are written in their dtype (GPU ones copied to the host one at a time); tensors
    that share memory are written once each (no aliasing survives in the file, as in the format).

    Args:
        tensors: a dict of str keys (not ``"__metadata__"``) to tensors or arrays.
        filename: a path (str or os.PathLike), or a file object opened for binary writing.
        metadata: optional str -> str pairs stored in the header (``{"format": "pt"}``, as
            ``transformers`` writes).

    Raises:
        TypeError: a key or metadata entry that is not a str, or a value that is not a tensor,
            naming it; nothing is written.
        DTypeError: a dtype the format has no code for (complex128, object ...).
    """
    header, arrays = _layout(tensors, metadata, "save_file")
    if hasattr(filename, "write"):
        _write(filename, header, arrays)
        filename.flush()
    else:
        write_atomically(os.fspath(filename), lambda f: _write(f, header, arrays), op="engine.safetensors.save_file")


def save(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (see :func:`save_file`)."""
    header, arrays = _layout(tensors, metadata, "save")
    buffer = io.BytesIO()
    _write(buffer, header, arrays)
    return buffer.getvalue()


def _layout(tensors, metadata, op: str) -> tuple[bytes, list]:
    """The padded header and the host arrays in file order (largest item size first, then by name,
    so that every tensor starts aligned to its item size)."""
    if not isinstance(tensors, dict):
        raise TypeError(f"engine.safetensors.{op}: expected a dict of names to tensors (a state_dict), got "
                        f"{type(tensors).__name__}")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == METADATA:
            raise TypeError(f"engine.safetensors.{op}: key {name!r} is not allowed; keys are str, and "
                            f"{METADATA!r} is reserved for the metadata")
        arrays[name] = _host_array(value, name, op)
    entries, offset = {}, 0
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise TypeError(f"engine.safetensors.{op}: metadata must be a dict of str to str, got {metadata!r}")
        entries[METADATA] = dict(metadata)
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    for name in order:
        array = arrays[name]
        entries[name] = {"dtype": _code(array.dtype, name, op), "shape": list(array.shape),
                         "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-(8 + len(header)) % _ALIGNMENT)
    return header, [arrays[name] for name in order]


def _host_array(value, name: str, op: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value._data
    foreign = dlpack.foreign_array(value)
    value = foreign if foreign is not None else value
    if not (isinstance(value, np.ndarray) or backend.is_array(value)):
        raise TypeError(f"engine.safetensors.{op}: {name!r} is a {type(value).__module__}.{type(value).__qualname__}; "
                        "values must be Tensors, numpy/cupy arrays or torch tensors")
    return np.asarray(backend.to_host(value))


def _code(dtype: np.dtype, name: str, op: str) -> str:
    code = _CODES.get(dtype.newbyteorder("="))
    if code is None:
        raise DTypeError(f"engine.safetensors.{op}: {name!r} has dtype {dtype}, which safetensors cannot store; "
                           f"supported: {', '.join(str(d) for d in _CODES)}")
    return code


def _write(f, header: bytes, arrays: list) -> None:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for array in arrays:
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder not in ("|", "<", "=") else array.dtype
        flat = np.ascontiguousarray(array, dtype=little).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _READ_CHUNK):  # bounded pieces: no second copy of a large tensor
            f.write(flat[start:start + _READ_CHUNK].data)


# ---- reading ----------------------------------------------------------------------------------

def looks_like(head: bytes, size: int) -> bool:
    """Whether the first bytes of a ``size``-byte file start a safetensors file (used by engine.load)."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= size - 8 and head[8:9] == b"{"


class _Reader:
    """The checked header of a safetensors file open at ``start`` of ``file`` (``size`` bytes from there)."""

    def __init__(self, file, label, size: int, start: int = 0):
        self.file, self.label, self.start = file, label, start
        if size < 8:
            raise self.fail(f"it is {size} bytes long, shorter than the 8-byte header length")
        self.file.seek(start)
        (length,) = struct.unpack("<Q", self._read(8, "the header length"))
        if length > min(MAX_HEADER_SIZE, size - 8):
            raise self.fail(f"its header claims {length} bytes but the file holds {size - 8} after the length "
                            f"(and at most {MAX_HEADER_SIZE} are allowed); the file is truncated or not safetensors")
        raw = self._read(length, "the header")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=self._no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self.fail(f"its {length}-byte header is not UTF-8 JSON ({type(exc).__name__}: {exc})") from exc
        if not isinstance(header, dict):
            raise self.fail(f"its header is a JSON {type(header).__name__}, not an object")
        self.metadata = self._metadata(header.pop(METADATA, None))
        self.data_start, self.data_size = start + 8 + length, size - 8 - length
        self.entries = {name: self._entry(name, info) for name, info in header.items()}
        self._check_tiling()

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"safetensors: {self.label!r} is not a valid safetensors file: {what}")

    def _read(self, count: int, what: str) -> bytes:
        data = self.file.read(count)
        if len(data) != count:
            raise self.fail(f"{what} is truncated ({len(data)} of {count} bytes)")
        return data

    def _no_duplicates(self, pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise self.fail(f"its header names {next(k for k in keys if keys.count(k) > 1)!r} twice")
        return dict(pairs)

    def _metadata(self, metadata):
        if metadata is None:
            return None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self.fail(f"{METADATA} must map str to str, got {str(metadata)[:80]}")
        return metadata

    def _entry(self, name: str, info) -> tuple[np.dtype, tuple, int, int]:
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self.fail(f"the entry {name!r} is not {{dtype, shape, data_offsets}}: {str(info)[:80]}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise self.fail(f"the entry {name!r} has dtype code {str(code)[:20]!r}; known: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self.fail(f"the entry {name!r} has shape {str(shape)[:80]}, not a list of ints >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= self.data_size):
            raise self.fail(f"the entry {name!r} has data_offsets {str(offsets)[:80]} outside the "
                            f"{self.data_size}-byte data area (truncated?)")
        dtype = DTYPES[code]
        needed = math.prod(shape) * dtype.itemsize
        if needed != offsets[1] - offsets[0]:
            raise self.fail(f"the entry {name!r} ({code} {tuple(shape)}) needs {needed} bytes but its data_offsets "
                            f"{offsets} hold {offsets[1] - offsets[0]}")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _check_tiling(self) -> None:
        """The data areas must cover the data exactly, without gaps or overlaps (as the reference reader)."""
        end = 0
        for name, (_, _, begin, stop) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin != end:
                raise self.fail(f"the entry {name!r} starts at byte {begin} of the data, expected {end} "
                                "(entries must tile the data without gaps or overlaps)")
            end = stop
        if end != self.data_size:
            raise self.fail(f"the entries end at byte {end} of the data but the file holds {self.data_size} "
                            "data bytes (truncated, or trailing bytes)")

    def array(self, name: str) -> np.ndarray:
        dtype, shape, begin, stop = self.entries[name]
        data = bytearray(stop - begin)
        self.file.seek(self.data_start + begin)
        view, got = memoryview(data), 0
        while got < len(data):
            chunk = self.file.readinto(view[got:got + _READ_CHUNK])
            if not chunk:
                raise self.fail(f"the data of {name!r} is truncated")
            got += chunk
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensors(file, label, size: int, placement: Placement, start: int = 0) -> dict:
    """Every tensor of the safetensors file open in ``file`` (at ``start``), placed by ``placement``
    (``map_location``): what ``engine.load`` returns for such a file. The file saved no device: "cpu"."""
    reader = _Reader(file, label, size, start)
    return {name: placement.place(reader.array(name), "cpu") for name in reader.entries}


def load_file(filename, device="cpu") -> dict:
    """The tensors of a safetensors file: ``{name: Tensor}`` on ``device``, in the file's order.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a valid safetensors file (a truncated or oversized
            header, an unknown dtype code, a shape that does not fit its data, overlapping or
            missing data, trailing bytes), naming the file and the entry.
    """
    path = os.fspath(filename)
    locations = _parse_map_location(path, device)
    with open_regular_file(path, "engine.safetensors.load_file", CheckpointError,
                           "; expected a .safetensors file") as file:
        return read_tensors(file, path, os.fstat(file.fileno()).st_size, Placement(path, locations))


def load(data: bytes, device="cpu") -> dict:
    """The tensors of safetensors ``data`` (bytes), as :func:`load_file`."""
    label = _file_label(io.BytesIO())
    return read_tensors(io.BytesIO(bytes(data)), label, len(data), Placement(label, _parse_map_location(label, device)))


class safe_open:  # noqa: N801 - the reference library's name
    """A safetensors file opened for reading one tensor at a time (bounded memory for large files).

    ``framework`` is accepted for the reference library's signature ("pt", "np", "numpy") and
    ignored: tensors come back as engine Tensors on ``device``.

    Example:
        >>> with safe_open("model.safetensors", framework="pt") as f:     # doctest: +SKIP
        ...     weights = {k: f.get_tensor(k) for k in f.keys() if k.startswith("h.0.")}
    """

    def __init__(self, filename, framework: str = "pt", device="cpu"):
        self._path = os.fspath(filename)
        self._placement = Placement(self._path, _parse_map_location(self._path, device))
        self._file = open_regular_file(self._path, "engine.safetensors.safe_open", CheckpointError,
                                       "; expected a .safetensors file")
        try:
            self._reader = _Reader(self._file, self._path, os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> bool:
        self._file.close()
        return False

    def keys(self) -> list[str]:
        """The tensor names, sorted (as the reference library)."""
        return sorted(self._reader.entries)

    def metadata(self) -> dict | None:
        """The header's ``__metadata__`` (str -> str), or None."""
        return self._reader.metadata

    def get_tensor(self, name: str) -> Tensor:
        """The tensor ``name``; KeyError naming the file for an unknown name."""
        if name not in self._reader.entries:
            raise KeyError(f"safe_open({self._path!r}): no tensor named {name!r}")
        return self._placement.place(self._reader.array(name), "cpu")

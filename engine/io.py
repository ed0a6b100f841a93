"""Checkpoints without pickle: :func:`save` and :func:`load`.

A checkpoint is a zip archive in the ``.npz`` layout: one ``arr_N.npy`` member per array
(written by ``numpy.lib.format`` with ``allow_pickle=False``) plus ``structure.json``, which
describes the saved object (nested dicts, lists, tuples, numbers, strings, bools, None) and
points at the arrays. ``numpy.load(path, allow_pickle=False)`` opens it; nothing in it is ever
unpickled, so loading an untrusted checkpoint cannot run code.

Writes are atomic: the archive is written to a temporary file in the target's directory,
flushed and fsynced, then renamed over the target with ``os.replace``. A crash mid-save leaves
the previous checkpoint intact and removes the temporary file.

``load`` also reads two foreign formats, recognised by their contents: safetensors files
(:mod:`engine.safetensors`; ``save(..., format="safetensors")`` writes them) and ``torch.save``
zip files (:mod:`engine.torch_format`: a restricted unpickler, no torch needed, no code run).

Example:
    >>> engine.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3},
    ...             "ckpt.npz")                                                  # doctest: +SKIP
    >>> ckpt = engine.load("ckpt.npz", map_location="cpu")                       # doctest: +SKIP
"""

from __future__ import annotations

import ast
import errno
import functools
import io
import json
import math
import os
import re
import stat
import struct
import sys
import tempfile
import warnings
import zipfile

import numpy as np

from engine import backend, dtypes
from engine.errors import EngineError
from engine.tensor import Tensor

__all__ = ["save", "load", "save_safetensors", "load_safetensors", "CheckpointError"]

FORMAT = "engine-checkpoint"
VERSION = 1
STRUCTURE = "structure.json"
# Python ints outside int64 are stored as hex strings: JSON readers elsewhere lose precision
# beyond 2**53 and Python refuses to convert more than 4300 decimal digits.
_INT64 = range(-2**63, 2**63)
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
# The temporary file's name keeps at most this many bytes of the target's name, so that a long
# (but valid) name does not exceed the file system's limit (usually 255 bytes) once prefixed.
_TEMP_NAME_BYTES = 64


class CheckpointError(EngineError):
    """A file that is not a readable engine checkpoint (corrupt, truncated, foreign, unsafe)."""


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a dict of tensors as a safetensors file (atomically): ``engine.safetensors.save_file``."""
    from engine import safetensors

    safetensors.save_file(tensors, path, metadata)


def load_safetensors(path, device="cpu") -> dict:
    """The tensors of a safetensors file: ``engine.safetensors.load_file``."""
    from engine import safetensors

    return safetensors.load_file(path, device)


# ---- save --------------------------------------------------------------------------------------

def save(obj, f, pickle_module=None, pickle_protocol=None, _use_new_zipfile_serialization=True, *,
         format: str = "engine", **_ignored) -> None:
    """Store ``obj`` in ``f`` (a path, atomically, or an open binary file), without pickle.

    ``format="safetensors"`` writes a safetensors file instead (``obj`` then is a flat dict of
    str names to tensors, a state_dict; see :mod:`engine.safetensors`), which ``load`` and
    Hugging Face's ``safetensors`` read back.

    PyTorch's signature: ``pickle_module``, ``pickle_protocol`` and the private options are
    accepted and ignored (nothing is pickled).

    Args:
        obj: nested dicts (keys: str, int, float, bool, None or tuples of them), lists and tuples
            of Tensors (any device; stored with their dtype and device), numpy arrays and
            scalars, cupy arrays, Python ints/floats (inf and nan included), strings, bools and
            None. The same Tensor or array object referenced twice is stored once and loads
            back as one object.
        f: file path (str or os.PathLike); its directory must exist. Written as given (no
            suffix is added); ``.npz`` or ``.ckpt`` are good names. Through a symlink, the file
            it points to is replaced (atomically) and the link kept, as ``torch.save`` does. Or a file object opened for
            binary writing (``open(p, "wb")``, ``io.BytesIO()``): the checkpoint is written at its
            current position (not atomically: the caller owns the file) and it is left open.

    Raises:
        TypeError: ``obj`` holds something else (named by its place in ``obj``), or ``f`` is a
            text-mode file; nothing is written.
        FileNotFoundError, IsADirectoryError, PermissionError: the path's directory does not
            exist, the path is a directory, or it (or its directory) is not writable; nothing is
            written and an existing file is left intact. Any failure while writing removes the
            temporary file and leaves the previous file as it was.
    """
    is_file = hasattr(f, "write")
    if is_file and isinstance(f, io.TextIOBase):
        raise TypeError(f"engine.save: {_file_label(f)} is opened in text mode; open it in binary mode ('wb')")
    if format == "safetensors":
        from engine import safetensors  # it builds on this module

        return safetensors.save_file(obj, f)
    if format != "engine":
        raise ValueError(f"engine.save: format={format!r}; expected 'engine' (the default) or 'safetensors'")
    path = None if is_file else os.fspath(f)
    arrays: list = []
    structure = {"format": FORMAT, "version": VERSION, "root": _Encoder(arrays).encode(obj, "obj")}
    # Python's json writes inf/nan as bare words; they are encoded as tagged strings instead.
    # ASCII escapes keep any str (lone surrogates included) representable in UTF-8.
    header = json.dumps(structure, allow_nan=False, ensure_ascii=True).encode("ascii")
    if is_file:
        _write_archive(f, header, arrays)
        f.flush()
    else:
        _write_atomically(path, header, arrays)


def _write_atomically(path: str, header: bytes, arrays: list) -> None:
    write_atomically(path, lambda f: _write_archive(f, header, arrays), op="engine.save")


def write_atomically(path, write, op: str = "write") -> None:
    """Write a file through ``write(f)`` (``f`` a binary file) so that readers see the old file or the
    new one, never a part: a temporary file in the same directory, fsynced, renamed over ``path``.

    Bad paths are refused before anything is written (see :func:`_save_target`; ``op`` names the
    caller in the message). If ``write`` raises, ``path`` is untouched and the temporary file
    removed. A symlink is followed (as ``open(path, "wb")`` and ``torch.save`` do): its target gets
    the new contents and the link stays a link. An existing file keeps its permissions. Shared by
    every writer of files.
    """
    target = _save_target(path, op)
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_short_name(os.path.basename(target))}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise type(exc)(exc.errno, f"{op}: cannot write {path!r}: cannot create a file in {directory!r} "
                                   f"({exc.strerror}); nothing was written") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _save_target(path: str, op: str) -> str:
    """The file ``op`` (``engine.save``, a tokenizer's save ...) replaces at ``path``: through a
    symlink, the file it points to (as ``torch.save``, which opens the link), so the link stays a
    link. Refuses, before anything is
    written, a path whose directory does not exist, a directory, and a file this process may not
    write (as opening it for writing would)."""
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    shown = repr(path) if target == os.path.abspath(path) else f"{path!r} (a link to {target!r})"
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"{op}: cannot write {shown}: the directory {directory!r} does "
                                              "not exist; create it first (os.makedirs)")
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, f"{op}: {shown} is a directory; give the path of a file "
                                              "inside it")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, f"{op}: {shown} is not writable (permission denied); it was "
                                            "left as it is")
    return target


def _write_archive(f, header: bytes, arrays: list) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(STRUCTURE, header)
        for index, source in enumerate(arrays):
            with archive.open(f"arr_{index}.npy", "w", force_zip64=True) as member:
                _write_array(member, _host_array(source))


class _Label(str):
    """A file object's name in messages: its repr is the name itself (``<BytesIO>``), unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _file_label(f) -> str:
    """How errors name a file object: its path if it has one, else ``<BytesIO>``, ``<BufferedReader>`` ..."""
    name = getattr(f, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)):
        return os.fsdecode(name)
    return _Label(f"<{type(f).__name__}>")


def _short_name(name: str) -> str:
    """``name`` cut to at most _TEMP_NAME_BYTES bytes in the file system's encoding."""
    while len(os.fsencode(name)) > _TEMP_NAME_BYTES:
        name = name[:-1]
    return name


# bfloat16 (ml_dtypes) has no .npy description of its own (its dtype.str is "<V2", raw void):
# its member holds the uint16 bit patterns and the structure names the dtype "bfloat16", so any
# numpy reads the file and the engine restores the dtype by name.
_NAMED_DTYPES = {"bfloat16": (np.dtype(dtypes.bfloat16), np.dtype("<u2"))}


def _dtype_label(dtype: np.dtype) -> str:
    """What the structure records for ``dtype``: its name for bfloat16, else numpy's ``dtype.str``."""
    return next((name for name, (named, _) in _NAMED_DTYPES.items() if dtype == named), dtype.str)


def _write_array(member, array: np.ndarray) -> None:
    label = _dtype_label(array.dtype)
    if label in _NAMED_DTYPES:
        array = np.ascontiguousarray(array).view(_NAMED_DTYPES[label][1])
    with warnings.catch_warnings():  # format 3.0 (non-latin-1 field names) is expected, and read back here
        warnings.filterwarnings("ignore", message="Stored array in format 3.0", category=UserWarning)
        np.lib.format.write_array(member, array, allow_pickle=False)


def _host_array(source) -> np.ndarray:
    """The numpy array to store for a Tensor or array (copied off the GPU one at a time)."""
    data = source._data if isinstance(source, Tensor) else source
    return np.asarray(backend.to_device(data, backend.CPU))


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; read once, restore at once
    os.umask(mask)
    return mask


def _new_file_mode(path: str) -> int:
    """Keep an existing checkpoint's permissions; a new one gets the usual 0o666 & ~umask
    (mkstemp creates 0o600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_repr(key) -> str:
    """``repr(key)`` for error messages (hex for ints too long for decimal conversion)."""
    if isinstance(key, int) and not isinstance(key, bool) and key not in _INT64:
        return hex(key)
    return repr(key)


class _Encoder:
    """``obj`` as JSON: JSON scalars stay themselves, everything else is a one-key tagged object.

    Tags: ``{"dict": [[key, value], ...]}`` (keys keep their types and order), ``{"tuple": [...]}``,
    ``{"float": "inf" | "-inf" | "nan"}``, ``{"int": "0x..."}`` (an int outside int64), ``{"tensor": {...}}``,
    ``{"ndarray": {...}}``, ``{"cupy": {...}}``, ``{"scalar": {...}}`` (numpy scalar), ``{"ref": n}`` (an
    object seen before).
    Lists are JSON arrays. Every JSON object in the structure is a tag, so none is ambiguous.
    """

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.seen: dict[int, int] = {}  # id(Tensor or array) -> index; self.arrays keeps each alive
        self.path_ids: set[int] = set()

    def encode(self, obj, where: str):
        if isinstance(obj, np.generic):  # first: np.float64 is also a Python float
            return self._array_node("scalar", obj, np.asarray(obj), where)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj) if obj in _INT64 else {"int": hex(obj)}
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, Tensor):
            return self._array_node("tensor", obj, obj._data, where, device=str(obj.device))
        if isinstance(obj, np.ndarray):
            if isinstance(obj, np.ma.MaskedArray):
                raise TypeError(f"engine.save: {where} is a numpy masked array; store .data and .mask separately")
            return self._array_node("ndarray", obj, obj, where)
        if backend.is_array(obj):
            return self._array_node("cupy", obj, obj, where, device=str(backend.device_of(obj)))
        if isinstance(obj, (dict, list, tuple)):
            return self._container(obj, where)
        raise TypeError(f"engine.save: cannot store {where}, a {type(obj).__module__}.{type(obj).__qualname__}; "
                        "a checkpoint holds dicts, lists, tuples, Tensors, numpy/cupy arrays and scalars, "
                        "ints, floats, strings, bools and None")

    def _container(self, obj, where: str):
        if id(obj) in self.path_ids:
            raise TypeError(f"engine.save: {where} contains itself; a checkpoint cannot hold cycles")
        self.path_ids.add(id(obj))
        try:
            if isinstance(obj, dict):
                items = [[self._key(k, where), self.encode(v, f"{where}[{_key_repr(k)}]")] for k, v in obj.items()]
                return {"dict": items}
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else {"tuple": items}
        finally:
            self.path_ids.discard(id(obj))

    def _key(self, key, where: str):
        if key is None or isinstance(key, (bool, str)):
            return key
        if isinstance(key, (int, float)):
            return self.encode(key, where)
        if isinstance(key, tuple):
            return {"tuple": [self._key(k, where) for k in key]}
        raise TypeError(f"engine.save: {where} has a key {key!r} of type {type(key).__name__}; dict keys must be "
                        "str, int, float, bool, None or tuples of them")

    def _array_node(self, tag: str, obj, array, where: str, device: str | None = None):
        if id(obj) in self.seen:
            return {"ref": self.seen[id(obj)]}
        if array.dtype.hasobject:
            raise TypeError(f"engine.save: {where} has dtype {array.dtype}, which holds Python objects and would "
                            "need pickle; convert it to a numeric, bool or string dtype")
        index = len(self.arrays)
        self.arrays.append(obj)
        self.seen[id(obj)] = index
        info = {"index": index, "dtype": _dtype_label(array.dtype), "shape": list(array.shape)}
        if device is not None:
            info["device"] = device
        return {tag: info}


# ---- load --------------------------------------------------------------------------------------

# Member data is copied into its array in pieces of this size: reading never holds a second copy.
_READ_CHUNK = 16 << 20
# A .npy header longer than this is refused before it is parsed. numpy's own reader stops at
# 10,000 characters; a structured dtype with many fields needs more, so the bound is larger,
# and the header must fit in its member anyway.
_MAX_NPY_HEADER = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"
_NPY_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_ZIP_LOCAL_HEADER = 30  # bytes before a member's name in its local header
_ZIP_METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    """Read a checkpoint written by :func:`save`; PyTorch's signature.

    Tensors come back as Tensors (``requires_grad=False``) with their dtype, numpy arrays as
    numpy arrays, numpy scalars as numpy scalars, tuples as tuples, dicts with their key types
    and order.

    Every size the file claims (zip directory, members, array shapes) is checked against the
    file's real size before anything is allocated, so a hostile file cannot make ``load``
    allocate more memory than the file's own size (plus the objects it describes), and nothing
    is ever decompressed (see docs/io.md, "Errors when loading").

    Args:
        f: the file: a path (str or os.PathLike), or a file object opened for binary reading
            (``open(p, "rb")``, ``io.BytesIO``), read from its current position and left open.
            Errors name a file object by its ``name``, else as ``<BytesIO>`` (its type).
        map_location: where Tensors (and cupy arrays) go, as in PyTorch: None (the device they
            were saved from), a device ("cpu", "cuda", "cuda:0" or a Device) for all of them, a
            dict mapping saved device names to devices (``{"cuda:1": "cuda:0"}``; unlisted ones
            stay), or a callable ``fn(tensor, location)`` called with each tensor on the CPU and
            its saved device name ("cuda:0"), returning the tensor to use (``lambda storage, loc:
            storage`` keeps everything on the CPU; ``lambda s, loc: s.cuda(0)`` moves it) or None
            (the saved device).
        pickle_module: accepted for PyTorch scripts and ignored: nothing is ever unpickled.
        weights_only: True or False (or None), accepted as in PyTorch; both read the same way.
            ``load`` never unpickles, so it always behaves as PyTorch's ``weights_only=True``
            (only tensors, arrays, numbers, strings and containers of them can come back, and no
            code runs); ``False`` cannot load more, since a checkpoint never holds anything else.
        mmap: None or False; ``True`` is refused (the data is always read into memory).
        pickle_load_args: accepted for PyTorch scripts (``encoding=...``) and ignored.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: the file exists but cannot be opened (permissions).
        CheckpointError: anything else, naming the file: it is not a regular file (a device,
            a directory, a FIFO), not a readable checkpoint (not a zip archive, truncated,
            corrupt, compressed or encrypted members, sizes or shapes that do not fit the
            file, missing or inconsistent entries, a pickled array), ``map_location`` is not a
            device, or a saved device is not available here (use ``map_location="cpu"``), or
            a file object in text mode. The error that revealed the problem, if any, is its
            ``__cause__``.
        TypeError: ``weights_only`` or ``mmap`` is not a bool or None.
    """
    for name, value in (("weights_only", weights_only), ("mmap", mmap)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"engine.load: {name} must be True, False or None, got {value!r}")
    if hasattr(f, "read"):
        return _load_file_object(f, map_location, mmap)
    path = os.fspath(f)
    locations = _parse_map_location(path, map_location, mmap)
    with open_regular_file(path, "engine.load", CheckpointError,
                           "; a checkpoint is a file written by engine.save") as file:
        return _load_guarded(file, path, locations, os.fstat(file.fileno()).st_size)


def _load_guarded(file, path: str, locations, size: int):
    try:
        return _load_checkpoint(file, path, locations, size)
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:  # whatever else a malformed file provokes, it is not a checkpoint
        raise CheckpointError(f"engine.load: {path!r} is not a valid engine checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc


def _load_file_object(f, map_location, mmap):
    """Load from an open binary file: seekable ones in place, others read into memory first
    (bounded by what the stream really holds)."""
    label = _file_label(f)
    locations = _parse_map_location(label, map_location, mmap)
    if isinstance(f, io.TextIOBase):
        raise CheckpointError(f"engine.load: {label!r} is opened in text mode; open it in binary mode ('rb')")
    try:
        seekable = f.seekable() if hasattr(f, "seekable") else False
        if seekable:
            start = f.tell()
            size = f.seek(0, os.SEEK_END)
            f.seek(start)
        else:
            data = f.read()
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise CheckpointError(f"engine.load: {label!r} returned {type(data).__name__} from read(), not "
                                      "bytes; open it in binary mode ('rb')")
            f, size = io.BytesIO(data), len(data)
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:  # a closed file, a failing stream ...
        raise CheckpointError(f"engine.load: cannot read {label!r} ({type(exc).__name__}: {exc})") from exc
    return _load_guarded(f, label, locations, size)


def _parse_map_location(path: str, map_location, mmap=None):
    """None, a Device, a callable, or {saved device name: Device or None (stays)}; checked before reading."""
    if mmap:
        raise CheckpointError(f"engine.load({path!r}): mmap=True is not supported; checkpoints are read into memory "
                              "(pass mmap=None or False)")
    try:
        if map_location is None or callable(map_location) and not isinstance(map_location, backend.Device):
            return map_location
        if isinstance(map_location, dict):
            return {str(backend.device(k)): None if v is None else backend.device(v) for k, v in map_location.items()}
        return backend.device(map_location)
    except (EngineError, TypeError, ValueError) as exc:
        raise CheckpointError(f"engine.load({path!r}): map_location={map_location!r} is not a device, a dict of "
                              f"devices or a callable ({exc}); use 'cpu', 'cuda:0', an engine.Device, "
                              f"{{'cuda:1': 'cuda:0'}} or lambda storage, loc: storage") \
            from exc


def open_regular_file(path, who: str, error: type[Exception], hint: str = ""):
    """``path`` opened for binary reading if it is a regular file; else ``error`` naming ``who``.

    Devices (``/dev/zero`` never ends), FIFOs (opening one waits for a writer), sockets and
    directories are refused before a byte is read. Shared by every loader of files (checkpoints,
    IDX), which pass their own error type and a hint for the user.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: no such file {str(path)!r}") from None
    _check_regular(path, info, who, error, hint)  # before opening: opening a FIFO or a tape device has effects
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it does not block.
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(path, os.fstat(fd), who, error, hint)  # the file actually opened
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(path, info: os.stat_result, who: str, error: type[Exception], hint: str) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(info.st_mode)), "not a regular file")
    raise error(f"{who}: {str(path)!r} is {kind}, not a regular file{hint}")


def _load_checkpoint(file, path: str, locations, file_size: int):
    """Read the file by what it holds: a safetensors file, a torch.save zip, or an engine checkpoint."""
    from engine import safetensors, torch_format  # they build on this module

    start = file.tell()
    head = file.read(16)
    file.seek(start)
    if safetensors.looks_like(head, file_size - start):
        return safetensors.read_tensors(file, path, file_size - start, Placement(path, locations), start)
    if torch_format.is_legacy(head):
        raise CheckpointError(f"engine.load: {path!r} is a torch.save file in PyTorch's legacy (pre-1.6, not zip) "
                              "format, which is a bare pickle and is not read; re-save it with a current torch.save "
                              "(or as safetensors)")
    try:
        archive = zipfile.ZipFile(file, "r")
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, OSError, and whatever a mangled directory provokes
        raise CheckpointError(f"engine.load: {path!r} is not an engine checkpoint: not a readable zip archive "
                              f"({exc}); the file may be truncated or of another format") from exc
    with archive:
        members = _Members(archive, path, file_size)
        if members.info(STRUCTURE) is None and torch_format.pickle_name(archive) is not None:
            return torch_format.load_archive(archive, members, Placement(path, locations))
        structure = _read_structure(members, path)
        return _Decoder(members, path, locations).decode(structure["root"])


class _Members:
    """The archive's members, each checked against the file's real size before it is read.

    Only stored (uncompressed) members are read, as ``save`` writes them: a member's claimed
    size is then bounded by the file itself, and no zip bomb can inflate. Compressed or
    encrypted members, and sizes that do not fit in the file, are refused before reading.
    """

    def __init__(self, archive: zipfile.ZipFile, path: str, file_size: int):
        self.archive, self.path, self.file_size = archive, path, file_size

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"engine.load: {self.path!r} is corrupt: {what}")

    def info(self, name: str) -> zipfile.ZipInfo | None:
        """The checked directory entry of ``name``; None when there is none."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            return None
        if info.flag_bits & 0x1:
            raise self.fail(f"the entry {name} is encrypted; engine checkpoints are never encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CheckpointError(f"engine.load: {self.path!r} has a compressed entry {name} ({method}); engine "
                                  "checkpoints store every entry uncompressed, and load never decompresses "
                                  "(a compressed entry could inflate without bound)")
        if info.file_size != info.compress_size:
            raise self.fail(f"the entry {name} is stored but claims {info.file_size} bytes from "
                            f"{info.compress_size} stored bytes")
        end = info.header_offset + _ZIP_LOCAL_HEADER + info.compress_size
        if end > self.file_size:
            raise self.fail(f"the entry {name} claims {info.compress_size} bytes at offset {info.header_offset}, "
                            f"beyond the end of the {self.file_size}-byte file (truncated?)")
        return info

    def open(self, info: zipfile.ZipInfo):
        try:
            return self.archive.open(info)
        except MemoryError:
            raise
        except Exception as exc:  # bad local header, name mismatch, unsupported flags ...
            raise self.fail(f"cannot open the entry {info.filename} ({type(exc).__name__}: {exc})") from exc

    def read_into(self, member, buffer, name: str) -> None:
        """Fill ``buffer`` from ``member`` in bounded pieces (the CRC is checked at the member's end)."""
        view = memoryview(buffer).cast("B")
        got = 0
        try:
            while got < len(view):
                chunk = member.read(min(_READ_CHUNK, len(view) - got))
                if not chunk:
                    break
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        except MemoryError:
            raise
        except Exception as exc:  # bad CRC, truncated member ...
            raise self.fail(f"cannot read {name} ({type(exc).__name__}: {exc})") from exc
        if got != len(view):
            raise self.fail(f"{name} is truncated ({got} of {len(view)} bytes)")

    def read(self, member, size: int, name: str) -> bytes:
        buffer = bytearray(size)
        self.read_into(member, buffer, name)
        return bytes(buffer)


def _read_structure(members: _Members, path: str) -> dict:
    info = members.info(STRUCTURE)
    if info is None:
        raise CheckpointError(f"engine.load: {path!r} is a zip/npz archive but has no {STRUCTURE} entry; it was "
                              "not written by engine.save (use numpy.load for plain .npz files)")
    with members.open(info) as member:
        raw = members.read(member, info.file_size, STRUCTURE)
    try:
        structure = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"engine.load: {path!r} is corrupt: {STRUCTURE} is not valid JSON "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(structure, dict) or structure.get("format") != FORMAT or "root" not in structure:
        raise CheckpointError(f"engine.load: {path!r} is not an engine checkpoint ({STRUCTURE} lacks the "
                              f"{FORMAT!r} marker)")
    if structure.get("version") != VERSION or isinstance(structure.get("version"), bool):
        raise CheckpointError(f"engine.load: {path!r} has checkpoint format version {structure.get('version')!r}; "
                              f"this engine reads version {VERSION}")
    return structure


class Placement:
    """Where ``load`` puts each array read from ``path``: ``map_location`` (parsed by
    :func:`_parse_map_location`) applied to the device it was saved from. Shared by every format
    ``load`` reads (engine checkpoints, safetensors, PyTorch zip files)."""

    def __init__(self, path: str, locations):
        self.path, self.locations = path, locations

    def fail(self, what: str):
        return CheckpointError(f"engine.load: {self.path!r} is corrupt: {what}")

    def place(self, array: np.ndarray, saved, tag: str = "tensor"):
        """``array`` (read on the host) as a Tensor (``tag`` "tensor") or a cupy/numpy array
        (``tag`` "cupy") on its target device; ``saved`` names the device it was saved from."""
        if callable(self.locations):
            return self._mapped_by_callable(tag, array, saved)
        moved = backend.to_device(array, self._target_device(saved))
        return Tensor(moved) if tag == "tensor" else moved

    def _mapped_by_callable(self, tag: str, array, saved):
        """PyTorch's ``map_location(storage, location)``: called with the tensor on the CPU and the
        saved device's name; returns the tensor (or array) to use, or None for the saved device."""
        location = str(self._saved_device(saved))
        try:
            result = self.locations(Tensor(array), location)
        except Exception as exc:
            raise CheckpointError(f"engine.load: {self.path!r}: map_location({location!r}) raised "
                                  f"{type(exc).__name__}: {exc}") from exc
        if result is None:
            moved = backend.to_device(array, self._target_device(saved, mapped=False))
        elif isinstance(result, Tensor) or backend.is_array(result):
            moved = result._data if isinstance(result, Tensor) else result
        else:
            raise CheckpointError(f"engine.load: {self.path!r}: map_location returned a {type(result).__name__}; it "
                                  "must return the tensor it was given (moved or not) or None")
        if tuple(moved.shape) != tuple(array.shape) or moved.dtype != array.dtype:
            raise CheckpointError(f"engine.load: {self.path!r}: map_location returned shape {tuple(moved.shape)} "
                                  f"{moved.dtype} for a saved {tuple(array.shape)} {array.dtype}")
        return Tensor(moved) if tag == "tensor" else moved

    def _saved_device(self, saved) -> backend.Device:
        if not isinstance(saved, str):
            raise self.fail(f"a saved device {str(saved)[:80]!r} is not a device name")
        try:
            return backend.device(saved)
        except (EngineError, ValueError) as exc:
            raise self.fail(f"a saved device {saved[:80]!r} is not a device name ({exc})") from exc

    def _target_device(self, saved, mapped: bool = True) -> backend.Device:
        saved_device = self._saved_device(saved)
        location = self.locations if mapped else None
        if isinstance(location, dict):
            target = location.get(str(saved_device)) or saved_device
        else:
            target = saved_device if location is None else location
        try:
            return backend.check_available(target)
        except EngineError as exc:
            raise CheckpointError(f"engine.load: {self.path!r} holds tensors saved on {saved}, mapped to {target}, "
                                  f"which is not usable here ({exc}); pass map_location='cpu'") from exc


class _Decoder(Placement):
    def __init__(self, members: _Members, path: str, locations):
        super().__init__(path, locations)
        self.members = members
        self.loaded: dict[int, object] = {}

    def decode(self, node):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(item) for item in node]
        if not isinstance(node, dict) or len(node) != 1:
            raise self.fail(f"unexpected structure node {str(node)[:80]!r}")
        (tag, body), = node.items()
        if tag == "dict":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                raise self.fail("a dict node is not a list of [key, value] pairs")
            return {self._key(k): self.decode(v) for k, v in body}
        if tag == "tuple" and isinstance(body, list):
            return tuple(self.decode(item) for item in body)
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "int" and isinstance(body, str) and _HEX_INT.fullmatch(body):
            return int(body, 16)  # base 16: no digit limit, linear time
        if tag == "ref" and isinstance(body, int) and not isinstance(body, bool):
            if body not in self.loaded:
                raise self.fail(f"a reference to array {body} comes before the array itself")
            return self.loaded[body]
        if tag in ("tensor", "ndarray", "scalar", "cupy") and isinstance(body, dict):
            return self._array_object(tag, body)
        raise self.fail(f"unknown structure node {tag!r}")

    def _key(self, node):
        key = self.decode(node)
        try:
            hash(key)
        except TypeError:
            raise self.fail(f"a dict key is unhashable ({type(key).__name__})") from None
        return key

    def _array_object(self, tag: str, info: dict):
        index = info.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or index in self.loaded:
            raise self.fail(f"bad array index {index!r}")
        array = self._read_array(index, info)
        if tag == "ndarray":
            value = array
        elif tag == "scalar":
            if array.shape != ():
                raise self.fail(f"arr_{index} should hold a scalar but has shape {array.shape}")
            value = array[()]
        else:
            value = self.place(array, info.get("device", "cpu"), tag)
        self.loaded[index] = value
        return value

    def _read_array(self, index: int, info: dict) -> np.ndarray:
        name = f"arr_{index}.npy"
        entry = self.members.info(name)
        if entry is None:
            raise self.fail(f"the entry {name} is missing")
        with self.members.open(entry) as member:
            shape, fortran, dtype, header_size = self._read_npy_header(member, name, entry.file_size)
            if dtype.hasobject:
                raise CheckpointError(f"engine.load: {self.path!r} holds a pickled object array in {name}; refusing "
                                      "to load it (unpickling can run arbitrary code)")
            named, stored = _NAMED_DTYPES.get(info.get("dtype"), (None, None))
            if (stored or dtype).str != dtype.str or (named is None and dtype.str != info.get("dtype")) \
                    or list(shape) != info.get("shape"):
                raise self.fail(f"{name} holds {dtype.str} {tuple(shape)} but the structure says "
                                f"{info.get('dtype')} {tuple(info.get('shape') or ())}")
            self._check_size(name, shape, dtype, entry.file_size - header_size)
            order = "F" if fortran else "C"
            count = math.prod(shape)
            if count == 0 or dtype.itemsize == 0:
                return np.empty(shape, dtype=named or dtype, order=order)
            data = bytearray(count * dtype.itemsize)  # checked above: the entry holds exactly this many
            self.members.read_into(member, data, name)
        return np.frombuffer(data, dtype=named or dtype, count=count).reshape(shape, order=order)

    def _read_npy_header(self, member, name: str, size: int):
        """``(shape, fortran_order, dtype, header bytes)`` of a .npy entry, parsed without numpy's
        reader (which has no public reader for format 3.0) and checked before anything is allocated."""
        magic = self.members.read(member, min(8, size), name)
        if len(magic) != 8 or magic[:6] != _NPY_MAGIC:
            raise self.fail(f"{name} is not a .npy entry (magic {magic[:8]!r})")
        version = (magic[6], magic[7])
        if version not in _NPY_VERSIONS:
            raise self.fail(f"{name} has .npy format version {version[0]}.{version[1]}; known: 1.0, 2.0, 3.0")
        length_format, encoding = _NPY_VERSIONS[version]
        length_size = struct.calcsize(length_format)
        if size < 8 + length_size:
            raise self.fail(f"{name} is truncated inside its .npy header")
        (length,) = struct.unpack(length_format, self.members.read(member, length_size, name))
        header_size = 8 + length_size + length
        if length > _MAX_NPY_HEADER or header_size > size:
            raise self.fail(f"{name} claims a {length}-byte .npy header in a {size}-byte entry")
        text = self.members.read(member, length, name)
        try:
            header = ast.literal_eval(text.decode(encoding))
        except (UnicodeDecodeError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise self.fail(f"{name} has an unreadable .npy header ({type(exc).__name__}: {exc})") from exc
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise self.fail(f"{name} has a .npy header without exactly descr, fortran_order and shape")
        shape, fortran = header["shape"], header["fortran_order"]
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise self.fail(f"{name} has a shape {str(shape)[:80]} that is not a tuple of ints")
        if not isinstance(fortran, bool):
            raise self.fail(f"{name} has fortran_order {str(fortran)[:80]}, not True or False")
        try:
            dtype = np.lib.format.descr_to_dtype(header["descr"])
        except MemoryError:
            raise
        except Exception as exc:  # TypeError, ValueError, RecursionError ... from a made-up descr
            raise self.fail(f"{name} has an invalid dtype description {str(header['descr'])[:80]} "
                            f"({type(exc).__name__}: {exc})") from exc
        return shape, fortran, dtype, header_size

    def _check_size(self, name: str, shape: tuple, dtype: np.dtype, available: int) -> None:
        """Refuse a shape numpy cannot build, or whose data is not exactly what the entry holds."""
        if len(shape) > _MAX_DIMS:
            raise self.fail(f"{name} has {len(shape)} dimensions; numpy allows at most {_MAX_DIMS}")
        if any(d < 0 for d in shape):
            raise self.fail(f"{name} has a negative dimension in its shape {shape}")
        if math.prod(d for d in shape if d) * max(dtype.itemsize, 1) > sys.maxsize:
            raise self.fail(f"{name} has shape {shape} of {dtype}, whose size overflows this platform's "
                            "index range")
        needed = math.prod(shape) * dtype.itemsize
        if needed != available:
            problem = "truncated" if needed > available else "longer than its header says"
            raise self.fail(f"{name} is {problem}: shape {shape} of {dtype} needs {needed} data bytes, "
                            f"the entry holds {available}")

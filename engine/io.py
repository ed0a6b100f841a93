"""Checkpoints without pickle: :func:`save` and :func:`load`.

A checkpoint is a zip archive in the ``.npz`` layout: one ``arr_N.npy`` member per array
(written by ``numpy.lib.format`` with ``allow_pickle=False``) plus ``structure.json``, which
describes the saved object (nested dicts, lists, tuples, numbers, strings, bools, None) and
points at the arrays. ``numpy.load(path, allow_pickle=False)`` opens it; nothing in it is ever
unpickled, so loading an untrusted checkpoint cannot run code.

Writes are atomic: the archive is written to a temporary file in the target's directory,
flushed and fsynced, then renamed over the target with ``os.replace``. A crash mid-save leaves
the previous checkpoint intact and removes the temporary file.

Example:
    >>> engine.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3},
    ...             "ckpt.npz")                                                  # doctest: +SKIP
    >>> ckpt = engine.load("ckpt.npz", map_location="cpu")                       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import zipfile

import numpy as np

from engine import backend
from engine.errors import EngineError
from engine.tensor import Tensor

__all__ = ["save", "load", "CheckpointError"]

FORMAT = "engine-checkpoint"
VERSION = 1
STRUCTURE = "structure.json"


class CheckpointError(EngineError):
    """A file that is not a readable engine checkpoint (corrupt, truncated, foreign, unsafe)."""


# ---- save --------------------------------------------------------------------------------------

def save(obj, path) -> None:
    """Store ``obj`` at ``path`` atomically, without pickle.

    Args:
        obj: nested dicts (keys: str, int, float, bool, None or tuples of them), lists and tuples
            of Tensors (any device; stored with their dtype and device), numpy arrays and
            scalars, cupy arrays, Python ints/floats (inf and nan included), strings, bools and
            None. The same Tensor or array object referenced twice is stored once and loads
            back as one object.
        path: file path (str or os.PathLike); its directory must exist. Written as given (no
            suffix is added); ``.npz`` or ``.ckpt`` are good names.

    Raises:
        TypeError: ``obj`` holds something else (named by its place in ``obj``); nothing is written.
    """
    path = os.fspath(path)
    arrays: list = []
    structure = {"format": FORMAT, "version": VERSION, "root": _Encoder(arrays).encode(obj, "obj")}
    # Python's json writes inf/nan as bare words; they are encoded as tagged strings instead.
    header = json.dumps(structure, allow_nan=False, ensure_ascii=False).encode("utf-8")
    _write_atomically(path, header, arrays)


def _write_atomically(path: str, header: bytes, arrays: list) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                archive.writestr(STRUCTURE, header)
                for index, source in enumerate(arrays):
                    with archive.open(f"arr_{index}.npy", "w", force_zip64=True) as member:
                        _write_array(member, _host_array(source))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _write_array(member, array: np.ndarray) -> None:
    np.lib.format.write_array(member, array, allow_pickle=False)


def _host_array(source) -> np.ndarray:
    """The numpy array to store for a Tensor or array (copied off the GPU one at a time)."""
    data = source.data if isinstance(source, Tensor) else source
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


class _Encoder:
    """``obj`` as JSON: JSON scalars stay themselves, everything else is a one-key tagged object.

    Tags: ``{"dict": [[key, value], ...]}`` (keys keep their types and order), ``{"tuple": [...]}``,
    ``{"float": "inf" | "-inf" | "nan"}``, ``{"tensor": {...}}``, ``{"ndarray": {...}}``,
    ``{"cupy": {...}}``, ``{"scalar": {...}}`` (numpy scalar), ``{"ref": n}`` (an object seen before).
    Lists are JSON arrays. Every JSON object in the structure is a tag, so none is ambiguous.
    """

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.seen: dict[int, int] = {}  # id(Tensor or array) -> index; self.arrays keeps each alive
        self.path_ids: set[int] = set()

    def encode(self, obj, where: str):
        if isinstance(obj, np.generic):  # first: np.float64 is also a Python float
            return self._array_node("scalar", obj, np.asarray(obj), where)
        if obj is None or isinstance(obj, (bool, str, int)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, Tensor):
            return self._array_node("tensor", obj, obj.data, where, device=str(obj.device))
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
                items = [[self._key(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]
                return {"dict": items}
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else {"tuple": items}
        finally:
            self.path_ids.discard(id(obj))

    def _key(self, key, where: str):
        if key is None or isinstance(key, (bool, int, str)):
            return key
        if isinstance(key, float):
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
        info = {"index": index, "dtype": array.dtype.str, "shape": list(array.shape)}
        if device is not None:
            info["device"] = device
        return {tag: info}


# ---- load --------------------------------------------------------------------------------------

def load(path, map_location=None):
    """Read a checkpoint written by :func:`save`.

    Tensors come back as Tensors (``requires_grad=False``) with their dtype, numpy arrays as
    numpy arrays, numpy scalars as numpy scalars, tuples as tuples, dicts with their key types
    and order.

    Args:
        path: the file.
        map_location: where Tensors (and cupy arrays) go: None (the device they were saved
            from), a device ("cpu", "cuda:0" or a Device) for all of them, or a dict mapping
            saved device names to devices (``{"cuda:1": "cuda:0"}``; unlisted ones stay).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable checkpoint (not a zip archive, truncated,
            corrupt, missing or inconsistent entries, a pickled array), or a saved device is
            not available here (use ``map_location="cpu"``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"engine.load: no such file {path!r}")
    try:
        archive = zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"engine.load: {path!r} is not an engine checkpoint: not a readable zip archive "
                              f"({exc}); the file may be truncated or of another format") from None
    with archive:
        structure = _read_structure(archive, path)
        decoder = _Decoder(archive, path, map_location)
        return decoder.decode(structure["root"])


def _read_structure(archive: zipfile.ZipFile, path: str) -> dict:
    try:
        raw = archive.read(STRUCTURE)
    except KeyError:
        raise CheckpointError(f"engine.load: {path!r} is a zip/npz archive but has no {STRUCTURE} entry; it was "
                              "not written by engine.save (use numpy.load for plain .npz files)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"engine.load: {path!r} is corrupt: cannot read {STRUCTURE} ({exc})") from None
    try:
        structure = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"engine.load: {path!r} is corrupt: {STRUCTURE} is not valid JSON ({exc})") from None
    if not isinstance(structure, dict) or structure.get("format") != FORMAT or "root" not in structure:
        raise CheckpointError(f"engine.load: {path!r} is not an engine checkpoint ({STRUCTURE} lacks the "
                              f"{FORMAT!r} marker)")
    if structure.get("version") != VERSION:
        raise CheckpointError(f"engine.load: {path!r} has checkpoint format version {structure.get('version')!r}; "
                              f"this engine reads version {VERSION}")
    return structure


class _Decoder:
    def __init__(self, archive: zipfile.ZipFile, path: str, map_location):
        self.archive, self.path = archive, path
        self.map_location = map_location
        self.loaded: dict[int, object] = {}

    def fail(self, what: str):
        return CheckpointError(f"engine.load: {self.path!r} is corrupt: {what}")

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
        if tag == "ref" and isinstance(body, int):
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
        if not isinstance(index, int) or index in self.loaded:
            raise self.fail(f"bad array index {index!r}")
        array = self._read_array(index, info)
        if tag == "ndarray":
            value = array
        elif tag == "scalar":
            if array.shape != ():
                raise self.fail(f"arr_{index} should hold a scalar but has shape {array.shape}")
            value = array[()]
        else:
            target = self._target_device(info.get("device", "cpu"))
            moved = backend.to_device(array, target)
            value = Tensor(moved) if tag == "tensor" else moved
        self.loaded[index] = value
        return value

    def _read_array(self, index: int, info: dict) -> np.ndarray:
        name = f"arr_{index}.npy"
        try:
            with self.archive.open(name) as member:
                array = self._read_npy(member, name, info)
                if member.read(1):
                    raise self.fail(f"{name} has bytes after its data")
        except KeyError:
            raise self.fail(f"the entry {name} is missing") from None
        except (zipfile.BadZipFile, EOFError, OSError) as exc:  # bad CRC, truncated member ...
            raise self.fail(f"cannot read {name} ({exc})") from None
        return array

    def _read_npy(self, member, name: str, info: dict) -> np.ndarray:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:  # 3.0 (utf-8 field names) has no public reader; numpy's own read_array uses this
                shape, fortran, dtype = np.lib.format._read_array_header(member, version)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise self.fail(f"{name} is not a valid .npy entry ({exc})") from None
        if dtype.hasobject:
            raise CheckpointError(f"engine.load: {self.path!r} holds a pickled object array in {name}; refusing to "
                                  "load it (unpickling can run arbitrary code)")
        if dtype.str != info.get("dtype") or list(shape) != info.get("shape"):
            raise self.fail(f"{name} holds {dtype.str} {tuple(shape)} but the structure says "
                            f"{info.get('dtype')} {tuple(info.get('shape') or ())}")
        count = math.prod(shape)
        data = bytearray(count * dtype.itemsize)
        got = member.readinto(data)
        if got != len(data):
            raise self.fail(f"{name} is truncated ({got} of {len(data)} data bytes)")
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")

    def _target_device(self, saved: str) -> backend.Device:
        location = self.map_location
        if isinstance(location, dict):
            location = {str(backend.device(k)): v for k, v in location.items()}.get(saved, saved)
        target = backend.device(location if location is not None else saved)
        try:
            return backend.check_available(target)
        except EngineError as exc:
            raise CheckpointError(f"engine.load: {self.path!r} holds tensors saved on {saved}, mapped to {target}, "
                                  f"which is not usable here ({exc}); pass map_location='cpu'") from None

"""Read ``torch.save`` files without torch and without running code.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<name>/data.pkl`` is a pickle of the
saved object in which every tensor is a call to ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` and every storage a persistent id ``("storage", type, key, location,
numel)`` whose bytes are the member ``<name>/data/<key>``. This module unpickles ``data.pkl`` with
a restricted unpickler that resolves only what ``torch.load(weights_only=True)`` allows by
default: the tensor and parameter rebuild functions, storage types, ``collections.OrderedDict``,
``torch.Size``, torch dtypes and devices, ``_codecs.encode`` (bytes), and the builtin containers
(set, frozenset, bytearray, complex, slice, range). Every other global, and a BUILD (attribute
setting) on anything but a dict, is refused with a :class:`CheckpointError` naming it, before it
could run. Tensors come back as engine Tensors (``nn.Parameter`` for parameters) of the same dtype
(bfloat16 as ``engine.bfloat16``), shape and strides; tensors that shared a storage share memory on
the CPU, as in torch (a tied weight, a view). The storage bytes are read with the checks of
``engine.load`` (stored members only, sizes checked against the file, views checked against
their storage).

Used by ``engine.load`` when the zip holds a ``data.pkl`` instead of the engine's structure.
"""

from __future__ import annotations

import collections
import io
import math
import pickle

import numpy as np

from engine import backend, dtypes
from engine.errors import EngineError
from engine.io import CheckpointError, Placement, _Members

# torch's dtype names -> numpy dtypes (its typed storages are named after the same element types)
_DTYPES = {"float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
           "float16": np.float16, "half": np.float16, "bfloat16": dtypes.bfloat16, "int64": np.int64,
           "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
           "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
           "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
           "cdouble": np.complex128}
_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
             "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # the pre-1.6 (non-zip) format's start


def is_legacy(head: bytes) -> bool:
    """Whether a file starts like a pre-1.6 ``torch.save`` (a bare pickle stream, not a zip)."""
    return head.startswith(_LEGACY_MAGIC[:len(head)]) and len(head) >= 4


def pickle_name(archive) -> str | None:
    """The ``<name>/data.pkl`` member of a torch zip archive, or None if it has none."""
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    return names[0] if len(names) == 1 else None


class _Storage:
    """A storage's bytes (read once, shared by every tensor over it) and, for typed storages, its dtype."""

    def __init__(self, data: bytearray, dtype, location: str, key: str):
        self.data, self.dtype, self.location, self.key = data, dtype, location, key
        self.swapped = False  # a big-endian file's bytes, turned native once


class _Built:
    """A tensor before placement: the host array, its saved device, and whether it is a Parameter."""

    def __init__(self, array: np.ndarray, location: str, requires_grad: bool, parameter: bool = False):
        self.array, self.location, self.requires_grad = array, location, bool(requires_grad)
        self.parameter = parameter


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (its dispatch table lets BUILD be restricted), resolving only allowed globals."""

    def __init__(self, data: bytes, loader: "_TorchLoader"):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.loader = loader
        self.dispatch = dict(pickle._Unpickler.dispatch)
        self.dispatch[pickle.BUILD[0]] = _Unpickler._build

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocol 2 spells it the Python 2 way
        allowed = self.loader.globals.get((module, name))
        if allowed is None and module == "torch" and name in _DTYPES:
            return np.dtype(_DTYPES[name])
        if allowed is None and module == "torch" and name in _STORAGES:
            return ("typed storage", np.dtype(_STORAGES[name]))
        if allowed is None:
            raise CheckpointError(f"engine.load: {self.loader.path!r} refers to {module}.{name}, which a weights-only "
                                  "load does not allow (it could run code); only tensors, parameters, storages, "
                                  "OrderedDict, torch.Size, dtypes, devices and builtin containers are read, as "
                                  "torch.load(weights_only=True)")
        return allowed

    def persistent_load(self, pid):
        return self.loader.storage(pid)

    def _build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, dict) or not isinstance(state, dict):
            raise CheckpointError(f"engine.load: {self.loader.path!r} sets attributes on a "
                                  f"{type(target).__name__}; a weights-only load only allows it on dicts "
                                  "(a state_dict's _metadata)")
        if isinstance(target, collections.OrderedDict):
            for key, value in state.items():
                setattr(target, key, value)  # state_dict()._metadata, kept as torch keeps it


class _TorchLoader:
    def __init__(self, members: _Members, prefix: str, placement: Placement):
        self.members, self.prefix, self.placement = members, prefix, placement
        self.path = placement.path
        self.storages: dict[str, _Storage] = {}
        self.big_endian = self._byteorder() == "big"
        self.globals = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter_with_state,
            ("torch.storage", "UntypedStorage"): ("untyped storage", None),
            ("torch", "UntypedStorage"): ("untyped storage", None),
            ("torch", "Size"): tuple,
            ("torch", "device"): _device,
            ("_codecs", "encode"): _encode,
            ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
            ("builtins", "complex"): complex, ("builtins", "slice"): slice, ("builtins", "range"): range,
        }

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"engine.load: {self.path!r} is a corrupt torch.save file: {what}")

    def _byteorder(self) -> str:
        info = self.members.info(f"{self.prefix}/byteorder")
        if info is None:
            return "little"  # files written before torch recorded it are little-endian
        with self.members.open(info) as member:
            order = self.members.read(member, min(info.file_size, 16), "byteorder").decode("ascii", "replace")
        if order not in ("little", "big"):
            raise self.fail(f"its byteorder entry says {order!r}")
        return order

    def load(self, pickle_member: str):
        info = self.members.info(pickle_member)
        with self.members.open(info) as member:
            data = self.members.read(member, info.file_size, pickle_member)
        try:
            return self._place(_Unpickler(data, self).load())
        except (CheckpointError, MemoryError):
            raise
        except Exception as exc:  # a malformed pickle: truncated, bad opcode, wrong arguments, too deep ...
            raise self.fail(f"{pickle_member} cannot be read ({type(exc).__name__}: {exc})") from exc

    # ---- what the pickle calls --------------------------------------------------------------------
    def storage(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.fail(f"a persistent id {str(pid)[:80]} is not a storage")
        _, kind, key, location, numel = pid
        if not (isinstance(kind, tuple) and isinstance(key, str) and isinstance(location, str)
                and isinstance(numel, int) and numel >= 0):
            raise self.fail(f"a storage record {str(pid)[:80]} is malformed")
        if key not in self.storages:
            dtype = kind[1]
            name = f"{self.prefix}/data/{key}"
            info = self.members.info(name)
            if info is None:
                raise self.fail(f"the storage {key!r} has no entry {name}")
            needed = numel * (dtype.itemsize if dtype is not None else 1)
            if info.file_size != needed:
                raise self.fail(f"the storage {key!r} holds {info.file_size} bytes, its record says {numel} "
                                f"elements ({needed} bytes)")
            data = bytearray(needed)
            with self.members.open(info) as member:
                self.members.read_into(member, data, name)
            self.storages[key] = _Storage(data, dtype, location, key)
        return self.storages[key]

    def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        if not isinstance(storage, _Storage) or storage.dtype is None:
            raise self.fail("_rebuild_tensor_v2 is given no typed storage")
        return self._view(storage, storage.dtype, offset, size, stride, requires_grad)

    def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
        if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
            raise self.fail("_rebuild_tensor_v3 is given no storage or no dtype")
        return self._view(storage, dtype, offset, size, stride, requires_grad)

    def rebuild_parameter(self, data, requires_grad, backward_hooks):
        if not isinstance(data, _Built):
            raise self.fail("_rebuild_parameter is given no tensor")
        return _Built(data.array, data.location, requires_grad, parameter=True)

    def rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self.rebuild_parameter(data, requires_grad, backward_hooks)

    def _view(self, storage: _Storage, dtype: np.dtype, offset, size, stride, requires_grad) -> _Built:
        """The tensor's values: a strided view of the storage, checked to lie inside it."""
        size, stride = tuple(size), tuple(stride)
        if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) or len(size) != len(stride):
            raise self.fail(f"a tensor over storage {storage.key!r} has offset {offset}, size {size}, stride {stride}")
        if len(storage.data) % dtype.itemsize:
            raise self.fail(f"storage {storage.key!r} of {len(storage.data)} bytes does not hold whole {dtype} items")
        elements = np.frombuffer(storage.data, dtype=dtype)
        if self.big_endian and not storage.swapped:  # once per storage, in place: its views keep sharing it
            elements.byteswap(inplace=True)
            storage.swapped = True
        if math.prod(size) == 0:
            return _Built(np.empty(size, dtype=dtype), storage.location, requires_grad)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise self.fail(f"a tensor of size {size}, stride {stride} at offset {offset} reaches element {last} of "
                            f"storage {storage.key!r}, which holds {elements.size}")
        view = np.lib.stride_tricks.as_strided(elements[offset:], size, tuple(s * dtype.itemsize for s in stride))
        return _Built(view, storage.location, requires_grad)

    # ---- placement ------------------------------------------------------------------------------
    def _place(self, obj):
        """Replace every built tensor inside ``obj`` by an engine Tensor on its target device."""
        from engine.nn import Parameter

        if isinstance(obj, _Built):
            tensor = self.placement.place(obj.array, obj.location)
            if obj.parameter:
                return Parameter(tensor, requires_grad=obj.requires_grad)
            return tensor.requires_grad_(True) if obj.requires_grad and tensor.is_floating_point() else tensor
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(self._place(item) for item in obj)
        if isinstance(obj, dict):
            placed = type(obj)((key, self._place(value)) for key, value in obj.items())
            if hasattr(obj, "_metadata"):
                placed._metadata = obj._metadata
            return placed
        if isinstance(obj, _Storage):
            raise self.fail(f"storage {obj.key!r} is stored outside a tensor; the engine has no storage objects")
        return obj


def _device(*args):
    """``torch.device(...)`` in a pickle: an engine Device ("cpu", "cuda:0"), or the name of a
    device the engine does not have ("mps", "meta")."""
    if len(args) == 1 and isinstance(args[0], str):
        name = args[0]
    elif len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
        name = f"{args[0]}:{args[1]}"
    else:
        raise CheckpointError(f"engine.load: torch.device{args!r} in the file is not a device")
    try:
        return backend.device(name)
    except EngineError:
        return name


def _encode(text, encoding="utf-8"):
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes: latin-1 text back to bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise CheckpointError(f"engine.load: _codecs.encode({str(text)[:40]!r}, {encoding!r}) is not a pickled bytes "
                              "object; only latin1 is used for that")
    return text.encode("latin1")


def load_archive(archive, members: _Members, placement: Placement):
    """The object a torch.save zip archive holds (see the module docstring)."""
    name = pickle_name(archive)
    return _TorchLoader(members, name.rsplit("/", 1)[0], placement).load(name)

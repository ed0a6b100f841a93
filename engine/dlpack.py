"""DLPack exchange: arrays in and out of the engine without copies.

The engine's arrays are numpy arrays (CPU) and cupy arrays (CUDA), and both libraries already
implement the DLPack protocol as producers and consumers, stream semantics included (the
producer makes its work visible on the consumer's stream before the capsule is handed over).
This module forwards to them and adds the one thing they lack: bfloat16. numpy cannot export or
import an ``ml_dtypes.bfloat16`` array through DLPack, so a bfloat16 array crosses as its uint16
bit patterns with the capsule's type code rewritten (``kDLUInt`` <-> ``kDLBfloat``, same 16 bits):
the memory is still shared, and the consumer sees bfloat16 (``torch.bfloat16`` in PyTorch).

Used by ``Tensor.__dlpack__`` / ``__dlpack_device__``, :func:`from_dlpack` (``engine.from_dlpack``),
and :func:`foreign_array`, through which ``engine.tensor``, ``Tensor(...)`` and
``load_state_dict`` accept torch tensors and other DLPack producers.
"""

from __future__ import annotations

import ctypes

import numpy as np

from engine import backend, dtypes
from engine.errors import DeviceError, DTypeError, EngineError, GradError

# DLDeviceType codes (dlpack.h)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST = 1, 2, 3
# DLDataTypeCode codes: unsigned int and bfloat (dlpack.h)
_KDL_UINT, _KDL_BFLOAT = 1, 4
_BFLOAT16 = np.dtype(dtypes.bfloat16)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):  # capsule name "dltensor" (DLPack < 1.0)
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):  # capsule name "dltensor_versioned" (DLPack >= 1.0)
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_CAPSULE_LAYOUTS = {b"dltensor": _DLManagedTensor, b"dltensor_versioned": _DLManagedTensorVersioned}
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype, _get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _dl_tensor(capsule) -> _DLTensor:
    """The DLTensor inside an unconsumed DLPack capsule (either layout)."""
    name = _get_name(capsule)
    layout = _CAPSULE_LAYOUTS.get(name)
    if layout is None:
        raise EngineError(f"from_dlpack: expected a DLPack capsule ('dltensor' or 'dltensor_versioned'), got a "
                          f"capsule named {name!r} (it may have been consumed already)")
    return layout.from_address(_get_pointer(capsule, name)).dl_tensor


def _relabel(capsule, old_code: int, new_code: int) -> bool:
    """Rewrite a 16-bit type code in the capsule (uint16 <-> bfloat16); True if it was ``old_code``."""
    dtype = _dl_tensor(capsule).dtype
    if dtype.code == old_code and dtype.bits == 16 and dtype.lanes == 1:
        dtype.code = new_code
        return True
    return False


def _is_capsule(obj) -> bool:
    return type(obj).__name__ == "PyCapsule"


# ---- export: Tensor.__dlpack__ -----------------------------------------------------------------

def export(array, stream=None, max_version=None, dl_device=None, copy=None):
    """``array.__dlpack__(...)`` for a numpy or cupy array, bfloat16 included.

    Only the keywords the consumer passed are forwarded (an older producer may not know
    ``max_version``; the consumer then retries without it, as the DLPack spec prescribes).
    """
    kwargs = {name: value for name, value in (("max_version", max_version), ("dl_device", dl_device),
                                              ("copy", copy)) if value is not None}
    if stream is not None:
        kwargs["stream"] = stream
    if array.dtype != _BFLOAT16:
        return array.__dlpack__(**kwargs)
    capsule = array.view(np.uint16).__dlpack__(**kwargs)
    _relabel(capsule, _KDL_UINT, _KDL_BFLOAT)
    return capsule


def device_tuple(array) -> tuple[int, int]:
    """``(DLDeviceType, device id)`` of a numpy or cupy array: ``(1, 0)`` for the CPU, ``(2, n)`` for cuda:n."""
    if isinstance(array, np.ndarray):
        return (KDL_CPU, 0)
    return (KDL_CUDA, int(backend.device_of(array).index))


# ---- import: engine.from_dlpack ------------------------------------------------------------------

class _Producer:
    """Stands between a foreign producer and numpy's / cupy's ``from_dlpack``: forwards every call
    (so the consumer's stream reaches the producer) and turns a bfloat16 capsule into uint16."""

    def __init__(self, source):
        self.source = source
        self.bfloat16 = False

    def __dlpack_device__(self):
        if _is_capsule(self.source):
            device = _dl_tensor(self.source).device
            return (device.device_type, device.device_id)
        return self.source.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        capsule = self.source if _is_capsule(self.source) else self.source.__dlpack__(**kwargs)
        self.bfloat16 = _relabel(capsule, _KDL_BFLOAT, _KDL_UINT)
        return capsule


def array_from_dlpack(source, where: str = "from_dlpack"):
    """The numpy (CPU) or cupy (CUDA) array sharing the memory of ``source``: an object with
    ``__dlpack__`` / ``__dlpack_device__``, or a DLPack capsule (consumed).

    On CUDA, cupy passes its current stream to the producer, which makes its pending writes
    visible there (DLPack's stream semantics). Raises EngineError naming ``where`` for a device
    or dtype the engine cannot hold.
    """
    if not _is_capsule(source) and not hasattr(source, "__dlpack__"):
        raise TypeError(f"{where}: expected an object with __dlpack__ (a torch, numpy, cupy or JAX array) or a DLPack "
                        f"capsule, got {type(source).__module__}.{type(source).__qualname__}")
    if getattr(source, "requires_grad", False) is True:
        raise GradError(f"{where}: the {type(source).__module__}.{type(source).__qualname__} requires grad; pass "
                        "x.detach() (torch refuses to export it too)")
    producer = _Producer(source)
    device_type, device_id = (int(v) for v in producer.__dlpack_device__())
    try:
        if device_type == KDL_CUDA:
            cupy = backend.xp_for(backend.check_available(backend.Device("cuda", device_id)))
            with cupy.cuda.Device(device_id):
                array = cupy.from_dlpack(producer)
        elif device_type in (KDL_CPU, KDL_CUDA_HOST):
            array = np.from_dlpack(producer)
        else:
            raise DeviceError(f"{where}: the producer's memory is on DLPack device type {device_type} "
                              f"(id {device_id}); "
                              "the engine holds CPU (1) and CUDA (2) memory only")
    except (BufferError, RuntimeError, TypeError) as exc:
        raise DTypeError(f"{where}: cannot share the memory of a {type(source).__module__}."
                         f"{type(source).__qualname__} ({type(exc).__name__}: {exc}); the engine takes bool, "
                         "integer, float16, bfloat16, float32 and float64 arrays on the CPU or a CUDA device") \
            from exc
    return array.view(_BFLOAT16) if producer.bfloat16 else array


def foreign_array(obj):
    """A numpy/cupy array sharing the memory of a foreign tensor (torch, JAX ...) that implements
    DLPack, or None when ``obj`` does not. A torch tensor that requires grad is detached first (its
    DLPack export refuses it); the values are what the engine keeps, not the graph."""
    if isinstance(obj, (np.ndarray, np.generic)) or backend.is_array(obj) or not hasattr(obj, "__dlpack__"):
        return None
    if getattr(obj, "requires_grad", False) and callable(getattr(obj, "detach", None)):
        obj = obj.detach()
    if getattr(obj, "is_conj", None) is not None and obj.is_conj():  # torch's lazy conjugate: DLPack refuses it
        obj = obj.resolve_conj()
    return array_from_dlpack(obj, f"converting a {type(obj).__module__}.{type(obj).__qualname__}")

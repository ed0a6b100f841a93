"""GEMMs on cupy arrays through ``cublasGemmEx`` itself, not ``cupy.matmul``'s generic dispatch.

:func:`matmul_into` writes ``out = op(a) @ op(b)`` for 2-D C-contiguous arrays of one dtype with
one call into cuBLAS (plus ``cublasSetStream``). ``cupy.matmul`` ends in the same GEMM after its
generalised-ufunc entry (cupy 14: a Python fast path for plain 2-D calls) and ``_core.matmul`` /
``tensordot_core`` (shape and dtype checks, reshapes, an overlap test of ``out`` against the
operands, device look-ups): the issue measured ~32 us of host time per call on an H200, paid
five times or more per small training step.

Row-major arrays, column-major library: a C-contiguous (r, c) array is, read column-major, its
transpose (c x r, leading dimension c). So ``C = op(A) op(B)`` is computed as
``C^T = op(B)^T op(A)^T``: cuBLAS gets B first, A second, ``m, n, k = Q, P, R`` for an (P, Q)
output with inner size R, each operand's leading dimension its row length (``shape[1]``), and
``CUBLAS_OP_T`` exactly where ``op`` transposes (the trick of cupy's ``tensordot_core``).

What each call passes (as ``cupy/_core/_routines_linalg.pyx`` ``tensordot_core_v11`` does):

- the handle of the current device (``cupy.cuda.get_cublas_handle()``), its stream set to cupy's
  current stream before every call (cupy's own calls set it too, so it is never stale);
- alpha = 1 and beta = 0 as host scalars (the handle's default ``CUBLAS_POINTER_MODE_HOST``) of
  the compute type's scale type: float for the 32F compute types, double for 64F;
- the compute type: ``CUBLAS_COMPUTE_32F_FAST_TF32`` for float32 when cupy's compute type for
  float32 is TF32 (the engine's matmul precision, ``set_float32_matmul_precision`` /
  ``backends.cuda.matmul.allow_tf32``, is applied there: engine/backend.py), ``..._PEDANTIC``
  when it is pedantic, else ``CUBLAS_COMPUTE_32F``; always ``CUBLAS_COMPUTE_32F`` for float16
  and bfloat16 (float32 accumulation, one rounding into the 16-bit output); ``CUBLAS_COMPUTE_64F``
  for float64;
- ``CUBLAS_GEMM_DEFAULT_TENSOR_OP`` on sm_80+ (and for float16 on sm_70+), else the default algorithm.

The library is called through ctypes, on the libcublas that cupy itself loaded (found by
``cuda.pathfinder``, as cupy finds it), not through cupy's binding: cupy 14's binding refuses any
cuBLAS call while the stream captures (``cublas.setStream`` raises NotImplementedError, cupy
issue #6290), while cuBLAS itself supports capture with host-pointer scalars (the cuBLAS
documentation, "CUDA Graphs Support"), which is what a captured training step needs.

Where the direct call cannot take the case, ``cupy.matmul`` runs instead: on ROCm (hipBLAS, not
libcublas), when libcublas cannot be located, for a dimension beyond cuBLAS's 32-bit ``int``, and
for an array that is not C-contiguous (the leading-dimension trick needs rows laid end to end;
the linear kernels' validators already refuse such inputs, so for them this never happens).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..precision import float_name
from .module import current_device

# cublas_api.h / library_types.h (the same values as cupy_backends/cuda/libs/cublas.pxd and
# cupy_backends/cuda/api/runtime.pxd; importing those here would need libcublas present).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 69, 77
CUBLAS_COMPUTE_64F = 70
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = 0, 1, 2, 14
DATA_TYPES = {"float32": CUDA_R_32F, "float64": CUDA_R_64F, "float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF}
# cupy._core._routines_linalg's COMPUTE_TYPE_* (the values cupy's get_compute_type returns)
_CUPY_COMPUTE_TYPE_PEDANTIC, _CUPY_COMPUTE_TYPE_TF32 = 2, 7
INT_MAX = 2**31 - 1

# alpha = 1, beta = 0 in the compute type's scale type, kept alive for the process: cuBLAS reads
# host scalars during the call (and a capture records their values), so their addresses must hold.
_SCALARS = {dtype: np.array([1, 0], dtype=dtype) for dtype in (np.float32, np.float64)}
ALPHA_BETA = {np.float32: tuple(_SCALARS[np.float32].ctypes.data + i * 4 for i in range(2)),
              np.float64: tuple(_SCALARS[np.float64].ctypes.data + i * 8 for i in range(2))}


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than CUBLAS_STATUS_SUCCESS."""


class _Library:
    """``cublasSetStream_v2`` and ``cublasGemmEx`` of one libcublas, as ``set_stream`` and ``gemm_ex``
    (the argument order of cupy's ``cublas.gemmEx``: pointers and handles as Python ints). Each
    returns the cuBLAS status, 0 on success: the caller checks it (an ``errcheck`` callback would
    cost a Python call per call)."""

    def __init__(self, lib: ctypes.CDLL):
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        self.set_stream = lib.cublasSetStream_v2
        self.set_stream.argtypes, self.set_stream.restype = (ptr, ptr), i32
        self.gemm_ex = lib.cublasGemmEx
        self.gemm_ex.argtypes = (ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, ptr, i32, i32, ptr, ptr, i32, i32,
                                 i32, i32)
        self.gemm_ex.restype = i32


@functools.cache
def _load_cublas():
    """The libcublas cupy uses, bound with ctypes; None where it cannot be had (then cupy.matmul runs)."""
    import cupy

    if getattr(cupy.cuda.runtime, "is_hip", False):
        return None
    try:
        from cuda import pathfinder

        path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path  # the copy cupy loaded (same lookup)
        return _Library(ctypes.CDLL(path)) if path else None
    except Exception:  # noqa: BLE001 - not found, not loadable, a symbol missing: the fallback is exact too
        return None


def _cublas():
    """The cuBLAS binding in use (a function, so that tests can put a fake one in its place)."""
    return _load_cublas()


@functools.cache
def _compute_capability(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).compute_capability)


def _compute_type(cupy, name: str) -> int:
    """The cuBLAS compute type for data of dtype ``name``, following cupy's setting for float32."""
    if name == "float64":
        return CUBLAS_COMPUTE_64F
    if name == "float32":
        setting = cupy._core.get_compute_type(np.float32)
        if setting == _CUPY_COMPUTE_TYPE_TF32:
            return CUBLAS_COMPUTE_32F_FAST_TF32
        if setting == _CUPY_COMPUTE_TYPE_PEDANTIC:
            return CUBLAS_COMPUTE_32F_PEDANTIC
    return CUBLAS_COMPUTE_32F  # float16 / bfloat16: float32 accumulation, whatever the setting


def _algorithm(name: str) -> int:
    cc = _compute_capability(current_device())
    return CUBLAS_GEMM_DEFAULT_TENSOR_OP if cc >= 80 or (cc >= 70 and name == "float16") else CUBLAS_GEMM_DEFAULT


def matmul_into(out, a, b, *, trans_a: bool = False, trans_b: bool = False) -> None:
    """``out[...] = op(a) @ op(b)`` with ``op`` a transposition where asked, on the current device.

    Args:
        out: (P, Q) cupy array, written (never read).
        a: cupy array, (P, R), or (R, P) with ``trans_a``.
        b: cupy array, (R, Q), or (Q, R) with ``trans_b``.
        trans_a, trans_b: multiply by the transpose, read in place (no copy).

    All three are 2-D and share one dtype (float32, float64, float16 or bfloat16), which the callers'
    validators ensure; call it with the arrays' device current. C-contiguous arrays go to cuBLAS
    directly, others through ``cupy.matmul``. R = 0 gives zeros, as numpy does.
    """
    import cupy

    p, q = out.shape
    r = a.shape[0] if trans_a else a.shape[1]
    if out.size == 0:
        return
    if r == 0:
        out.fill(0)
        return
    lib = _cublas()
    if lib is None or max(p, q, r) > INT_MAX or not (
            a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        cupy.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        return
    name = float_name(out.dtype)
    data_type = DATA_TYPES[name]
    compute = _compute_type(cupy, name)
    alpha, beta = ALPHA_BETA[np.float64 if compute == CUBLAS_COMPUTE_64F else np.float32]
    handle = cupy.cuda.get_cublas_handle()
    status = lib.set_stream(handle, cupy.cuda.get_current_stream().ptr)
    if status:
        raise CublasError(f"cublasSetStream returned cuBLAS status {status}")
    # C^T (Q x P, column-major) = op(b)^T (Q x R) @ op(a)^T (R x P): b first, a second.
    status = lib.gemm_ex(handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
                         q, p, r, alpha, b.data.ptr, data_type, b.shape[1], a.data.ptr, data_type, a.shape[1],
                         beta, out.data.ptr, data_type, q, compute, _algorithm(name))
    if status:
        raise CublasError(f"cublasGemmEx returned cuBLAS status {status} for a ({p}, {r}) x ({r}, {q}) "
                          f"{name} GEMM (trans_a={trans_a}, trans_b={trans_b})")

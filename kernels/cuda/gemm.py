"""GEMMs on cupy arrays through ``cublasGemmEx`` itself, not ``cupy.matmul``'s generic dispatch.

:func:`matmul` is ``a @ b`` (numpy's semantics: batches, broadcasting, 1-D operands) for any cupy
arrays of one float dtype, the engine's one GEMM entry on the GPU (``engine.backend.matmul``):
one ``cublasGemmEx`` or ``cublasGemmStridedBatchedEx``, transposed views read in place. Before
every call :func:`prepare_handle` sets cupy's stream and a workspace of ours on cupy's handle.
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
libcublas), when libcublas cannot be located, for a dimension beyond cuBLAS's 32-bit ``int``, for
dtypes other than the four float ones (``matmul``), and, in ``matmul_into``, for an array that is
not C-contiguous (the leading-dimension trick needs rows laid end to end; the linear kernels'
validators already refuse such inputs, so for them this never happens; ``matmul`` copies such an
operand instead). ``cupy.matmul`` cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..precision import float_name
from .module import current_device, on_device

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
        i64, size = ctypes.c_longlong, ctypes.c_size_t
        self.gemm_strided_batched_ex = lib.cublasGemmStridedBatchedEx
        self.gemm_strided_batched_ex.argtypes = (ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, i64, ptr, i32, i32,
                                                 i64, ptr, ptr, i32, i32, i64, i32, i32, i32)
        self.gemm_strided_batched_ex.restype = i32
        self.set_workspace = lib.cublasSetWorkspace_v2
        self.set_workspace.argtypes, self.set_workspace.restype = (ptr, ptr, size), i32


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
    # trans_x: op(x) = x.T is x's memory read column-major; either way the leading dimension is x's row length
    _gemm(cupy, lib, out, _Operand(a, trans_a, a.shape[1], 0), _Operand(b, trans_b, b.shape[1], 0), (p, q, r), 1)


# ---- the general entry: any batch, broadcasting, strided views ----------------------------------

class _Operand:
    """One GEMM operand as cuBLAS reads it: the array (its pointer), whether the row-major matrix
    is stored transposed (column-major: cuBLAS then reads it with ``CUBLAS_OP_T`` after the C^T
    swap), its leading dimension and its batch stride, in elements."""

    __slots__ = ("array", "transposed", "ld", "batch_stride")

    def __init__(self, array, transposed: bool, ld: int, batch_stride: int):
        self.array, self.transposed, self.ld, self.batch_stride = array, transposed, ld, batch_stride


def _matrix_layout(array):
    """``(transposed, ld)`` of the last two dims of ``array`` read in place, or None (then a copy).

    Row-major: unit column stride and rows that do not overlap (row stride >= columns); column-major
    the other way round. A size-1 dim's stride is meaningless (numpy and cupy set it freely), so it
    is ignored and the leading dimension is the smallest valid one.
    """
    rows, cols = array.shape[-2:]
    item = array.itemsize
    s_row, s_col = array.strides[-2] // item, array.strides[-1] // item
    if any(s % item for s in array.strides[-2:]):
        return None
    if (cols == 1 or s_col == 1) and (rows == 1 or s_row >= max(cols, 1)):
        return False, s_row if rows > 1 else max(cols, 1)
    if (rows == 1 or s_row == 1) and (cols == 1 or s_col >= max(rows, 1)):
        return True, s_col if cols > 1 else max(rows, 1)
    return None


def _batch_stride(array, batch: tuple):
    """The one element stride taking ``array``'s batch (broadcast to ``batch``) from one matrix to the
    next in row-major batch order (0 for a batch-broadcast operand), or None when the batch dims do
    not collapse into one stride (then a copy)."""
    lead = array.ndim - 2
    item = array.itemsize
    dims = []  # (size, stride) of the batch dims that count, outermost first
    for i, size in enumerate(batch):
        j = i - (len(batch) - lead)
        own = array.shape[j] if j >= 0 else 1
        stride = array.strides[j] if j >= 0 and own != 1 else 0
        if size != 1:
            dims.append((size, stride))
    stride = dims[-1][1] if dims else 0
    for (_, outer), (inner_size, inner) in zip(dims[:-1], dims[1:]):
        if outer != inner * inner_size:
            return None
    if stride < 0 or stride % item:
        return None
    return stride // item


def _operand(cupy, array, batch: tuple):
    """``array`` as a strided-batched GEMM operand over ``batch``: in place where its strides allow,
    else a C-contiguous copy (of the broadcast batch, where the batch dims do not collapse)."""
    layout, stride = _matrix_layout(array), _batch_stride(array, batch)
    if layout is None or stride is None:
        if stride is None:  # e.g. (B1, 1, M, K) against (1, B2, ...): the broadcast batch, materialised
            array = cupy.broadcast_to(array, batch + array.shape[-2:])
        array = cupy.ascontiguousarray(array)
        layout, stride = _matrix_layout(array), _batch_stride(array, batch)
    return _Operand(array, layout[0], layout[1], stride)


def matmul(a, b):
    """``a @ b`` for cupy arrays (numpy's ``matmul`` semantics) through cuBLAS directly.

    One entry for every GEMM of the engine on GPU arrays: 2-D products are one ``cublasGemmEx``,
    batched ones (3-D and more, batch dims broadcast as numpy does) one ``cublasGemmStridedBatchedEx``.
    Transposed views (``w.T``, ``swapaxes``) are read in place with a transposition flag, and a
    batch-broadcast operand with batch stride 0; what cuBLAS cannot address in place (a matrix
    without a unit stride, negative strides, batch dims that do not collapse into one stride)
    is copied first. 1-D operands are promoted and the added dim removed, as numpy does. The
    result is a new C-contiguous array from cupy's current allocator (so a graph capture's
    private pool serves it). Unlike ``cupy.matmul``, this works while the stream is captured
    (cupy's own cuBLAS binding refuses every call then).

    Args:
        a, b: cupy arrays of one dtype (float16, bfloat16, float32 or float64), on the current device.

    Returns:
        The product, in the operands' dtype, with float32 accumulation for 16-bit data and the
        compute types of :func:`matmul_into` (TF32 for float32 when cupy's compute type says so).

    Other dtypes, mixed dtypes, ROCm, a missing libcublas and sizes past 32-bit ints go to
    ``cupy.matmul`` (which cannot be captured).
    """
    with on_device(a):  # the handle, the workspace and the result on the operands' GPU
        return _matmul(a, b)


def _matmul(a, b):
    import cupy

    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least one dim, got shapes {a.shape} and {b.shape}")
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    p, r = a2.shape[-2:]
    if b2.shape[-2] != r:
        raise ValueError(f"matmul: the inner dims differ: shapes {a.shape} and {b.shape}")
    q = b2.shape[-1]
    batch = _broadcast_batch(a2.shape[:-2], b2.shape[:-2], a.shape, b.shape)
    lib = _cublas()
    count = _product(batch)
    if lib is None or a.dtype != b.dtype or _data_type_name(a.dtype) is None \
            or max(p, q, r, count) > INT_MAX:
        return cupy.matmul(a, b)
    out = cupy.empty(batch + (p, q), dtype=a.dtype)
    if out.size and r == 0:
        out.fill(0)
    elif out.size:
        op_a, op_b = _operand(cupy, a2, batch), _operand(cupy, b2, batch)
        if max(op_a.ld, op_b.ld) > INT_MAX:  # a view with rows further apart than cuBLAS's int reaches
            return cupy.matmul(a, b)
        _gemm(cupy, lib, out, op_a, op_b, (p, q, r), count)
    if a.ndim == 1:
        out = out.reshape(out.shape[:-2] + out.shape[-1:])
    if b.ndim == 1:
        out = out.reshape(out.shape[:-1])
    return out


def _broadcast_batch(sa: tuple, sb: tuple, a_shape, b_shape) -> tuple:
    n = max(len(sa), len(sb))
    sa, sb = (1,) * (n - len(sa)) + tuple(sa), (1,) * (n - len(sb)) + tuple(sb)
    batch = []
    for x, y in zip(sa, sb):
        if x != y and 1 not in (x, y):
            raise ValueError(f"matmul: the batch dims do not broadcast: shapes {a_shape} and {b_shape}")
        batch.append(y if x == 1 else x)
    return tuple(batch)


def _product(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _data_type_name(dtype):
    """The dtype's name where cuBLAS takes it here (float16, bfloat16, float32, float64), else None."""
    name = float_name(dtype)
    return name if name in DATA_TYPES else None


def _gemm(cupy, lib, out, a: _Operand, b: _Operand, pqr: tuple, count: int) -> None:
    """``out = op(a) @ op(b)`` (``count`` products of (P, R) x (R, Q), out C-contiguous) as one cuBLAS call.

    C^T (Q x P, column-major, ldc = Q) = op(b)^T @ op(a)^T: b first, a second, each ``CUBLAS_OP_T``
    exactly where its row-major matrix is stored transposed.
    """
    p, q, r = pqr
    name = float_name(out.dtype)
    data_type = DATA_TYPES[name]
    compute = _compute_type(cupy, name)
    alpha, beta = ALPHA_BETA[np.float64 if compute == CUBLAS_COMPUTE_64F else np.float32]
    handle = prepare_handle(cupy, lib)
    op_b = CUBLAS_OP_T if b.transposed else CUBLAS_OP_N
    op_a = CUBLAS_OP_T if a.transposed else CUBLAS_OP_N
    ptr_a, ptr_b = a.array.data.ptr, b.array.data.ptr
    if count == 1:
        status = lib.gemm_ex(handle, op_b, op_a, q, p, r, alpha, ptr_b, data_type, b.ld, ptr_a, data_type, a.ld,
                             beta, out.data.ptr, data_type, q, compute, _algorithm(name))
        what = "cublasGemmEx"
    else:
        status = lib.gemm_strided_batched_ex(handle, op_b, op_a, q, p, r, alpha, ptr_b, data_type, b.ld,
                                             b.batch_stride, ptr_a, data_type, a.ld, a.batch_stride, beta,
                                             out.data.ptr, data_type, q, p * q, count, compute, _algorithm(name))
        what = f"cublasGemmStridedBatchedEx (batch {count})"
    if status:
        raise CublasError(f"{what} returned cuBLAS status {status} for a ({p}, {r}) x ({r}, {q}) {name} GEMM "
                          f"(trans_a={a.transposed}, trans_b={b.transposed})")


# ---- the handle: cupy's, its stream and a workspace set before every call ----------------------

# (handle, stream) -> the workspace cuBLAS uses on that stream, kept for the life of the process: a
# captured graph holds its address (PyTorch keeps one per handle and stream the same way).
_workspaces: dict = {}
_DEFAULT_WORKSPACE_SM90 = 4096 * 8 * 1024  # PyTorch's default on sm_90 (CUDABlasHandlePool.cpp)
_DEFAULT_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8", its default elsewhere


def workspace_size(device_id: int) -> int:
    """Bytes of cuBLAS workspace per (handle, stream), as PyTorch sizes it: ``CUBLAS_WORKSPACE_CONFIG``
    (``:SIZE_KiB:COUNT`` pairs, summed) where set, else 32 MiB on sm_90 and 8 MiB + 128 KiB elsewhere."""
    import os
    import re

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":([0-9]+):([0-9]+)", config or "")
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return _DEFAULT_WORKSPACE_SM90 if _compute_capability(device_id) == 90 else _DEFAULT_WORKSPACE


def prepare_handle(cupy, lib) -> int:
    """The current device's cuBLAS handle with cupy's current stream and this stream's workspace set.

    ``cublasSetStream`` resets the handle to cuBLAS's own workspace pool, so the workspace is set
    again after it, every call (two host calls, no device work). With a workspace of its own,
    cuBLAS allocates nothing while a graph is captured (as PyTorch does, for the same reason).
    """
    handle = cupy.cuda.get_cublas_handle()
    stream = cupy.cuda.get_current_stream().ptr
    status = lib.set_stream(handle, stream)
    if status:
        raise CublasError(f"cublasSetStream returned cuBLAS status {status}")
    key = (int(handle), int(stream))
    workspace = _workspaces.get(key)
    if workspace is None:
        size = workspace_size(current_device())
        workspace = _workspaces[key] = (cupy.cuda.alloc(size), size)
    status = lib.set_workspace(handle, workspace[0].ptr, workspace[1])
    if status:
        raise CublasError(f"cublasSetWorkspace returned cuBLAS status {status} for {workspace[1]} bytes")
    return handle

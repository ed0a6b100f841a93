"""A stand-in for cuBLAS that runs each call with NumPy under cuBLAS's own semantics.

kernels/cuda/gemm.py calls ``set_stream(handle, stream)``, ``set_workspace(handle, ptr, bytes)``,
``gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
ldc, computeType, algo)`` and ``gemm_strided_batched_ex`` (the same with a stride after each of
A's, B's and C's leading dimension and the batch count before the compute type) with raw
pointers. :class:`FakeCublas` takes the same arguments and does what cuBLAS would: it finds the
memory each pointer points into (arrays registered by the fake cupy in use), reads the operands
as **column-major** matrices with the given leading dimensions and transpositions, reads alpha
and beta from host memory in the compute type's scale type, computes in the compute type
(float32 for ``CUBLAS_COMPUTE_32F``, inputs rounded to TF32 for ``..._FAST_TF32``, float64 for
``CUBLAS_COMPUTE_64F``) and rounds into C's data type. So a wrong transposition, leading
dimension, batch stride, m/n/k, operand order, data type or scalar type gives a wrong result (or the error
cuBLAS would give: an invalid leading dimension, a type combination cuBLAS does not support, a
read past the end of an allocation) rather than passing unnoticed.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np

from engine.kernels.cuda import gemm as g

OP_N, OP_T = g.CUBLAS_OP_N, g.CUBLAS_OP_T
# (data type, compute type) pairs this engine may pass, each with what the fake computes in
# (cuBLAS's table of cublasGemmEx combinations allows these; anything else is refused here).
SUPPORTED = {
    (g.CUDA_R_16F, g.CUBLAS_COMPUTE_32F): "float32", (g.CUDA_R_16BF, g.CUBLAS_COMPUTE_32F): "float32",
    (g.CUDA_R_32F, g.CUBLAS_COMPUTE_32F): "float32", (g.CUDA_R_32F, g.CUBLAS_COMPUTE_32F_PEDANTIC): "float32",
    (g.CUDA_R_32F, g.CUBLAS_COMPUTE_32F_FAST_TF32): "tf32", (g.CUDA_R_64F, g.CUBLAS_COMPUTE_64F): "float64",
}
DTYPE_NAMES = {value: name for name, value in g.DATA_TYPES.items()}


class FakeCublasError(RuntimeError):
    """What cuBLAS would return instead of CUBLAS_STATUS_SUCCESS (or a GPU's illegal address)."""


def round_to_tf32(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (10 explicit mantissa bits), to nearest even, as the tensor cores read them."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return rounded.view(np.float32)


class FakeCublas:
    """cuBLAS's ``set_stream`` and ``gemm_ex`` over the memory that ``resolve`` finds.

    Args:
        resolve: ``resolve(ptr, dtype) -> (flat, device_id)``: the memory from ``ptr`` to the end of
            its allocation as a 1-D numpy array of ``dtype`` (raising if the allocation holds another
            dtype), and the device it lives on.
        handle_device: ``handle_device(handle) -> device id`` of a cuBLAS handle.
        run: ``run(c_ptr, compute)``: how a call's write into C happens (default: at once). A fake
            with stream capture records it so that a replay computes it again.
    """

    def __init__(self, resolve, handle_device, run=None):
        self.resolve, self.handle_device = resolve, handle_device
        self.run = run or (lambda c_ptr, compute: compute())
        self.streams: dict[int, int] = {}  # handle -> the stream last set on it
        self.calls: list = []  # one namespace per gemm_ex / gemm_strided_batched_ex call
        self.workspaces: dict[int, tuple | None] = {}  # handle -> (pointer, bytes) in effect, None: cuBLAS's own
        self.workspace_calls: list = []  # (handle, stream, pointer, bytes) per set_workspace call

    def set_stream(self, handle, stream):
        self.streams[int(handle)] = int(stream)
        self.workspaces[int(handle)] = None  # cublasSetStream resets the workspace to cuBLAS's own pool
        return 0  # CUBLAS_STATUS_SUCCESS

    def set_workspace(self, handle, workspace, size):
        """``cublasSetWorkspace_v2``: the memory must be a live allocation of at least ``size`` bytes."""
        flat, _ = self.resolve(int(workspace), np.uint8)
        if flat.size < size:
            raise FakeCublasError(f"an illegal address: a {size}-byte workspace at {int(workspace):#x} runs past the "
                                  f"end of its allocation ({flat.size} bytes)")
        self.workspaces[int(handle)] = (int(workspace), int(size))
        self.workspace_calls.append((int(handle), self.streams.get(int(handle)), int(workspace), int(size)))
        return 0

    def gemm_ex(self, handle, transa, transb, m, n, k, alpha, a_ptr, a_type, lda, b_ptr, b_type, ldb, beta, c_ptr,
                c_type, ldc, compute_type, algo):
        return self._gemm(handle, transa, transb, m, n, k, alpha, (a_ptr, a_type, lda, 0), (b_ptr, b_type, ldb, 0),
                          beta, (c_ptr, c_type, ldc, 0), 1, compute_type, algo)

    def gemm_strided_batched_ex(self, handle, transa, transb, m, n, k, alpha, a_ptr, a_type, lda, stride_a, b_ptr,
                                b_type, ldb, stride_b, beta, c_ptr, c_type, ldc, stride_c, batch_count, compute_type,
                                algo):
        """``cublasGemmStridedBatchedEx``: matrix i of A, B and C starts ``i * stride`` elements after the first
        (a stride of 0 reuses one matrix; C's matrices must not overlap, as cuBLAS requires)."""
        if batch_count < 0 or min(stride_a, stride_b) < 0 or (
                batch_count > 1 and m * n and stride_c < (n - 1) * ldc + m):
            raise FakeCublasError(f"CUBLAS_STATUS_INVALID_VALUE: batch_count={batch_count}, strides {stride_a}, "
                                  f"{stride_b}, {stride_c} (C's matrices overlap?)")
        return self._gemm(handle, transa, transb, m, n, k, alpha, (a_ptr, a_type, lda, stride_a),
                          (b_ptr, b_type, ldb, stride_b), beta, (c_ptr, c_type, ldc, stride_c), batch_count,
                          compute_type, algo)

    def _gemm(self, handle, transa, transb, m, n, k, alpha, a_spec, b_spec, beta, c_spec, batch, compute_type, algo):
        (a_ptr, a_type, lda, stride_a), (b_ptr, b_type, ldb, stride_b) = a_spec, b_spec
        c_ptr, c_type, ldc, stride_c = c_spec
        if transa not in (OP_N, OP_T) or transb not in (OP_N, OP_T) or min(m, n, k) < 0:
            raise FakeCublasError("CUBLAS_STATUS_INVALID_VALUE: transa/transb/m/n/k")
        rows_a, rows_b = (m if transa == OP_N else k), (k if transb == OP_N else n)
        if lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
            raise FakeCublasError(f"CUBLAS_STATUS_INVALID_VALUE: lda={lda}, ldb={ldb}, ldc={ldc} for m={m}, n={n}, "
                                  f"k={k}, transa={transa}, transb={transb}")
        if not a_type == b_type == c_type or (c_type, compute_type) not in SUPPORTED:
            raise FakeCublasError(f"CUBLAS_STATUS_NOT_SUPPORTED: types {a_type}, {b_type}, {c_type} with compute "
                                  f"type {compute_type}")
        if algo not in (g.CUBLAS_GEMM_DEFAULT, g.CUBLAS_GEMM_DEFAULT_TENSOR_OP):
            raise FakeCublasError(f"CUBLAS_STATUS_INVALID_VALUE: algo {algo}")
        mode = SUPPORTED[(c_type, compute_type)]
        dtype = _dtype(DTYPE_NAMES[c_type])
        scale = np.float64 if mode == "float64" else np.float32
        alpha_v, beta_v = _host_scalar(alpha, scale), _host_scalar(beta, scale)
        a, a_dev = self._matrices(a_ptr, dtype, (m, k) if transa == OP_N else (k, m), lda, stride_a, batch)
        b, b_dev = self._matrices(b_ptr, dtype, (k, n) if transb == OP_N else (n, k), ldb, stride_b, batch)
        c, c_dev = self._matrices(c_ptr, dtype, (m, n), ldc, stride_c, batch)
        call = types.SimpleNamespace(handle=int(handle), stream=self.streams.get(int(handle)),
                                     handle_device=self.handle_device(int(handle)), transa=transa, transb=transb,
                                     m=m, n=n, k=k, lda=lda, ldb=ldb, ldc=ldc, data_type=c_type,
                                     compute_type=compute_type, algo=algo, alpha=alpha_v, beta=beta_v,
                                     devices=(a_dev, b_dev, c_dev), batch=batch,
                                     strides=(stride_a, stride_b, stride_c),
                                     workspace=self.workspaces.get(int(handle)))
        self.calls.append(call)

        def compute():
            op_a = a if transa == OP_N else a.swapaxes(-1, -2)
            op_b = b if transb == OP_N else b.swapaxes(-1, -2)
            work = np.float64 if mode == "float64" else np.float32
            op_a, op_b = op_a.astype(work), op_b.astype(work)
            if mode == "tf32":
                op_a, op_b = round_to_tf32(op_a), round_to_tf32(op_b)
            with np.errstate(all="ignore"):  # the GPU does not warn about inf or NaN either
                result = scale(alpha_v) * (op_a @ op_b)
                if beta_v != 0:  # beta == 0: C is not read (it may hold NaN), as cuBLAS documents
                    result = result + scale(beta_v) * c.astype(work)
                c[...] = result.astype(dtype)

        self.run(c_ptr, compute)
        return 0  # CUBLAS_STATUS_SUCCESS (the call is in ``calls``)

    def _matrices(self, ptr, dtype, shape, ld, stride, batch):
        """``batch`` column-major (rows, cols) matrices at ``ptr``, ``stride`` elements apart, as one writable
        (batch, rows, cols) view (or a (rows, cols) view when ``batch`` is 1, as gemm_ex reads)."""
        rows, cols = shape
        flat, device = self.resolve(int(ptr), dtype)
        last = (rows - 1) + (cols - 1) * ld + (batch - 1) * stride
        if rows and cols and batch and last >= flat.size:
            raise FakeCublasError(f"an illegal address: {batch} {rows}x{cols} matrices with ld={ld}, stride={stride} "
                                  f"read past the end of their allocation ({flat.size} elements from the pointer)")
        size = flat.itemsize
        if batch == 1:
            return np.lib.stride_tricks.as_strided(flat, (rows, cols), (size, ld * size)), device
        return np.lib.stride_tricks.as_strided(flat, (batch, rows, cols), (stride * size, size, ld * size)), device

def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _host_scalar(ptr, dtype) -> float:
    """The ``dtype`` value at host address ``ptr`` (CUBLAS_POINTER_MODE_HOST)."""
    size = np.dtype(dtype).itemsize
    return float(np.frombuffer((ctypes.c_char * size).from_address(int(ptr)), dtype)[0])


class BufferRegistry:
    """Allocations by address, for :class:`FakeCublas`'s ``resolve``: (start, host array, device)."""

    def __init__(self):
        self.buffers: list = []

    def add(self, start: int, host: np.ndarray, device_id: int) -> None:
        self.buffers.append((int(start), host, device_id))

    def resolve(self, ptr: int, dtype):
        for start, host, device in reversed(self.buffers):  # the latest allocation at an address wins
            if start <= ptr < start + max(host.nbytes, 1):
                if host.dtype != np.dtype(dtype):
                    raise FakeCublasError(f"the data type says {np.dtype(dtype)} but the memory at {ptr:#x} holds "
                                          f"{host.dtype}")
                offset, rem = divmod(ptr - start, host.itemsize)
                if rem:
                    raise FakeCublasError(f"a misaligned pointer {ptr:#x}")
                return host.reshape(-1)[offset:], device
        raise FakeCublasError(f"an illegal address: {ptr:#x} is in no allocation")

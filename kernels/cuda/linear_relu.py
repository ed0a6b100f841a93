"""Linear + ReLU on cupy arrays: cuBLAS GEMMs plus the fused CUDA C++ stages of linear_relu.cu.

Forward: ``y = x @ weight.T`` is one ``cublasGemmEx`` call (kernels/cuda/gemm.py: cuBLAS itself,
not ``cupy.matmul``'s dispatch; float32 GEMMs follow the engine's matmul precision through cupy's
compute type), then ONE kernel adds the bias and applies ReLU in place on ``y``. Backward: ONE
kernel reads ``dy`` and ``y`` once and writes ``g = dy * (y > 0)`` and per-block column sums of
``g``; a tiny kernel adds those up into ``db`` in a fixed order (no atomics: deterministic); then
``dx = g @ W`` and ``dW = g.T @ x`` are two more ``cublasGemmEx`` calls, every transposition a
cuBLAS flag (nothing is copied). Everything runs on the GPU the inputs live on, whichever device
is current, on cupy's current stream.

The bias is not folded into the GEMM: with ``beta = 1`` over a C pre-filled with the broadcast
bias, the fill is one more pass over y and the ReLU still needs its own, so the forward would move
more bytes, not fewer. cuBLASLt's ``RELU_BIAS`` epilogue would fold both, but cupy exposes no
cuBLASLt (docs/kernels/linear_relu.md).

float16 and bfloat16: ``cublasGemmEx`` with 16-bit A, B and C and ``CUBLAS_COMPUTE_32F`` (as
cupy's ``tensordot_core_v11``, tensor-core algorithm on sm_80+), so the tensor cores accumulate in
float32 and round once into the output. The bias + ReLU pass then reads that rounded y, adds the
bias in float32 and rounds again (a second rounding where a bias is given; torch's cuBLASLt
epilogue adds it before the first). The backward's column sums run in float32 and db is rounded once.

Cost model and launch configuration: docs/kernels/linear_relu.md.
"""

from __future__ import annotations

import functools

import numpy as np

from ..cpu.linear_relu import validate_backward, validate_forward
from ..cuda.module import current_device, function, on_device
from .gemm import matmul_into
from ..precision import accumulation_dtype, float_name

MODULE = "linear_relu"
# Entry-point suffix per dtype (the instantiations at the end of linear_relu.cu).
SUFFIXES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}


def _suffix(dtype) -> str:
    return SUFFIXES[float_name(dtype)]

_EPILOGUE_THREADS = 256
_BLOCKS_PER_SM = 8  # 8 x 256 threads = 2048, a full Hopper/Ampere SM
_COL_THREADS, _ROW_THREADS = 32, 8  # block of the backward prologue (kColThreads, kRowThreads)
# Blocks the backward prologue aims at. A constant, not a function of the device, so that db is
# summed in the same order (bit for bit the same result) on every GPU.
_PROLOGUE_TARGET_BLOCKS = 1024
_REDUCE_THREADS = 256


def linear_relu_forward(x, weight, bias=None):
    """``relu(x @ weight.T + bias)`` on the GPU (see kernels.linear_relu_forward)."""
    import cupy

    dtype = validate_forward(x, weight, bias)
    with on_device(x):  # allocate, multiply and launch on the inputs' GPU, whichever is current
        n, m = x.shape[0], weight.shape[0]
        y = cupy.empty((n, m), dtype=dtype)
        if y.size == 0:
            return y
        matmul_into(y, x, weight, trans_b=True)  # K == 0 gives zeros, as in numpy
        _bias_relu_inplace(y, bias)
        return y


def linear_relu_backward(grad_out, x, weight, out, *, compute_grad_x=True):
    """``(grad_x, grad_weight, grad_bias)`` on the GPU (see kernels.linear_relu_backward)."""
    import cupy

    dtype = validate_backward(grad_out, x, weight, out)
    with on_device(x):  # allocate, multiply and launch on the inputs' GPU, whichever is current
        n, k = x.shape
        m = weight.shape[0]
        if n == 0 or m == 0:
            # No rows or no outputs: every gradient is zero (or empty); nothing to launch.
            return (cupy.zeros((n, k), dtype=dtype) if compute_grad_x else None, cupy.zeros((m, k), dtype=dtype),
                    cupy.zeros(m, dtype=dtype))
        g = cupy.empty((n, m), dtype=dtype)
        grad_bias = _mask_and_bias_grad(grad_out, out, g)
        grad_x = cupy.empty((n, k), dtype=dtype) if compute_grad_x else None
        grad_weight = cupy.empty((m, k), dtype=dtype)
        if k:
            if compute_grad_x:
                matmul_into(grad_x, g, weight)
            matmul_into(grad_weight, g, x, trans_a=True)
        return grad_x, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------


def _lanes(dtype) -> int:
    """Elements per 16-byte vector access."""
    return 16 // np.dtype(dtype).itemsize


def _aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _bias_relu_inplace(y, bias) -> None:
    """One pass over the GEMM output: ``y = relu(y + bias)`` (called with y's device current)."""
    suffix = _suffix(y.dtype)
    lanes = _lanes(y.dtype)
    total, m = y.size, y.shape[1]
    # cupy allocations are 256-byte aligned, and y is ours: the flat vector walk is always legal.
    assert _aligned(y), "the output of cupy.empty is expected to be 16-byte aligned"
    work = max(total // lanes, total % lanes, 1)  # vectors, or the scalar tail when smaller
    blocks = min(-(-work // _EPILOGUE_THREADS), _sm_count(current_device()) * _BLOCKS_PER_SM)
    if bias is None:
        kernel, args = function(MODULE, f"linear_relu_fwd_epilogue_{suffix}"), (y, np.int64(total))
    else:
        vector_bias = m % lanes == 0 and _aligned(bias)
        name = f"linear_relu_fwd_epilogue_{'biasvec' if vector_bias else 'bias'}_{suffix}"
        kernel, args = function(MODULE, name), (y, bias, np.int64(total), np.int64(m))
    kernel((blocks,), (_EPILOGUE_THREADS,), args)


def _mask_and_bias_grad(grad_out, out, g):
    """Write ``g = grad_out * (out > 0)`` and return ``g.sum(0)``, reading grad_out and out once."""
    return _column_sums(grad_out, out, g)


def bias_grad(grad_out):
    """``grad_out.sum(0)`` for a C-contiguous (N, M) cupy array: a Linear's bias gradient, in
    grad_out's dtype (float32, float64, float16 or bfloat16), summed in float32 for 16-bit data and
    rounded once, in a fixed order (deterministic, no atomics). The column-sum pass of the
    linear_relu backward without its mask (``linear_relu_bwd_colsum*``) and the same reduction, with
    the same launch plan (so the same summation order): one launch for float32 / float64 when one
    block row covers the rows (N <= 8), else two, where ``cupy``'s ``sum(0)`` is one reduction
    launch with a much larger host cost. Capturable: no host read, no allocation outside cupy's
    current allocator. Called with any device current: it runs on grad_out's."""
    import cupy

    with on_device(grad_out):
        n, m = grad_out.shape
        if n == 0 or m == 0:
            return cupy.zeros(m, dtype=grad_out.dtype)
        return _column_sums(grad_out)


def _column_sums(grad_out, out=None, g=None):
    """``db``, the column sums of ``g`` (``grad_out`` masked by ``out > 0``, written to ``g``), or of
    ``grad_out`` itself when ``out`` is None: one column-sum pass, plus the fixed-order reduction of its
    per-block partial sums unless one block row sufficed for a float32 / float64 db."""
    import cupy

    dtype = grad_out.dtype
    suffix = _suffix(dtype)
    n, m = grad_out.shape
    lanes = _lanes(dtype)
    arrays = (grad_out,) if out is None else (grad_out, out, g)
    vector = m % lanes == 0 and _aligned(*arrays)
    cols_per_block = _COL_THREADS * (lanes if vector else 1)
    grid_x = -(-m // cols_per_block)
    grid_y = min(-(-n // _ROW_THREADS), max(1, _PROLOGUE_TARGET_BLOCKS // grid_x))
    grad_bias = cupy.empty(m, dtype=dtype)
    acc = accumulation_dtype(dtype)  # the partial sums' dtype: float32 for 16-bit g
    # One block row of float32 / float64: its column sums are db itself and the second kernel is
    # not needed. 16-bit db is rounded from the float32 sums by the second kernel.
    direct = grid_y == 1 and acc == dtype
    partial = grad_bias if direct else cupy.empty((grid_y, m), dtype=acc)
    if out is None:
        name, args = f"linear_relu_bwd_colsum_{'vec_' if vector else ''}{suffix}", (grad_out, partial)
    else:
        name, args = f"linear_relu_bwd_mask_db_{'vec_' if vector else ''}{suffix}", (grad_out, out, g, partial)
    function(MODULE, name)((grid_x, grid_y), (_COL_THREADS, _ROW_THREADS), (*args, np.int64(n), np.int64(m)))
    if not direct:
        blocks = -(-m // _REDUCE_THREADS)
        function(MODULE, f"linear_relu_bwd_db_reduce_{suffix}")(
            (blocks,), (_REDUCE_THREADS,), (partial, grad_bias, np.int64(grid_y), np.int64(m)))
    return grad_bias

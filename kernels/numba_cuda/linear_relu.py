"""numba.cuda impls of linear + ReLU: a tiled shared-memory GEMM with a fused bias+ReLU store.

- ``gemm``: C = op(A) @ op(B), op = identity or transpose (flags; the transposed operand is
  read straight from its row-major storage, never copied), TILE x TILE threads per block, one
  output element per thread, TILE x TILE tiles of op(A) and op(B) staged in shared memory per
  step of the K loop. Optional epilogue in the store: ``+ bias[col]`` then ReLU.
  Forward: y = relu(x @ W.T + b) is one launch (trans_b).
  Backward: dx = g @ W and dW = g.T @ x (trans_a) are two launches of the same kernel.
- ``mask_and_column_sums``: g = dy * (y > 0) and the column sums of g over the rows one block
  row visits, reduced over the block's 8 row-threads in shared memory (fixed tree);
  ``sum_partials`` adds the block-row partials in order into db (deterministic, no atomics).
  When one block row covers all rows, the partials are db and the second kernel is skipped.

The kernels are built per dtype (shared arrays need a compile-time dtype), and every constant is
of that dtype, so the float32 PTX has no float64 arithmetic (tests/kernels/test_gpu_compile.py).
Simulator-safe: shared memory and syncthreads only, no warp intrinsics.

float16 (numba.cuda has it; it has no bfloat16, so bfloat16 is refused with the registry's
KernelError and the registry sends it to the cupy impl): every load is widened to float32, the
tiles, sums and partial column sums are float32, each output is rounded once when stored
(``cvt.rn.f16.f32``); db always goes through the float32 partials and ``sum_partials``.

On a GPU the kernels take cupy arrays and launch on cupy's current stream; under the Numba CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) they take numpy arrays.

This is the readable GPU impl, not the fast one: one output per thread and 16 x 16 tiles make
about two shared-memory loads per FMA, far from cuBLAS; the ``cupy`` impl uses cuBLAS.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, types

from ..cpu.linear_relu import validate_backward, validate_forward
from ..numba_cuda.launch import launch
from ..registry import KernelError, check_dtype

TILE = 16
TILE_PAD = TILE + 1  # padded rows: the transposed tile stores hit 16 different banks
COL_THREADS, ROW_THREADS = 32, 8  # block of mask_and_column_sums
PROLOGUE_TARGET_BLOCKS = 1024  # a constant, so db's summation order does not depend on the GPU
REDUCE_THREADS = 256
MAX_GRID_Y = 65535


class _Kernels:
    """The jitted kernels of one storage dtype ``stype``, computing in ``ftype`` (float32 for float16)."""

    def __init__(self, stype, ftype):
        zero = ftype(0)
        one = ftype(1)
        wide = ftype  # a stored value widened (a no-op when stype is ftype)
        store = stype  # a computed value rounded once to the storage type

        @cuda.jit
        def gemm(a, b, c, bias, trans_a, trans_b, add_bias, relu):
            """c (P, Q) = op(a) (P, R) @ op(b) (R, Q), then optionally + bias[col], ReLU."""
            sa = cuda.shared.array((TILE, TILE_PAD), dtype=ftype)  # sa[i, k] = op(a)[row0 + i, k0 + k]
            sb = cuda.shared.array((TILE, TILE_PAD), dtype=ftype)  # sb[k, j] = op(b)[k0 + k, col0 + j]
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            row0 = cuda.blockIdx.y * TILE
            col0 = cuda.blockIdx.x * TILE
            p = c.shape[0]
            q = c.shape[1]
            r = a.shape[0] if trans_a else a.shape[1]
            acc = zero
            for k0 in range(0, r, TILE):
                # Each thread loads one element of each tile; consecutive tx read consecutive
                # addresses of the stored (row-major) array whether or not it is transposed.
                if trans_a:  # a is stored (R, P)
                    kk = k0 + ty
                    ii = row0 + tx
                    sa[tx, ty] = wide(a[kk, ii]) if kk < r and ii < p else zero
                else:  # a is stored (P, R)
                    ii = row0 + ty
                    kk = k0 + tx
                    sa[ty, tx] = wide(a[ii, kk]) if ii < p and kk < r else zero
                if trans_b:  # b is stored (Q, R)
                    jj = col0 + ty
                    kk = k0 + tx
                    sb[tx, ty] = wide(b[jj, kk]) if jj < q and kk < r else zero
                else:  # b is stored (R, Q)
                    kk = k0 + ty
                    jj = col0 + tx
                    sb[ty, tx] = wide(b[kk, jj]) if kk < r and jj < q else zero
                cuda.syncthreads()
                for k in range(TILE):
                    acc += sa[ty, k] * sb[k, tx]
                cuda.syncthreads()
            i = row0 + ty
            j = col0 + tx
            if i < p and j < q:
                if add_bias:
                    acc += wide(bias[j])
                if relu:
                    acc = zero if acc <= zero else acc  # NaN propagates, like np.maximum
                c[i, j] = store(acc)

        @cuda.jit
        def mask_and_column_sums(dy, y, g, partial):
            """g = dy * (y > 0); partial[blockIdx.y, col] = sum of g over this block row's rows (ftype)."""
            sums = cuda.shared.array((ROW_THREADS, COL_THREADS), dtype=ftype)
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            n = dy.shape[0]
            m = dy.shape[1]
            col = cuda.blockIdx.x * COL_THREADS + tx
            acc = zero
            if col < m:
                for row in range(cuda.blockIdx.y * ROW_THREADS + ty, n, cuda.gridDim.y * ROW_THREADS):
                    v = wide(dy[row, col]) * (one if wide(y[row, col]) > zero else zero)  # a product, as in numpy
                    g[row, col] = store(v)  # exact: dy times 0 or 1
                    acc += v
            sums[ty, tx] = acc
            cuda.syncthreads()
            half = ROW_THREADS // 2
            while half > 0:
                if ty < half:
                    sums[ty, tx] += sums[ty + half, tx]
                cuda.syncthreads()
                half //= 2
            if ty == 0 and col < m:
                partial[cuda.blockIdx.y, col] = sums[0, tx]

        @cuda.jit
        def sum_partials(partial, db):
            """db[col] = sum over rows of partial[:, col] (ftype), in row order, rounded once to stype."""
            start = cuda.grid(1)
            stride = cuda.gridsize(1)
            for col in range(start, db.shape[0], stride):
                s = zero
                for row in range(partial.shape[0]):
                    s += partial[row, col]
                db[col] = store(s)

        self.gemm = gemm
        self.mask_and_column_sums = mask_and_column_sums
        self.sum_partials = sum_partials


_F32 = _Kernels(types.float32, types.float32)
_F64 = _Kernels(types.float64, types.float64)
_F16 = _Kernels(types.float16, types.float32)
_BY_DTYPE = {np.dtype(np.float32): _F32, np.dtype(np.float64): _F64, np.dtype(np.float16): _F16}
_ACC = {np.dtype(np.float32): np.float32, np.dtype(np.float64): np.float64, np.dtype(np.float16): np.float32}


def _signatures(dtype, acc) -> dict:
    mat, vec, acc_mat = types.Array(dtype, 2, "C"), types.Array(dtype, 1, "C"), types.Array(acc, 2, "C")
    flag = types.boolean
    return {
        "gemm": (mat, mat, mat, vec, flag, flag, flag, flag),
        "mask_and_column_sums": (mat, mat, mat, acc_mat),
        "sum_partials": (acc_mat, vec),
    }


# Every kernel, for float32, float64 and float16: compiled to sm_90 PTX by
# tests/kernels/test_gpu_compile.py (float32 and float16: no float64 arithmetic).
PTX_CHECKS = [
    (getattr(kernels, name), sig, str(dtype))
    for kernels, dtype, acc in ((_F32, types.float32, types.float32), (_F64, types.float64, types.float64),
                                (_F16, types.float16, types.float32))
    for name, sig in _signatures(dtype, acc).items()
]


def _kernels(kernel: str, dtype) -> _Kernels:
    """The kernels of ``dtype``; bfloat16 (no numba type) gets the registry's KernelError."""
    check_dtype(kernel, "numba_cuda", dtype)
    return _BY_DTYPE[np.dtype(dtype)]


# --------------------------------------------------------------------------------------------
# The impls
# --------------------------------------------------------------------------------------------


def linear_relu_forward(x, weight, bias=None):
    """``relu(x @ weight.T + bias)``: one launch of the tiled GEMM with its fused epilogue."""
    dtype = validate_forward(x, weight, bias)
    kernels = _kernels("linear_relu_forward", dtype)
    xp = _array_module(x)
    n, m = x.shape[0], weight.shape[0]
    y = xp.empty((n, m), dtype=dtype)
    if y.size:
        # Never read when add_bias is False. An input, not a view of y: the simulator copies
        # every host array back after the launch, and a stale view of y would overwrite y.
        placeholder = weight[0]
        _gemm(kernels, x, weight, y, bias if bias is not None else placeholder,
              trans_a=False, trans_b=True, add_bias=bias is not None, relu=True)
    return y


def linear_relu_backward(grad_out, x, weight, out, *, compute_grad_x=True):
    """``(grad_x, grad_weight, grad_bias)``: one fused mask + db pass, then two tiled GEMMs."""
    dtype = validate_backward(grad_out, x, weight, out)
    kernels = _kernels("linear_relu_backward", dtype)
    xp = _array_module(x)
    n, k = x.shape
    m = weight.shape[0]
    if n == 0 or m == 0:
        grad_x = xp.zeros((n, k), dtype=dtype) if compute_grad_x else None
        return grad_x, xp.zeros((m, k), dtype=dtype), xp.zeros(m, dtype=dtype)
    g = xp.empty((n, m), dtype=dtype)
    grad_bias = xp.empty(m, dtype=dtype)
    _mask_and_bias_grad(kernels, grad_out, out, g, grad_bias, xp)
    grad_x = xp.empty((n, k), dtype=dtype) if compute_grad_x else None
    grad_weight = xp.empty((m, k), dtype=dtype)
    if k:
        placeholder = weight[0]  # never read: no epilogue (an input: see linear_relu_forward)
        if compute_grad_x:
            _gemm(kernels, g, weight, grad_x, placeholder, trans_a=False, trans_b=False, add_bias=False,
                  relu=False)
        _gemm(kernels, g, x, grad_weight, placeholder, trans_a=True, trans_b=False, add_bias=False, relu=False)
    return grad_x, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------


def _array_module(a):
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _gemm(kernels, a, b, c, bias, *, trans_a, trans_b, add_bias, relu) -> None:
    p, q = c.shape
    grid = (-(-q // TILE), -(-p // TILE))
    if grid[1] > MAX_GRID_Y:
        raise KernelError(f"linear_relu (numba_cuda): {p} output rows exceed the tiled GEMM's grid "
                          f"limit ({MAX_GRID_Y * TILE}); use the cupy impl or split the batch")
    launch(kernels.gemm, grid, (TILE, TILE), (a, b, c, bias, trans_a, trans_b, add_bias, relu))


def _mask_and_bias_grad(kernels, grad_out, out, g, grad_bias, xp) -> None:
    n, m = g.shape
    grid_x = -(-m // COL_THREADS)
    grid_y = min(-(-n // ROW_THREADS), max(1, PROLOGUE_TARGET_BLOCKS // grid_x))
    acc = _ACC[np.dtype(g.dtype)]
    # One block row of float32 / float64: its column sums are db itself and the second kernel is
    # not needed. float16 db is rounded from the float32 partials by the second kernel.
    direct = grid_y == 1 and acc == g.dtype
    partial = grad_bias.reshape(1, m) if direct else xp.empty((grid_y, m), dtype=acc)
    launch(kernels.mask_and_column_sums, (grid_x, grid_y), (COL_THREADS, ROW_THREADS),
            (grad_out, out, g, partial))
    if not direct:
        launch(kernels.sum_partials, (-(-m // REDUCE_THREADS),), (REDUCE_THREADS,), (partial, grad_bias))

"""numba.cuda impl of layer norm, forward and backward (the math in kernels/cpu/layer_norm.py).

Written so that it also runs under the Numba CUDA simulator: no warp shuffles, block reductions
through shared memory and ``cuda.syncthreads`` (a power-of-two tree).

- forward: one block per row; a strided walk sums the row, a tree gives the mean; a second walk
  sums the squared deviations (two-pass: no E[x^2] - E[x]^2 cancellation), a tree gives rstd; a
  third walk writes y. The row is read three times (the later reads mostly from cache): the
  readable version, the cupy impl keeps the row in registers.
- backward: a grid of P blocks, block p walking rows p, p + P, ...; per row a strided walk sums g
  and g xhat (one tree for both), then a second walk writes dx. Each thread owns the same columns
  in every row, so it adds dy xhat and dy for them into row p of the (P, D) partials with no other
  writer (no atomics); ``col_reduce_kernel`` then sums the P partial rows into dweight and dbias.

The kernels are built per compute dtype with its constants frozen in, so the float32 kernels have
no float64 arithmetic (tests/kernels/test_gpu_compile.py reads their PTX). float16 x runs the
float32 build: every element is converted to float32 where it is read (``cv``), the statistics,
sums and partial rows are float32, mean and rstd are stored in float32, and y / dx round once to
float16 where they are stored; weight and bias may be float16 or float32 (numba compiles one
specialisation per argument types). numba.cuda has no bfloat16 type: a bfloat16 x gets the
registry's KernelError (kernels/declarations.py), and the registry's default for cupy arrays,
cupy, takes it.

On a GPU they take cupy arrays and launch on cupy's current stream; under the simulator they take
numpy arrays and run with at most 16 threads per block and a few blocks, so the strided walks, the
trees and the partial rows all run several steps on small inputs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from ..cpu.layer_norm import validate_layer_norm_backward, validate_layer_norm_forward
from ..numba_cuda.launch import launch, simulator
from ..registry import check_dtype

MAX_THREADS = 256  # threads per block on a GPU: the size of the shared reduction arrays
SIMULATOR_MAX_THREADS = 16
BACKWARD_BLOCKS = 512  # partial rows on a GPU (a few per SM), at most N
SIMULATOR_BACKWARD_BLOCKS = 3
REDUCE_THREADS = 256


def _build(nb_float, np_float):
    """The forward, backward and column-reduce kernels computing in one float dtype."""
    zero, one, inf, nan = np_float(0), np_float(1), np_float(np.inf), np_float(np.nan)
    cv = nb_float  # an element read as the compute dtype (a no-op on float32 / float64 arrays)

    # Device functions would need a driver to compile to PTX without a GPU (numba resolves the
    # current device), so the tree reductions are written out in each kernel.

    @cuda.jit
    def forward_kernel(x, weight, has_weight, bias, has_bias, eps, y, mean_out, rstd_out):
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        d = x.shape[1]
        fd = nb_float(d)
        sm = cuda.shared.array(MAX_THREADS, nb_float)
        s = zero
        for k in range(tid, d, nt):
            s += cv(x[row, k])
        sm[tid] = s
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                sm[tid] += sm[tid + stride]
            cuda.syncthreads()
            stride //= 2
        mu = sm[0] / fd
        cuda.syncthreads()  # everyone has read slot 0 before it is reused
        q = zero
        for k in range(tid, d, nt):
            c = cv(x[row, k]) - mu
            q += c * c
        sm[tid] = q
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                sm[tid] += sm[tid + stride]
            cuda.syncthreads()
            stride //= 2
        var_eps = sm[0] / fd + eps
        # var + eps <= 0 (eps = 0 on a constant row, or a negative eps): inf or NaN as 1 / sqrt gives
        # on the device and in PyTorch; spelled out because the simulator's math.sqrt and 1 / 0 raise
        r = one / math.sqrt(var_eps) if var_eps > zero else (inf if var_eps == zero else nan)
        if tid == 0:
            mean_out[row] = mu
            rstd_out[row] = r
        for k in range(tid, d, nt):
            v = (cv(x[row, k]) - mu) * r
            if has_weight:
                v *= cv(weight[k])
            if has_bias:
                v += cv(bias[k])
            y[row, k] = v  # one rounding, to y's dtype

    @cuda.jit
    def backward_kernel(dy, x, weight, has_weight, mean, rstd, weight_grads, dx, part_w, part_b):
        p = cuda.blockIdx.x
        parts = cuda.gridDim.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n, d = x.shape
        fd = nb_float(d)
        sm_g = cuda.shared.array(MAX_THREADS, nb_float)
        sm_gx = cuda.shared.array(MAX_THREADS, nb_float)
        if weight_grads:  # this block's partial row starts at zero; only this block writes it
            for k in range(tid, d, nt):
                part_w[p, k] = zero
                part_b[p, k] = zero
        for row in range(p, n, parts):  # the same trip count for every thread: barriers inside are safe
            mu = mean[row]
            r = rstd[row]
            sg = zero
            sgx = zero
            for k in range(tid, d, nt):
                xh = (cv(x[row, k]) - mu) * r
                dyk = cv(dy[row, k])
                g = dyk * cv(weight[k]) if has_weight else dyk
                sg += g
                sgx += g * xh
                if weight_grads:
                    part_w[p, k] += dyk * xh
                    part_b[p, k] += dyk
            sm_g[tid] = sg
            sm_gx[tid] = sgx
            cuda.syncthreads()
            stride = nt // 2
            while stride > 0:
                if tid < stride:
                    sm_g[tid] += sm_g[tid + stride]
                    sm_gx[tid] += sm_gx[tid + stride]
                cuda.syncthreads()
                stride //= 2
            c_g = sm_g[0] / fd
            c_gx = sm_gx[0] / fd
            cuda.syncthreads()  # slot 0 read by everyone before the next row overwrites it
            for k in range(tid, d, nt):
                xh = (cv(x[row, k]) - mu) * r
                dyk = cv(dy[row, k])
                g = dyk * cv(weight[k]) if has_weight else dyk
                dx[row, k] = r * (g - c_g - xh * c_gx)  # one rounding, to dx's dtype

    @cuda.jit
    def col_reduce_kernel(part_w, part_b, dweight, dbias):
        parts, d = part_w.shape
        for k in range(cuda.grid(1), d, cuda.gridsize(1)):
            sw = zero
            sb = zero
            for p in range(parts):
                sw += part_w[p, k]
                sb += part_b[p, k]
            dweight[k] = sw  # one rounding, to weight's dtype
            dbias[k] = sb

    return forward_kernel, backward_kernel, col_reduce_kernel


forward_f32, backward_f32, col_reduce_f32 = _build(types.float32, np.float32)
forward_f64, backward_f64, col_reduce_f64 = _build(types.float64, np.float64)
# Storage dtype of x -> its kernels (float16 computes in the float32 build).
KERNELS = {np.dtype(np.float32): (forward_f32, backward_f32, col_reduce_f32),
           np.dtype(np.float16): (forward_f32, backward_f32, col_reduce_f32),
           np.dtype(np.float64): (forward_f64, backward_f64, col_reduce_f64)}


def _signatures(x, w, c):
    """Argument types for x (and y, dy, dx) of dtype ``x``, weight / bias ``w``, compute dtype ``c``."""
    x2, w1, c1, c2 = types.Array(x, 2, "C"), types.Array(w, 1, "C"), types.Array(c, 1, "C"), types.Array(c, 2, "C")
    forward = (x2, w1, types.boolean, w1, types.boolean, c, x2, c1, c1)
    backward = (x2, x2, w1, types.boolean, c1, c1, types.boolean, x2, c2, c2)
    reduce = (c2, c2, w1, w1)
    return forward, backward, reduce


# Every kernel: compiled to sm_90 PTX by tests/kernels/test_gpu_compile.py (float32 and float16:
# no f64 ops). "float16-w32" is a float16 x with float32 weight and bias.
_F16, _F32, _F64 = types.float16, types.float32, types.float64
PTX_CHECKS = [
    (kernel, sig, name)
    for (x, w, c), name in (((_F32, _F32, _F32), "float32"), ((_F64, _F64, _F64), "float64"),
                            ((_F16, _F16, _F32), "float16"), ((_F16, _F32, _F32), "float16-w32"))
    for kernel, sig in zip(KERNELS[np.dtype(name.split("-")[0])], _signatures(x, w, c))
]


def _threads(d: int) -> int:
    cap = SIMULATOR_MAX_THREADS if simulator() else MAX_THREADS
    floor = 1 if simulator() else 32
    return min(cap, max(floor, 1 << (d - 1).bit_length()))


def _xp(spec):
    if spec.array_module == "cupy":
        import cupy

        return cupy
    return np


def layer_norm_forward(x, weight=None, bias=None, *, eps=1e-5):
    spec = validate_layer_norm_forward(x, weight, bias, eps=eps)
    check_dtype("layer_norm_forward", "numba_cuda", spec.dtype)  # bfloat16: no numba type
    xp = _xp(spec)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    y, mean, rstd = xp.empty((n, d), dt), xp.empty(n, ct), xp.empty(n, ct)
    if n == 0:
        return y, mean, rstd
    # Placeholders are their own (empty) arrays, never aliases: under the simulator every argument
    # is copied in and back out.
    w = weight if weight is not None else xp.empty(0, ct)
    b = bias if bias is not None else xp.empty(0, ct)
    forward, _, _ = KERNELS[dt]
    launch(forward, n, _threads(d), (x, w, weight is not None, b, bias is not None, ct.type(spec.eps), y, mean, rstd))
    return y, mean, rstd


def layer_norm_backward(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True):
    spec = validate_layer_norm_backward(grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads)
    check_dtype("layer_norm_backward", "numba_cuda", spec.dtype)  # bfloat16: no numba type
    xp = _xp(spec)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    dx = xp.empty((n, d), dt)
    wgrad = spec.weight_grads
    if n == 0:
        return (dx, xp.zeros(d, weight.dtype), xp.zeros(d, weight.dtype)) if wgrad else (dx, None, None)
    parts = min(n, SIMULATOR_BACKWARD_BLOCKS if simulator() else BACKWARD_BLOCKS)
    part_w = xp.empty((parts, d) if wgrad else (0, d), ct)  # partial sums in the compute dtype
    part_b = xp.empty((parts, d) if wgrad else (0, d), ct)
    w = weight if weight is not None else xp.empty(0, ct)
    _, backward, col_reduce = KERNELS[dt]
    launch(backward, parts, _threads(d), (grad_y, x, w, weight is not None, mean, rstd, wgrad, dx, part_w, part_b))
    if not wgrad:
        return dx, None, None
    dweight, dbias = xp.empty(d, weight.dtype), xp.empty(d, weight.dtype)
    threads = min(REDUCE_THREADS, SIMULATOR_MAX_THREADS) if simulator() else REDUCE_THREADS
    blocks = min(-(-d // threads), 2 if simulator() else 1024)
    launch(col_reduce, blocks, threads, (part_w, part_b, dweight, dbias))
    return dx, dweight, dbias

"""numba.cuda impl of softmax cross-entropy: loss and gradient in one launch, one block per row.

The streaming algorithm of kernels/cuda/softmax_cross_entropy.cu (``sce_stream``), written so that
it also runs under the Numba CUDA simulator: no warp shuffles, block reductions through shared
memory and ``cuda.syncthreads`` (a power-of-two tree). Per row:

1. each thread walks columns tid, tid + T, ... keeping an online max ``m`` and ``s = sum exp(z - m)``
   (rescaled when the max grows), plus ``sum u`` (the target mass, needed before the gradient);
   a tree reduction merges the (m, s) pairs;
2. each thread walks its columns again and writes ``grad = grad_scale (S p - u)``, accumulating
   ``sum u (z - m)`` for the loss; a second tree reduction, then thread 0 writes the loss.

Hard targets are checked first by ``target_range_kernel`` (device min / max of the non-ignored
targets into two int64s, one atomic pair per block), read at the next sync point
(kernels/deferred.py), which raises KernelError for a class index outside [0, C); meanwhile such a
row gets a NaN loss and a zero gradient. ``grad_scale`` is a one-element array read on the device.
The kernels are built per dtype with the dtype's constants frozen in, so the
float32 kernels have no float64 arithmetic (tests/kernels/test_gpu_compile.py reads their PTX).

float16 logits (numba.cuda has no bfloat16: the registry sends bfloat16 to cupy, and a direct call
gets its KernelError): every load is widened to float32, the sums and the loss are float32, each
gradient element is rounded once when stored; the scalars and grad_scale are float32.

On a GPU the kernels take cupy arrays and launch on cupy's current stream; under the simulator
(NUMBA_ENABLE_CUDASIM=1) they take numpy arrays and run with at most 16 threads per row, so that
the strided column loops and the tree reductions run several steps on small rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from numba import cuda, types

from ..numba_cuda.launch import launch, simulator
from .. import deferred
from ..cpu.softmax_cross_entropy import check_target_bounds, validate_denominator_out, validate_softmax_cross_entropy
from ..registry import check_dtype

MAX_THREADS = 256  # threads per row (block) on a GPU: the size of the shared reduction arrays
SIMULATOR_MAX_THREADS = 16
RANGE_THREADS = 256
INT64_MAX, INT64_MIN = np.int64(np.iinfo(np.int64).max), np.int64(np.iinfo(np.int64).min)


def _build(nb_store, nb_float, np_float):
    """The hard-target and soft-target row kernels for the storage type ``nb_store`` (logits, soft
    targets, weights, gradient), computing in ``nb_float`` (float32 for float16)."""
    lowest = np_float(np.finfo(np_float).min)
    zero, one = np_float(0), np_float(1)
    nan = np_float(np.nan)
    wide = nb_float  # a stored value widened (a no-op when the types agree)
    store = nb_store  # a computed value rounded once to the storage type

    # Device functions would need a driver to compile to PTX without a GPU (numba resolves the
    # current device), so the tree reductions are written out in each kernel.

    @cuda.jit
    def hard_kernel(logits, targets, weight, has_weight, ignore_index, one_minus_eps, eps_over_c, smooth,
                    grad_scale_at, compute_grad, loss, grad):
        grad_scale = grad_scale_at[0]  # on the device: an engine-computed scale is never read back
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        c = logits.shape[1]
        sm_m = cuda.shared.array(MAX_THREADS, nb_float)
        sm_s = cuda.shared.array(MAX_THREADS, nb_float)
        sm_u = cuda.shared.array(MAX_THREADS, nb_float)
        t = targets[row]
        if t == ignore_index:  # uniform across the block: no barrier is skipped by part of it
            if compute_grad:
                for k in range(tid, c, nt):
                    grad[row, k] = store(zero)
            if tid == 0:
                loss[row] = zero
            return
        if t < 0 or t >= c:  # reported by the deferred check; never read out of bounds, keep grads finite
            if compute_grad:
                for k in range(tid, c, nt):
                    grad[row, k] = store(zero)
            if tid == 0:
                loss[row] = nan
            return
        # Pass 1: online max / sum-exp, and sum_c (eps / C) w_c for smoothing (eps / C per term: the
        # plain sums can overflow where the loss does not).
        m = lowest
        s = zero
        su = zero
        for k in range(tid, c, nt):
            z = wide(logits[row, k])
            if z > m:
                # s == 0 before the first finite value: skip the rescale (m - z may overflow)
                s = s * math.exp(m - z) + one if s != zero else one
                m = z
            else:
                s += math.exp(z - m)
            if smooth:
                su += eps_over_c * (wide(weight[k]) if has_weight else one)
        sm_m[tid] = m
        sm_s[tid] = s
        sm_u[tid] = su
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:  # tree-merge (m, s, sum u) into slot 0
            if tid < stride:
                m1 = sm_m[tid]
                m2 = sm_m[tid + stride]
                mm = m1 if m1 >= m2 else m2
                s1 = sm_s[tid]
                s2 = sm_s[tid + stride]
                # an empty side (s == 0, m == lowest) adds nothing and skips an overflowing m - mm
                s1 = s1 * math.exp(m1 - mm) if s1 != zero else zero
                s2 = s2 * math.exp(m2 - mm) if s2 != zero else zero
                sm_s[tid] = s1 + s2
                sm_m[tid] = mm
                sm_u[tid] += sm_u[tid + stride]
            cuda.syncthreads()
            stride //= 2
        m = sm_m[0]
        s = sm_s[0]
        su = sm_u[0]
        w_t = wide(weight[t]) if has_weight else one
        hard = one_minus_eps * w_t
        big_s = hard + su
        # Pass 2: gradient, and sum_c (eps / C) w_c (z_c - m) for the smoothing part of the loss.
        coef = grad_scale * big_s / s
        acc = zero
        if compute_grad or smooth:
            for k in range(tid, c, nt):
                d = wide(logits[row, k]) - m
                uk = eps_over_c * (wide(weight[k]) if has_weight else one)
                if smooth:
                    acc += uk * d
                if compute_grad:
                    g = coef * math.exp(d)
                    if smooth:
                        g -= grad_scale * uk
                    if k == t:
                        g -= grad_scale * hard
                    grad[row, k] = store(g)
        cuda.syncthreads()  # everyone has read slot 0 of pass 1
        sm_s[tid] = acc
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                sm_s[tid] += sm_s[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            log_s = math.log(s)
            value = hard * (log_s - (wide(logits[row, t]) - m))
            if smooth:
                value += su * log_s - sm_s[0]
            loss[row] = value

    @cuda.jit
    def soft_kernel(logits, q, weight, has_weight, one_minus_eps, eps_over_c, grad_scale_at, compute_grad, loss,
                    grad):
        grad_scale = grad_scale_at[0]
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        c = logits.shape[1]
        sm_m = cuda.shared.array(MAX_THREADS, nb_float)
        sm_s = cuda.shared.array(MAX_THREADS, nb_float)
        sm_u = cuda.shared.array(MAX_THREADS, nb_float)
        m = lowest
        s = zero
        su = zero
        for k in range(tid, c, nt):
            z = wide(logits[row, k])
            if z > m:
                # s == 0 before the first finite value: skip the rescale (m - z may overflow)
                s = s * math.exp(m - z) + one if s != zero else one
                m = z
            else:
                s += math.exp(z - m)
            su += (one_minus_eps * wide(q[row, k]) + eps_over_c) * (wide(weight[k]) if has_weight else one)
        sm_m[tid] = m
        sm_s[tid] = s
        sm_u[tid] = su
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:  # tree-merge (m, s, sum u) into slot 0
            if tid < stride:
                m1 = sm_m[tid]
                m2 = sm_m[tid + stride]
                mm = m1 if m1 >= m2 else m2
                s1 = sm_s[tid]
                s2 = sm_s[tid + stride]
                # an empty side (s == 0, m == lowest) adds nothing and skips an overflowing m - mm
                s1 = s1 * math.exp(m1 - mm) if s1 != zero else zero
                s2 = s2 * math.exp(m2 - mm) if s2 != zero else zero
                sm_s[tid] = s1 + s2
                sm_m[tid] = mm
                sm_u[tid] += sm_u[tid + stride]
            cuda.syncthreads()
            stride //= 2
        m = sm_m[0]
        s = sm_s[0]
        su = sm_u[0]
        coef = grad_scale * su / s
        acc = zero
        for k in range(tid, c, nt):
            d = wide(logits[row, k]) - m
            u = (one_minus_eps * wide(q[row, k]) + eps_over_c) * (wide(weight[k]) if has_weight else one)
            acc += u * d
            if compute_grad:
                grad[row, k] = store(coef * math.exp(d) - grad_scale * u)
        cuda.syncthreads()
        sm_s[tid] = acc
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                sm_s[tid] += sm_s[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            loss[row] = su * math.log(s) - sm_s[0]

    return hard_kernel, soft_kernel


@cuda.jit
def target_range_kernel(targets, ignore_index, out):
    """out[0] = min, out[1] = max of targets != ignore_index (out preset to INT64_MAX, INT64_MIN)."""
    sm_lo = cuda.shared.array(RANGE_THREADS, types.int64)
    sm_hi = cuda.shared.array(RANGE_THREADS, types.int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lo = INT64_MAX
    hi = INT64_MIN
    for i in range(cuda.grid(1), targets.shape[0], cuda.gridsize(1)):
        t = types.int64(targets[i])
        if t != ignore_index:
            lo = min(lo, t)
            hi = max(hi, t)
    sm_lo[tid] = lo
    sm_hi[tid] = hi
    cuda.syncthreads()
    stride = nt // 2
    while stride > 0:
        if tid < stride:
            sm_lo[tid] = min(sm_lo[tid], sm_lo[tid + stride])
            sm_hi[tid] = max(sm_hi[tid], sm_hi[tid + stride])
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        cuda.atomic.min(out, 0, sm_lo[0])
        cuda.atomic.max(out, 1, sm_hi[0])


hard_kernel_f32, soft_kernel_f32 = _build(types.float32, types.float32, np.float32)
hard_kernel_f64, soft_kernel_f64 = _build(types.float64, types.float64, np.float64)
hard_kernel_f16, soft_kernel_f16 = _build(types.float16, types.float32, np.float32)
KERNELS = {np.dtype(np.float32): (hard_kernel_f32, soft_kernel_f32),
           np.dtype(np.float64): (hard_kernel_f64, soft_kernel_f64),
           np.dtype(np.float16): (hard_kernel_f16, soft_kernel_f16)}


def _hard_signature(s, index, f=None):
    """Storage type ``s``, accumulation type ``f`` (``s`` when not given)."""
    f = f or s
    a2, a1, f1 = types.Array(s, 2, "C"), types.Array(s, 1, "C"), types.Array(f, 1, "C")
    return (a2, types.Array(index, 1, "C"), a1, types.boolean, types.int64, f, f, types.boolean, f1, types.boolean,
            f1, a2)


def _soft_signature(s, f=None):
    f = f or s
    a2, a1, f1 = types.Array(s, 2, "C"), types.Array(s, 1, "C"), types.Array(f, 1, "C")
    return (a2, a2, a1, types.boolean, f, f, f1, types.boolean, f1, a2)


# Every kernel: compiled to sm_90 PTX by tests/kernels/test_gpu_compile.py (float32 and float16:
# no f64 ops).
PTX_CHECKS = [
    (hard_kernel_f32, _hard_signature(types.float32, types.int64), "float32"),
    (hard_kernel_f32, _hard_signature(types.float32, types.int32), "float32"),
    (soft_kernel_f32, _soft_signature(types.float32), "float32"),
    (hard_kernel_f16, _hard_signature(types.float16, types.int64, types.float32), "float16"),
    (soft_kernel_f16, _soft_signature(types.float16, types.float32), "float16"),
    (hard_kernel_f64, _hard_signature(types.float64, types.int64), "float64"),
    (soft_kernel_f64, _soft_signature(types.float64), "float64"),
    (target_range_kernel, (types.Array(types.int64, 1, "C"), types.int64, types.Array(types.int64, 1, "C")), "int64"),
    (target_range_kernel, (types.Array(types.int32, 1, "C"), types.int64, types.Array(types.int64, 1, "C")), "int32"),
]


def _threads_per_row(c: int) -> int:
    cap = SIMULATOR_MAX_THREADS if simulator() else MAX_THREADS
    floor = 1 if simulator() else 32
    return min(cap, max(floor, 1 << (c - 1).bit_length()))


def softmax_cross_entropy(logits, targets, weight=None, *, ignore_index=-100, label_smoothing=0.0, grad_scale=1.0,
                          compute_grad=True, denominator_out=None):
    spec = validate_softmax_cross_entropy(logits, targets, weight, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad_scale=grad_scale,
                                          compute_grad=compute_grad)
    validate_denominator_out(spec, logits, weight, grad_scale, denominator_out)
    if spec.array_module == "cupy":
        import cupy as xp
    else:
        xp = np
    if denominator_out is not None:  # the teaching impl counts with array ops (cupy's folds it into its check)
        acc = spec.acc_dtype
        denominator_out[...] = (targets != spec.ignore_index).sum(dtype=acc).reshape(denominator_out.shape)
        positive = denominator_out.reshape(1) > 0
        spec = dataclasses.replace(spec, grad_scale_array=(positive / xp.where(positive, denominator_out.reshape(1),
                                                                                acc.type(1))).astype(acc))
    check_dtype("softmax_cross_entropy", "numba_cuda", spec.dtype)  # bfloat16: no numba type
    n, c, dt, acc = spec.n, spec.c, spec.dtype, spec.acc_dtype
    loss = xp.empty(n, acc)  # float32 for float16 logits
    # Placeholders are their own (empty) arrays, never aliases: under the simulator every argument
    # is copied in and back out.
    grad = xp.empty((n, c), dt) if spec.compute_grad else xp.empty((0, c), dt)
    if n == 0:
        return loss, (grad if spec.compute_grad else None)
    has_weight = weight is not None
    w = weight if has_weight else xp.empty(0, dt)
    hard_kernel, soft_kernel = KERNELS[dt]
    scalar = acc.type
    threads = _threads_per_row(c)
    scale = spec.grad_scale_array if spec.grad_scale_array is not None else xp.full(1, spec.grad_scale, acc)
    if spec.soft:
        args = (logits, targets, w, has_weight, scalar(1.0 - spec.eps), scalar(spec.eps / c), scale,
                spec.compute_grad, loss, grad)
        launch(soft_kernel, n, threads, args)
    else:
        _check_targets(xp, targets, spec)
        args = (logits, targets, w, has_weight, np.int64(spec.ignore_index), scalar(1.0 - spec.eps),
                scalar(spec.eps / c), spec.eps > 0, scale, spec.compute_grad, loss, grad)
        launch(hard_kernel, n, threads, args)
    return loss, (grad if spec.compute_grad else None)


def _check_targets(xp, targets, spec) -> None:
    """Device min / max of the non-ignored targets, checked against [0, C) at the next sync
    (kernels/deferred.py; at once under the simulator, whose arrays are on the host)."""
    bounds = xp.full(2, INT64_MAX, dtype=np.int64)
    bounds[1] = INT64_MIN
    threads = min(RANGE_THREADS, SIMULATOR_MAX_THREADS) if simulator() else RANGE_THREADS
    blocks = min(-(-spec.n // threads), 2 if simulator() else 1024)
    launch(target_range_kernel, blocks, threads, (targets, np.int64(spec.ignore_index), bounds))
    deferred.defer(bounds, functools.partial(check_target_bounds, spec=spec, impl="numba_cuda"))

"""numba.cuda impl of attention: the readable version of attention.cu, one thread per row.

Runs under the Numba CUDA simulator (shared memory and syncthreads only, no warp intrinsics).

- ``forward_kernel``: a block of T threads takes T query rows of one batch row; per tile of T
  keys, the block stages k and v rows in shared memory (syncthreads), then each thread runs the
  online softmax over the tile for its row (running max, sum, an Ev accumulator in local memory).
- ``rowdot_kernel``: D_i = dO_i . out_i, one thread per row.
- ``dkdv_kernel``: a block takes T keys; per tile of T query rows (q, dO, lse, D staged in shared
  memory) each thread accumulates its key's dk and dv (P and dS recomputed from lse).
- ``dq_kernel``: a block takes T query rows; per tile of T keys (k, v staged) each thread
  accumulates its row's dq. Two kernels instead of atomics: simple, deterministic, at the cost of
  computing P and dP twice.

Head dims up to 128 (the local and shared arrays' size), float32 only: bfloat16 and float16 are
refused with a KernelError that names the cupy impl (numba has no bfloat16, and this impl stays
the plain readable one). ``precision`` is validated and otherwise moot: every product here is an
exact float32 multiply-add. Every constant is a float32 so the PTX has no float64 arithmetic
(tests/kernels/test_gpu_compile.py reads it).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from ..cpu.attention import (GPU_MAX_HEAD_DIM, check_gpu_limits, empty_backward, empty_forward, is_empty,
                                   validate_backward, validate_forward)
from ..numba_cuda.launch import launch, simulator
from ..registry import KernelError

TILE = 32  # threads per block = rows (or keys) per block = keys (or rows) per shared tile
SIMULATOR_TILE = 8
HD = GPU_MAX_HEAD_DIM
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0)
ONE = np.float32(1)


@cuda.jit
def forward_kernel(q, k, v, mask, has_mask, mask_per_batch, mask_per_row, scale, causal, out, lse):
    b = cuda.blockIdx.x  # batch rows on x: gridDim.y stops at 65535, B = batch * heads may not
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    i = cuda.blockIdx.y * nt + t
    nl, ne = q.shape[1], q.shape[2]
    ns, nev = k.shape[1], v.shape[2]
    ks = cuda.shared.array((TILE, HD), types.float32)
    vs = cuda.shared.array((TILE, HD), types.float32)
    acc = cuda.local.array(HD, types.float32)
    for x in range(nev):
        acc[x] = ZERO
    m = NEG_INF
    total = ZERO
    mb = b if mask_per_batch else 0
    mi = i if mask_per_row else 0
    for j0 in range(0, ns, nt):
        cuda.syncthreads()  # the previous tile is consumed
        j = j0 + t
        if j < ns:
            for x in range(ne):
                ks[t, x] = k[b, j, x]
            for x in range(nev):
                vs[t, x] = v[b, j, x]
        cuda.syncthreads()
        if i < nl:
            for jj in range(min(nt, ns - j0)):
                j = j0 + jj
                if causal and j > i:
                    break
                s = ZERO
                for x in range(ne):
                    s += q[b, i, x] * ks[jj, x]
                s = s * scale
                if has_mask:
                    s += mask[mb, mi, j]
                if s == NEG_INF:  # masked: p = 0, but 0 * v is NaN for a non-finite v (PyTorch's P @ V)
                    for x in range(nev):
                        acc[x] += ZERO * vs[jj, x]
                    continue
                # a new max: rescale what is summed so far (0 while nothing was seen); a NaN score
                # never is one, but its p below is NaN, and so is the row
                if s > m:
                    alpha = math.exp(m - s)
                    total = total * alpha
                    for x in range(nev):
                        acc[x] = acc[x] * alpha
                    m = s
                p = math.exp(s - m)
                total += p
                for x in range(nev):
                    acc[x] += p * vs[jj, x]
    if i < nl:
        if total == ZERO:  # fully masked row: out = sum 0 * v (0, or NaN where v is not finite)
            for x in range(nev):
                out[b, i, x] = acc[x]
            lse[b, i] = NEG_INF
        else:  # total NaN (a NaN or +inf score): out and lse NaN, as in PyTorch
            inv = ONE / total
            for x in range(nev):
                out[b, i, x] = acc[x] * inv
            lse[b, i] = m + math.log(total)


@cuda.jit
def rowdot_kernel(grad_out, out, rowdot):
    b = cuda.blockIdx.x  # batch rows on x: gridDim.y stops at 65535, B = batch * heads may not
    i = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.shape[1]:
        d = ZERO
        for x in range(out.shape[2]):
            d += grad_out[b, i, x] * out[b, i, x]
        rowdot[b, i] = d


@cuda.jit
def dkdv_kernel(grad_out, q, k, v, lse, rowdot, mask, has_mask, mask_per_batch, mask_per_row, scale, causal, dk,
                dv):
    b = cuda.blockIdx.x  # batch rows on x: gridDim.y stops at 65535, B = batch * heads may not
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    j = cuda.blockIdx.y * nt + t
    nl, ne = q.shape[1], q.shape[2]
    ns, nev = k.shape[1], v.shape[2]
    qs = cuda.shared.array((TILE, HD), types.float32)
    dos = cuda.shared.array((TILE, HD), types.float32)
    ls = cuda.shared.array(TILE, types.float32)
    ds_ = cuda.shared.array(TILE, types.float32)
    dka = cuda.local.array(HD, types.float32)
    dva = cuda.local.array(HD, types.float32)
    for x in range(ne):
        dka[x] = ZERO
    for x in range(nev):
        dva[x] = ZERO
    mb = b if mask_per_batch else 0
    for i0 in range(0, nl, nt):
        cuda.syncthreads()
        i = i0 + t
        if i < nl:
            for x in range(ne):
                qs[t, x] = q[b, i, x]
            for x in range(nev):
                dos[t, x] = grad_out[b, i, x]
            ls[t] = lse[b, i]
            ds_[t] = rowdot[b, i]
        cuda.syncthreads()
        if j < ns:
            for ii in range(min(nt, nl - i0)):
                i = i0 + ii
                li = ls[ii]
                if causal and j > i:
                    continue
                s = ZERO
                dp = ZERO
                for x in range(ne):
                    s += qs[ii, x] * k[b, j, x]
                for x in range(nev):
                    dp += dos[ii, x] * v[b, j, x]
                s = s * scale
                if has_mask:
                    s += mask[mb, i if mask_per_row else 0, j]
                p = ZERO if li == NEG_INF else math.exp(s - li)  # fully masked row: P = 0
                ds = p * (dp - ds_[ii]) * scale  # 0 times a NaN dP - D stays NaN, as in PyTorch
                for x in range(nev):
                    dva[x] += p * dos[ii, x]
                for x in range(ne):
                    dka[x] += ds * qs[ii, x]
    if j < ns:
        for x in range(ne):
            dk[b, j, x] = dka[x]
        for x in range(nev):
            dv[b, j, x] = dva[x]


@cuda.jit
def dq_kernel(grad_out, q, k, v, lse, rowdot, mask, has_mask, mask_per_batch, mask_per_row, scale, causal, dq):
    b = cuda.blockIdx.x  # batch rows on x: gridDim.y stops at 65535, B = batch * heads may not
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    i = cuda.blockIdx.y * nt + t
    nl, ne = q.shape[1], q.shape[2]
    ns, nev = k.shape[1], v.shape[2]
    ks = cuda.shared.array((TILE, HD), types.float32)
    vs = cuda.shared.array((TILE, HD), types.float32)
    dqa = cuda.local.array(HD, types.float32)
    for x in range(ne):
        dqa[x] = ZERO
    li = lse[b, i] if i < nl else NEG_INF
    d_i = rowdot[b, i] if i < nl else ZERO
    mb = b if mask_per_batch else 0
    mi = i if mask_per_row else 0
    for j0 in range(0, ns, nt):
        cuda.syncthreads()
        j = j0 + t
        if j < ns:
            for x in range(ne):
                ks[t, x] = k[b, j, x]
            for x in range(nev):
                vs[t, x] = v[b, j, x]
        cuda.syncthreads()
        if i < nl:
            for jj in range(min(nt, ns - j0)):
                j = j0 + jj
                if causal and j > i:
                    break
                s = ZERO
                dp = ZERO
                for x in range(ne):
                    s += q[b, i, x] * ks[jj, x]
                for x in range(nev):
                    dp += grad_out[b, i, x] * vs[jj, x]
                s = s * scale
                if has_mask:
                    s += mask[mb, mi, j]
                p = ZERO if li == NEG_INF else math.exp(s - li)  # fully masked row: P = 0
                ds = p * (dp - d_i) * scale  # 0 times a NaN dP - D stays NaN, as in PyTorch
                for x in range(ne):
                    dqa[x] += ds * ks[jj, x]
    if i < nl:
        for x in range(ne):
            dq[b, i, x] = dqa[x]


def _xp(spec):
    if spec.array_module == "cupy":
        import cupy

        return cupy
    return np


def _mask_args(mask, spec, xp):
    # A placeholder of its own (never an alias): under the simulator arguments are copied in and out.
    m = mask if mask is not None else xp.zeros((1, 1, 1), np.float32)
    return m, mask is not None, spec.mask_b > 1, spec.mask_l > 1


def _tile() -> int:
    return SIMULATOR_TILE if simulator() else TILE


def _check_float32(spec, op):
    check_gpu_limits(spec, op, "numba_cuda")
    if spec.dtype != np.float32:
        raise KernelError(f"{op} (numba_cuda): dtype {spec.dtype} is not supported by this impl, which takes "
                          f"float32 only (q ({spec.b}, {spec.l}, {spec.e})); bfloat16 and float16 run on the "
                          "cupy impl (impl='cupy', the default for GPU arrays)")


def attention_forward(q, k, v, mask=None, *, scale=None, causal=False, precision=None):
    spec = validate_forward(q, k, v, mask, scale=scale, causal=causal, precision=precision)
    _check_float32(spec, "attention_forward")
    xp = _xp(spec)
    if is_empty(spec):
        return empty_forward(spec, xp)
    out = xp.empty((spec.b, spec.l, spec.ev), np.float32)
    lse = xp.empty((spec.b, spec.l), np.float32)
    tile = _tile()
    launch(forward_kernel, (spec.b, -(-spec.l // tile)), tile,
           (q, k, v, *_mask_args(mask, spec, xp), np.float32(spec.scale), spec.causal, out, lse))
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None):
    spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal, precision=precision)
    _check_float32(spec, "attention_backward")
    xp = _xp(spec)
    if is_empty(spec):
        return empty_backward(spec, xp)
    tile = _tile()
    rowdot = xp.empty((spec.b, spec.l), np.float32)
    launch(rowdot_kernel, (spec.b, -(-spec.l // tile)), tile, (grad_out, out, rowdot))
    dq = xp.empty((spec.b, spec.l, spec.e), np.float32)
    dk = xp.empty((spec.b, spec.s, spec.e), np.float32)
    dv = xp.empty((spec.b, spec.s, spec.ev), np.float32)
    masks = _mask_args(mask, spec, xp)
    scale32 = np.float32(spec.scale)
    launch(dkdv_kernel, (spec.b, -(-spec.s // tile)), tile,
           (grad_out, q, k, v, lse, rowdot, *masks, scale32, spec.causal, dk, dv))
    launch(dq_kernel, (spec.b, -(-spec.l // tile)), tile,
           (grad_out, q, k, v, lse, rowdot, *masks, scale32, spec.causal, dq))
    return dq, dk, dv


def _signatures():
    f32 = types.float32
    a3, a2 = types.Array(f32, 3, "C"), types.Array(f32, 2, "C")
    flags = (types.boolean, types.boolean, types.boolean)
    return [
        (forward_kernel, (a3, a3, a3, a3, *flags, f32, types.boolean, a3, a2), "float32"),
        (rowdot_kernel, (a3, a3, a2), "float32"),
        (dkdv_kernel, (a3, a3, a3, a3, a2, a2, a3, *flags, f32, types.boolean, a3, a3), "float32"),
        (dq_kernel, (a3, a3, a3, a3, a2, a2, a3, *flags, f32, types.boolean, a3), "float32"),
    ]


# Every kernel: compiled to sm_90 PTX by tests/kernels/test_gpu_compile.py (float32: no f64 ops).
PTX_CHECKS = _signatures()

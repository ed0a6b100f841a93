"""Attention on cupy arrays: the CUDA C++ kernels of attention.cu (see there for the tiling).

forward: one launch of ``attn_fwd_hd<HD>`` (HD = 32, 64 or 128, the smallest that holds E and
Ev); saves nothing but out and lse. backward: ``attn_bwd_rowdot`` (D = rowsum(dO * out)), then
one launch of ``attn_bwd_hd<HD>`` over key tiles, with dq accumulated by atomics into a zeroed
array. Math, mask shapes and fully masked rows: kernels/cpu/attention.py. float32 only, head
dims <= 128 (KernelError otherwise, from :func:`check_gpu_limits`).
"""

from __future__ import annotations

import numpy as np

from kernels.cpu.attention import (check_gpu_limits, empty_backward, empty_forward, is_empty, validate_backward,
                                   validate_forward)
from kernels.cuda.module import on_device
from kernels.registry import KernelError

MODULE = "attention"
THREADS = 128
FWD_ROWS = 32  # query rows per forward block (attention.cu)
BWD_KEYS = 32  # keys per backward block
HEAD_DIMS = (32, 64, 128)


def head_dim_bucket(e: int, ev: int) -> int:
    """The kernel instance for head dims e, ev: the smallest HD in HEAD_DIMS >= both."""
    return next(hd for hd in HEAD_DIMS if hd >= max(e, ev))


MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535


def launch_grid(batch: int, rows: int, per_block: int, op: str) -> tuple[int, int]:
    """The grid of attn_fwd / attn_bwd: batch rows along x, tiles of ``per_block`` rows along y.

    B (batch * heads) goes along x, whose limit is 2^31 - 1: along y it would stop at 65535.
    """
    tiles = -(-rows // per_block)
    if batch > MAX_GRID_X or tiles > MAX_GRID_Y:
        raise KernelError(f"{op} (cupy): B = {batch} batch rows of {rows} rows need a ({batch}, {tiles}) grid, "
                          f"over CUDA's limits ({MAX_GRID_X}, {MAX_GRID_Y}); split the batch or the sequence")
    return batch, tiles


def _mask_args(mask, spec, placeholder):
    bs, ls = spec.mask_strides
    return (mask if mask is not None else placeholder), np.int64(bs), np.int64(ls), np.int32(mask is not None)


def attention_forward(q, k, v, mask=None, *, scale=None, causal=False):
    with on_device(q):
        import cupy

        from kernels.cuda.module import function

        spec = validate_forward(q, k, v, mask, scale=scale, causal=causal)
        check_gpu_limits(spec, "attention_forward", "cupy")
        if is_empty(spec):
            return empty_forward(spec, cupy)
        out = cupy.empty((spec.b, spec.l, spec.ev), np.float32)
        lse = cupy.empty((spec.b, spec.l), np.float32)
        hd = head_dim_bucket(spec.e, spec.ev)
        m, bs, ls, has = _mask_args(mask, spec, q)
        args = (q, k, v, m, out, lse, np.int32(spec.l), np.int32(spec.s), np.int32(spec.e), np.int32(spec.ev),
                bs, ls, has, np.int32(spec.causal), np.float32(spec.scale))
        grid = launch_grid(spec.b, spec.l, FWD_ROWS, "attention_forward")
        function(MODULE, f"attn_fwd_hd{hd}")(grid, (THREADS,), args)
        return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False):
    with on_device(q):
        import cupy

        from kernels.cuda.module import function

        spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
        check_gpu_limits(spec, "attention_backward", "cupy")
        if is_empty(spec):
            return empty_backward(spec, cupy)
        rows = spec.b * spec.l
        rowdot = cupy.empty((spec.b, spec.l), np.float32)
        function(MODULE, "attn_bwd_rowdot")((-(-rows // 8),), (256,), (grad_out, out, rowdot, np.int64(rows),
                                                                         np.int32(spec.ev)))
        dq = cupy.zeros((spec.b, spec.l, spec.e), np.float32)  # accumulated by atomics
        dk = cupy.empty((spec.b, spec.s, spec.e), np.float32)
        dv = cupy.empty((spec.b, spec.s, spec.ev), np.float32)
        hd = head_dim_bucket(spec.e, spec.ev)
        m, bs, ls, has = _mask_args(mask, spec, q)
        args = (q, k, v, m, grad_out, lse, rowdot, dq, dk, dv, np.int32(spec.l), np.int32(spec.s),
                np.int32(spec.e), np.int32(spec.ev), bs, ls, has, np.int32(spec.causal), np.float32(spec.scale))
        grid = launch_grid(spec.b, spec.s, BWD_KEYS, "attention_backward")
        function(MODULE, f"attn_bwd_hd{hd}")(grid, (THREADS,), args)
        return dq, dk, dv

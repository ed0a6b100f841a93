"""Attention on cupy arrays: the CUDA C++ kernels of attention.cu and attention_tc.cu.

forward, by dtype, head dims and ``precision`` (:func:`forward_plan`):

- **tensor cores** (attention_tc.cu, ``attn_tc_fwd_<dtype>_hd<HD>``): E = Ev = HD in {64, 128},
  q, k, v 16-byte aligned. bfloat16 / float16 by default (mma.sync m16n8k16, fp32 accumulators);
  float32 with ``precision="3xtf32"`` (three m16n8k8 TF32 products per product). Blocks of
  TC_ROWS = 64 query rows, K / V tiles of :func:`tc_keys` keys double-buffered in dynamic shared
  memory (:func:`tc_shared_bytes`; the kernel's limit is raised above 48 KiB once per device).
- **CUDA cores** (attention.cu, ``attn_fwd_<dtype>_hd<HD>``, HD = 32, 64 or 128, the smallest that
  holds E and Ev): everything else, and every dtype with ``precision="exact"``. float32 runs here by
  default: the 3xTF32 kernel is compiled and emulated (kernels/cuda/attention_emulation.py) but not
  yet run on a GPU, so the engine chooses it explicitly (engine/functional/attention.py, ``_attention_precision``).

backward (:func:`uses_tc_backward`): ``attn_bwd_rowdot_<dtype>`` (D = rowsum(dO * out)), then over
key tiles either the tensor-core ``attn_tc_bwd_<dtype>_hd<HD>`` (where the forward runs on tensor
cores: 16-bit, and float32 with ``precision="3xtf32"``, at E = Ev in {64, 128}; blocks of
TC_BWD_KEYS = 64 keys, :func:`tc_bwd_shared_bytes` of dynamic shared memory; float32 at 128 in
:func:`tc_bwd_passes` = 2 column passes) or the CUDA-core
``attn_bwd_<dtype>_hd<HD>`` (everything else). Both sum dq by float atomics into a zeroed float32
array (16-bit inputs: rounded once to the input dtype by ``attn_bwd_finish_<dtype>``).

16-bit inputs: out, dq, dk, dv in the input dtype, lse float32, a 16-bit mask widened to float32
(the kernels read float masks). Math, mask shapes and fully masked rows: kernels/cpu/attention.py.
Head dims <= 128 and float32 / bfloat16 / float16 only (KernelError from :func:`check_gpu_limits`).
"""

from __future__ import annotations

import functools

import numpy as np

from ..cpu.attention import (check_gpu_limits, empty_backward, empty_forward, is_empty, validate_backward,
                                   validate_forward)
from ..cuda.module import on_device
from ..registry import KernelError

MODULE = "attention"
THREADS = 128
FWD_ROWS = 32  # query rows per forward block (attention.cu)
BWD_KEYS = 32  # keys per backward block
HEAD_DIMS = (32, 64, 128)

TC_MODULE = "attention_tc"
TC_THREADS = 128  # attention_tc.cu: 4 warps of 16 query rows
TC_ROWS = 64
TC_HEAD_DIMS = (64, 128)
TC_BWD_KEYS = 64  # attention_tc.cu's backward: keys per block, 16 per warp
STATIC_SHARED_LIMIT = 48 * 1024  # above it a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)
SHARED_LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # the opt-in maximum per block (A100, H100)

DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def dtype_name(dtype) -> str:
    """The kernel-name suffix of a storage dtype: f32, f16 or bf16."""
    return DTYPE_NAMES[np.dtype(dtype).name]


def tc_keys(dtype, hd: int) -> int:
    """Keys per K / V tile of the tensor-core forward (attention_tc.cu's TcKeys)."""
    return 32 if np.dtype(dtype) == np.float32 and hd == 128 else 64


def tc_pad(dtype) -> int:
    """Padding of each shared row in elements (attention_tc.cu's TcPad): 16 bytes of 16-bit, 4 floats."""
    return 4 if np.dtype(dtype) == np.float32 else 8


def tc_shared_bytes(dtype, hd: int) -> int:
    """Dynamic shared memory of one tensor-core forward block: Q, two K and two V tiles."""
    dtype = np.dtype(dtype)
    return (TC_ROWS + 4 * tc_keys(dtype, hd)) * (hd + tc_pad(dtype)) * dtype.itemsize


def tc_bwd_passes(dtype, hd: int) -> int:
    """Walks over the query tiles per backward block (attention_tc.cu's TcBwdPasses): 2 for float32
    at HD 128, each accumulating 64 of dK's and dV's columns (all 128 at once would not fit in
    registers with the 3xTF32 split), 1 otherwise. S^T and dP^T are recomputed per pass; dq is
    added on the first."""
    return 2 if np.dtype(dtype) == np.float32 and hd == 128 else 1


def tc_bwd_rows(dtype, hd: int) -> int:
    """Query rows per step of the tensor-core backward (attention_tc.cu's TcBwdRows): 64 / 32 at
    HD 64 / 128 for 16-bit inputs, half that for float32."""
    rows = 32 if hd == 128 else 64
    return rows // 2 if np.dtype(dtype) == np.float32 else rows


def tc_bwd_shared_bytes(dtype, hd: int) -> int:
    """Dynamic shared memory of one tensor-core backward block: K and V (TC_BWD_KEYS rows each), two
    Q and two dO tiles of :func:`tc_bwd_rows` rows, and dS^T (TC_BWD_KEYS rows of the tile's queries)."""
    dtype = np.dtype(dtype)
    rows = tc_bwd_rows(dtype, hd)
    return ((2 * TC_BWD_KEYS + 4 * rows) * (hd + tc_pad(dtype)) + TC_BWD_KEYS * (rows + tc_pad(dtype))) * dtype.itemsize


def head_dim_bucket(e: int, ev: int) -> int:
    """The SIMT kernel instance for head dims e, ev: the smallest HD in HEAD_DIMS >= both."""
    return next(hd for hd in HEAD_DIMS if hd >= max(e, ev))


def uses_tensor_cores(spec, *arrays) -> bool:
    """Whether the forward of this call runs attention_tc.cu (see the module docstring)."""
    if spec.e != spec.ev or spec.e not in TC_HEAD_DIMS or spec.precision == "exact":
        return False
    if spec.dtype == np.float32 and spec.precision != "3xtf32":
        return False
    return all(a.data.ptr % 16 == 0 for a in arrays)  # cp.async moves 16 bytes at a time


def uses_tc_backward(spec, *arrays) -> bool:
    """Whether the backward of this call runs attention_tc.cu: where the forward would (so float32
    only with ``precision="3xtf32"``), dO aligned too."""
    return uses_tensor_cores(spec, *arrays)


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
    if mask is not None and mask.dtype != np.float32:  # a 16-bit mask of 16-bit inputs: the kernels read float
        mask = mask.astype(np.float32)
    return (mask if mask is not None else placeholder), np.int64(bs), np.int64(ls), np.int32(mask is not None)


@functools.cache
def _tc_function(kernel: str, device_id: int, shared_bytes: int):
    """The tensor-core kernel, allowed ``shared_bytes`` of dynamic shared memory (set once per device)."""
    from ..cuda.module import function

    fn = function(TC_MODULE, kernel, device_id)
    if shared_bytes > STATIC_SHARED_LIMIT:
        fn.max_dynamic_shared_size_bytes = shared_bytes
    return fn


def attention_forward(q, k, v, mask=None, *, scale=None, causal=False, precision=None):
    with on_device(q):
        import cupy

        from ..cuda.module import current_device, function

        spec = validate_forward(q, k, v, mask, scale=scale, causal=causal, precision=precision)
        check_gpu_limits(spec, "attention_forward", "cupy")
        if is_empty(spec):
            return empty_forward(spec, cupy)
        out = cupy.empty((spec.b, spec.l, spec.ev), spec.dtype)
        lse = cupy.empty((spec.b, spec.l), np.float32)
        m, bs, ls, has = _mask_args(mask, spec, q)
        name = dtype_name(spec.dtype)
        if uses_tensor_cores(spec, q, k, v):
            shared = tc_shared_bytes(spec.dtype, spec.e)
            args = (q, k, v, m, out, lse, np.int32(spec.l), np.int32(spec.s), bs, ls, has, np.int32(spec.causal),
                    np.float32(spec.scale))
            grid = launch_grid(spec.b, spec.l, TC_ROWS, "attention_forward")
            kernel = _tc_function(f"attn_tc_fwd_{name}_hd{spec.e}", current_device(), shared)
            kernel(grid, (TC_THREADS,), args, shared_mem=shared)
            return out, lse
        hd = head_dim_bucket(spec.e, spec.ev)
        args = (q, k, v, m, out, lse, np.int32(spec.l), np.int32(spec.s), np.int32(spec.e), np.int32(spec.ev),
                bs, ls, has, np.int32(spec.causal), np.float32(spec.scale))
        grid = launch_grid(spec.b, spec.l, FWD_ROWS, "attention_forward")
        function(MODULE, f"attn_fwd_{name}_hd{hd}")(grid, (THREADS,), args)
        return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None):
    with on_device(q):
        import cupy

        from ..cuda.module import current_device, function

        spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal, precision=precision)
        check_gpu_limits(spec, "attention_backward", "cupy")
        if is_empty(spec):
            return empty_backward(spec, cupy)
        name = dtype_name(spec.dtype)
        rows = spec.b * spec.l
        rowdot = cupy.empty((spec.b, spec.l), np.float32)
        function(MODULE, f"attn_bwd_rowdot_{name}")((-(-rows // 8),), (256,), (grad_out, out, rowdot, np.int64(rows),
                                                                                 np.int32(spec.ev)))
        dq = cupy.zeros((spec.b, spec.l, spec.e), np.float32)  # accumulated by atomics
        dk = cupy.empty((spec.b, spec.s, spec.e), spec.dtype)
        dv = cupy.empty((spec.b, spec.s, spec.ev), spec.dtype)
        m, bs, ls, has = _mask_args(mask, spec, q)
        tail = (bs, ls, has, np.int32(spec.causal), np.float32(spec.scale))
        if uses_tc_backward(spec, q, k, v, grad_out):
            shared = tc_bwd_shared_bytes(spec.dtype, spec.e)
            grid = launch_grid(spec.b, spec.s, TC_BWD_KEYS, "attention_backward")
            kernel = _tc_function(f"attn_tc_bwd_{name}_hd{spec.e}", current_device(), shared)
            kernel(grid, (TC_THREADS,), (q, k, v, m, grad_out, lse, rowdot, dq, dk, dv, np.int32(spec.l),
                                         np.int32(spec.s), *tail), shared_mem=shared)
        else:
            hd = head_dim_bucket(spec.e, spec.ev)
            args = (q, k, v, m, grad_out, lse, rowdot, dq, dk, dv, np.int32(spec.l), np.int32(spec.s),
                    np.int32(spec.e), np.int32(spec.ev), *tail)
            grid = launch_grid(spec.b, spec.s, BWD_KEYS, "attention_backward")
            function(MODULE, f"attn_bwd_{name}_hd{hd}")(grid, (THREADS,), args)
        if spec.low_precision:  # the float sums rounded once to the input dtype
            rounded = cupy.empty(dq.shape, spec.dtype)
            n = dq.size
            blocks = max(1, min(-(-n // 256), 65535))
            function(MODULE, f"attn_bwd_finish_{name}")((blocks,), (256,), (dq, rounded, np.int64(n)))
            dq = rounded
        return dq, dk, dv

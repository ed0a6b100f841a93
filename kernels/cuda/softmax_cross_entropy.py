"""Softmax cross-entropy on cupy arrays: the CUDA C++ kernels of softmax_cross_entropy.cu.

One launch computes the per-row loss and the gradient (see the .cu file for the algorithm and
kernels/cpu/softmax_cross_entropy.py for the math). The host picks the row kernel by C:

- ``sce_warp_*``: C <= 512 (float32, float16, bfloat16) / 256 (float64): G lanes per row, 256 / G
  rows per block;
- ``sce_block_lean_*``: hard targets, no weights, no smoothing, C <= 32768 / 16384: one row per
  block, the row held in registers (read once, gradient written once);
- ``sce_block_full_*``: any features, C <= 16384 / 8192 (half that when rows are not 16-byte
  aligned), likewise on chip;
- ``sce_stream_*``: any C: an online max / sum-exp pass, then the gradient pass.

Hard targets are checked with ``sce_target_range_*`` (device min / max of the non-ignored targets):
the 16 bytes are not read back here, which would wait for the GPU, but at the next sync point
(kernels/deferred.py), where a class index outside [0, C) raises KernelError. With
``denominator_out`` (reduction='mean' of unweighted hard targets) the same pass counts the
non-ignored rows into it and its last block writes the reciprocal where the row kernel reads its
grad_scale: the 'mean' denominator costs no launch of its own beyond zeroing the count.

``grad_scale`` reaches the kernels as a pointer to one value on the device: the caller's array,
or a cached one-element array for a number (so 1 / weight-sum computed on the GPU is never read).

float16 / bfloat16 logits run native ``__half`` / ``__nv_bfloat16`` instances: the row is read
as 16-bit packs of 8, computed in float32, the loss written as float32, each gradient element
rounded once; the scalars and ``grad_scale`` are float32 (the accumulation dtype).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import deferred
from ..cpu.softmax_cross_entropy import check_target_bounds, validate_denominator_out, validate_softmax_cross_entropy
from ..cuda.module import on_device
from ..precision import float_name
from ..registry import KernelError

MODULE = "softmax_cross_entropy"

# Flag bits, mirrored in softmax_cross_entropy.cu.
SCE_SOFT, SCE_WEIGHT, SCE_SMOOTH, SCE_GRAD, SCE_I64, SCE_VEC = 1, 2, 4, 8, 16, 32

# Per dtype name: suffix, values per 16-byte pack, warp configs (G lanes, K values per lane), and
# the K of the block kernels by kind (lean: <= 1024 threads, full: <= 512) and packing (v: 16-byte
# packs, s: scalars, whose per-value addresses cost registers, hence a smaller K for full). The
# 16-bit rows sit in float registers: float32's capacities, K a multiple of their 8-value pack.
# Mirrors the instantiations at the end of the .cu file.
_FLOAT32_BLOCKS = {("lean", "v"): (8, 16, 32), ("lean", "s"): (8, 16, 32),
                   ("full", "v"): (8, 32), ("full", "s"): (8, 16)}
CONFIGS = {
    "float32": dict(suffix="f32", pack=4, warp=((8, 4), (32, 8), (32, 16)), block=_FLOAT32_BLOCKS),
    "float64": dict(suffix="f64", pack=2, warp=((8, 4), (32, 8)),
                    block={("lean", "v"): (4, 8, 16), ("lean", "s"): (4, 8, 16),
                           ("full", "v"): (4, 16), ("full", "s"): (4, 8)}),
    "float16": dict(suffix="f16", pack=8, warp=((8, 8), (32, 8), (32, 16)), block=_FLOAT32_BLOCKS),
    "bfloat16": dict(suffix="bf16", pack=8, warp=((8, 8), (32, 8), (32, 16)), block=_FLOAT32_BLOCKS),
}
WARP_BLOCK = 256
LEAN_MAX_THREADS = 1024
FULL_MAX_THREADS = 512
STREAM_THREADS = 512
MAX_CLASSES = 2**30  # column indices are 32-bit in the kernels
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def plan(dtype, c: int, full: bool, vec: bool):
    """(kernel name, threads per block, rows per block) for rows of ``c`` classes."""
    cfg = CONFIGS[float_name(dtype)]
    dt = cfg["suffix"]
    for g, k in cfg["warp"]:
        if c <= g * k:
            return f"sce_warp_{dt}_g{g}_k{k}", WARP_BLOCK, WARP_BLOCK // g
    kind, max_threads = ("full", FULL_MAX_THREADS) if full else ("lean", LEAN_MAX_THREADS)
    packing = "v" if vec else "s"
    for k in cfg["block"][kind, packing]:
        if c <= max_threads * k:
            threads = -(-c // k)
            return f"sce_block_{kind}_{dt}_k{k}_{packing}", -(-threads // 32) * 32, 1
    threads = min(STREAM_THREADS, -(-c // (cfg["pack"] if vec else 1) // 32) * 32)
    return f"sce_stream_{dt}_{packing}", threads, 1


def softmax_cross_entropy(logits, targets, weight=None, *, ignore_index=-100, label_smoothing=0.0, grad_scale=1.0,
                          compute_grad=True, denominator_out=None):
    """Loss and gradient on the GPU the logits live on, whichever device is current."""
    with on_device(logits):
        return _softmax_cross_entropy(logits, targets, weight, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, grad_scale=grad_scale,
                                      compute_grad=compute_grad, denominator_out=denominator_out)


def _softmax_cross_entropy(logits, targets, weight, *, ignore_index, label_smoothing, grad_scale, compute_grad,
                           denominator_out):
    import cupy

    from ..cuda.module import function

    spec = validate_softmax_cross_entropy(logits, targets, weight, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad_scale=grad_scale,
                                          compute_grad=compute_grad)
    validate_denominator_out(spec, logits, weight, grad_scale, denominator_out)
    n, c, dt, acc = spec.n, spec.c, spec.dtype, spec.acc_dtype
    if c > MAX_CLASSES:
        raise KernelError(f"softmax_cross_entropy (cupy): C = {c} classes is over the kernel's limit of {MAX_CLASSES}")
    loss = cupy.empty(n, acc)  # float32 for 16-bit logits
    grad = cupy.empty((n, c), dt) if spec.compute_grad else None
    if n == 0:
        if denominator_out is not None:
            denominator_out.fill(0)
        return loss, grad
    mean_scale = None
    if not spec.soft:
        mean_scale = _check_targets(cupy, function, targets, spec, denominator_out, loss)

    cfg = CONFIGS[float_name(dt)]
    used = [logits] + ([grad] if grad is not None else []) + ([targets] if spec.soft else [])
    used += [weight] if weight is not None else []
    vec = c % cfg["pack"] == 0 and all(a.data.ptr % 16 == 0 for a in used)
    flags = ((SCE_SOFT if spec.soft else 0) | (SCE_WEIGHT if weight is not None else 0)
             | (SCE_SMOOTH if spec.eps > 0 else 0) | (SCE_GRAD if grad is not None else 0)
             | (SCE_I64 if targets.dtype == np.int64 else 0) | (SCE_VEC if vec else 0))
    full = bool(flags & (SCE_SOFT | SCE_WEIGHT | SCE_SMOOTH))
    name, threads, rows_per_block = plan(dt, c, full, vec)
    scalar = acc.type
    scale = mean_scale if mean_scale is not None else spec.grad_scale_array if spec.grad_scale_array is not None \
        else device_scalar(spec.grad_scale, acc, logits.device.id)
    args = (logits, targets, weight if weight is not None else logits, loss, grad if grad is not None else loss,
            np.int64(n), np.int32(c), np.int64(spec.ignore_index), scalar(1.0 - spec.eps), scalar(spec.eps / c),
            scale, np.int32(flags))
    blocks = -(-n // rows_per_block)
    function(MODULE, name)((blocks,), (threads,), args)
    return loss, grad


@functools.lru_cache(maxsize=64)
def device_scalar(value: float, dtype, device_id: int):
    """A one-element device array holding ``value`` (cached: the kernels only read it)."""
    import cupy

    with cupy.cuda.Device(device_id):
        value = cupy.full(1, value, dtype=dtype)
        # Once per cached value: a kernel on another stream must never see it before it is filled.
        cupy.cuda.get_current_stream().synchronize()
        return value


@functools.cache
def _bounds_start(device_id: int):
    """(INT64_MAX, INT64_MIN, 0) on the device: where the min / max reductions start, and the count
    of blocks done (for the 'mean' scale written by the last one)."""
    import cupy

    with cupy.cuda.Device(device_id):
        start = cupy.array([INT64_MAX, INT64_MIN, 0], dtype=np.int64)
        cupy.cuda.get_current_stream().synchronize()  # once per device, as device_scalar
        return start


def _check_targets(cupy, function, targets, spec, denominator_out, placeholder):
    """Device min / max of the non-ignored targets, checked against [0, C) at the next sync; with
    ``denominator_out``, also their count into it, and returned: the one-element array the last
    block writes the gradient's scale to (else None). ``placeholder``: an array of the accumulation
    dtype passed for the unused pointers."""
    n = spec.n
    bounds = _bounds_start(targets.device.id).copy()  # a device-to-device copy: no host transfer
    threads = 256
    blocks = min(-(-n // threads), 1024)
    scale = None
    if denominator_out is not None:
        denominator_out.fill(0)
        scale = cupy.empty(1, spec.acc_dtype)
    name = (f"sce_target_range_{'i64' if targets.dtype == np.int64 else 'i32'}_"
            f"{'f64' if spec.acc_dtype == np.float64 else 'f32'}")
    function(MODULE, name)((blocks,), (threads,), (
        targets, np.int64(n), np.int64(spec.ignore_index), bounds,
        denominator_out if scale is not None else placeholder, scale if scale is not None else placeholder,
        np.int32(scale is not None)))
    deferred.defer(bounds, functools.partial(check_target_bounds, spec=spec, impl="cupy"))
    return scale

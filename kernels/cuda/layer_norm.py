"""Layer norm on cupy arrays: the CUDA C++ kernels of layer_norm.cu (algorithm there; the math in
kernels/cpu/layer_norm.py).

The host picks the kernels by D and dtype (:func:`plan_forward`, :func:`plan_backward`):

- forward ``ln_fwd_block_*`` while the row fits in registers (float32: D <= 16384), one row per
  block, else ``ln_fwd_stream_*``;
- backward ``ln_bwd_block_*`` while the row fits (float32: D <= 4096), a one-wave grid of P blocks
  walking the rows, else ``ln_bwd_rowsums_*`` then ``ln_bwd_tile_*``; either writes P partial rows
  of the dweight / dbias column sums, which ``ln_col_reduce_*`` adds up. Nothing is read back to the
  host, so a call never waits for the GPU.
"""

from __future__ import annotations

import functools

import numpy as np

from kernels.cpu.layer_norm import validate_layer_norm_backward, validate_layer_norm_forward
from kernels.cuda.module import on_device

MODULE = "layer_norm"

# Flag bits, mirrored in layer_norm.cu.
LN_WEIGHT, LN_BIAS, LN_VEC, LN_WGRAD = 1, 2, 4, 8

# Per dtype: suffix, values per 16-byte pack, and the K (values per thread) of the on-chip kernels;
# mirrors the instantiations at the end of the .cu file.
CONFIGS = {
    np.dtype(np.float32): dict(suffix="f32", pack=4, fwd=(4, 8, 16), bwd=(4, 8)),
    np.dtype(np.float64): dict(suffix="f64", pack=2, fwd=(2, 4, 8), bwd=(2, 4)),
}
FWD_MAX_THREADS = 1024
BWD_MAX_THREADS = 512
# Threads per row the planner aims for when a smaller K would need more: enough warps for the
# loads in flight, few enough that several rows' blocks share an SM.
PREFERRED_THREADS = 256
STREAM_THREADS = 512
TILE_THREADS = 256
REDUCE_THREADS = 256
MAX_COLUMNS = 2**30  # column indices are 32-bit in the kernels
# Blocks per SM when the occupancy query is unavailable (an older cupy): 1 is always resident.
FALLBACK_BLOCKS_PER_SM = 1


def _round_warp(threads: int) -> int:
    return max(32, -(-threads // 32) * 32)


def _pick_k(ks, d: int, max_threads: int):
    """(K, threads) of the on-chip kernel for rows of ``d`` values, or None when no K fits."""
    fitting = [(k, _round_warp(-(-d // k))) for k in ks if -(-d // k) <= max_threads]
    if not fitting:
        return None
    for k, threads in fitting:
        if threads <= PREFERRED_THREADS:
            return k, threads
    return fitting[-1]


def plan_forward(dtype, d: int, vec: bool) -> tuple[str, int]:
    """(kernel name, threads per block) of the forward for rows of ``d`` values."""
    cfg = CONFIGS[np.dtype(dtype)]
    packing = "v" if vec else "s"
    picked = _pick_k(cfg["fwd"], d, FWD_MAX_THREADS)
    if picked is not None:
        k, threads = picked
        return f"ln_fwd_block_{cfg['suffix']}_k{k}_{packing}", threads
    threads = min(STREAM_THREADS, _round_warp(-(-d // (cfg["pack"] if vec else 1))))
    return f"ln_fwd_stream_{cfg['suffix']}_{packing}", threads


def plan_backward(dtype, d: int, vec: bool) -> tuple[str, int] | tuple[str, str, int]:
    """``("block", name, threads)`` or ``("tile", rowsums name, tile name)`` for rows of ``d`` values."""
    cfg = CONFIGS[np.dtype(dtype)]
    packing = "v" if vec else "s"
    picked = _pick_k(cfg["bwd"], d, BWD_MAX_THREADS)
    if picked is not None:
        k, threads = picked
        return "block", f"ln_bwd_block_{cfg['suffix']}_k{k}_{packing}", threads
    return "tile", f"ln_bwd_rowsums_{cfg['suffix']}_{packing}", f"ln_bwd_tile_{cfg['suffix']}_{packing}"


def _vec(d: int, dtype, arrays) -> bool:
    return d % CONFIGS[np.dtype(dtype)]["pack"] == 0 and all(a.data.ptr % 16 == 0 for a in arrays if a is not None)


def _check_columns(kernel: str, d: int) -> None:
    from kernels.registry import KernelError

    if d > MAX_COLUMNS:
        raise KernelError(f"{kernel} (cupy): D = {d} columns is over the kernel's limit of {MAX_COLUMNS}")


def layer_norm_forward(x, weight=None, bias=None, *, eps=1e-5):
    """(y, mean, rstd) on the GPU x lives on, whichever device is current."""
    with on_device(x):
        return _forward(x, weight, bias, eps)


def _forward(x, weight, bias, eps):
    import cupy

    from kernels.cuda.module import function

    spec = validate_layer_norm_forward(x, weight, bias, eps=eps)
    n, d, dt = spec.n, spec.d, spec.dtype
    _check_columns("layer_norm_forward", d)
    y, mean, rstd = cupy.empty((n, d), dt), cupy.empty(n, dt), cupy.empty(n, dt)
    if n == 0:
        return y, mean, rstd
    vec = _vec(d, dt, (x, y, weight, bias))
    flags = (LN_WEIGHT if weight is not None else 0) | (LN_BIAS if bias is not None else 0) | (LN_VEC if vec else 0)
    name, threads = plan_forward(dt, d, vec)
    # Absent weight / bias: x stands in as a pointer the kernel never reads (its flag is off).
    args = (x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
            np.int32(d), dt.type(spec.eps), np.int32(flags))
    function(MODULE, name)((n,), (threads,), args)
    return y, mean, rstd


def layer_norm_backward(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True):
    """(dx, dweight, dbias) on the GPU x lives on, whichever device is current."""
    with on_device(x):
        return _backward(grad_y, x, weight, mean, rstd, compute_weight_grads)


def _backward(grad_y, x, weight, mean, rstd, compute_weight_grads):
    import cupy

    from kernels.cuda.module import current_device, function

    spec = validate_layer_norm_backward(grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads)
    n, d, dt = spec.n, spec.d, spec.dtype
    _check_columns("layer_norm_backward", d)
    dx = cupy.empty((n, d), dt)
    wgrad = spec.weight_grads
    if n == 0:
        return (dx, cupy.zeros(d, dt), cupy.zeros(d, dt)) if wgrad else (dx, None, None)
    vec = _vec(d, dt, (grad_y, x, dx, weight))
    flags = (LN_WEIGHT if weight is not None else 0) | (LN_VEC if vec else 0) | (LN_WGRAD if wgrad else 0)
    plan = plan_backward(dt, d, vec)
    device = current_device()
    if plan[0] == "block":
        _, name, threads = plan
        parts = min(n, _resident_blocks(device, name, threads))
        grid = (parts,)
    else:
        _, rowsums_name, name = plan
        threads = TILE_THREADS
        pack = CONFIGS[dt]["pack"] if vec else 1
        tiles = -(-d // (threads * pack))
        # Row groups: enough blocks for one wave over the device, each group one partial row.
        parts = int(min(n, 65535, max(1, -(-_resident_blocks(device, name, threads) // tiles))))
        grid = (tiles, parts)
    # Partials (P, D): row p holds block (or row group) p's column sums; 2 P D values, against N D.
    part_w = cupy.empty((parts, d), dt) if wgrad else dx
    part_b = cupy.empty((parts, d), dt) if wgrad else dx
    args = (grad_y, x, weight if weight is not None else x, mean, rstd, dx, part_w, part_b, np.int64(n),
            np.int32(d), np.int32(flags))
    if plan[0] == "tile":
        row_sums = cupy.empty(2 * n, dt)
        function(MODULE, rowsums_name)((n,), (min(STREAM_THREADS, _round_warp(-(-d // pack))),), args + (row_sums,))
        args = args + (row_sums,)
    function(MODULE, name)(grid, (threads,), args)
    if not wgrad:
        return dx, None, None
    dweight, dbias = cupy.empty(d, dt), cupy.empty(d, dt)
    blocks = min(-(-d // REDUCE_THREADS), 4 * _sm_count(device))
    function(MODULE, f"ln_col_reduce_{CONFIGS[dt]['suffix']}")((blocks,), (REDUCE_THREADS,),
                                                               (part_w, part_b, dweight, dbias, np.int32(parts),
                                                                np.int32(d)))
    return dx, dweight, dbias


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=256)
def _resident_blocks(device_id: int, name: str, threads: int) -> int:
    """Blocks of ``name`` at ``threads`` threads that fit on the device at once (one wave)."""
    import cupy

    from kernels.cuda.module import function

    try:
        fn = function(MODULE, name, device_id)
        per_sm = int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0))
    except Exception:  # an older cupy without the query: a figure that is always resident
        per_sm = FALLBACK_BLOCKS_PER_SM
    return _sm_count(device_id) * max(per_sm, 1)

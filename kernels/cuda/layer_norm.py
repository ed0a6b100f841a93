"""Layer norm on cupy arrays: the CUDA C++ kernels of layer_norm.cuh (algorithm there; the math in
kernels/cpu/layer_norm.py), compiled as two modules: layer_norm.cu (float32, float64) and
layer_norm_lowp.cu (float16, bfloat16, each also with float32 weight and bias).

The host picks the kernels by D and dtype (:func:`plan_forward`, :func:`plan_backward`):

- forward ``ln_fwd_block_*`` while the row fits in registers (D <= 16384 for float32 and the
  16-bit types), one row per block, else ``ln_fwd_stream_*``;
- backward ``ln_bwd_block_*`` while the row fits (D <= 4096 for float32 and the 16-bit types), a
  one-wave grid of P blocks walking the rows with the next row's loads in flight, else
  ``ln_bwd_rowsums_*`` then ``ln_bwd_tile_*``; either writes P partial rows of the dweight / dbias
  column sums (in float32 for the 16-bit types), which ``ln_col_reduce_*`` adds up into weight's
  dtype. Nothing is read back to the host, so a call never waits for the GPU.

Kernel names: ``<kind>_<types>[_k<K>]_<v|s>[_<variant>]`` with types f32, f64, f16, bf16, or
f16w32 / bf16w32 (a 16-bit x with float32 weight and bias), v for 16-byte packs and s for
scalars, and the backward variants plain (no weight), weight (dx only) and wgrad (dx, dw, db).
"""

from __future__ import annotations

import functools

import numpy as np

from ..cpu.layer_norm import validate_layer_norm_backward, validate_layer_norm_forward
from ..precision import FLOAT32, float_name, is_low_precision
from ..cuda.module import on_device

# Per x dtype name: the module, type suffix, values per 16-byte pack, and the K (values per thread)
# of the on-chip kernels; mirrors the instantiations in layer_norm.cu and layer_norm_lowp.cu.
CONFIGS = {
    "float32": dict(module="layer_norm", suffix="f32", pack=4, fwd=(4, 8, 16), bwd=(4, 8)),
    "float64": dict(module="layer_norm", suffix="f64", pack=2, fwd=(2, 4, 8), bwd=(2, 4)),
    "float16": dict(module="layer_norm_lowp", suffix="f16", pack=8, fwd=(8, 16), bwd=(8,)),
    "bfloat16": dict(module="layer_norm_lowp", suffix="bf16", pack=8, fwd=(8, 16), bwd=(8,)),
}


def config(dtype) -> dict:
    """CONFIGS of x's ``dtype``."""
    return CONFIGS[float_name(dtype)]
# The forward's flag bits, mirrored in layer_norm.cuh (the backward's are in the kernel's name).
LN_WEIGHT, LN_BIAS = 1, 2
FWD_MAX_THREADS = 1024
BWD_MAX_THREADS = 512
# Threads per row the planner aims for when a smaller K would need more: enough warps for the
# loads in flight, few enough that several rows' blocks share an SM.
PREFERRED_THREADS = 256
STREAM_THREADS = 512
TILE_THREADS = 256
REDUCE_THREADS = 256
MAX_COLUMNS = 2**30  # column indices are 32-bit in the kernels


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


def type_suffix(dtype, weight_dtype=None) -> str:
    """``f32``, ``bf16``, ``bf16w32`` (a bfloat16 x with float32 weight and bias) ..."""
    cfg = config(dtype)
    mixed = is_low_precision(dtype) and weight_dtype is not None and np.dtype(weight_dtype) == FLOAT32
    return cfg["suffix"] + ("w32" if mixed else "")


def backward_variant(has_weight: bool, weight_grads: bool) -> str:
    """The backward kernels' weight variant: plain (no weight), weight (dx only), wgrad (dx, dw, db)."""
    return "wgrad" if weight_grads else ("weight" if has_weight else "plain")


def plan_forward(dtype, d: int, vec: bool, weight_dtype=None) -> tuple[str, int]:
    """(kernel name, threads per block) of the forward for rows of ``d`` values."""
    cfg = config(dtype)
    types, packing = type_suffix(dtype, weight_dtype), "v" if vec else "s"
    picked = _pick_k(cfg["fwd"], d, FWD_MAX_THREADS)
    if picked is not None:
        k, threads = picked
        return f"ln_fwd_block_{types}_k{k}_{packing}", threads
    threads = min(STREAM_THREADS, _round_warp(-(-d // (cfg["pack"] if vec else 1))))
    return f"ln_fwd_stream_{types}_{packing}", threads


def plan_backward(dtype, d: int, vec: bool, variant: str = "wgrad",
                  weight_dtype=None) -> tuple[str, str, int] | tuple[str, str, str]:
    """``("block", name, threads)`` or ``("tile", rowsums name, tile name)`` for rows of ``d`` values."""
    cfg = config(dtype)
    types, packing = type_suffix(dtype, weight_dtype), "v" if vec else "s"
    picked = _pick_k(cfg["bwd"], d, BWD_MAX_THREADS)
    if picked is not None:
        k, threads = picked
        return "block", f"ln_bwd_block_{types}_k{k}_{packing}_{variant}", threads
    rowsums = "plain" if variant == "plain" else "weight"  # the row sums need the weight, never dw / db
    return "tile", f"ln_bwd_rowsums_{types}_{packing}_{rowsums}", f"ln_bwd_tile_{types}_{packing}_{variant}"


def col_reduce_name(weight_dtype) -> str:
    """``ln_col_reduce_<dw>``: sums the partial rows into dw / db of ``weight_dtype``."""
    return f"ln_col_reduce_{config(weight_dtype)['suffix']}"


def _vec(d: int, dtype, arrays) -> bool:
    return d % config(dtype)["pack"] == 0 and all(a.data.ptr % 16 == 0 for a in arrays if a is not None)


def _check_columns(kernel: str, d: int) -> None:
    from ..registry import KernelError

    if d > MAX_COLUMNS:
        raise KernelError(f"{kernel} (cupy): D = {d} columns is over the kernel's limit of {MAX_COLUMNS}")


def _affine_dtype(x_dtype, *params):
    """The one dtype the kernel takes weight and bias in: x's, or float32 when either is float32
    (a 16-bit one is then upcast, exactly: D values)."""
    dtypes = {p.dtype for p in params if p is not None}
    return FLOAT32 if FLOAT32 in dtypes and is_low_precision(x_dtype) else np.dtype(x_dtype)


def _as(a, dtype):
    return a if a is None or a.dtype == dtype else a.astype(dtype)


def layer_norm_forward(x, weight=None, bias=None, *, eps=1e-5):
    """(y, mean, rstd) on the GPU x lives on, whichever device is current."""
    with on_device(x):
        return _forward(x, weight, bias, eps)


def _forward(x, weight, bias, eps):
    import cupy

    from ..cuda.module import function

    spec = validate_layer_norm_forward(x, weight, bias, eps=eps)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    _check_columns("layer_norm_forward", d)
    y, mean, rstd = cupy.empty((n, d), dt), cupy.empty(n, ct), cupy.empty(n, ct)
    if n == 0:
        return y, mean, rstd
    wt = _affine_dtype(dt, weight, bias)
    weight, bias = _as(weight, wt), _as(bias, wt)
    vec = _vec(d, dt, (x, y, weight, bias))
    flags = (LN_WEIGHT if weight is not None else 0) | (LN_BIAS if bias is not None else 0)
    name, threads = plan_forward(dt, d, vec, wt)
    # Absent weight / bias: x stands in as a pointer the kernel never reads (its flag is off).
    args = (x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
            np.int32(d), ct.type(spec.eps), np.int32(flags))
    function(config(dt)["module"], name)((n,), (threads,), args)
    return y, mean, rstd


def layer_norm_backward(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True):
    """(dx, dweight, dbias) on the GPU x lives on, whichever device is current."""
    with on_device(x):
        return _backward(grad_y, x, weight, mean, rstd, compute_weight_grads)


def _backward(grad_y, x, weight, mean, rstd, compute_weight_grads):
    import cupy

    from ..cuda.module import current_device, function

    spec = validate_layer_norm_backward(grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    _check_columns("layer_norm_backward", d)
    dx = cupy.empty((n, d), dt)
    wgrad = spec.weight_grads
    if n == 0:
        return (dx, cupy.zeros(d, weight.dtype), cupy.zeros(d, weight.dtype)) if wgrad else (dx, None, None)
    module = config(dt)["module"]
    vec = _vec(d, dt, (grad_y, x, dx, weight))
    variant = backward_variant(weight is not None, wgrad)
    plan = plan_backward(dt, d, vec, variant, None if weight is None else weight.dtype)
    device = current_device()
    if plan[0] == "block":
        _, name, threads = plan
        parts = min(n, _resident_blocks(device, module, name, threads))
        grid = (parts,)
    else:
        _, rowsums_name, name = plan
        threads = TILE_THREADS
        pack = config(dt)["pack"] if vec else 1
        tiles = -(-d // (threads * pack))
        # Row groups: enough blocks for one wave over the device, each group one partial row.
        parts = int(min(n, 65535, max(1, -(-_resident_blocks(device, module, name, threads) // tiles))))
        grid = (tiles, parts)
    # Partials (P, D) in the compute dtype: row p holds block (or row group) p's column sums; 2 P D
    # values, against N D.
    part_w = cupy.empty((parts, d), ct) if wgrad else mean
    part_b = cupy.empty((parts, d), ct) if wgrad else mean
    args = (grad_y, x, weight if weight is not None else x, mean, rstd, dx, part_w, part_b, np.int64(n),
            np.int32(d))
    if plan[0] == "tile":
        row_sums = cupy.empty(2 * n, ct)
        function(module, rowsums_name)((n,), (min(STREAM_THREADS, _round_warp(-(-d // pack))),), args + (row_sums,))
        args = args + (row_sums,)
    function(module, name)(grid, (threads,), args)
    if not wgrad:
        return dx, None, None
    dweight, dbias = cupy.empty(d, weight.dtype), cupy.empty(d, weight.dtype)
    blocks = min(-(-d // REDUCE_THREADS), 4 * _sm_count(device))
    function(module, col_reduce_name(weight.dtype))((blocks,), (REDUCE_THREADS,),
                                                     (part_w, part_b, dweight, dbias, np.int32(parts), np.int32(d)))
    return dx, dweight, dbias


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=256)
def _resident_blocks(device_id: int, module: str, name: str, threads: int) -> int:
    """Blocks of ``name`` at ``threads`` threads that fit on the device at once (one wave).

    The backward's grid is one wave by design (each block's partial row spans its rows), so a
    failed occupancy query is an error that says so, not a guess: a figure too small would leave
    SMs idle, one too large would run a second, partial wave.
    """
    import cupy

    from ..cuda.module import function
    from ..registry import KernelError

    fn = function(module, name, device_id)
    try:
        per_sm = int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0))
    except Exception as exc:
        raise KernelError(f"layer_norm_backward (cupy): the occupancy query for {name} at {threads} threads on "
                          f"cuda:{device_id} failed ({type(exc).__name__}: {exc}); it sizes the backward's one-wave "
                          "grid. cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor must work "
                          "(cupy >= 9 with a working driver)") from exc
    if per_sm < 1:
        raise KernelError(f"layer_norm_backward (cupy): {name} cannot run {threads} threads per block on "
                          f"cuda:{device_id} (the occupancy query says 0 blocks per SM)")
    return _sm_count(device_id) * per_sm

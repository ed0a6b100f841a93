"""Layer normalisation over the last dimension on the CPU, forward and backward (PyTorch ``F.layer_norm``).

The math every impl shares (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy`` elsewhere).
Per row ``x`` of length D, with weight ``w`` and bias ``b`` (w = 1, b = 0 without affine):

    mean = sum_j x_j / D
    var  = sum_j (x_j - mean)^2 / D             (biased, as PyTorch)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) rstd
    y    = xhat w + b

Forward returns ``(y, mean, rstd)``; mean and rstd (N,) are the saved state of the backward, which
recomputes ``xhat`` from x instead of keeping an (N, D) array. Given ``dy``:

    g      = dy w
    dx     = rstd (g - mean_j(g) - xhat mean_j(g xhat))
    dw     = sum_rows dy xhat                   (column sums over the N rows)
    db     = sum_rows dy

dtypes: x is float32, float64, float16 or bfloat16. A 16-bit x is computed in float32 (statistics
and sums accumulated in float32 or wider) and rounded once where y and dx are stored; its mean and
rstd are kept in float32, as PyTorch's CUDA kernel keeps them, so backward sees the statistics
forward used. weight and bias have x's dtype, or float32 with a 16-bit x (PyTorch's mixed-dtype
rule); dweight and dbias come back in weight's dtype.

The variance is two-pass (the mean first, then the mean of squared deviations), never
``E[x^2] - E[x]^2``, which cancels catastrophically when |mean| >> std. The column sums ``dw``,
``db`` are a reduction across rows, which the rows' threads cannot share without racing: every impl
splits the rows into chunks, each chunk writes one partial row of sums, and a small final
reduction adds the partials (never an atomic per element).

This module also holds the validators every impl calls first. ``import engine.kernels.cpu.layer_norm``
does not import numba: the jitted code is built on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import threads as _threads
from ..cpu.optim import bits_view  # 16-bit floats as the bit views half_bits.py reads
from ..precision import FLOAT32, accumulation_dtype, float_name, is_low_precision
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import module_of as _module_of
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..registry import numba_parallel as _numba_parallel
from ..registry import real_number as _real_number

FORWARD = "layer_norm_forward"
BACKWARD = "layer_norm_backward"


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerNormSpec:
    """What one validated call asks for."""

    n: int  # rows
    d: int  # row length (the normalised dimension)
    dtype: np.dtype  # of x, y, grad_y and dx
    array_module: str  # "numpy" or "cupy"
    eps: float = 0.0  # forward only
    weight_grads: bool = False  # backward: dweight / dbias wanted (and a weight given)

    @property
    def compute_dtype(self) -> np.dtype:
        """What the kernels compute in, and the dtype of mean and rstd: float32 for a 16-bit x."""
        return accumulation_dtype(self.dtype)


# Which dtype each array may have, by its role: "x" (x's own dtype), "param" (x's, or float32 with a
# 16-bit x: PyTorch's mixed-dtype rule) and "stats" (the compute dtype: float32 with a 16-bit x).
_ROLES = {"x": "x", "grad_y": "x", "weight": "param", "bias": "param", "mean": "stats", "rstd": "stats"}


def _dtype_problem(name: str, dtype, x_dtype) -> str | None:
    role = _ROLES[name]
    low = is_low_precision(x_dtype)
    if role == "x" or not low:
        if dtype == x_dtype:
            return None
        if role == "stats" and not low:
            return f"{name} must have x's dtype {x_dtype}, got {dtype} (as layer_norm_forward returns it)"
        return f"{name} must have x's dtype {x_dtype}, got {dtype}; cast it with .astype(x.dtype) (no silent promotion)"
    if role == "param":
        if dtype in (x_dtype, FLOAT32):
            return None
        return f"{name} must have x's dtype {x_dtype} or float32, got {dtype}"
    if dtype == FLOAT32:
        return None
    return (f"{name} must be float32, got {dtype}: layer_norm_forward keeps the statistics of a {x_dtype} x "
            "in float32")


# x dtypes whose every other array must have x's own dtype (no mixed-dtype rule applies).
_SAME_DTYPE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _plain_numpy(arrays: dict, x) -> bool:
    """Whether every check of :func:`_check_arrays` passes for the common call, in one pass: numpy
    arrays of one float32 / float64 dtype, C-contiguous, x 2-D with columns. Anything else (cupy,
    16-bit, a problem) gets the checks one at a time, which name what is wrong."""
    if type(x) is not np.ndarray:
        return False
    dtype = x.dtype
    if x.ndim != 2 or dtype not in _SAME_DTYPE_FLOATS or x.shape[1] < 1:
        return False
    for a in arrays.values():
        if type(a) is not np.ndarray or a.dtype != dtype or not a.flags.c_contiguous:
            return False
    return True


def _check_arrays(kernel: str, where, arrays: dict, x) -> str:
    """Arrays on one device, x 2-D float, each other array of the dtype its role allows; returns the
    array module."""
    if _plain_numpy(arrays, x):  # runs on every call: the full checks cost as much as a small kernel
        return "numpy"
    problem = _misplaced_arrays_message(arrays)
    if problem:
        raise KernelError(f"{where()}: {problem}")
    module = _module_of(x)
    if x.ndim != 2:
        raise KernelError(f"{where()}: x must be 2-D (N, D), got {x.ndim}-D; reshape to (-1, D) with the "
                          "normalised dimension last")
    if float_name(x.dtype) is None:
        raise KernelError(f"{where()}: x has dtype {x.dtype}; only float32, float64, float16 and bfloat16 are "
                          "supported")
    if int(x.shape[1]) < 1:
        raise KernelError(f"{where()}: x has D = 0 columns; layer norm needs rows of at least one value")
    for name, a in arrays.items():
        problem = _dtype_problem(name, a.dtype, x.dtype)
        if problem:
            raise KernelError(f"{where()}: {problem}")
        if not a.flags.c_contiguous:
            raise KernelError(f"{where()}: {name} is not C-contiguous; pass a contiguous array "
                              "(e.g. ascontiguousarray)")
    return module


def _check_shape(where, name: str, a, shape: tuple, what: str) -> None:
    if a is not None and tuple(a.shape) != shape:
        raise KernelError(f"{where()}: {name} must have shape {shape}, {what}, got {tuple(a.shape)}")


def validate_layer_norm_forward(x, weight, bias, *, eps) -> LayerNormSpec:
    """Check the arguments of one forward call; raise KernelError naming the problem."""
    def where() -> str:  # described only on failure: this check runs on every call
        return f"{FORWARD}({_describe('x', x)}, {_describe('weight', weight)}, {_describe('bias', bias)})"

    arrays = {"x": x, **{k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}}
    module = _check_arrays(FORWARD, where, arrays, x)
    n, d = (int(s) for s in x.shape)
    _check_shape(where, "weight", weight, (d,), "one weight per column of x")
    _check_shape(where, "bias", bias, (d,), "one bias per column of x")
    return LayerNormSpec(n, d, x.dtype, module, eps=_eps(eps))


def validate_layer_norm_backward(grad_y, x, weight, mean, rstd, *, compute_weight_grads) -> LayerNormSpec:
    """Check the arguments of one backward call; raise KernelError naming the problem."""
    def where() -> str:
        return (f"{BACKWARD}({_describe('grad_y', grad_y)}, {_describe('x', x)}, {_describe('weight', weight)}, "
                f"{_describe('mean', mean)}, {_describe('rstd', rstd)})")

    arrays = {"grad_y": grad_y, "x": x, "mean": mean, "rstd": rstd}
    if weight is not None:
        arrays["weight"] = weight
    module = _check_arrays(BACKWARD, where, arrays, x)
    n, d = (int(s) for s in x.shape)
    _check_shape(where, "grad_y", grad_y, (n, d), "x's shape")
    _check_shape(where, "weight", weight, (d,), "one weight per column of x")
    _check_shape(where, "mean", mean, (n,), "one per row of x (as layer_norm_forward returns it)")
    _check_shape(where, "rstd", rstd, (n,), "one per row of x (as layer_norm_forward returns it)")
    if not isinstance(compute_weight_grads, (bool, np.bool_)):
        raise KernelError(f"{BACKWARD}: compute_weight_grads must be True or False, got {compute_weight_grads!r}")
    return LayerNormSpec(n, d, x.dtype, module, weight_grads=bool(compute_weight_grads) and weight is not None)


def _eps(value) -> float:
    """eps as a float. Any real value is taken, as PyTorch does: eps = 0 on a constant row gives
    rstd = 1 / sqrt(0) = inf and y = 0 * inf = NaN, a negative eps above the variance NaN too."""
    return _real_number(FORWARD, "eps", value, finite=False)


# --------------------------------------------------------------------------------------------
# numpy: the reference, written as the formulas above (whole-array ops in the compute dtype; a
# 16-bit x is upcast to float32 and y / dx rounded once at the end)
# --------------------------------------------------------------------------------------------


def _in(a, dtype):
    return None if a is None else a.astype(dtype, copy=False)


def normalize(xp, x, weight, bias, *, axes, eps):
    """The forward formulas on whole arrays (numpy or cupy, ``xp`` their module) over ``axes``,
    in x's dtype -> ``(y, xhat, mean, rstd)``, mean and rstd with ``keepdims``.

    The numpy impl runs it on (N, D) rows, the engine's unfused LayerNorm Function on any trailing
    axes; x, weight and bias come in the dtype to compute in.
    """
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # var + eps <= 0: inf or NaN, as PyTorch
        rstd = x.dtype.type(1) / xp.sqrt(var + x.dtype.type(eps))
        xhat = centered * rstd
    y = xhat if weight is None else xhat * weight
    return (y if bias is None else y + bias), xhat, mean, rstd


def input_grad(g, xhat, rstd, *, axes):
    """``dx = rstd (g - mean(g) - xhat mean(g xhat))`` over ``axes``, with ``g = dy w`` (dy without a
    weight); whole arrays of one dtype, numpy or cupy, rstd with ``keepdims``."""
    with np.errstate(invalid="ignore"):  # 0 * inf where rstd = inf (eps = 0, constant row): NaN, as PyTorch
        mean_g = g.mean(axis=axes, keepdims=True)
        mean_gx = (g * xhat).mean(axis=axes, keepdims=True)
        return rstd * (g - mean_g - xhat * mean_gx)


def layer_norm_forward_numpy(x, weight=None, bias=None, *, eps=1e-5):
    spec = validate_layer_norm_forward(x, weight, bias, eps=eps)
    dt, ct = spec.dtype, spec.compute_dtype
    if spec.n == 0:
        return np.empty((0, spec.d), dt), np.empty(0, ct), np.empty(0, ct)
    y, _, mean, rstd = normalize(np, _in(x, ct), _in(weight, ct), _in(bias, ct), axes=1, eps=spec.eps)
    return y.astype(dt, copy=False), mean.reshape(spec.n), rstd.reshape(spec.n)


def layer_norm_backward_numpy(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True):
    spec = validate_layer_norm_backward(grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads)
    dt, ct = spec.dtype, spec.compute_dtype
    grad_dtype = None if weight is None else weight.dtype
    grad_y, x, weight = _in(grad_y, ct), _in(x, ct), _in(weight, ct)
    with np.errstate(invalid="ignore"):  # 0 * inf where rstd = inf (eps = 0, constant row): NaN, as PyTorch
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = grad_y * weight if weight is not None else grad_y
        dx = input_grad(g, xhat, rstd[:, None], axes=1).astype(dt, copy=False)
        if not spec.weight_grads:
            return dx, None, None
        dweight = (grad_y * xhat).sum(axis=0, dtype=ct)
    dbias = grad_y.sum(axis=0, dtype=ct)
    return dx, dweight.astype(grad_dtype, copy=False), dbias.astype(grad_dtype, copy=False)


# --------------------------------------------------------------------------------------------
# numba_cpu: rows in parallel (prange over chunks of rows). Per row the two-pass statistics (the
# row is cache-resident for the second pass) accumulate in float64. Backward: each chunk adds its
# rows' dy xhat and dy into its own float64 partial row (no two threads share one), and the
# partials are summed once at the end, in chunk order (chunks x D values, small).
# --------------------------------------------------------------------------------------------

# Elements (N * D) from which rows may run in parallel, and then only while other processes leave
# CPUs free (threads.parallel_region, as the GELU and AdamW kernels). Higher than the region's
# start-up cost alone asks, because after a BLAS GEMM (whose threads still spin) a parallel region
# can stall for milliseconds; the measurements are in docs/benchmarks.md, "Why the thresholds are
# where they are" (the GPT's (1024, 128) calls stay serial: issue 26's layer-norm section).
PARALLEL_MIN = 1 << 18
# Rows per chunk, and the most chunks a call splits into. The chunking depends on N only, never on
# the thread count or the load, so the column sums dw / db (whose float64 partials are added per
# chunk) have the same bits whichever build ran and however many threads it had.
CHUNK_ROWS = 64
MAX_CHUNKS = 64


def _chunks(n: int) -> int:
    """Row chunks of a call: a function of N alone (the bits of dw / db follow the chunking)."""
    return max(1, min(MAX_CHUNKS, -(-n // CHUNK_ROWS)))


def _parallel(n: int, d: int) -> bool:
    return n > 1 and _threads.parallel_region(n * d, PARALLEL_MIN)


def layer_norm_forward_numba(x, weight=None, bias=None, *, eps=1e-5):
    spec = validate_layer_norm_forward(x, weight, bias, eps=eps)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    y, mean, rstd = np.empty((n, d), dt), np.empty(n, ct), np.empty(n, ct)
    if n == 0:
        return y, mean, rstd
    forward, _ = _numba_kernels(_parallel(n, d))
    # weight and bias in the compute dtype: a 16-bit one is upcast (D values, exact)
    w = _in(weight, ct) if weight is not None else np.empty(0, ct)
    b = _in(bias, ct) if bias is not None else np.empty(0, ct)
    forward(bits_view(x), w, weight is not None, b, bias is not None, spec.eps, _chunks(n), bits_view(y), mean, rstd)
    return y, mean, rstd


def layer_norm_backward_numba(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True):
    spec = validate_layer_norm_backward(grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads)
    n, d, dt, ct = spec.n, spec.d, spec.dtype, spec.compute_dtype
    dx = np.empty((n, d), dt)
    chunks = _chunks(n)
    # One float64 partial row per chunk, zeroed by its chunk: no two threads write one value. The
    # kernel adds the rows into row 0 at the end.
    partial_w = np.empty((chunks, d) if spec.weight_grads else (0, d), np.float64)
    partial_b = np.empty_like(partial_w)
    if n:
        _, backward = _numba_kernels(_parallel(n, d))
        w = _in(weight, ct) if weight is not None else np.empty(0, ct)
        backward(bits_view(grad_y), bits_view(x), w, weight is not None, mean, rstd, spec.weight_grads, chunks,
                 bits_view(dx), partial_w, partial_b)
    else:
        partial_w[...] = 0.0
        partial_b[...] = 0.0
    if not spec.weight_grads:
        return dx, None, None
    # One rounding to weight's dtype.
    return dx, partial_w[0].astype(weight.dtype), partial_b[0].astype(weight.dtype)


@functools.cache
def _numba_kernels(parallel: bool):
    """(forward, backward) over row chunks in parallel (prange) or on the calling thread.

    x, dy, y and dx come as float32 / float64 arrays or as the bit views of 16-bit ones
    (kernels.cpu.optim.bits_view), read as float32 and rounded once when stored through
    kernels/cpu/half_bits.py (numba compiles one specialisation per view type). Weight, bias, mean
    and rstd always come in the compute dtype.
    """
    import numba

    from ..cpu.half_bits import load, store

    # `loop` (prange or range, which pickle by name) is a closure variable, so the serial and the
    # parallel build get different keys in numba's on-disk cache.
    loop = numba.prange if parallel else range
    # The forward's float64 row sums may reassociate (reassoc only: no contraction, no finite-math
    # flags), so they run in SIMD lanes; without it each sum is one serial chain of adds and the
    # loops stay scalar (docs/benchmarks.md, "Other measured choices in the code"). The order
    # changes only the float64 sums' last bits, which the float32 mean and rstd round away (no
    # bit of y, mean or rstd differed on the GPT's shapes). The backward's float32 terms must not
    # reassociate: with the flag on the whole kernel, dx moved by an ulp in 7 % of its elements,
    # which moved a 200-step GPT's validation loss by 1 % (tests/test_gpt.py). So the backward
    # computes its per-element terms without the flag into a scratch row and only their float64
    # row sums (:func:`row_sums`) run reassociated: a float64 sum of D float32 terms rounds (if at
    # all) far below the float32 rounding of c_g and c_gx, so dx keeps its bits.
    jit = numba.njit(cache=True, parallel=parallel, fastmath=False, error_model="numpy")
    jit_sums = numba.njit(cache=True, parallel=parallel, fastmath={"reassoc"}, error_model="numpy")

    @numba.njit(cache=True, fastmath={"reassoc"}, error_model="numpy")
    def row_sums(a, b):
        """(sum a, sum b) in float64, in SIMD lanes (the float32 terms are already rounded)."""
        sa = 0.0
        sb = 0.0
        for j in range(a.shape[0]):
            sa += a[j]
            sb += b[j]
        return sa, sb

    @jit_sums
    def forward(x, w, has_weight, b, has_bias, eps, chunks, y, mean_out, rstd_out):
        n, d = x.shape
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            for i in range(chunk * per, min(n, (chunk + 1) * per)):
                row = x[i]
                s = 0.0  # float64 accumulators: the float32 rounding of long sums stays out
                for j in range(d):
                    s += load(row, j)
                mu = s / d
                q = 0.0
                for j in range(d):
                    c = load(row, j) - mu
                    q += c * c
                mean_out[i] = mu
                rstd_out[i] = 1.0 / np.sqrt(q / d + eps)
                mu_t = mean_out[i]  # y from the saved (rounded) statistics, as backward sees them
                r_t = rstd_out[i]
                out = y[i]
                for j in range(d):
                    v = (load(row, j) - mu_t) * r_t
                    if has_weight:
                        v = v * w[j]
                    if has_bias:
                        v = v + b[j]
                    store(out, j, v)

    @jit
    def backward(dy, x, w, has_weight, mean, rstd, weight_grads, chunks, dx, partial_w, partial_b):
        n, d = x.shape
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            gs = np.empty(d, mean.dtype)  # the row's g and g xhat terms, summed by row_sums
            gxs = np.empty(d, mean.dtype)
            if weight_grads:
                for j in range(d):
                    partial_w[chunk, j] = 0.0
                    partial_b[chunk, j] = 0.0
            for i in range(chunk * per, min(n, (chunk + 1) * per)):
                mu = mean[i]
                r = rstd[i]
                xr = x[i]
                gr = dy[i]
                for j in range(d):
                    xh = (load(xr, j) - mu) * r
                    dyj = load(gr, j)
                    g = dyj * w[j] if has_weight else dyj
                    gs[j] = g
                    gxs[j] = g * xh
                    if weight_grads:  # this chunk's own partial row: no other thread writes it
                        partial_w[chunk, j] += dyj * xh
                        partial_b[chunk, j] += dyj
                sg, sgx = row_sums(gs, gxs)
                c_g = mean.dtype.type(sg / d)
                c_gx = mean.dtype.type(sgx / d)
                out = dx[i]
                for j in range(d):
                    xh = (load(xr, j) - mu) * r
                    dyj = load(gr, j)
                    g = dyj * w[j] if has_weight else dyj
                    store(out, j, r * (g - c_g - xh * c_gx))
        if weight_grads:  # after the region, on the calling thread: the partials in chunk order
            for chunk in range(1, chunks):
                for j in range(d):
                    partial_w[0, j] += partial_w[chunk, j]
                    partial_b[0, j] += partial_b[chunk, j]

    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return _numba_parallel(forward), _numba_parallel(backward)
    return forward, backward

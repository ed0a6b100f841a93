"""GELU on the CPU, forward and backward (PyTorch ``F.gelu``, both ``approximate`` modes).

The math every impl shares (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy`` elsewhere),
elementwise on the flat buffer of x (any shape):

    "none" (exact):  y = x Phi(x),            Phi(x) = erfc(-x / sqrt 2) / 2,  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
                     dx = dy (Phi(x) + x phi(x))
    "tanh":          z = sqrt(2/pi) (x + 0.044715 x^3)
                     y = x (1 + tanh z) / 2 = x s,              s = sigmoid(2 z) = 1 / (1 + exp(-2 z))
                     dx = dy (s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 0.044715 x^2))

float16 and bfloat16 inputs are computed in float32 (numpy: float64) and rounded once to the
input's dtype where the result is stored, as PyTorch's kernels do.

Written with erfc and sigmoid rather than PyTorch's ``1 + erf`` / ``1 + tanh``: for negative x
those sums cancel (1 + tanh(-8.45) is 9e-8, below float32's spacing at 1), so the result keeps
no correct digit in float32; erfc(-u) and sigmoid(2z) are accurate to a few ulps relative
everywhere. The sigmoid is taken as ``1 / (1 + exp(-2|z|))`` and its complement ``e / (1 + e)``
(e = exp(-2|z|) <= 1), so no exp overflows. Backward saves only x and recomputes z and s.

This module also holds the validators every impl calls first. ``import engine.kernels.cpu.gelu`` does
not import numba: the jitted code is built on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import threads as _threads
from ..cpu.optim import bits_view  # 16-bit floats as the bit views half_bits.py reads
from ..precision import accumulation_dtype, float_name
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import module_of as _module_of
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..registry import numba_parallel as _numba_parallel

FORWARD = "gelu_forward"
BACKWARD = "gelu_backward"
APPROXIMATIONS = ("none", "tanh")

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_COEF = 0.044715
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# x^2 in the tanh form's slope is capped here: from |x| = 1e15 on, sigmoid(2z) (1 - sigmoid(2z)) is
# exactly 0 in float32 and float64 while x^2 (float32: from 1.8e19) or x^3 may overflow, and
# 0 * inf would make the gradient NaN where it is 1 (x -> inf) or 0 (x -> -inf).
SQUARE_MAX = 1e30


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeluSpec:
    """What one validated call asks for."""

    size: int  # elements of x (the flat buffer)
    dtype: np.dtype
    array_module: str  # "numpy" or "cupy"
    approximate: str  # "none" or "tanh"


def _check(kernel: str, where, arrays: dict, x, approximate) -> GeluSpec:
    problem = _misplaced_arrays_message(arrays)
    if problem:
        raise KernelError(f"{where()}: {problem}")
    if approximate not in APPROXIMATIONS:
        raise KernelError(f"{kernel}: approximate must be 'none' or 'tanh', got {approximate!r}")
    module = _module_of(x)
    if float_name(x.dtype) is None:
        raise KernelError(f"{where()}: x has dtype {x.dtype}; only float32, float64, float16 and bfloat16 are "
                          "supported")
    for name, a in arrays.items():
        if a.dtype != x.dtype:
            raise KernelError(f"{where()}: {name} must have x's dtype {x.dtype}, got {a.dtype}; cast it with "
                              ".astype(x.dtype) (no silent promotion)")
        if tuple(a.shape) != tuple(x.shape):
            raise KernelError(f"{where()}: {name} must have x's shape {tuple(x.shape)}, got {tuple(a.shape)}")
        if not a.flags.c_contiguous:
            raise KernelError(f"{where()}: {name} is not C-contiguous (the kernel walks the flat buffer); "
                              "pass a contiguous array (e.g. ascontiguousarray)")
    return GeluSpec(int(x.size), x.dtype, module, approximate)


def validate_gelu_forward(x, *, approximate) -> GeluSpec:
    """Check the arguments of one forward call; raise KernelError naming the problem."""
    def where() -> str:  # described only on failure: this check runs on every call
        return f"{FORWARD}({_describe('x', x)}, approximate={approximate!r})"

    return _check(FORWARD, where, {"x": x}, x, approximate)


def validate_gelu_backward(grad_y, x, *, approximate) -> GeluSpec:
    """Check the arguments of one backward call; raise KernelError naming the problem."""
    def where() -> str:
        return f"{BACKWARD}({_describe('grad_y', grad_y)}, {_describe('x', x)}, approximate={approximate!r})"

    return _check(BACKWARD, where, {"grad_y": grad_y, "x": x}, x, approximate)


# --------------------------------------------------------------------------------------------
# numpy: the reference, computed in float64 and rounded once to x's dtype (16-bit ones too)
# --------------------------------------------------------------------------------------------

# erfc in float64 from two textbook expansions (numpy has no erf, and scipy is not a dependency):
#   |u| < ERF_SERIES_MAX: erf(u) = 2/sqrt(pi) exp(-u^2) sum_n (2u^2)^n u / (1 3 5 ... (2n+1)), all
#       terms of u's sign (no cancellation); at |u| = 2.5 the terms fall below 1e-17 of the sum
#       by n = 40. erfc = 1 - erf then loses at most log10(1 / erfc(2.5)) = 3.4 digits.
#   |u| >= ERF_SERIES_MAX: erfc(u) = exp(-u^2) / sqrt(pi) / (u + (1/2) / (u + 1 / (u + (3/2) / (u + ...)))),
#       Laplace's continued fraction, 40 levels evaluated from the bottom up (converged to
#       float64 for u >= 1.5).
# Measured against math.erfc on a grid: relative error <= 6e-14 (the exp(-u^2) rounding dominates
# at large u), tests/kernels/test_gelu.py holds it to 1e-12.
ERF_SERIES_MAX = 2.5
ERF_TERMS = 40


def erfc(u):
    """erfc of a float64 array (numpy or cupy), accurate to ~1e-13 relative everywhere."""
    xp = np if _module_of(u) == "numpy" else __import__("cupy")
    a = xp.abs(u)
    small = xp.minimum(a, ERF_SERIES_MAX)  # each branch runs on every element: keep both finite
    large = xp.maximum(a, ERF_SERIES_MAX)
    s2 = 2.0 * small * small
    term = small.copy()
    series = small.copy()
    for n in range(ERF_TERMS):
        term *= s2 / (2 * n + 3)
        series += term
    erf_small = (2.0 / math.sqrt(math.pi)) * xp.exp(-small * small) * series
    frac = large.copy()
    for j in range(ERF_TERMS, 0, -1):
        frac = large + (0.5 * j) / frac
    erfc_large = xp.exp(-large * large) / (math.sqrt(math.pi) * frac)
    erfc_abs = xp.where(a < ERF_SERIES_MAX, 1.0 - erf_small, erfc_large)
    return xp.where(u >= 0, erfc_abs, 2.0 - erfc_abs)


def _tanh_parts(x64):
    """(s, 1 - s) with s = sigmoid(2 z), z = sqrt(2/pi)(x + 0.044715 x^3), overflow-free."""
    z = SQRT_2_OVER_PI * (x64 + TANH_COEF * x64 * x64 * x64)
    e = np.exp(-2.0 * np.abs(z))
    hi = 1.0 / (1.0 + e)  # sigmoid(2|z|)
    lo = e * hi  # sigmoid(-2|z|)
    return np.where(z >= 0, hi, lo), np.where(z >= 0, lo, hi)


def gelu_forward_numpy(x, *, approximate="none"):
    spec = validate_gelu_forward(x, approximate=approximate)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # +-inf input: inf * 0 is the NaN PyTorch gives too, not a fault
        if spec.approximate == "tanh":
            s, _ = _tanh_parts(x64)
            y = x64 * s
        else:
            y = x64 * (0.5 * erfc(-INV_SQRT_2 * x64))
    return y.astype(spec.dtype)


def gelu_backward_numpy(grad_y, x, *, approximate="none"):
    spec = validate_gelu_backward(grad_y, x, approximate=approximate)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # +-inf input: a NaN slope, as PyTorch's
        if spec.approximate == "tanh":
            s, s_minus = _tanh_parts(x64)
            square = np.minimum(x64 * x64, SQUARE_MAX)
            slope = s + x64 * s * s_minus * (2.0 * SQRT_2_OVER_PI) * (1.0 + 3.0 * TANH_COEF * square)
        else:
            slope = 0.5 * erfc(-INV_SQRT_2 * x64) + x64 * INV_SQRT_2PI * np.exp(-0.5 * x64 * x64)
        return (grad_y.astype(np.float64) * slope).astype(spec.dtype)


# --------------------------------------------------------------------------------------------
# numba_cpu: chunks of the flat buffer in parallel (prange), each chunk a simple loop.
#
# float32 tanh (the GPT's GELU): the loop must vectorize, and without Intel's SVML numba calls
# libm's scalar tanhf / expf per element, much slower than numpy's SIMD tanh (docs/benchmarks.md).
# So exp is written out in float32 arithmetic LLVM vectorizes: 2^n exp(r) with n = round(a / ln 2),
# r = a - n ln 2 (ln 2 in two parts, Cody-Waite), exp(r) by its degree-7 Taylor polynomial (|r| <= ln2 / 2:
# truncation 6e-9 relative, below float32's 6e-8 spacing) and 2^n built in the exponent bits. No
# fastmath: contraction and reassociation would change results between builds for no speed gain
# once the loop vectorizes. error_model="numpy": numba's default division check blocks vectorizing.
#
# float32 exact (erf) form: libm's erfcf is scalar too (8 ms per (1024, 512) against 0.3 for the
# tanh form), so erfc(v) is written out the same way, v = -x / sqrt 2, a = |v|:
#   a < ERF_SPLIT:  erfc(v) = 1 -+ erf(a), erf(a) = a P(a^2) (ERF_SMALL: fit error 3e-11);
#   a >= ERF_SPLIT: erfc(a) = exp(-a^2) g(t), t = 1 / (1 + a / 2) (ERFC_TAIL: g(a) = erfc(a) exp(a^2),
#                   fit error 1.1e-9 on [ERF_SPLIT, 10]; from a = 9.4 exp(-a^2) is 0 in float32),
#                   erfc(-a) = 2 - erfc(a).
# The tail's exp(-a^2) multiplies relative errors of a by 2 a^2, so a^2 is carried exactly: the
# rounding error of v = x (1 / sqrt 2) (Dekker's product, the constant in two parts) and of a a
# (Veltkamp's split) go in as exp(-a^2) = exp(-fl(a^2)) (1 - delta). Worst measured error on 2.3M
# points: 0.81 of the test's bound (libm's erfcf: 0.85). Both branches run on every element and a
# select picks one, so the loop vectorizes.
#
# float64: libm's math.exp / math.erfc, scalar and accurate.
# --------------------------------------------------------------------------------------------

# Least-squares fits in float64 at Chebyshev nodes (numpy.polynomial.polynomial.polyfit, 400 and
# 600 nodes), lowest power first; tests/kernels/test_gelu.py checks their error against math.erf(c).
ERF_SPLIT = 0.75
ERF_TAIL_MAX = 10.0  # the tail's fitted range ends here; exp(-a^2) is 0 in float32 from a = 9.4
ERF_SMALL = (1.1283791670697263, -0.3761263845175094, 0.1128377874777813, -0.026864779737784738,
             0.005216816650103182, -0.000835735651383564, 9.472998678392853e-05)  # erf(a) / a in a^2
ERFC_TAIL = (2.5739337920881416e-06, 0.2820152820362129, 0.28317019193489523, 0.2384605749888111,
             0.21771365899753092, -0.05111180412299307, 0.2832609640324668, -0.43447456807537477,
             0.19018459268306168, 0.010234319661284996, -0.019492585668781863)  # erfc(a) exp(a^2) in t

# Elements from which the chunks may run in parallel: below it one thread finishes in about the time a
# parallel region takes to start (docs/benchmarks.md, "Why the thresholds are where they are").
# Above it they do while other processes leave CPUs free (threads.parallel_region): the GPT's
# (1024, 512) GELU takes ~0.3 ms on one thread, and beside a busy process a two-thread region of
# that size ran slower than one thread (docs/benchmarks.md, issue 26).
PARALLEL_MIN = 1 << 16
# exp's argument is clamped here: round(-88 / ln 2) = -127, whose 2^n bits are 0.0 (exp(-88) = 6e-39,
# under float32's smallest normal; cupy's build flushes such results too).
EXP_F32_MIN = -88.0


def _num_threads() -> int:
    import numba

    return numba.get_num_threads()


def _plan(size: int) -> tuple[bool, int]:
    """(parallel, chunks): a few chunks per thread when the buffer is large enough and the machine
    has CPUs to spare (threads.parallel_region)."""
    if not _threads.parallel_region(size, PARALLEL_MIN):
        return False, 1
    return True, 4 * _num_threads()


def gelu_forward_numba(x, *, approximate="none"):
    spec = validate_gelu_forward(x, approximate=approximate)
    y = np.empty_like(x)
    if spec.size:
        parallel, chunks = _plan(spec.size)
        _numba_kernels(parallel, accumulation_dtype(spec.dtype).name)[spec.approximate][0](
            bits_view(x).reshape(-1), chunks, bits_view(y).reshape(-1))
    return y


def gelu_backward_numba(grad_y, x, *, approximate="none"):
    spec = validate_gelu_backward(grad_y, x, approximate=approximate)
    dx = np.empty_like(x)
    if spec.size:
        parallel, chunks = _plan(spec.size)
        _numba_kernels(parallel, accumulation_dtype(spec.dtype).name)[spec.approximate][1](
            bits_view(grad_y).reshape(-1), bits_view(x).reshape(-1), chunks, bits_view(dx).reshape(-1))
    return dx


@functools.cache
def _bits_to_float32():
    """A numba intrinsic: the float32 whose bits are the given int32 (LLVM bitcast, vectorizable)."""
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def bits_to_float32(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return types.float32(types.int32), codegen

    return bits_to_float32


@functools.cache
def _numba_kernels(parallel: bool, dtype: str) -> dict:
    """{"tanh": (forward, backward), "none": (forward, backward)} for one dtype, over chunks of
    the flat buffer in parallel (prange) or on the calling thread. ``dtype`` is the compute dtype:
    float16 and bfloat16 arrays run the float32 build on their bit views (kernels.cpu.optim.bits_view),
    each element read as float32 and rounded once when stored (kernels/cpu/half_bits.py)."""
    import numba

    from ..cpu.half_bits import load, store

    # `loop` and the dtype's constants are closure variables, so each build gets its own key in
    # numba's on-disk cache.
    loop = numba.prange if parallel else range
    jit = numba.njit(cache=True, parallel=parallel, fastmath=False, error_model="numpy")
    inline = numba.njit(cache=True, fastmath=False, error_model="numpy", inline="always")
    f = np.float32 if dtype == "float32" else np.float64
    half, one, two = f(0.5), f(1), f(2)
    k, c = f(SQRT_2_OVER_PI), f(TANH_COEF)
    k2, c3 = f(2 * SQRT_2_OVER_PI), f(3 * TANH_COEF)
    inv_sqrt2, inv_sqrt2pi = f(INV_SQRT_2), f(INV_SQRT_2PI)
    square_max = f(SQUARE_MAX)

    if dtype == "float32":
        bits_to_float32 = _bits_to_float32()
        log2e, ln2_hi, ln2_lo = f(1.4426950408889634), f(0.693145751953125), f(1.4286068203094173e-06)
        taylor = tuple(f(1.0 / math.factorial(i)) for i in range(8))  # 1/0! ... 1/7!
        t7, t6, t5, t4, t3, t2, t1, t0 = taylor[::-1]
        exp_min = f(EXP_F32_MIN)

        @inline
        def exp_neg(a):  # exp(a) for a <= 0 in float32 arithmetic only
            # a >= -88 keeps n >= -127; n = -127 gives the bits of 0.0 for 2^n: exp flushes to 0
            # just below float32's normal range, with no extra select
            a = max(a, exp_min)
            n = np.floor(a * log2e + half)
            r = (a - n * ln2_hi) - n * ln2_lo
            p = ((((((t7 * r + t6) * r + t5) * r + t4) * r + t3) * r + t2) * r + t1) * r + t0
            return p * bits_to_float32(np.int32(n) + np.int32(127) << np.int32(23))

        e0, e1, e2, e3, e4, e5, e6 = (f(v) for v in ERF_SMALL)
        g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10 = (f(v) for v in ERFC_TAIL)
        split, tail_max, erf_split = f(4097), f(ERF_TAIL_MAX), f(ERF_SPLIT)
        x_max = f(1.5 * ERF_TAIL_MAX)  # past it erfc's tail is 0: clamping keeps the error terms finite
        r_hi = f(INV_SQRT_2)  # 1 / sqrt 2 = r_hi + r_lo; r_hi = r_h + r_l (Veltkamp halves)
        r_lo = f(INV_SQRT_2 - float(r_hi))
        r_h = f(split * r_hi - (split * r_hi - r_hi))
        r_l = f(r_hi - r_h)

        @inline
        def normal_parts(xv):  # (Phi(x), exp(-x^2 / 2)), as the comment above says
            v = -xv * r_hi
            xc = min(max(xv, -x_max), x_max)
            p = split * xc
            xh = p - (p - xc)
            xl = xc - xh
            v_err = -((((xh * r_h - xc * r_hi) + xh * r_l + xl * r_h) + xl * r_l) + xc * r_lo)  # v's rounding
            a = abs(v)
            sq = a * a
            erf_small = a * (((((((e6 * sq + e5) * sq + e4) * sq + e3) * sq + e2) * sq + e1) * sq) + e0)
            at = min(a, tail_max)
            s = at * at
            p = split * at
            ah = p - (p - at)
            al = at - ah
            a_err = v_err if v >= 0 else -v_err
            delta = (((ah * ah - s) + two * ah * al) + al * al) + two * at * a_err  # at^2 - s, + a's rounding
            t = one / (one + half * at)
            g = ((((((((((g10 * t + g9) * t + g8) * t + g7) * t + g6) * t + g5) * t + g4) * t + g3) * t + g2) * t
                  + g1) * t + g0)
            e = exp_neg(-s)
            e = e - e * delta  # exp(-a^2)
            tail = e * g
            small = a < erf_split
            erfc_a = one - erf_small if small else tail  # erfc(|v|)
            erfc_minus_a = one + erf_small if small else two - tail  # erfc(-|v|)
            cdf = half * (erfc_a if v >= 0 else erfc_minus_a)
            return cdf, e
    else:
        @inline
        def exp_neg(a):
            return math.exp(a)

        @inline
        def normal_parts(xv):  # (Phi(x), exp(-x^2 / 2)) from libm
            return half * math.erfc(-xv * inv_sqrt2), math.exp(-half * xv * xv)

    @inline
    def sigmoid_pair(xv):  # (sigmoid(2z), 1 - sigmoid(2z)) of the tanh form's z
        z = k * (xv + c * xv * xv * xv)
        e = exp_neg(-two * abs(z))
        hi = one / (one + e)
        lo = e * hi
        # two scalar selects: a select of tuples becomes a branch that stops LLVM vectorizing
        s = hi if z >= 0 else lo
        s_minus = lo if z >= 0 else hi
        return s, s_minus

    # Each chunk loops over its own slices from index 0: with ``range(start, stop)`` on the whole
    # buffer numba cannot prove the index non-negative, so every access keeps its negative-index
    # wraparound and LLVM leaves the loop scalar (3x slower; docs/benchmarks.md, issue 26).
    @jit
    def tanh_forward(x_all, chunks, y_all):
        n = x_all.size
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            x = x_all[chunk * per:min(n, (chunk + 1) * per)]
            y = y_all[chunk * per:min(n, (chunk + 1) * per)]
            for i in range(x.size):
                xv = load(x, i)
                z = k * (xv + c * xv * xv * xv)
                e = exp_neg(-two * abs(z))
                # sigmoid(2z) with one division; the select apart from the division (written inside
                # it, LLVM left the loop scalar)
                numerator = one if z >= 0 else e
                s = numerator / (one + e)
                store(y, i, xv * s)

    @jit
    def tanh_backward(dy_all, x_all, chunks, dx_all):
        n = x_all.size
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            dy = dy_all[chunk * per:min(n, (chunk + 1) * per)]
            x = x_all[chunk * per:min(n, (chunk + 1) * per)]
            dx = dx_all[chunk * per:min(n, (chunk + 1) * per)]
            for i in range(x.size):
                xv = load(x, i)
                s, sm = sigmoid_pair(xv)
                store(dx, i, load(dy, i) * (s + xv * s * sm * k2 * (one + c3 * min(xv * xv, square_max))))

    @jit
    def erf_forward(x_all, chunks, y_all):
        n = x_all.size
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            x = x_all[chunk * per:min(n, (chunk + 1) * per)]
            y = y_all[chunk * per:min(n, (chunk + 1) * per)]
            for i in range(x.size):
                xv = load(x, i)
                cdf, _ = normal_parts(xv)
                store(y, i, xv * cdf)

    @jit
    def erf_backward(dy_all, x_all, chunks, dx_all):
        n = x_all.size
        per = (n + chunks - 1) // chunks
        for chunk in loop(chunks):
            dy = dy_all[chunk * per:min(n, (chunk + 1) * per)]
            x = x_all[chunk * per:min(n, (chunk + 1) * per)]
            dx = dx_all[chunk * per:min(n, (chunk + 1) * per)]
            for i in range(x.size):
                xv = load(x, i)
                cdf, gauss = normal_parts(xv)
                store(dx, i, load(dy, i) * (cdf + xv * inv_sqrt2pi * gauss))

    kernels = {"tanh": (tanh_forward, tanh_backward), "none": (erf_forward, erf_backward)}
    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return {name: tuple(_numba_parallel(fn) for fn in pair) for name, pair in kernels.items()}
    return kernels

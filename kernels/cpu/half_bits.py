"""float16 and bfloat16 values inside ``numba.njit`` code, which has no 16-bit float type on the CPU.

A 16-bit array reaches a jitted loop as a view of its bits, and the view's integer type says which
format the bits are in: ``uint16`` for bfloat16, ``int16`` for float16
(``kernels.cpu.optim.bits_view`` makes the view).
:func:`load` and :func:`store` then read an element as float32 and write a float32 back rounded to
nearest-even, exactly as ``ml_dtypes`` / numpy cast (NaN included: bfloat16 gets ml_dtypes'
quiet NaN, float16 keeps numpy's payload). For float32 / float64 arrays they are plain indexing,
so one loop body serves every dtype; LLVM inlines them, so the float32 loops compile as before
(numba's own IR inlining, inline="always", breaks prange loops: "overwrite of parallel loop index").

Imports numba: import it only from code that builds jitted functions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

def load(a, i):
    """``a[i]`` as a float (float32 for 16-bit bit views). Jitted code only."""
    raise NotImplementedError("half_bits.load runs inside numba-jitted code only")


def store(a, i, x):
    """``a[i] = x``, rounded to nearest-even for 16-bit bit views. Jitted code only."""
    raise NotImplementedError("half_bits.store runs inside numba-jitted code only")


def rounded(a, x):
    """``x`` rounded to the format of ``a``'s elements, as a float (``x`` itself for float arrays).
    Jitted code only."""
    raise NotImplementedError("half_bits.rounded runs inside numba-jitted code only")


@njit(inline="always")
def bf16_to_f32(b):
    return np.uint32(np.uint32(b) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def f32_to_bf16(x):
    u = np.float32(x).view(np.uint32)
    if x != x:  # ml_dtypes: the sign and a quiet NaN
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(rounded >> np.uint32(16))


@njit(inline="always")
def f16_to_f32(h):
    u = np.uint32(h) & np.uint32(0xFFFF)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    exponent = (u >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = u & np.uint32(0x3FF)
    if exponent == 0:  # zero or subnormal: mantissa * 2^-24, exact in float32
        value = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return -value if sign else value
    if exponent == 31:  # inf, NaN (payload kept)
        bits = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    else:
        bits = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    return np.uint32(bits).view(np.float32)


@njit(inline="always")
def f32_to_f16(x):
    u = np.float32(x).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN: numpy keeps the top of the payload, and a NaN
        r = np.uint32(0x7C00) + ((a & np.uint32(0x7FFFFF)) >> np.uint32(13))
        if r == np.uint32(0x7C00):
            r = np.uint32(0x7C01)
    elif a >= np.uint32(0x477FF000):  # 65520 and above (inf too) round to inf
        r = np.uint32(0x7C00)
    elif a >= np.uint32(0x38800000):  # normal: rebias the exponent, round the mantissa to nearest-even
        r = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    else:  # subnormal or zero: |x| * 2^24 is exact, rint rounds half to even
        r = np.uint32(np.rint(np.uint32(a).view(np.float32) * np.float32(16777216.0)))
    return np.int16(np.uint16(sign | r))


@overload(load)
def _load(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: f16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(store)
def _store(a, i, x):
    if a.dtype == types.uint16:
        def store_bf16(a, i, x):
            a[i] = f32_to_bf16(x)
        return store_bf16
    if a.dtype == types.int16:
        def store_f16(a, i, x):
            a[i] = f32_to_f16(x)
        return store_f16

    def store_float(a, i, x):
        a[i] = x
    return store_float


@overload(rounded)
def _rounded(a, x):
    if a.dtype == types.uint16:
        return lambda a, x: bf16_to_f32(f32_to_bf16(x))
    if a.dtype == types.int16:
        return lambda a, x: f16_to_f32(f32_to_f16(x))
    return lambda a, x: x

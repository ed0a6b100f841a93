"""16-bit storage dtypes (float16, bfloat16) in the kernels: names, the float32 compute dtype, and
the bit-level conversions the numba_cpu kernels use.

A kernel that takes a 16-bit array loads each element as float32, computes (and accumulates) in
float32 or wider, and rounds once, to nearest even, when it stores a 16-bit result: PyTorch's
rule. bfloat16 arrays on the CPU are ``ml_dtypes.bfloat16`` (also what cupy 14 takes on the GPU).

numba has no float16 or bfloat16 type on the CPU, so the numba_cpu kernels see 16-bit arrays as
``uint16`` views (:func:`as_bits`) and convert with the intrinsics built here: bfloat16 is the top
half of a float32 (a shift one way, a rounding add the other), float16 follows the bit recipe of
F. Giesen's "half_to_float" / "float_to_half_fast3_rtne" (subnormals, inf and NaN included).
Both are branch-free selects LLVM vectorizes, and both are tested against numpy's and ml_dtypes'
own conversions on every 16-bit pattern and on float32 values around every rounding boundary.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
LOW_PRECISION = (FLOAT16, BFLOAT16)
# Every float dtype a fused kernel takes (16-bit ones computed in float32).
KERNEL_FLOAT_DTYPES = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)


def is_low_precision(dtype) -> bool:
    """float16 or bfloat16."""
    return np.dtype(dtype) in LOW_PRECISION


def compute_dtype(dtype) -> np.dtype:
    """The dtype a kernel computes a ``dtype`` array in: float32 for the 16-bit types, else itself."""
    dtype = np.dtype(dtype)
    return FLOAT32 if dtype in LOW_PRECISION else dtype


def as_bits(a):
    """A 16-bit array as the ``uint16`` view the numba_cpu kernels take; other arrays unchanged."""
    return a.view(np.uint16) if a is not None and a.dtype in LOW_PRECISION else a


def codec_name(dtype) -> str:
    """How a numba_cpu kernel reads and writes ``dtype`` elements: "native", "bfloat16" or "float16"."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype in LOW_PRECISION else "native"


@functools.cache
def _bitcasts():
    """numba intrinsics: (float32 -> its uint32 bits, int32 bits -> float32), LLVM bitcasts."""
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def float32_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def bits_to_float32(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        # the argument is converted to 32 bits first (numba widens integer sums to 64)
        width = types.uint32 if isinstance(bits, types.Integer) and not bits.signed else types.int32
        return types.float32(width), codegen

    return float32_bits, bits_to_float32


def bits_to_float32():
    """The numba intrinsic that reinterprets a 32-bit integer's bits as a float32."""
    return _bitcasts()[1]


@functools.cache
def numba_codec(name: str):
    """``(load, store)`` numba functions for a kernel's elements: ``load(element) -> float32 or the
    native value`` and ``store(float32 or native value) -> element``. ``name`` is :func:`codec_name`'s;
    "native" gives the identity (the array holds float32 / float64 values already)."""
    import numba

    inline = numba.njit(cache=True, fastmath=False, error_model="numpy", inline="always")
    if name == "native":
        @inline
        def identity(v):
            return v

        return identity, identity
    float32_bits, to_float32 = _bitcasts()
    u32 = np.uint32
    if name == "bfloat16":
        @inline
        def load_bf16(bits):
            return to_float32(u32(u32(bits) << u32(16)))

        @inline
        def store_bf16(value):
            f = np.float32(value)
            b = float32_bits(f)
            rounded = (b + u32(0x7FFF) + ((b >> u32(16)) & u32(1))) >> u32(16)  # to nearest, ties to even
            # (numba widens uint32 sums to 64 bits: no wrap-around, and np.uint16 keeps the low bits)
            quiet_nan = (b >> u32(16)) | u32(0x0040)  # keep the sign and top payload, set the quiet bit
            return np.uint16(quiet_nan if f != f else rounded)

        return load_bf16, store_bf16
    if name == "float16":
        magic = np.float32(2.0 ** -14)  # 113 << 23: renormalises a subnormal's mantissa
        denorm_magic = np.float32(0.5)  # ((127 - 15) + (23 - 10) + 1) << 23

        @inline
        def load_f16(bits):
            h = u32(bits)
            shifted = (h & u32(0x7FFF)) << u32(13)
            exponent = shifted & u32(0x0F800000)
            o = u32(shifted + u32(112 << 23))  # rebias 15 -> 127
            o = u32(o + u32(112 << 23)) if exponent == u32(0x0F800000) else o  # inf / NaN: exponent all ones
            sub = to_float32(u32(o + u32(1 << 23))) - magic  # zero or subnormal: exact in float32
            value = sub if exponent == u32(0) else to_float32(o)
            return to_float32(u32(float32_bits(value) | ((h & u32(0x8000)) << u32(16))))

        @inline
        def store_f16(value):
            f = np.float32(value)
            b = float32_bits(f)
            sign = (b >> u32(16)) & u32(0x8000)
            a = u32(b & u32(0x7FFFFFFF))
            special = u32(0x7E00) if a > u32(0x7F800000) else u32(0x7C00)  # NaN -> quiet NaN, else inf
            # below 2^-14 the result is subnormal or 0: adding 0.5 aligns the 10 mantissa bits at the
            # bottom, and float32 addition rounds them to nearest even
            sub = float32_bits(to_float32(a) + denorm_magic) - float32_bits(denorm_magic)
            odd = (a >> u32(13)) & u32(1)
            normal = (a - u32(112 << 23) + u32(0xFFF) + odd) >> u32(13)  # rebias 127 -> 15, round to even
            out = special if a >= u32(0x47800000) else (sub if a < u32(113 << 23) else normal)
            return np.uint16(out | sign)

        return load_f16, store_f16
    raise ValueError(f"numba_codec: unknown codec {name!r}; expected 'native', 'bfloat16' or 'float16'")

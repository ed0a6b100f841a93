"""float16 / bfloat16 <-> float32 conversions for the numba_cpu impls, written on the bit patterns.

numba compiles for neither ``numpy.float16`` nor ``ml_dtypes.bfloat16`` arrays, so the numba_cpu
impls compute 16-bit data on float32 copies (kernels/precision.py) and convert at the boundary.
NumPy's own ``astype`` is the reference (the ``numpy`` impls use it) but its float32 -> float16
conversion is slow where the result is a float16 subnormal (below 6.1e-5, which most softmax
probabilities of a wide row are; docs/benchmarks.md, "Why the thresholds are where they are", has
the figures). These loops view the arrays as uint16 and do the same conversions, round to nearest
even, bit for bit equal to ``astype`` (NaNs stay NaNs, with the sign; their payload may differ).

``import engine.kernels.cpu.convert`` does not import numba: the loops are compiled on first use.
"""

from __future__ import annotations

import functools

import numpy as np

from ..precision import ACCUMULATION, float_name


def widen(a):
    """``a`` as a new float32 array if it is float16 / bfloat16, else ``a`` itself (None stays None)."""
    if a is None or float_name(a.dtype) not in ("float16", "bfloat16"):
        return a
    name = float_name(a.dtype)
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, ACCUMULATION)
    bits, wide = a.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32)
    loops = _loops()
    if name == "bfloat16":
        loops.bf16_to_f32(bits, wide)
    else:
        loops.f16_to_f32(bits, wide, _f16_table())
    return out


def narrow(a, dtype):
    """A float32 array ``a`` rounded once (to nearest even) to float16 / bfloat16 ``dtype`` (a new
    array); ``a`` itself when ``dtype`` is neither. None stays None."""
    name = float_name(dtype)
    if a is None or name not in ("float16", "bfloat16"):
        return a
    a = np.ascontiguousarray(a, dtype=ACCUMULATION)
    out = np.empty(a.shape, dtype)
    bits, wide = out.reshape(-1).view(np.uint16), a.reshape(-1).view(np.uint32)
    loops = _loops()
    (loops.f32_to_bf16 if name == "bfloat16" else loops.f32_to_f16)(wide, bits)
    return out


@functools.cache
def _f16_table() -> np.ndarray:
    """float32 bits of every float16 bit pattern (exact: float16 -> float32 never rounds)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


class _Loops:
    def __init__(self, **fns):
        self.__dict__.update(fns)


@functools.cache
def _loops() -> _Loops:
    import numba

    jit = numba.njit(cache=True)

    @jit
    def bf16_to_f32(bits, out):
        for i in range(bits.shape[0]):
            out[i] = np.uint32(bits[i]) << np.uint32(16)

    @jit
    def f16_to_f32(bits, out, table):
        for i in range(bits.shape[0]):
            out[i] = table[bits[i]]

    @jit
    def f32_to_bf16(wide, out):
        for i in range(wide.shape[0]):
            f = wide[i]
            if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep the sign, stay quiet
                out[i] = np.uint16((f >> np.uint32(16)) | np.uint32(0x40))
            else:  # + 0x7FFF, + 1 more when the kept part is odd: round half to even
                out[i] = np.uint16((f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @jit
    def f32_to_f16(wide, out):
        # float16: 5 exponent bits (bias 15), 10 fraction bits; float32: 8 (bias 127) and 23.
        one = np.uint32(1)
        for i in range(wide.shape[0]):
            f = wide[i]
            sign = (f >> np.uint32(16)) & np.uint32(0x8000)
            f &= np.uint32(0x7FFFFFFF)
            if f >= np.uint32(0x47800000):  # |x| >= 2^16 (inf in float16), inf, NaN
                h = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
            elif f >= np.uint32(0x38800000):  # a normal float16: rebias, round half to even on 13 bits
                odd = (f >> np.uint32(13)) & one
                h = (f - np.uint32((127 - 15) << 23) + np.uint32(0xFFF) + odd) >> np.uint32(13)
            else:  # |x| < 2^-14: a float16 subnormal (units of 2^-24) or zero
                e = f >> np.uint32(23)
                m = (f & np.uint32(0x7FFFFF)) | (np.uint32(0x800000) if e else np.uint32(0))
                shift = np.uint32(126) - e if e else np.uint32(125)  # |x| = m 2^(e - 150): m 2^-24 >> shift
                if shift >= np.uint32(32):
                    h = np.uint32(0)
                else:
                    q = m >> shift
                    rest = m & ((one << shift) - one)
                    half = one << (shift - one)
                    if rest > half or (rest == half and (q & one)):
                        q += one  # 1023 + 1 carries into the exponent: the smallest normal, correct
                    h = q
            out[i] = np.uint16(h | sign)

    return _Loops(bf16_to_f32=bf16_to_f32, f16_to_f32=f16_to_f32, f32_to_bf16=f32_to_bf16, f32_to_f16=f32_to_f16)

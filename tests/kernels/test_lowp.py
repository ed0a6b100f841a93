"""kernels/cpu/lowp.py: the bit-level float16 / bfloat16 conversions the numba_cpu kernels use,
against numpy's and ml_dtypes' own casts, on every 16-bit pattern and on float32 values at and
around every rounding boundary (ties to even, overflow to inf, subnormals, NaN)."""

import ml_dtypes
import numpy as np
import pytest

from kernels.cpu import lowp

pytest.importorskip("numba")

CODECS = [("bfloat16", np.dtype(ml_dtypes.bfloat16)), ("float16", np.dtype(np.float16))]


def _loops(name):
    import numba

    load, store = lowp.numba_codec(name)

    @numba.njit
    def decode(bits, out):
        for i in range(bits.size):
            out[i] = load(bits[i])

    @numba.njit
    def encode(values, out):
        for i in range(values.size):
            out[i] = store(values[i])

    return decode, encode


def _same(a, b):
    """Bit-equal float32 arrays, any NaN matching any NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("name,dtype", CODECS)
def test_decode_every_16_bit_pattern(name, dtype):
    decode, _ = _loops(name)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(bits.size, np.float32)
    decode(bits, got)
    assert _same(got, bits.view(dtype).astype(np.float32)).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the NaN patterns
@pytest.mark.parametrize("name,dtype", CODECS)
def test_encode_rounds_to_nearest_even_like_numpy(name, dtype):
    _, encode = _loops(name)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype).astype(np.float64)
    finite = np.sort(every[np.isfinite(every)])
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties (float32 holds them), and one float32 step either side
    mids32 = mids.astype(np.float32)
    around = [mids32, np.nextafter(mids32, np.float32(np.inf)), np.nextafter(mids32, np.float32(-np.inf))]
    random_bits = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.array([65504, 65519.996, 65520, 65536, 3.4e38, np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0,
                        2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1e-45, -1e-45, 2.0 ** -126, 2.0 ** -133], np.float32)
    values = np.concatenate([*around, random_bits.view(np.float32), special, every.astype(np.float32)])
    got = np.empty(values.size, np.uint16)
    encode(values, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(dtype)
    assert _same(got.view(dtype).astype(np.float32), want.astype(np.float32)).all()
    # signs survive, NaN stays a (quiet) NaN
    assert np.signbit(got.view(dtype)[values.size - 65536:]).sum() == np.signbit(want[values.size - 65536:]).sum()


def test_names_and_compute_dtypes():
    assert lowp.codec_name(np.float32) == lowp.codec_name(np.float64) == "native"
    assert lowp.codec_name(ml_dtypes.bfloat16) == "bfloat16" and lowp.codec_name(np.float16) == "float16"
    assert lowp.compute_dtype(np.float16) == lowp.compute_dtype(ml_dtypes.bfloat16) == np.float32
    assert lowp.compute_dtype(np.float64) == np.float64
    x = np.ones(3, ml_dtypes.bfloat16)
    assert lowp.as_bits(x).dtype == np.uint16 and lowp.as_bits(x).base is x
    with pytest.raises(ValueError, match="unknown codec"):
        lowp.numba_codec("float8")

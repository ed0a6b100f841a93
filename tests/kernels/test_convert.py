"""kernels/cpu/convert.py: the numba_cpu impls' 16-bit <-> float32 conversions equal NumPy's astype
bit for bit (round to nearest even, subnormals, overflow to inf, signed zeros; NaN stays NaN)."""

import numpy as np
import pytest

from engine.kernels.cpu import convert
from tests.kernels.helpers import BF16, F16, LOW_DTYPES


def _float32_patterns():
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x00000001, 0x807FFFFF,
                        0x3F800000, 0x477FEFFF, 0x477FF000, 0x477FE000, 0x47800000, 0x38800000, 0x387FFFFF,
                        0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x7F7FFFFF, 0x3F808000, 0x3F818000],
                       np.uint32)
    # every float16 value, and just below / at / just above the halfway point to the next one
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    ties = [halves + np.uint32(d) for d in (0, (1 << 12) - 1, 1 << 12, (1 << 12) + 1)]
    small = (rng.random(100_000).astype(np.float32) * np.float32(1e-5)).view(np.uint32)  # float16 subnormals
    patterns = np.concatenate([random, special, *ties, small])
    return np.concatenate([patterns, patterns | np.uint32(0x80000000)]).view(np.float32)


PATTERNS = _float32_patterns()


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.slow
def test_narrow_equals_astype_bit_for_bit(dtype):
    with np.errstate(all="ignore"):
        expected = PATTERNS.astype(dtype)
    ours = convert.narrow(PATTERNS, dtype)
    assert ours.dtype == dtype and ours.shape == PATTERNS.shape
    nan = np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(ours.astype(np.float32)), nan)
    np.testing.assert_array_equal(ours.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    np.testing.assert_array_equal(np.signbit(ours.astype(np.float32)), np.signbit(expected.astype(np.float32)))


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.slow
def test_widen_is_exact_for_every_16_bit_pattern(dtype):
    every = np.arange(1 << 16, dtype=np.uint16).view(dtype).reshape(256, 256)
    ours = convert.widen(every)
    assert ours.dtype == np.float32 and ours.shape == (256, 256)
    expected = every.astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def test_other_dtypes_and_none_pass_through():
    a = np.ones(3, np.float32)
    assert convert.widen(a) is a and convert.narrow(a, np.float32) is a and convert.widen(None) is None
    assert convert.narrow(None, F16) is None
    strided = np.arange(8, dtype=np.float32)[::2]
    np.testing.assert_array_equal(convert.narrow(strided, BF16).astype(np.float32), strided)
    np.testing.assert_array_equal(convert.widen(strided.astype(F16)[::-1]), strided[::-1])

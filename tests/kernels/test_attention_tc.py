"""16-bit attention in every impl, and the tensor-core kernels (attention_tc.cu) without a GPU.

- bfloat16 / float16 on the CPU impls: computed in float32, rounded once, against the float64
  definition (and numba_cpu against numpy).
- The NumPy replay of the tensor-core kernel (kernels/cuda/attention_emulation.py: same tiles,
  same online softmax, same roundings, same 3xTF32 split) against the float64 definition, for every
  mask kind, causal with L != S, fully masked rows, odd L and S, NaN and inf; plain TF32 (the split
  dropped) fails the float32 tolerance, so a lost split would show.
- The replay of the tensor-core backward (16-bit and 3xTF32, E 64 and 128) against the
  float64 gradients, for the same grid of cases, and its NaN / inf against PyTorch's CPU SDPA (as
  the CPU impls' on bfloat16 inputs).
- The cupy wrapper's choice of kernel and its launch plan under a fake cupy (forward and
  backward), and the .cu constants against the host's.
- ``gpu``-marked: the cupy impl against the definition and against the replay, per variant.
"""

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from engine import kernels
from engine.kernels.cuda import attention as cu
from engine.kernels.cuda.attention_emulation import round_tf32, split_tf32, tc_backward, tc_forward
from engine.kernels.registry import KernelError
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.test_attention import (_poison, make_case, make_mask, reference, run, torch_like_reference,
                                          assert_same_nonfinite)

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOW = [pytest.param(BF16, id="bf16"), pytest.param(F16, id="f16")]
TC_DTYPES = LOW + [pytest.param(np.dtype(np.float32), id="f32-3xtf32")]
MASKS = [None, "shared", "padding", "full", "keys"]


def tolerance(dtype) -> dict:
    """Two units in the last place of the storage dtype (bf16 2^-7, fp16 2^-10, relative and
    absolute; out is O(1)); float32 the float32 tolerance of tests/kernels/test_attention.py."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return dict(rtol=2 ** -6, atol=2 ** -6)
    if dtype == F16:
        return dict(rtol=2 ** -9, atol=2 ** -9)
    return dict(rtol=2e-4, atol=2e-5)


def low_case(shape, dtype, seed=0):
    """q, k, v rounded to ``dtype`` (the float64 reference then sees the very values the kernel sees)."""
    return tuple(a.astype(dtype) for a in make_case(*shape, seed=seed))


def grad_tolerance(dtype, want) -> dict:
    tol = tolerance(dtype)
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(np.abs(want).max()) if want.size else 1.0))


def reference_grads(q, k, v, mask, scale, causal, grad_out):
    """float64 (dq, dk, dv) of the definition, from the numpy impl on float64 inputs."""
    q64, k64, v64, g64 = (a.astype(np.float64) for a in (q, k, v, grad_out))
    m64 = None if mask is None else mask.astype(np.float64)
    out, lse = kernels.attention_forward(q64, k64, v64, m64, scale=scale, causal=causal, impl="numpy")
    return kernels.attention_backward(g64, q64, k64, v64, out, lse, m64, scale=scale, causal=causal, impl="numpy")


# ---- 16-bit inputs on the CPU impls -----------------------------------------------------------


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "padding", "full"])
def test_cpu_impls_take_16_bit_inputs(impl, dtype, causal, mask_kind):
    b, l, s, e, ev = 2, 37, 70, 7, 5
    q, k, v = low_case((b, l, s, e, ev), dtype, seed=4)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)  # float32 mask with 16-bit inputs
    out, lse = kernels.attention_forward(q, k, v, mask, scale=0.4, causal=causal, impl=impl)
    assert out.dtype == dtype and lse.dtype == np.float32
    ref_out, ref_lse = reference(q, k, v, mask, 0.4, causal)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # the float32 result rounded once: equal to the float32 computation on the widened inputs
    out32, _ = kernels.attention_forward(*(a.astype(np.float32) for a in (q, k, v)), mask, scale=0.4, causal=causal,
                                         impl=impl)
    np.testing.assert_array_equal(out, out32.astype(dtype))
    grad_out = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, mask, scale=0.4, causal=causal, impl=impl)
    for name, got, want in zip(("dq", "dk", "dv"), grads, reference_grads(q, k, v, mask, 0.4, causal, grad_out)):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got.astype(np.float64), want, err_msg=name, **grad_tolerance(dtype, want))


def test_a_16_bit_mask_is_taken_and_other_dtypes_are_named():
    q, k, v = low_case((2, 3, 4, 5, 6), BF16)
    mask = make_mask("padding", 2, 3, 4)
    got = kernels.attention_forward(q, k, v, mask.astype(BF16), scale=0.5, impl="numpy")
    want = kernels.attention_forward(q, k, v, mask.astype(BF16).astype(np.float32), scale=0.5, impl="numpy")
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(KernelError, match="mask has dtype float16 but q has bfloat16; the mask of 16-bit"):
        kernels.attention_forward(q, k, v, mask.astype(np.float16), scale=0.5, impl="numpy")
    with pytest.raises(KernelError, match="k has dtype float32 but q has bfloat16"):
        kernels.attention_forward(q, k.astype(np.float32), v, scale=0.5, impl="numpy")
    out, lse = kernels.attention_forward(q, k, v, scale=0.5, impl="numpy")
    with pytest.raises(KernelError, match="lse has dtype bfloat16 but q has bfloat16; lse is float32"):
        kernels.attention_backward(out, q, k, v, out, lse.astype(BF16), scale=0.5, impl="numpy")
    with pytest.raises(KernelError, match="precision must be one of"):
        kernels.attention_forward(q, k, v, scale=0.5, precision="tf32", impl="numpy")


def test_numba_cuda_refuses_16_bit_inputs_by_name():
    pytest.importorskip("numba.cuda")
    from engine.kernels.numba_cuda.attention import attention_forward

    q, k, v = low_case((2, 3, 4, 8, 8), F16)
    with pytest.raises(KernelError, match=r"attention_forward \(numba_cuda\): dtype float16 .* cupy impl"):
        attention_forward(q, k, v, scale=0.5)


def test_empty_16_bit_calls_keep_the_dtypes():
    q, k, v = low_case((2, 3, 0, 4, 5), BF16)  # S = 0: every row fully masked
    out, lse = kernels.attention_forward(q, k, v, scale=1.0, impl="numba_cpu")
    assert out.dtype == BF16 and lse.dtype == np.float32 and np.isneginf(lse).all() and not out.astype(float).any()
    grads = kernels.attention_backward(out, q, k, v, out, lse, scale=1.0, impl="numba_cpu")
    assert [g.dtype for g in grads] == [BF16] * 3


# ---- the tensor-core kernel's replay against the definition -----------------------------------


def test_tf32_rounding_is_to_nearest_ties_away():
    one = np.float32(1)
    ulp = np.float32(2.0 ** -10)  # TF32 keeps 10 mantissa bits
    x = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2.0 ** -23, 1 + 3 * ulp / 2, np.inf, -np.inf, np.nan,
                  np.finfo(np.float32).max], np.float32)
    got = round_tf32(x)
    np.testing.assert_array_equal(got[:6], np.array([one + ulp, -(one + ulp), one, one + 2 * ulp, np.inf, -np.inf],
                                                     np.float32))
    assert np.isnan(got[6]) and np.isinf(got[7])  # the largest float rounds past TF32's largest: inf
    big, small, cross = split_tf32(np.array([np.pi, np.inf, np.nan], np.float32))
    assert big[0] + small[0] == np.float32(np.pi) or abs(float(big[0]) + float(small[0]) - np.pi) < 2 ** -20
    assert (small[1:] == 0).all() and (cross[1:] == 0).all() and np.isinf(big[1]) and np.isnan(big[2])


TC_SHAPES = [
    (2, 37, 70),    # L != S, partial query block and key tiles
    (1, 130, 67),   # L > S: causal rows past S see every key; three query blocks
    (2, 1, 9),      # one query row
    (1, 64, 129),   # full query block, a one-key last tile
]


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", TC_SHAPES, ids=[f"{b}x{l}x{s}" for b, l, s in TC_SHAPES])
def test_emulated_tc_forward_matches_the_definition(dtype, hd, causal, mask_kind, shape):
    b, l, s = shape
    q, k, v = low_case((b, l, s, hd, hd), dtype, seed=l + s + hd)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    scale = hd ** -0.5
    out, lse = tc_forward(q, k, v, mask, scale=scale, causal=causal)
    ref_out, ref_lse = reference(q, k, v, mask, scale, causal)
    assert out.dtype == dtype and lse.dtype == np.float32
    np.testing.assert_allclose(out.astype(np.float64), ref_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hd", [64, 128])
def test_plain_tf32_would_fail_the_float32_tolerance(hd):
    """The float32 check has teeth: with the split's small terms dropped (1xTF32), the replay misses
    the float32 tolerance that 3xTF32 meets; a split bug of that size would show."""
    q, k, v = make_case(2, 70, 90, hd, hd, seed=3)
    ref_out, _ = reference(q, k, v, None, hd ** -0.5, True)
    good, _ = tc_forward(q, k, v, scale=hd ** -0.5, causal=True, tf32_terms=3)
    np.testing.assert_allclose(good, ref_out, **tolerance(np.float32))
    plain, _ = tc_forward(q, k, v, scale=hd ** -0.5, causal=True, tf32_terms=1)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(plain, ref_out, **tolerance(np.float32))


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_emulated_fully_masked_rows_give_zero_and_minus_inf(dtype):
    b, l, s = 3, 70, 80
    q, k, v = low_case((b, l, s, 64, 64), dtype, seed=11)
    mask = make_mask("full", b, l, s)
    mask[0, 2, :] = -np.inf
    mask[2] = -np.inf
    out, lse = tc_forward(q, k, v, mask, scale=0.125)
    live = ~np.isneginf(mask).all(-1)
    assert not out[~live].astype(np.float32).any() and np.isneginf(lse[~live]).all() and np.isfinite(lse[live]).all()
    assert (~live).sum() == l + 1
    ref_out, _ = reference(q, k, v, np.where(np.isneginf(mask).all(-1, keepdims=True), 0, mask), 0.125)
    np.testing.assert_allclose(out.astype(np.float64)[live], ref_out[live], **tolerance(dtype))


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_emulated_backward_from_the_tc_forward_state(dtype):
    """The backward (CUDA cores, P recomputed from lse) fed the tensor-core forward's out and lse:
    gradients within the dtype's tolerance of the definition's."""
    b, l, s, hd = 2, 45, 77, 64
    q, k, v = low_case((b, l, s, hd, hd), dtype, seed=8)
    mask = make_mask("padding", b, l, s)
    out, lse = tc_forward(q, k, v, mask, scale=0.125, causal=True)
    grad_out = np.random.default_rng(9).standard_normal(out.shape).astype(dtype)
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, mask, scale=0.125, causal=True, impl="numpy")
    for name, got, want in zip(("dq", "dk", "dv"), grads, reference_grads(q, k, v, mask, 0.125, True, grad_out)):
        tol = grad_tolerance(dtype, want)
        if dtype == np.float32:  # out carries the 3xTF32 error into D = dO . out
            tol = dict(rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
        np.testing.assert_allclose(got.astype(np.float64), want, err_msg=name, **tol)


NONFINITE = ["nan_q", "inf_q", "nan_k", "inf_k", "nan_v", "inf_v", "nan_mask", "inf_mask", "masked_key_nan_v",
             "full_row", "full_row_nan_v", "full_row_nan_mask", "causal_nan_q", "causal_nan_k"]


@pytest.mark.parametrize("name", NONFINITE)
def test_emulated_3xtf32_propagates_nan_and_inf_as_torch(name):
    """The split keeps a non-finite operand out of the correction terms (inf * 0 there would turn an
    inf result into NaN): NaN and inf land where PyTorch puts them."""
    pytest.importorskip("torch")
    q, k, v, mask, causal = _poison(name)
    q, k, v = (np.ascontiguousarray(np.pad(a, ((0, 0), (0, 0), (0, 64 - a.shape[2])))) for a in (q, k, v))
    out, _ = tc_forward(q, k, v, mask, scale=0.125, causal=causal)  # torch's default, 1 / sqrt(64)
    want = torch_like_reference(q, k, v, mask, causal, np.zeros(out.shape, np.float32))
    assert_same_nonfinite(out, want[0], f"3xtf32 {name} out")


# ---- the tensor-core backward's replay against the definition ----------------------------------


TC_BWD_VARIANTS = [pytest.param(BF16, 64, id="bf16-64"), pytest.param(BF16, 128, id="bf16-128"),
                   pytest.param(F16, 64, id="f16-64"), pytest.param(F16, 128, id="f16-128"),
                   pytest.param(np.dtype(np.float32), 64, id="f32-3xtf32-64"),
                   pytest.param(np.dtype(np.float32), 128, id="f32-3xtf32-128")]


@pytest.mark.parametrize("dtype,hd", TC_BWD_VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", TC_SHAPES, ids=[f"{b}x{l}x{s}" for b, l, s in TC_SHAPES])
def test_emulated_tc_backward_matches_the_definition(dtype, hd, causal, mask_kind, shape):
    """dq, dk, dv of the replay (fed the replayed forward's out and lse) against the float64
    gradients. Tolerance: grad_tolerance, 2 ulps of the dtype relative to the largest gradient
    (bf16 2^-6, fp16 2^-9). The kernel rounds P and dS to the dtype before their products (as
    FlashAttention-2), an error of 1/2 ulp per term that partly cancels over the keys / queries;
    measured at most 0.9 ulp (bf16 6.9e-3, fp16 7.6e-4 of the largest gradient) over this grid.
    float32 (3xTF32): the float32 gradient tolerance x 5 (as for the CUDA-core backward fed the
    3xTF32 forward's out); measured 7.3e-7 of the largest gradient, and plain TF32 fails it
    (test_plain_tf32_backward_would_fail_the_float32_tolerance)."""
    b, l, s = shape
    q, k, v = low_case((b, l, s, hd, hd), dtype, seed=l + s + hd)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    scale = hd ** -0.5
    out, lse = tc_forward(q, k, v, mask, scale=scale, causal=causal)
    grad_out = np.random.default_rng(l + s).standard_normal(out.shape).astype(dtype)
    grads = tc_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
    for name, got, want in zip(("dq", "dk", "dv"), grads, reference_grads(q, k, v, mask, scale, causal, grad_out)):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got.astype(np.float64), want, err_msg=name, **tc_grad_tolerance(dtype, want))


def tc_grad_tolerance(dtype, want) -> dict:
    """grad_tolerance, x 5 for float32 (the 3xTF32 forward's out error reaches D = dO . out)."""
    tol = grad_tolerance(dtype, want)
    if np.dtype(dtype) == np.float32:
        tol = dict(rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
    return tol


@pytest.mark.parametrize("hd", [64, 128])
def test_plain_tf32_backward_would_fail_the_float32_tolerance(hd):
    """As for the forward: without the split's small terms the backward misses the tolerance (at 128
    too, where the replay makes the kernel's two column passes)."""
    q, k, v = make_case(2, 70, 90, hd, hd, seed=4)
    scale = hd ** -0.5
    out, lse = tc_forward(q, k, v, scale=scale, causal=True)
    grad_out = np.random.default_rng(6).standard_normal(out.shape).astype(np.float32)
    want = reference_grads(q, k, v, None, scale, True, grad_out)
    good = tc_backward(grad_out, q, k, v, out, lse, scale=scale, causal=True)
    plain = tc_backward(grad_out, q, k, v, out, lse, scale=scale, causal=True, tf32_terms=1)
    for got, bad, expected in zip(good, plain, want):
        np.testing.assert_allclose(got, expected, **tc_grad_tolerance(np.float32, expected))
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(bad, expected, **tc_grad_tolerance(np.float32, expected))


@pytest.mark.parametrize("dtype", LOW)
def test_emulated_tc_backward_would_see_a_lost_tile(dtype):
    """The comparison has teeth: drop one query tile's contribution (as a wrong causal start or tile
    count would) and the gradients leave the tolerance."""
    b, l, s, hd = 1, 130, 70, 64
    q, k, v = low_case((b, l, s, hd, hd), dtype, seed=2)
    out, lse = tc_forward(q, k, v, scale=0.125)
    grad_out = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
    cut = grad_out.copy()
    cut[:, 64:128] = 0  # one query tile's dO gone: its dk, dv terms vanish
    want = reference_grads(q, k, v, None, 0.125, False, grad_out)
    _, dk, dv = tc_backward(cut, q, k, v, out, lse, scale=0.125)
    for got, expected in ((dk, want[1]), (dv, want[2])):
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(got.astype(np.float64), expected, **grad_tolerance(dtype, expected))


@pytest.mark.parametrize("dtype", LOW)
def test_emulated_tc_backward_fully_masked_rows_get_no_gradient(dtype):
    b, l, s = 2, 70, 80
    q, k, v = low_case((b, l, s, 64, 64), dtype, seed=12)
    mask = make_mask("full", b, l, s)
    mask[0, 2, :] = -np.inf
    mask[1, 40:, :] = -np.inf
    out, lse = tc_forward(q, k, v, mask, scale=0.125)
    grad_out = np.random.default_rng(13).standard_normal(out.shape).astype(dtype)
    dq, dk, dv = tc_backward(grad_out, q, k, v, out, lse, mask, scale=0.125)
    dead = np.isneginf(mask).all(-1)
    assert not dq[dead].astype(np.float32).any()
    live_mask = np.where(dead[..., None], 0, mask)  # the definition on the live rows only
    want = reference_grads(q, k, v, live_mask, 0.125, False, np.where(dead[..., None], 0, grad_out).astype(dtype))
    for name, got, expected in zip(("dk", "dv"), (dk, dv), want[1:]):
        np.testing.assert_allclose(got.astype(np.float64), expected, err_msg=name, **grad_tolerance(dtype, expected))


@pytest.mark.parametrize("dtype,hd", [pytest.param(BF16, 64, id="bf16-64"),
                                      pytest.param(np.dtype(np.float32), 64, id="f32-3xtf32-64"),
                                      pytest.param(np.dtype(np.float32), 128, id="f32-3xtf32-128")])
@pytest.mark.parametrize("name", NONFINITE)
def test_emulated_tc_backward_propagates_nan_and_inf_as_torch(name, dtype, hd):
    """NaN and inf in q, k, v or the mask reach out, dq, dk, dv where PyTorch's CPU SDPA puts them
    (bf16 inputs widened for torch; float32 through the 3xTF32 split's non-finite guard, at 128 over
    the two column passes; causal: dq NaN at least where torch's is, dk / dv not compared, as
    tests/kernels/test_attention.py's assert_nonfinite_like_reference says why)."""
    pytest.importorskip("torch")
    q, k, v, mask, causal = _poison(name)
    q, k, v = (np.ascontiguousarray(np.pad(a, ((0, 0), (0, 0), (0, hd - a.shape[2])))).astype(dtype) for a in (q, k, v))
    scale = hd ** -0.5  # torch's default
    out, lse = tc_forward(q, k, v, mask, scale=scale, causal=causal)
    grad_out = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = tc_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
    assert_16_bit_nonfinite_as_torch(name, (out, *grads), q, k, v, grad_out, mask, causal)


def assert_16_bit_nonfinite_as_torch(name, results, q, k, v, grad_out, mask, causal):
    """(out, dq, dk, dv) of 16-bit (or float32) inputs against PyTorch's CPU SDPA on the same values
    widened to float32: equal NaN and inf positions, finite values within the dtype's tolerance
    (causal: dq NaN at least where torch's is, dk / dv not compared, as in
    tests/kernels/test_attention.py)."""
    f32 = [a.astype(np.float32) for a in (q, k, v, grad_out)]
    want = torch_like_reference(*f32[:3], mask, causal, f32[3])
    for what, got, expected in list(zip(("out", "dq", "dk", "dv"), results, want))[:2 if causal else 4]:
        got = got.astype(np.float32)
        if causal and what == "dq":
            assert np.isnan(got)[np.isnan(expected)].all(), f"{name} dq: NaN turned into numbers"
            continue
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"{name} {what}: NaN positions")
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{name} {what}: inf positions")
        np.testing.assert_allclose(got[finite], expected[finite], err_msg=f"{name} {what}",
                                   **grad_tolerance(q.dtype, expected[finite]))


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("name", NONFINITE)
def test_cpu_impls_16_bit_propagate_nan_and_inf_as_torch(impl, name):
    """The CPU impls on bfloat16 inputs: no NaN row turned into zeros (float32 is covered by
    tests/kernels/test_attention.py's test_nan_and_inf_propagate_as_in_torch)."""
    pytest.importorskip("torch")
    q, k, v, mask, causal = _poison(name)
    q, k, v = (a.astype(BF16) for a in (q, k, v))
    out, lse = kernels.attention_forward(q, k, v, mask, scale=0.5, causal=causal, impl=impl)  # torch's 1 / sqrt(4)
    grad_out = np.random.default_rng(5).standard_normal(out.shape).astype(BF16)
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, mask, scale=0.5, causal=causal, impl=impl)
    assert_16_bit_nonfinite_as_torch(name, (out, *grads), q, k, v, grad_out, mask, causal)


def test_emulated_tc_backward_refuses_what_the_kernel_does_not_take():
    q, k, v = low_case((1, 5, 6, 32, 32), BF16)
    with pytest.raises(ValueError, match="E = Ev in"):
        tc_backward(q, q, k, v, q, np.zeros((1, 5), np.float32), scale=0.125)
    q, k, v = make_case(1, 5, 6, 64, 128)
    with pytest.raises(ValueError, match="E = 64, Ev = 128"):
        tc_backward(v[:, :5], q, k, v, v[:, :5], np.zeros((1, 5), np.float32), scale=0.125)
    q, k, v = make_case(1, 5, 6, 64, 64)
    with pytest.raises(ValueError, match="float64"):
        tc_backward(*(a.astype(np.float64) for a in (q, q, k, v, q)), np.zeros((1, 5), np.float32), scale=0.125)


# ---- the cupy wrapper: kernel choice and launch plan ------------------------------------------

TC_TEXT = (Path(kernels.__file__).parent / "cuda" / "attention_tc.cu").read_text()


def test_tc_constants_match_the_host():
    assert int(re.search(r"constexpr int TC_THREADS = (\d+);", TC_TEXT).group(1)) == cu.TC_THREADS
    assert int(re.search(r"constexpr int TC_ROWS = (\d+);", TC_TEXT).group(1)) == cu.TC_ROWS
    assert cu.TC_ROWS == 16 * cu.TC_THREADS // 32  # 16 rows per warp: one m16 MMA block
    assert re.search(r"struct TcKeys \{ static constexpr int value = 64; \};", TC_TEXT)
    assert re.search(r"struct TcKeys<float, 128> \{ static constexpr int value = 32; \};", TC_TEXT)
    assert [cu.tc_keys(d, hd) for d in (BF16, F16, np.float32) for hd in (64, 128)] == [64, 64, 64, 64, 64, 32]
    assert re.search(r"struct TcPad \{ static constexpr int value = 8; \};", TC_TEXT) and cu.tc_pad(BF16) == 8
    assert re.search(r"struct TcPad<float> \{ static constexpr int value = 4; \};", TC_TEXT) and cu.tc_pad(
        np.float32) == 4
    for name in ("bf16", "f16", "f32"):
        for hd in cu.TC_HEAD_DIMS:
            assert re.search(rf"ATTN_TC_FWD\([\w ]+, {name}, {hd},", TC_TEXT), (name, hd)
    assert int(re.search(r"constexpr int TC_BWD_KEYS = (\d+);", TC_TEXT).group(1)) == cu.TC_BWD_KEYS
    assert cu.TC_BWD_KEYS == 16 * cu.TC_THREADS // 32  # 16 keys per warp: one m16 MMA block
    assert re.search(r"struct TcBwdRows \{ static constexpr int value = HD == 128 \? 32 : 64; \};", TC_TEXT)
    assert re.search(r"struct TcBwdRows<float, HD> \{ static constexpr int value = HD == 128 \? 16 : 32; \};",
                     TC_TEXT)
    assert [cu.tc_bwd_rows(d, hd) for d in (BF16, F16, np.float32) for hd in (64, 128)] == [64, 32, 64, 32, 32, 16]
    assert re.search(r"struct TcBwdPasses \{ static constexpr int value = 1; \};", TC_TEXT)
    assert re.search(r"struct TcBwdPasses<float, 128> \{ static constexpr int value = 2; \};", TC_TEXT)
    assert [cu.tc_bwd_passes(d, hd) for d in (BF16, F16, np.float32) for hd in (64, 128)] == [1, 1, 1, 1, 1, 2]
    backward = set(re.findall(r"^ATTN_TC_BWD\([\w ]+, (\w+), (\d+), ", TC_TEXT, re.M))
    assert backward == {(cu.dtype_name(d), str(hd)) for d in (BF16, F16, np.float32) for hd in cu.TC_HEAD_DIMS}


def _instantiated_kernels() -> set[str]:
    """extern "C" names of attention_tc.cu (forward and backward, every dtype and head dim), for
    tests/kernels/test_gpu_compile.py: each must be in the NVRTC build, with its register count."""
    forward = re.findall(r"^ATTN_TC_FWD\([\w ]+, (\w+), (\d+),", TC_TEXT, re.M)
    backward = re.findall(r"^ATTN_TC_BWD\([\w ]+, (\w+), (\d+), ", TC_TEXT, re.M)
    return ({f"attn_tc_fwd_{name}_hd{hd}" for name, hd in forward}
            | {f"attn_tc_bwd_{name}_hd{hd}" for name, hd in backward})


def test_instantiated_kernels_are_every_variant():
    assert _instantiated_kernels() == ({f"attn_tc_fwd_{n}_hd{hd}" for n in ("bf16", "f16", "f32") for hd in (64, 128)}
                                       | {f"attn_tc_bwd_{n}_hd{hd}" for n in ("bf16", "f16", "f32") for hd in (64, 128)})


@pytest.mark.parametrize("dtype", [BF16, F16, np.dtype(np.float32)])
@pytest.mark.parametrize("hd", [64, 128])
def test_tc_backward_shared_memory_fits_and_is_conflict_free(dtype, hd):
    """K, V, two Q and two dO tiles, and dS^T fit an A100's opt-in limit. dS^T's rows (BM + pad
    elements): 16-bit, the accumulator stores (8 rows x 4 words per warp) hit 32 distinct banks and
    the ldmatrix.trans phases (8 rows of 16 bytes) 8 distinct bank quads; float, the dS fragment
    loads of dQ (rows 2q, 2q + 1 x 8 queries) and K's (rows 2q x 8 columns) hit 32 distinct banks."""
    assert cu.tc_bwd_shared_bytes(dtype, hd) <= cu.SHARED_LIMITS["sm_80"]
    row_bytes = (cu.tc_bwd_rows(dtype, hd) + cu.tc_pad(dtype)) * dtype.itemsize
    assert row_bytes % 16 == 0
    if dtype.itemsize == 2:
        assert len({(g * row_bytes // 4 + q) % 32 for g in range(8) for q in range(4)}) == 32
        assert len({(r * row_bytes // 16) % 8 for r in range(8)}) == 8
    else:
        words, k_words = row_bytes // 4, hd + cu.tc_pad(dtype)
        for stride in (words, k_words):
            assert len({(2 * q * stride + g) % 32 for g in range(8) for q in range(4)}) == 32


@pytest.mark.parametrize("dtype", [BF16, F16, np.dtype(np.float32)])
@pytest.mark.parametrize("hd", [64, 128])
def test_tc_shared_memory_fits_and_is_conflict_free(dtype, hd):
    shared = cu.tc_shared_bytes(dtype, hd)
    assert shared <= cu.SHARED_LIMITS["sm_80"] <= cu.SHARED_LIMITS["sm_90"]
    row_bytes = (hd + cu.tc_pad(dtype)) * np.dtype(dtype).itemsize
    assert row_bytes % 16 == 0  # cp.async and ldmatrix rows stay 16-byte aligned
    if np.dtype(dtype).itemsize == 2:  # ldmatrix: 8 rows of 16 bytes in one phase hit 8 distinct bank quads
        assert len({(r * row_bytes // 16) % 8 for r in range(8)}) == 8
    else:  # fragment loads: 8 rows x 4 columns (and V's rows 2q, 2q + 1 x 8 columns) in 32 distinct banks
        words = row_bytes // 4
        assert len({(g * words + q) % 32 for g in range(8) for q in range(4)}) == 32
        assert len({(2 * q * words + g) % 32 for g in range(8) for q in range(4)}) == 32


def _fake_inputs(fake, dtype, b, l, s, e, ev, mask_shape=None, misalign=False):
    rng = np.random.default_rng(0)

    def array(shape):
        host = rng.standard_normal(shape).astype(dtype)
        if misalign:  # a contiguous view 2 bytes into its buffer
            flat = np.empty(host.size + 1, dtype)
            flat[1:] = host.ravel()
            host = flat[1:].reshape(shape)
            return cu_ndarray(fake, host)
        return fake.on(1, host)

    q, k, v = array((b, l, e)), array((b, s, e)), array((b, s, ev))
    mask = None if mask_shape is None else fake.on(1, np.zeros(mask_shape, np.float32))
    return q, k, v, mask


def cu_ndarray(fake, host):
    from tests.kernels.fake_cupy import ndarray

    return ndarray(host, 1, fake)


@pytest.mark.parametrize("dtype,precision,hd,tc", [
    (BF16, None, 64, True), (BF16, None, 128, True), (F16, None, 64, True), (F16, None, 128, True),
    (np.float32, "3xtf32", 64, True), (np.float32, "3xtf32", 128, True),
    (np.float32, None, 64, False),  # float32 stays on CUDA cores unless asked (GPU-unverified kernel)
    (BF16, "exact", 64, False),  # every dtype on CUDA cores on request
])
def test_tc_launch_plan(fake_cupy, dtype, precision, hd, tc):  # noqa: F811
    fake = fake_cupy
    b, l, s = 3, 130, 77
    q, k, v, mask = _fake_inputs(fake, dtype, b, l, s, hd, hd, (b, 1, s))
    out, lse = cu.attention_forward(q, k, v, mask, scale=0.25, causal=True, precision=precision)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32 and out.shape == (b, l, hd)
    (fwd,) = fake.launches
    name = cu.dtype_name(dtype)
    if not tc:
        assert fwd.name == f"attn_fwd_{name}_hd{hd}" and fwd.grid == (b, -(-l // 32)) and fwd.shared_mem == 0
        return
    assert fwd.name == f"attn_tc_fwd_{name}_hd{hd}" and fwd.device == 1 and fwd.block == (cu.TC_THREADS,)
    assert fwd.grid == (b, -(-l // cu.TC_ROWS))
    shared = (cu.TC_ROWS + 4 * cu.tc_keys(dtype, hd)) * (hd + cu.tc_pad(dtype)) * np.dtype(dtype).itemsize
    assert fwd.shared_mem == shared == cu.tc_shared_bytes(dtype, hd) <= cu.SHARED_LIMITS["sm_90"]
    if shared > cu.STATIC_SHARED_LIMIT:
        assert fwd.kernel.max_dynamic_shared_size_bytes == shared
    else:
        assert not hasattr(fwd.kernel, "max_dynamic_shared_size_bytes")
    assert fwd.args[:3] == (q, k, v) and fwd.args[3] is mask and fwd.args[4] is out and fwd.args[5] is lse
    assert [int(a) for a in fwd.args[6:12]] == [l, s, s, 0, 1, 1]  # L, S, key-padding strides, has_mask, causal
    assert fwd.args[8].dtype == np.int64 and fwd.args[12] == np.float32(0.25)


@pytest.mark.parametrize("case", ["e_ne_ev", "hd32", "hd96", "misaligned"])
def test_tc_forward_falls_back_to_cuda_cores(fake_cupy, case):  # noqa: F811
    fake = fake_cupy
    e, ev = {"e_ne_ev": (64, 128), "hd32": (32, 32), "hd96": (96, 96), "misaligned": (64, 64)}[case]
    q, k, v, _ = _fake_inputs(fake, BF16, 2, 10, 12, e, ev, misalign=case == "misaligned")
    cu.attention_forward(q, k, v, scale=0.25)
    (fwd,) = fake.launches
    assert fwd.name == f"attn_fwd_bf16_hd{cu.head_dim_bucket(e, ev)}"


@pytest.mark.parametrize("e", [64, 96])
def test_16_bit_backward_launch_plan(fake_cupy, e):  # noqa: F811
    """rowdot, then the tensor-core backward (E = 64) or the CUDA-core one (E = 96), then dq's float
    sums rounded once to the dtype."""
    fake = fake_cupy
    b, l, s = 2, 33, 40
    q, k, v, _ = _fake_inputs(fake, F16, b, l, s, e, e)
    mask16 = fake.on(1, np.zeros((1, l, s), np.float16))
    out, lse = cu.attention_forward(q, k, v, mask16, scale=0.25)
    (fwd,) = fake.launches
    assert fwd.args[3].dtype == np.float32 and fwd.args[3] is not mask16  # widened for the kernel
    fake.launches.clear()
    dq, dk, dv = cu.attention_backward(out, q, k, v, out, lse, scale=0.25)
    rowdot, bwd, finish = fake.launches
    expected = "attn_tc_bwd_f16_hd64" if e == 64 else "attn_bwd_f16_hd128"
    assert (rowdot.name, bwd.name, finish.name) == ("attn_bwd_rowdot_f16", expected, "attn_bwd_finish_f16")
    assert bwd.args[6] is rowdot.args[2] and bwd.args[7].dtype == np.float32
    assert finish.args[0] is bwd.args[7] and finish.args[1] is dq
    assert int(finish.args[2]) == b * l * e and finish.block == (256,)
    assert (dq.dtype, dk.dtype, dv.dtype) == (F16, F16, F16)


@pytest.mark.parametrize("dtype,precision,hd,tc", [
    (BF16, None, 64, True), (BF16, None, 128, True), (F16, None, 64, True), (F16, None, 128, True),
    (np.float32, "3xtf32", 64, True), (np.float32, "3xtf32", 128, True),  # 128: two column passes in the kernel
    (np.float32, None, 64, False), (np.float32, None, 128, False), (BF16, "exact", 64, False),
])
def test_tc_backward_launch_plan(fake_cupy, dtype, precision, hd, tc):  # noqa: F811
    fake = fake_cupy
    b, l, s = 3, 130, 77
    q, k, v, mask = _fake_inputs(fake, dtype, b, l, s, hd, hd, (b, 1, s))
    out, lse = cu.attention_forward(q, k, v, mask, scale=0.25, causal=True, precision=precision)
    fake.launches.clear()
    dq, dk, dv = cu.attention_backward(out, q, k, v, out, lse, mask, scale=0.25, causal=True, precision=precision)
    name = cu.dtype_name(dtype)
    rowdot, bwd, *finish = fake.launches
    assert rowdot.name == f"attn_bwd_rowdot_{name}" and len(finish) == (np.dtype(dtype).itemsize == 2)
    if not tc:
        assert bwd.name == f"attn_bwd_{name}_hd{hd}" and bwd.grid == (b, -(-s // 32)) and bwd.shared_mem == 0
        return
    assert bwd.name == f"attn_tc_bwd_{name}_hd{hd}" and bwd.device == 1 and bwd.block == (cu.TC_THREADS,)
    assert bwd.grid == (b, -(-s // cu.TC_BWD_KEYS))
    rows, pad, size = cu.tc_bwd_rows(dtype, hd), cu.tc_pad(dtype), np.dtype(dtype).itemsize
    shared = ((2 * 64 + 4 * rows) * (hd + pad) + 64 * (rows + pad)) * size
    assert bwd.shared_mem == shared == cu.tc_bwd_shared_bytes(dtype, hd) <= cu.SHARED_LIMITS["sm_80"]
    assert shared > cu.STATIC_SHARED_LIMIT and bwd.kernel.max_dynamic_shared_size_bytes == shared
    assert bwd.args[:6] == (q, k, v, mask, out, lse) and bwd.args[6] is rowdot.args[2]
    assert bwd.args[7].dtype == np.float32 and bwd.args[7].shape == (b, l, hd) and not bwd.args[7].host.any()
    assert bwd.args[8] is dk and bwd.args[9] is dv and (finish[0].args[1] if finish else bwd.args[7]) is dq
    assert [int(a) for a in bwd.args[10:16]] == [l, s, s, 0, 1, 1]  # L, S, key-padding strides, has_mask, causal
    assert bwd.args[12].dtype == np.int64 and bwd.args[16] == np.float32(0.25) and len(bwd.args) == 17


@pytest.mark.parametrize("case", ["e_ne_ev", "hd32", "misaligned_grad_out"])
def test_tc_backward_falls_back_to_cuda_cores(fake_cupy, case):  # noqa: F811
    fake = fake_cupy
    e, ev = {"e_ne_ev": (64, 128), "hd32": (32, 32), "misaligned_grad_out": (64, 64)}[case]
    q, k, v, _ = _fake_inputs(fake, BF16, 2, 10, 12, e, ev)
    out, lse = cu.attention_forward(q, k, v, scale=0.25)
    grad_out = out
    if case == "misaligned_grad_out":  # cp.async needs 16-byte rows: a view 2 bytes in takes the SIMT kernel
        grad_out = cu_ndarray(fake, _misaligned(out.host))
    fake.launches.clear()
    cu.attention_backward(grad_out, q, k, v, out, lse, scale=0.25)
    assert fake.launches[1].name == f"attn_bwd_bf16_hd{cu.head_dim_bucket(e, ev)}"


def _misaligned(host):
    flat = np.empty(host.size + 1, host.dtype)
    flat[1:] = host.ravel()
    return flat[1:].reshape(host.shape)


# ---- on a GPU: the cupy impl against the definition and the replay -----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(BF16, None), (F16, None), (np.dtype(np.float32), "3xtf32"),
                                             (BF16, "exact"), (np.dtype(np.float32), None)])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_cupy_variants_match_the_definition(dtype, precision, hd, causal, mask_kind):
    b, l, s = 2, 130, 77
    q, k, v = low_case((b, l, s, hd, hd), dtype, seed=hd)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    kw = dict(scale=hd ** -0.5, causal=causal, precision=precision)
    out, lse = run("cupy", "attention_forward", q, k, v, mask, **kw)
    ref_out, ref_lse = reference(q, k, v, mask, hd ** -0.5, causal)
    assert out.dtype == dtype and lse.dtype == np.float32
    np.testing.assert_allclose(out.astype(np.float64), ref_out, **tolerance(dtype))
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if precision != "exact" and not (dtype == np.float32 and precision is None):
        emulated, _ = tc_forward(q, k, v, mask, scale=hd ** -0.5, causal=causal)
        np.testing.assert_allclose(out.astype(np.float64), emulated.astype(np.float64), **tolerance(dtype))
    grad_out = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    grads = run("cupy", "attention_backward", grad_out, q, k, v, out, lse, mask, **kw)
    for name, got, want in zip(("dq", "dk", "dv"), grads, reference_grads(q, k, v, mask, hd ** -0.5, causal, grad_out)):
        tol = grad_tolerance(dtype, want)
        if dtype == np.float32:
            tol = dict(rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
        np.testing.assert_allclose(got.astype(np.float64), want, err_msg=name, **tol)
    tc_backward_ran = (dtype.itemsize == 2 and precision != "exact") or precision == "3xtf32"
    if tc_backward_ran:  # the tensor-core backward against its replay
        emulated = tc_backward(grad_out, q, k, v, out, lse, mask, scale=hd ** -0.5, causal=causal)
        for name, got, want in zip(("dq", "dk", "dv"), grads, emulated):
            want = want.astype(np.float64)
            np.testing.assert_allclose(got.astype(np.float64), want, err_msg=f"{name} vs replay",
                                       **tc_grad_tolerance(dtype, want))


@pytest.mark.gpu
@pytest.mark.parametrize("name", NONFINITE)
def test_cupy_tc_backward_nan_and_inf_as_its_replay(name):
    """The tensor-core backward's NaN / inf positions are its replay's (which the CPU test holds to
    PyTorch's)."""
    q, k, v, mask, causal = _poison(name)
    q, k, v = (np.ascontiguousarray(np.pad(a, ((0, 0), (0, 0), (0, 60)))).astype(BF16) for a in (q, k, v))
    out, lse = tc_forward(q, k, v, mask, scale=0.125, causal=causal)
    grad_out = np.random.default_rng(5).standard_normal(out.shape).astype(BF16)
    grads = run("cupy", "attention_backward", grad_out, q, k, v, out, lse, mask, scale=0.125, causal=causal)
    for what, got, want in zip(("dq", "dk", "dv"), grads, tc_backward(grad_out, q, k, v, out, lse, mask, scale=0.125,
                                                                         causal=causal)):
        got, want = got.astype(np.float32), want.astype(np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name} {what}: NaN positions")
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{name} {what}: inf positions")


@pytest.mark.gpu
@pytest.mark.parametrize("name", NONFINITE)
@pytest.mark.parametrize("dtype,precision", [(BF16, None), (np.dtype(np.float32), "3xtf32")])
def test_cupy_tc_nan_and_inf_as_torch(name, dtype, precision):
    q, k, v, mask, causal = _poison(name)
    q, k, v = (np.ascontiguousarray(np.pad(a, ((0, 0), (0, 0), (0, 60)))).astype(dtype) for a in (q, k, v))
    out, lse = run("cupy", "attention_forward", q, k, v, mask, scale=0.125, causal=causal, precision=precision)
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    want = torch_like_reference(*f32, mask, causal, np.zeros(out.shape, np.float32))[0]
    got = out.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN positions")
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{name}: inf positions")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], err_msg=name, **tolerance(dtype))

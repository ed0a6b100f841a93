"""numba_cuda softmax_cross_entropy under the Numba CUDA simulator, against the numpy impl.

Small rows (the simulator runs one Python thread per CUDA thread), at most 16 threads per row, so
rows longer than 16 classes make each thread walk several columns and the tree reductions run
several steps; C = 1 and rows that are not a power of two cover the edges.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError
from tests.kernels.helpers import make_cross_entropy_case as make_case


def assert_matches_numpy(z, targets, weight=None, **kw):
    loss, grad = kernels.softmax_cross_entropy(z, targets, weight, impl="numba_cuda", **kw)
    ref_loss, ref_grad = kernels.softmax_cross_entropy(z, targets, weight, impl="numpy", **kw)
    assert loss.dtype == z.dtype and loss.shape == ref_loss.shape
    tight = z.dtype == np.float64
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12 if tight else 2e-5, atol=1e-12 if tight else 2e-5)
    if ref_grad is None:
        assert grad is None
    else:
        assert grad.dtype == z.dtype and grad.shape == z.shape
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-10 if tight else 1e-4, atol=1e-13 if tight else 2e-6)
    return loss, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,c", [(1, 1), (4, 1), (3, 5), (3, 37)])
def test_hard_targets(dtype, n, c):
    z, targets, weight = make_case(n, c, dtype, seed=n * 100 + c, weighted=True)
    if n > 2:
        targets[1] = -100
    assert_matches_numpy(z, targets)
    assert_matches_numpy(z, targets, weight, label_smoothing=0.2, grad_scale=0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_targets(dtype):
    z, q, weight = make_case(2, 19, dtype, kind="soft", seed=3, weighted=True)
    assert_matches_numpy(z, q)
    assert_matches_numpy(z, q, weight, label_smoothing=0.1, grad_scale=2.0)


def test_int32_targets_custom_ignore_index_and_no_grad():
    z, targets, weight = make_case(4, 23, np.float32, seed=5, weighted=True, index_dtype=np.int32)
    targets[2] = 7
    loss, grad = assert_matches_numpy(z, targets, weight, ignore_index=7, label_smoothing=0.1)
    assert loss[2] == 0 and not grad[2].any()
    assert_matches_numpy(z, targets, weight, ignore_index=7, label_smoothing=0.1, compute_grad=False)


def test_every_row_ignored_and_empty_batch():
    z, targets, _ = make_case(2, 9, np.float32, seed=7)
    targets[:] = -100
    loss, grad = assert_matches_numpy(z, targets)
    assert not loss.any() and not grad.any()
    loss, grad = kernels.softmax_cross_entropy(np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                               impl="numba_cuda")
    assert loss.shape == (0,) and grad.shape == (0, 4)


def test_extreme_and_masked_logits():
    z = np.array([np.linspace(-1e4, 1e4, 20), np.linspace(1e38, 3e38, 20), np.full(20, 5e-39)], np.float32)
    targets = np.array([3, 0, 19])
    loss, grad = assert_matches_numpy(z, targets, label_smoothing=0.1)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    masked = make_case(2, 20, np.float32, seed=9)[0]
    masked[:, 5:9] = -np.inf
    loss, grad = assert_matches_numpy(masked, np.array([0, 19]))
    assert np.isfinite(loss).all() and not grad[:, 5:9].any()


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_float16_is_float32_with_the_gradient_rounded_once(kind):
    """float16 logits in the simulator: float32 loss equal to the numpy impl's to float32 rounding, the
    float16 gradient within one ulp of its (both are one rounding of float32 values)."""
    z, targets, weight = make_case(4, 37, np.float32, kind, seed=17, weighted=True)
    z, weight = z.astype(np.float16), weight.astype(np.float16)
    targets = targets.astype(np.float16) if kind == "soft" else targets
    if kind == "hard":
        targets[2] = -100
    kw = dict(label_smoothing=0.1, grad_scale=np.array([0.5], np.float32))
    loss, grad = kernels.softmax_cross_entropy(z, targets, weight, impl="numba_cuda", **kw)
    ref_loss, ref_grad = kernels.softmax_cross_entropy(z, targets, weight, impl="numpy", **kw)
    assert loss.dtype == np.float32 and grad.dtype == np.float16
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-5)
    err = np.abs(grad.astype(np.float64) - ref_grad.astype(np.float64))
    assert (err <= 2.0**-10 * np.abs(ref_grad.astype(np.float64)) + 1e-6).all(), err.max()
    z[1, 5] = np.nan
    loss, grad = kernels.softmax_cross_entropy(z, targets, impl="numba_cuda")
    assert np.isnan(loss[1]) and np.isnan(grad[1].astype(np.float32)).all() and np.isfinite(loss[0])


def test_bfloat16_is_refused_with_the_registrys_error():
    import ml_dtypes

    z = np.ones((2, 3), ml_dtypes.bfloat16)
    with pytest.raises(KernelError, match=r"impl 'numba_cuda' does not take bfloat16 arrays; it takes float32, "
                                          r"float64, float16"):
        kernels.get("softmax_cross_entropy", "numba_cuda")(z, np.zeros(2, np.int64))


@pytest.mark.parametrize("bad", [9, -2])
def test_target_out_of_range_is_an_error(bad):
    z, targets, _ = make_case(3, 9, np.float32, seed=11)
    targets[1] = bad
    with pytest.raises(KernelError, match=rf"{bad}\b.*outside the classes \[0, C\) = \[0, 9\)"):
        kernels.softmax_cross_entropy(z, targets, impl="numba_cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_cuda_denominator_out_matches_the_numpy_impl(dtype):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((7, 11)).astype(dtype)
    t = np.array([3, -100, 0, 10, 2, -100, 4], np.int64)
    results = {}
    for impl in ("numpy", "numba_cuda"):
        den = np.full(1, np.nan, dtype)
        loss, grad = kernels.softmax_cross_entropy(z, t, denominator_out=den, impl=impl)
        results[impl] = (den, loss, grad)
    assert results["numba_cuda"][0].tolist() == results["numpy"][0].tolist() == [5.0]
    np.testing.assert_allclose(results["numba_cuda"][1], results["numpy"][1], rtol=1e-6)
    np.testing.assert_allclose(results["numba_cuda"][2], results["numpy"][2], rtol=1e-6, atol=1e-7)

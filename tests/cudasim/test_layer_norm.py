"""numba_cuda layer_norm under the Numba CUDA simulator, against the numpy impl.

Small rows (the simulator runs one Python thread per CUDA thread), at most 16 threads per block
and 3 backward blocks, so rows longer than 16 make each thread walk several columns, the tree
reductions run several steps, and more than 3 rows make a block's partial row of dw / db sum
several rows; D = 1, N = 0 and sizes that are not powers of two cover the edges.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError


def make_case(n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3, (n, 1)) + rng.uniform(-2, 2, (n, 1))).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return x, dy, rng.uniform(0.5, 2.0, d).astype(dtype), rng.standard_normal(d).astype(dtype)


def assert_matches_numpy(x, dy, weight, bias, **kw):
    tight = x.dtype == np.float64
    tol = dict(rtol=1e-12, atol=1e-12) if tight else dict(rtol=2e-5, atol=2e-5)
    got = kernels.layer_norm_forward(x, weight, bias, impl="numba_cuda", **kw)
    want = kernels.layer_norm_forward(x, weight, bias, impl="numpy", **kw)
    for g, w in zip(got, want):
        assert g.dtype == x.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, **tol)
    _, mean, rstd = want
    got = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cuda")
    want = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numpy")
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == x.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, **tol)
    return got


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d", [(1, 1), (4, 1), (3, 5), (7, 37), (2, 16), (5, 64)])
def test_affine(dtype, n, d):
    assert_matches_numpy(*make_case(n, d, dtype, seed=n * 100 + d), eps=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_affine_and_weight_only(dtype):
    x, dy, weight, bias = make_case(5, 23, dtype, seed=3)
    dx, dw, db = assert_matches_numpy(x, dy, None, None)
    assert dw is None and db is None
    assert_matches_numpy(x, dy, weight, None)
    assert_matches_numpy(x, dy, None, bias)


def test_compute_weight_grads_false_and_empty_batch():
    x, dy, weight, bias = make_case(4, 19, np.float32, seed=5)
    _, mean, rstd = kernels.layer_norm_forward(x, weight, bias, impl="numpy")
    dx, dw, db = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cuda",
                                             compute_weight_grads=False)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numpy")[0],
                               rtol=2e-5, atol=2e-5)
    x, dy, weight, bias = make_case(0, 6, np.float32)
    y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, impl="numba_cuda")
    assert y.shape == (0, 6) and mean.shape == (0,)
    dx, dw, db = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cuda")
    assert dx.shape == (0, 6) and not dw.any() and not db.any()


@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n,d", [(1, 1), (3, 5), (7, 37), (5, 64)])
def test_float16(weight_dtype, n, d):
    """numba's float16 in the simulator: float32 statistics (mean and rstd come back float32),
    float32 partial rows, y / dx rounded once to float16, dw / db to weight's dtype; against the
    numpy impl within one float16 rounding (plus float32 noise near zero)."""
    x, dy, weight, bias = make_case(n, d, np.float16, seed=n * 10 + d)
    weight, bias = weight.astype(weight_dtype), bias.astype(weight_dtype)
    got = kernels.layer_norm_forward(x, weight, bias, impl="numba_cuda")
    want = kernels.layer_norm_forward(x, weight, bias, impl="numpy")
    assert [a.dtype for a in got] == [np.float16, np.float32, np.float32]
    np.testing.assert_allclose(got[0].astype(np.float32), want[0].astype(np.float32), rtol=2.0 ** -10, atol=1e-3)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    _, mean, rstd = want
    got = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cuda")
    want = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numpy")
    assert [a.dtype for a in got] == [np.float16, np.dtype(weight_dtype), np.dtype(weight_dtype)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=2.0 ** -10, atol=1e-3)


def test_bfloat16_is_refused_by_name():
    import ml_dtypes

    x = np.ones((2, 3), ml_dtypes.bfloat16)
    with pytest.raises(KernelError, match=r"'layer_norm_forward': impl 'numba_cuda' does not take bfloat16"):
        kernels.layer_norm_forward(x, impl="numba_cuda")
    s = np.ones(2, np.float32)
    # called directly (past the registry), the impl refuses with the same words
    with pytest.raises(KernelError, match=r"'layer_norm_backward': impl 'numba_cuda' does not take bfloat16"):
        kernels.get("layer_norm_backward", "numba_cuda")(x, x, None, s, s)


def test_bad_input_is_refused():
    with pytest.raises(KernelError, match="layer_norm_forward.*weight must have shape"):
        kernels.layer_norm_forward(np.ones((2, 3), np.float32), np.ones(4, np.float32), impl="numba_cuda")


def test_eps_zero_and_negative_eps_as_torch():
    from tests.kernels.test_layer_norm import assert_eps_edges_like_torch

    def run_impl(x, dy, weight, bias, eps):
        y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, eps=eps, impl="numba_cuda")
        return [y, *kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cuda")]

    assert_eps_edges_like_torch(run_impl)

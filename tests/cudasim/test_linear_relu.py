"""numba_cuda linear_relu kernels under the Numba CUDA simulator, against the numpy impl.

Small sizes only (the simulator runs one Python thread per CUDA thread), but sizes that are not
multiples of the 16 x 16 GEMM tile or of the 32 x 8 prologue block, several tiles along every
dimension, and more than 8 rows so that the two-stage db reduction runs.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError


def make_inputs(rng, n, k, m, dtype, bias=True):
    x = rng.uniform(0.5, 1.5, (n, k)) * rng.choice([-1.0, 1.0], (n, k))
    w = rng.uniform(0.5, 1.5, (m, k)) * rng.choice([-1.0, 1.0], (m, k)) / np.sqrt(max(k, 1))
    b = rng.uniform(0.1, 1.0, m) * rng.choice([-1.0, 1.0], m) if bias else None
    dy = rng.uniform(0.5, 1.5, (n, m)) * rng.choice([-1.0, 1.0], (n, m))
    cast = (lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype))
    return cast(x), cast(w), cast(b), cast(dy)


def assert_close(actual, expected, k):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = 1e-5 if actual.dtype == np.float32 else 1e-13
    err = np.linalg.norm(actual.astype(np.float64) - expected.astype(np.float64))
    assert err <= eps * np.sqrt(max(k, 1)) * max(np.linalg.norm(expected.astype(np.float64)), 1e-30)


@pytest.mark.parametrize("shape,dtype,bias", [
    ((37, 29, 53), np.float32, True),   # several tiles everywhere; 5 block rows in the prologue
    ((17, 18, 5), np.float64, False),   # 2 tiles of rows and of K; float64
    ((9, 1, 1), np.float32, True),      # K = 1, M = 1
    ((1, 1, 1), np.float64, True),
    ((1, 3, 20), np.float32, False),    # N = 1
])
def test_numba_cuda_matches_numpy_impl(shape, dtype, bias):
    rng = np.random.default_rng(sum(shape))
    n, k, m = shape
    x, w, b, dy = make_inputs(rng, n, k, m, dtype, bias)
    y = kernels.linear_relu_forward(x, w, b, impl="numba_cuda")
    y_ref = kernels.linear_relu_forward(x, w, b, impl="numpy")
    assert_close(y, y_ref, k)
    grads = kernels.linear_relu_backward(dy, x, w, y_ref, impl="numba_cuda")
    refs = kernels.linear_relu_backward(dy, x, w, y_ref, impl="numpy")
    for got, ref, terms in zip(grads, refs, (m, n, n)):
        assert_close(got, ref, terms)


def test_numba_cuda_backward_without_grad_x():
    rng = np.random.default_rng(3)
    x, w, b, dy = make_inputs(rng, 19, 17, 21, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    grad_x, grad_w, grad_b = kernels.linear_relu_backward(dy, x, w, y, compute_grad_x=False, impl="numba_cuda")
    _, ref_w, ref_b = kernels.linear_relu_backward(dy, x, w, y, impl="numpy")
    assert grad_x is None
    assert_close(grad_w, ref_w, 19)
    assert_close(grad_b, ref_b, 19)


def test_numba_cuda_empty_edges():
    rng = np.random.default_rng(0)
    x, w, b, dy = make_inputs(rng, 0, 4, 3, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numba_cuda")
    assert y.shape == (0, 3) and y.dtype == np.float32
    dx, dw, db = kernels.linear_relu_backward(dy, x, w, y, impl="numba_cuda")
    assert dx.shape == (0, 4) and not dw.any() and not db.any() and dw.shape == (3, 4)
    # K = 0: the GEMM is empty and y = relu(b) on every row.
    x, w, b, _ = make_inputs(rng, 2, 0, 3, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numba_cuda")
    np.testing.assert_array_equal(y, np.broadcast_to(np.maximum(b, 0), (2, 3)))


def assert_within_one_ulp(actual, expected, magnitude):
    """Two float16 results each rounded once from float32 sums (of different order): within one unit
    in the last place (2 u |value|, u = 2^-11) plus the float32 error of the sums."""
    assert actual.dtype == expected.dtype == np.float16 and actual.shape == expected.shape
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert (err <= 2.0**-10 * np.abs(expected.astype(np.float64)) + 1e-5 * magnitude).all(), err.max()


@pytest.mark.parametrize("shape,bias", [((37, 29, 53), True), ((9, 1, 1), False), ((17, 18, 5), True)])
def test_numba_cuda_float16_is_float32_rounded_once(shape, bias):
    """float16 in the simulator: loads widened to float32, float32 tiles and sums, one rounding."""
    rng = np.random.default_rng(sum(shape) + 1)
    n, k, m = shape
    x, w, b, dy = make_inputs(rng, n, k, m, np.float16, bias)
    wide = (lambda a: None if a is None else a.astype(np.float64))
    y = kernels.linear_relu_forward(x, w, b, impl="numba_cuda")
    assert_within_one_ulp(y, kernels.linear_relu_forward(x, w, b, impl="numpy"),
                          np.abs(wide(x)) @ np.abs(wide(w)).T + (0 if b is None else np.abs(wide(b))))
    grads = kernels.linear_relu_backward(dy, x, w, y, impl="numba_cuda")
    refs = kernels.linear_relu_backward(dy, x, w, y, impl="numpy")
    g = np.abs(wide(dy)) * (wide(y) > 0)
    for got, ref, magnitude in zip(grads, refs, (g @ np.abs(wide(w)), g.T @ np.abs(wide(x)), g.sum(axis=0))):
        assert_within_one_ulp(got, ref, magnitude)
    column = np.ones((4096, 1), np.float16)  # a float16 accumulator would stop at 2048
    assert kernels.linear_relu_forward(column.T.copy(), column.T.copy(), None, impl="numba_cuda")[0, 0] == 4096


def test_numba_cuda_refuses_bfloat16_with_the_registrys_error():
    import ml_dtypes

    x = np.ones((2, 3), ml_dtypes.bfloat16)
    w = np.ones((4, 3), ml_dtypes.bfloat16)
    with pytest.raises(KernelError, match=r"impl 'numba_cuda' does not take bfloat16 arrays; it takes float32, "
                                          r"float64, float16\. Impls of 'linear_relu_forward' that take bfloat16"):
        kernels.get("linear_relu_forward", "numba_cuda")(x, w, None)
    with pytest.raises(KernelError, match=r"impl 'numba_cuda' does not take bfloat16"):
        kernels.linear_relu_backward(np.ones((2, 4), x.dtype), x, w, np.ones((2, 4), x.dtype), impl="numba_cuda")


def test_numba_cuda_validates_inputs():
    x = np.ones((4, 6), np.float32)[:, ::2]
    w = np.ones((5, 3), np.float32)
    with pytest.raises(KernelError, match=r"x is not C-contiguous.*np\.ascontiguousarray"):
        kernels.linear_relu_forward(x, w, None, impl="numba_cuda")

"""numba_cuda gelu under the Numba CUDA simulator, against the numpy impl.

The simulator runs 3 blocks of 8 threads, so sizes over 24 make every thread take several
grid-stride steps; size 0 and 1 and shapes of several dims cover the edges.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 17), (2, 3, 11), (0,)], ids=str)
def test_matches_numpy(approximate, dtype, shape):
    rng = np.random.default_rng(sum(shape) + 1)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x.flat[:1] = -9.0  # deep in the left tail, where 1 + erf / 1 + tanh would cancel
    dy = rng.standard_normal(shape).astype(dtype)
    # float32: the rounding of x / sqrt 2 or z is amplified ~x^2-fold in the tails (kernels test docstring)
    steep = 1 + float(np.abs(x).max(initial=0)) ** 2
    tol = dict(rtol=1e-12, atol=1e-300) if dtype == np.float64 else dict(rtol=2.5e-7 * steep, atol=1e-36)
    y = kernels.gelu_forward(x, approximate=approximate, impl="numba_cuda")
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, kernels.gelu_forward(x, approximate=approximate, impl="numpy"), **tol)
    dx = kernels.gelu_backward(dy, x, approximate=approximate, impl="numba_cuda")
    want = kernels.gelu_backward(dy, x, approximate=approximate, impl="numpy")
    assert dx.dtype == x.dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, want, rtol=tol["rtol"], atol=1e-12 if dtype == np.float64 else 3e-7)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 17), (2, 3, 11)], ids=str)
def test_float16_matches_numpy(approximate, shape):
    """The simulator runs numba's float16: loads converted to float32, one rounding at the store.
    Against the numpy impl (float64 rounded once to float16): at most one float16 unit apart."""
    rng = np.random.default_rng(sum(shape) + 7)
    x = (rng.standard_normal(shape) * 3).astype(np.float16)
    x.flat[:1] = -9.0
    dy = rng.standard_normal(shape).astype(np.float16)
    for got, want in ((kernels.gelu_forward(x, approximate=approximate, impl="numba_cuda"),
                       kernels.gelu_forward(x, approximate=approximate, impl="numpy")),
                      (kernels.gelu_backward(dy, x, approximate=approximate, impl="numba_cuda"),
                       kernels.gelu_backward(dy, x, approximate=approximate, impl="numpy"))):
        assert got.dtype == np.float16 and got.shape == x.shape
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2.0 ** -10, atol=6e-8)


def test_bfloat16_is_refused_by_name():
    import ml_dtypes

    x = np.ones(4, ml_dtypes.bfloat16)
    with pytest.raises(KernelError, match=r"'gelu_forward': impl 'numba_cuda' does not take bfloat16"):
        kernels.gelu_forward(x, impl="numba_cuda")
    # called directly (past the registry), the impl refuses with the same words
    with pytest.raises(KernelError, match=r"'gelu_backward': impl 'numba_cuda' does not take bfloat16.*'cupy'"):
        kernels.get("gelu_backward", "numba_cuda")(x, x)


def test_refuses_non_contiguous():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(KernelError, match="not C-contiguous"):
        kernels.gelu_forward(x[:, ::2], impl="numba_cuda")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_extreme_inputs_give_the_limits(approximate):
    from tests.kernels.test_gelu import assert_extremes

    with np.errstate(all="ignore"):  # the simulator computes in numpy scalars: inf * 0 warns there
        assert_extremes(lambda x: kernels.gelu_forward(x, approximate=approximate, impl="numba_cuda"),
                        lambda g, x: kernels.gelu_backward(g, x, approximate=approximate, impl="numba_cuda"),
                        approximate)

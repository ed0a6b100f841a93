"""PyTorch names the ported tutorial scripts (tests/compat/scripts/) needed, each behaving as in PyTorch."""

import numpy as np
import pytest

import engine
from engine.errors import ShapeError


def test_matmul_and_mm_take_pytorch_keyword_names():
    a, b = engine.randn(3, 4), engine.randn(4, 2)
    np.testing.assert_allclose(engine.matmul(input=a, other=b).numpy(), a.numpy() @ b.numpy(), rtol=1e-6)
    np.testing.assert_allclose(engine.mm(input=a, mat2=b).numpy(), a.numpy() @ b.numpy(), rtol=1e-6)
    v = engine.randn(4)
    assert engine.matmul(input=v, other=v).shape == ()    # polynomial_tensor: dot of two vectors


def test_t_transposes_2d_and_keeps_0d_1d():
    x = engine.randn(2, 3, requires_grad=True)
    y = x.t()
    assert y.shape == (3, 2) and engine.t(x).shape == (3, 2)
    (y * engine.arange(6).reshape(3, 2).float()).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.arange(6).reshape(3, 2).T)
    v = engine.randn(4)
    assert v.t() is v and engine.randn(()).t().shape == ()
    with pytest.raises(ShapeError, match=r"t: .*3 dims|t: expects"):
        engine.randn(2, 3, 4).t()


def test_backends_mps_is_unavailable_and_cudnn_flags_settable():
    import engine.backends

    assert engine.backends.mps.is_available() is False and engine.backends.mps.is_built() is False
    device = ("cuda" if engine.cuda.is_available() else "mps" if engine.backends.mps.is_available() else "cpu")
    assert device in ("cuda", "cpu")
    engine.backends.cudnn.benchmark = True
    assert engine.backends.cudnn.benchmark is True
    engine.backends.cudnn.benchmark = False

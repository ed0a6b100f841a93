"""GELU through the fused kernels (kernels.gelu_*) vs the unfused array expressions, end to end.

F.gelu and nn.GELU, both approximations, forward values and input gradients; a non-contiguous
input (the fused path passes the kernels a contiguous copy); the switch really switches (the
fused path calls the kernel, the unfused one does not).
"""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import kernels
from engine import nn


def _run(module_or_fn, x_np, fused, transpose=False):
    x = engine.Tensor(x_np, requires_grad=True)
    with F.fused_kernels(fused):
        inp = x.T if transpose else x
        y = module_or_fn(inp)
        g = np.random.default_rng(5).standard_normal(y.shape).astype(x_np.dtype)
        (y * engine.Tensor(g)).sum().backward()
    return y.numpy(), x.grad.numpy()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", ["F.gelu", "nn.GELU"])
@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.slow
def test_fused_matches_unfused(approximate, dtype, how, transpose):
    x = (np.random.default_rng(0).standard_normal((33, 17)) * 2).astype(dtype)
    fn = (lambda t: F.gelu(t, approximate=approximate)) if how == "F.gelu" else nn.GELU(approximate=approximate)
    y_f, g_f = _run(fn, x, True, transpose)
    y_u, g_u = _run(fn, x, False, transpose)
    # both exact forms use the kernels' one erfc (~1e-13); the unfused float32 forms round Phi(x) and
    # the tanh form loses ~1e-7 absolute to 1 + tanh cancelling; the kernels are accurate to a few ulps
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(y_f, y_u, **tol)
    np.testing.assert_allclose(g_f, g_u, **tol)
    assert y_f.dtype == dtype and g_f.dtype == dtype


def test_switch_selects_the_kernel(monkeypatch):
    calls = []
    real_f, real_b = kernels.gelu_forward, kernels.gelu_backward
    monkeypatch.setattr(kernels, "gelu_forward", lambda *a, **k: calls.append("f") or real_f(*a, **k))
    monkeypatch.setattr(kernels, "gelu_backward", lambda *a, **k: calls.append("b") or real_b(*a, **k))
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    _run(nn.GELU(approximate="tanh"), x, False)
    assert calls == []
    _run(nn.GELU(approximate="tanh"), x, True)
    assert calls == ["f", "b"]


def test_fused_saves_only_x():
    x = engine.Tensor(np.ones((3, 4), np.float32), requires_grad=True)
    y = F.gelu(x, approximate="tanh")
    assert len(y.grad_fn.saved) == 1 and y.grad_fn.saved[0] is x._data

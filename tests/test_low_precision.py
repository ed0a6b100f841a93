"""bfloat16 and float16: the dtypes, PyTorch's type promotion, the float32 compute rule, and
save/load, against torch on the CPU as the oracle."""

import itertools

import numpy as np
import pytest

import engine
from engine import dtypes
from engine.errors import DTypeError

torch = pytest.importorskip("torch")

TORCH_TO_ENGINE = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                   torch.int32: np.int32, torch.int64: np.int64, torch.float16: engine.float16,
                   torch.bfloat16: engine.bfloat16, torch.float32: engine.float32, torch.float64: engine.float64}
LOW = [(engine.bfloat16, torch.bfloat16), (engine.float16, torch.float16)]


def _engine_dtype(torch_dtype):
    return np.dtype(TORCH_TO_ENGINE[torch_dtype])


# ---- the dtypes --------------------------------------------------------------------------------

def test_bfloat16_is_ml_dtypes_and_a_floating_dtype():
    import ml_dtypes

    assert engine.bfloat16 is ml_dtypes.bfloat16
    assert dtypes.is_floating(engine.bfloat16) and dtypes.is_floating(engine.half)
    assert not dtypes.is_floating(np.int64)


@pytest.mark.parametrize("dtype, torch_dtype", LOW)
def test_casts_factories_and_names(dtype, torch_dtype):
    x = engine.tensor([[1.5, -2.25], [3.0, 0.1]])
    cast = x.bfloat16() if dtype is engine.bfloat16 else x.half()
    assert cast.dtype == np.dtype(dtype)
    assert x.to(dtype).dtype == np.dtype(dtype) and x.type(dtype).dtype == np.dtype(dtype)
    assert cast.type() == torch.tensor(x.numpy()).to(torch_dtype).type()
    assert cast.tolist() == torch.tensor(x.numpy()).to(torch_dtype).tolist()
    assert isinstance(cast[0, 0].item(), float) and cast[1, 1].item() == torch.tensor(0.1, dtype=torch_dtype).item()
    made = [engine.zeros(2, 3, dtype=dtype), engine.ones(2, dtype=dtype), engine.full((2,), 1.5, dtype=dtype),
            engine.randn(4, dtype=dtype), engine.rand(4, dtype=dtype), engine.tensor([1.0, 2.0], dtype=dtype),
            engine.arange(0, 3, dtype=dtype), engine.empty(2, dtype=dtype), engine.zeros_like(cast),
            engine.ones_like(cast), engine.full_like(cast, 2.0), engine.rand_like(cast), engine.randn_like(cast)]
    assert all(t.dtype == np.dtype(dtype) for t in made)
    assert "dtype=" in repr(cast) and "0.1" in repr(cast) and "0.1000" not in repr(x)


@pytest.mark.parametrize("dtype, _", LOW)
def test_rand_never_returns_one(dtype, _):
    engine.manual_seed(0)
    assert float(engine.rand(200_000, dtype=dtype).max()) < 1.0  # about 400 samples round to 1.0 in bf16 otherwise


@pytest.mark.parametrize("dtype, _", LOW)
def test_requires_grad_and_differentiable_casts(dtype, _):
    w = engine.randn(3, dtype=dtype, requires_grad=True)
    x = engine.randn(3, requires_grad=True)
    (w.float() * x.to(dtype)).sum().backward()
    assert w.grad.dtype == np.dtype(dtype) and x.grad.dtype == np.float32  # each in its source dtype
    np.testing.assert_allclose(w.grad.numpy().astype(np.float32), x.numpy(), rtol=2 ** -7)


# ---- promotion: torch.result_type over every pair --------------------------------------------

SHAPES = [((3,), (3,)), ((), (3,)), ((3,), ()), ((), ())]


@pytest.mark.parametrize("ta, tb", list(itertools.product(TORCH_TO_ENGINE, repeat=2)))
def test_promotion_matches_torch_result_type(ta, tb):
    for sa, sb in SHAPES:
        want = torch.result_type(torch.zeros(sa, dtype=ta), torch.zeros(sb, dtype=tb))
        a = engine.zeros(sa, dtype=_engine_dtype(ta))
        b = engine.zeros(sb, dtype=_engine_dtype(tb))
        got = engine.where(engine.tensor(True), a, b) if ta == torch.bool and tb == torch.bool else a + b
        assert got.dtype == _engine_dtype(want), (ta, sa, tb, sb)


@pytest.mark.parametrize("ta", list(TORCH_TO_ENGINE))
@pytest.mark.parametrize("scalar", [True, 3, 2.5])
def test_promotion_with_python_scalars_matches_torch(ta, scalar):
    if ta == torch.bool and scalar is True:
        return  # bool + bool is an error in both
    for shape in [(3,), ()]:
        want = torch.result_type(torch.zeros(shape, dtype=ta), scalar)
        got = engine.zeros(shape, dtype=_engine_dtype(ta)) * scalar
        assert got.dtype == _engine_dtype(want), (ta, shape, scalar)


def test_promotion_keeps_each_gradient_in_its_operand_dtype():
    a = engine.randn(4, dtype=engine.bfloat16, requires_grad=True)
    b = engine.randn(4, dtype=engine.float16, requires_grad=True)
    out = a * b
    assert out.dtype == np.float32
    out.sum().backward()
    assert a.grad.dtype == np.dtype(engine.bfloat16) and b.grad.dtype == np.float16


def test_matmul_refuses_mixed_float_dtypes_as_torch():
    with pytest.raises(DTypeError, match=r"matmul: .*bfloat16.*float32"):
        engine.randn(2, 3, dtype=engine.bfloat16) @ engine.randn(3, 2)

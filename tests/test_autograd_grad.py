"""engine.autograd.grad and engine.inference_mode against PyTorch (the oracle)."""

import threading

import numpy as np
import pytest

import engine
from engine import autograd
from engine.errors import GradError

torch = pytest.importorskip("torch")


def _pair(values, requires_grad=True):
    array = np.asarray(values, dtype=np.float32)
    return (engine.tensor(array, requires_grad=requires_grad),
            torch.tensor(array, requires_grad=requires_grad))


def _same(mine, theirs):
    assert len(mine) == len(theirs)
    for m, t in zip(mine, theirs):
        if t is None:
            assert m is None
        else:
            np.testing.assert_allclose(m.numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-6)
            assert m.shape == tuple(t.shape) and m.dtype == np.float32


def test_values_match_torch_and_leave_grad_untouched(rng):
    values = rng.standard_normal((3, 4))
    x, tx = _pair(values)
    w, tw = _pair(rng.standard_normal((4, 2)))
    x.grad = engine.ones(3, 4)  # an existing .grad stays as it is
    mine = autograd.grad((x @ w).tanh().sum(), [x, w])
    theirs = torch.autograd.grad((tx @ tw).tanh().sum(), [tx, tw])
    _same(mine, theirs)
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((3, 4), np.float32))
    assert w.grad is None
    assert isinstance(mine, tuple)


def test_single_tensor_arguments_and_non_leaf_inputs(rng):
    x, tx = _pair(rng.standard_normal(5))
    y, ty = x * 3, tx * 3
    _same(autograd.grad((y * x).sum(), [x, y]), torch.autograd.grad((ty * tx).sum(), [tx, ty]))
    y, ty = x.exp(), tx.exp()
    _same(autograd.grad((y * y).sum(), y), torch.autograd.grad((ty * ty).sum(), ty))


def test_grad_outputs_for_non_scalar_outputs(rng):
    x, tx = _pair(rng.standard_normal((2, 3)))
    v = rng.standard_normal((2, 3)).astype(np.float32)
    mine = autograd.grad(x.sin() * 2, x, grad_outputs=engine.tensor(v))
    _same(mine, torch.autograd.grad(tx.sin() * 2, tx, grad_outputs=torch.tensor(v)))
    # several outputs: one vector each, None for a scalar one
    mine = autograd.grad([x * 2, (x * x).sum()], x, grad_outputs=[engine.tensor(v), None])
    theirs = torch.autograd.grad([tx * 2, (tx * tx).sum()], tx, grad_outputs=[torch.tensor(v), None])
    _same(mine, theirs)


def test_non_scalar_output_needs_grad_outputs():
    x, tx = _pair([1.0, 2.0])
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        torch.autograd.grad(tx * 2, tx)
    with pytest.raises(GradError, match="not a scalar"):
        autograd.grad(x * 2, x)
    with pytest.raises(GradError, match="shape"):
        autograd.grad(x * 2, x, grad_outputs=engine.ones(3))
    with pytest.raises(GradError, match="2 grad_outputs for 1 outputs"):
        autograd.grad(x * 2, x, grad_outputs=[engine.ones(2), engine.ones(2)])


def test_allow_unused_none_false_true_and_materialize():
    x, tx = _pair([1.0, 2.0])
    w, tw = _pair([3.0])
    with pytest.raises(RuntimeError, match="not have been used"):
        torch.autograd.grad((tx * 2).sum(), [tx, tw])
    for allow in (None, False):
        with pytest.raises(GradError, match="input 1 .* not used"):
            autograd.grad((x * 2).sum(), [x, w], allow_unused=allow)
    _same(autograd.grad((x * 2).sum(), [x, w], allow_unused=True),
          torch.autograd.grad((tx * 2).sum(), [tx, tw], allow_unused=True))
    mine = autograd.grad((x * 2).sum(), [x, w], materialize_grads=True)
    _same(mine, torch.autograd.grad((tx * 2).sum(), [tx, tw], materialize_grads=True))
    with pytest.raises(ValueError, match="allow_unused to be True"):
        torch.autograd.grad((tx * 2).sum(), [tx, tw], allow_unused=False, materialize_grads=True)
    with pytest.raises(ValueError, match="allow_unused to be True"):
        autograd.grad((x * 2).sum(), [x, w], allow_unused=False, materialize_grads=True)


def test_second_use_needs_retain_graph():
    x, tx = _pair([1.0, 2.0])
    out, tout = (x * x).sum(), (tx * tx).sum()
    torch.autograd.grad(tout, tx)
    autograd.grad(out, x)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(tout, tx)
    with pytest.raises(GradError, match="second time"):
        autograd.grad(out, x)
    out = (x * x).sum()
    first = autograd.grad(out, x, retain_graph=True)
    second = autograd.grad(out, x)  # the retained graph serves once more
    np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
    with pytest.raises(GradError, match="second time"):
        out.backward()


def test_retain_grad_non_leaf_gets_grad_as_in_torch():
    x, tx = _pair([1.0, -2.0])
    a, ta = x * 2, tx * 2
    a.retain_grad()
    ta.retain_grad()
    autograd.grad((a * a).sum(), x)
    torch.autograd.grad((ta * ta).sum(), tx)
    np.testing.assert_allclose(a.grad.numpy(), ta.grad.numpy())
    assert x.grad is None and tx.grad is None


def test_two_inputs_never_share_one_gradient_array():
    a, b = _pair([1.0, 2.0])[0], _pair([3.0, 4.0])[0]
    ga, gb = autograd.grad((a + b).sum(), [a, b])
    ga.add_(1.0)
    np.testing.assert_array_equal(gb.numpy(), [1.0, 1.0])


def test_bad_arguments_are_refused():
    x, _ = _pair([1.0, 2.0])
    constant = engine.tensor([1.0, 2.0])
    with pytest.raises(GradError, match="input 0 .* does not require grad"):
        autograd.grad((x * 2).sum(), constant)
    with pytest.raises(GradError, match="output 0 .* does not require grad"):
        autograd.grad(constant.sum(), x)
    with pytest.raises(GradError, match="create_graph=True .* not supported"):
        autograd.grad((x * x).sum(), x, create_graph=True)
    with pytest.raises(GradError, match="is_grads_batched"):
        autograd.grad((x * x).sum(), x, is_grads_batched=True)
    with pytest.raises(TypeError, match="inputs must be Tensors"):
        autograd.grad((x * x).sum(), [x, np.ones(2)])


def test_grad_through_a_pytorch_style_function():
    class Cube(autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t * t * t

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return g * 3 * t * t

    x, tx = _pair([1.0, -2.0, 0.5])
    (mine,) = autograd.grad(Cube.apply(x).sum(), x)
    np.testing.assert_allclose(mine.numpy(), (3 * tx * tx).detach().numpy())


# ---- inference_mode ----------------------------------------------------------------------------

def test_inference_mode_records_nothing_as_torch():
    x, tx = _pair([1.0, 2.0])
    with engine.inference_mode(), torch.inference_mode():
        assert engine.is_inference_mode_enabled() and torch.is_inference_mode_enabled()
        assert engine.is_grad_enabled() is torch.is_grad_enabled() is False
        y, ty = x * 2, tx * 2
        assert y.requires_grad is ty.requires_grad is False and y.grad_fn is None
        leaf, tleaf = engine.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        assert leaf.requires_grad and tleaf.requires_grad
        with engine.enable_grad(), torch.enable_grad():
            assert (x * 2).requires_grad is (tx * 2).requires_grad is False
        with engine.set_grad_enabled(True), torch.set_grad_enabled(True):
            assert (x * 2).requires_grad is (tx * 2).requires_grad is False
        with engine.inference_mode(False), torch.inference_mode(False):
            assert not engine.is_inference_mode_enabled() and not torch.is_inference_mode_enabled()
            assert (x * 2).requires_grad and (tx * 2).requires_grad
        assert engine.is_inference_mode_enabled()
    assert not engine.is_inference_mode_enabled() and engine.is_grad_enabled()
    assert (x * 2).requires_grad


def test_inference_mode_false_turns_grad_on_inside_no_grad():
    with engine.no_grad(), torch.no_grad():
        with engine.inference_mode(False), torch.inference_mode(False):
            assert engine.is_grad_enabled() and torch.is_grad_enabled()
        assert not engine.is_grad_enabled()


def test_inference_mode_decorators_and_exceptions():
    x, _ = _pair([1.0, 2.0])

    @engine.inference_mode()
    def called(t):
        return t * 2, engine.is_inference_mode_enabled()

    @engine.inference_mode
    def bare(t):
        return t * 2

    out, inside = called(x)
    assert inside and not out.requires_grad
    assert not bare(x).requires_grad
    assert bare.__name__ == "bare"
    with pytest.raises(KeyError):
        with engine.inference_mode():
            raise KeyError("boom")
    assert not engine.is_inference_mode_enabled() and engine.is_grad_enabled()
    with pytest.raises(TypeError, match="mode must be a bool"):
        engine.inference_mode(3)


def test_inference_mode_is_per_thread():
    seen = []
    with engine.inference_mode():
        worker = threading.Thread(target=lambda: seen.append(engine.is_inference_mode_enabled()))
        worker.start()
        worker.join()
    assert seen == [False]

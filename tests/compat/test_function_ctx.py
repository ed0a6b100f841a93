"""PyTorch-style autograd.Function: static forward(ctx, ...) / backward(ctx, grad_output) on Tensors."""

import math

import numpy as np
import pytest

import engine as torch
from engine.errors import GradError


# The tutorial's example, as on pytorch.org ("Learning PyTorch with Examples", "PyTorch: Defining
# new autograd functions"), with only the import changed.
class LegendrePolynomial3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return 0.5 * (5 * input ** 3 - 3 * input)

    @staticmethod
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        return grad_output * 1.5 * (5 * input ** 2 - 1)


@pytest.mark.slow
def test_legendre_polynomial_tutorial_trains():
    dtype = torch.float
    device = torch.device("cpu")
    x = torch.linspace(-math.pi, math.pi, 2000, device=device, dtype=dtype)
    y = torch.sin(x)
    a = torch.full((), 0.0, device=device, dtype=dtype, requires_grad=True)
    b = torch.full((), -1.0, device=device, dtype=dtype, requires_grad=True)
    c = torch.full((), 0.0, device=device, dtype=dtype, requires_grad=True)
    d = torch.full((), 0.3, device=device, dtype=dtype, requires_grad=True)
    learning_rate = 5e-6
    losses = []
    for t in range(2000):
        P3 = LegendrePolynomial3.apply
        y_pred = a + b * P3(c + d * x)
        loss = (y_pred - y).pow(2).sum()
        if t % 100 == 99:
            losses.append(loss.item())
        loss.backward()
        with torch.no_grad():
            a -= learning_rate * a.grad
            b -= learning_rate * b.grad
            c -= learning_rate * c.grad
            d -= learning_rate * d.grad
            a.grad = None
            b.grad = None
            c.grad = None
            d.grad = None
    assert losses[0] > 100 and losses[-1] < 10  # the tutorial ends near 8.8
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert repr(P3(c + d * x).grad_fn) == "<LegendrePolynomial3Backward>"


class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        result = i.exp()
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        result, = ctx.saved_tensors
        return grad_output * result


def test_exp_saving_its_output_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    assert torch.gradcheck(lambda t: Exp.apply(t) * 2, [x])
    assert torch.gradcheck(lambda t: Exp.apply(Exp.apply(t).sum(dim=1)), [x])


def test_changing_a_saved_output_in_place_is_refused():
    x = torch.randn(4, requires_grad=True)
    y = Exp.apply(x)
    y.mul_(2)
    with pytest.raises(GradError, match=r"Exp saved its output.*in-place"):
        y.sum().backward()


def test_changing_a_saved_input_in_place_is_refused():
    x = torch.randn(4, requires_grad=True)
    h = x * 1
    out = LegendrePolynomial3.apply(h)
    h.add_(1)
    with pytest.raises(GradError, match=r"LegendrePolynomial3 saved one of its inputs"):
        out.sum().backward()


class ScaleBy(torch.autograd.Function):
    """Non-tensor arguments, needs_input_grad, two tensor inputs."""

    @staticmethod
    def forward(ctx, x, w, factor):
        ctx.factor = factor
        ctx.save_for_backward(x, w)
        ctx.seen_needs = ctx.needs_input_grad
        return x * w * factor

    @staticmethod
    def backward(ctx, grad_output):
        x, w = ctx.saved_tensors
        gx = grad_output * w * ctx.factor if ctx.needs_input_grad[0] else None
        gw = (grad_output * x * ctx.factor).sum(dim=0) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def test_non_tensor_arguments_and_needs_input_grad():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3)
    out = ScaleBy.apply(x, w, 3.0)
    assert out.grad_fn.ctx.seen_needs == (True, False, False)
    out.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(w.numpy() * 3, (5, 3)), rtol=1e-6)
    assert w.grad is None
    w.requires_grad_(True)
    assert torch.gradcheck(lambda a, b: ScaleBy.apply(a, b, 0.5), [x.detach(), w.detach()])


def test_no_graph_without_grad_and_under_no_grad():
    x = torch.randn(3)
    assert Exp.apply(x).grad_fn is None
    with torch.no_grad():
        assert Exp.apply(torch.randn(3, requires_grad=True)).requires_grad is False
    y = Exp.apply(torch.randn(3, requires_grad=True))
    assert y.requires_grad and y.grad_fn.ctx.saved_tensors[0] is y  # the output itself was saved


class SplitSquare(torch.autograd.Function):
    """Two outputs and an int output marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        index = x.argmax()
        ctx.mark_non_differentiable(index)
        return x * x, x * 3, index

    @staticmethod
    def backward(ctx, g_square, g_triple, g_index):
        x, = ctx.saved_tensors
        assert g_square is not None and g_triple is not None  # materialized as zeros when unused
        return g_square * 2 * x + g_triple * 3


def test_multiple_outputs():
    torch.manual_seed(1)
    x = torch.randn(4, requires_grad=True)
    square, triple, index = SplitSquare.apply(x)
    assert square.requires_grad and triple.requires_grad and not index.requires_grad
    (square.sum() + 2 * triple.sum()).backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.detach().numpy() + 6, rtol=1e-6)
    x.grad = None
    square, _, _ = SplitSquare.apply(x)  # only one output used: the other's gradient is zeros
    square.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.detach().numpy(), rtol=1e-6)
    assert torch.gradcheck(lambda t: SplitSquare.apply(t)[0] + SplitSquare.apply(t)[1], [x.detach()])


class SetupStyle(torch.autograd.Function):
    """PyTorch 2's form: forward without ctx, setup_context saves."""

    @staticmethod
    def forward(x, power):
        return x ** power

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, power = inputs
        ctx.power = power
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        return grad_output * ctx.power * x ** (ctx.power - 1), None


def test_setup_context_style():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    SetupStyle.apply(x, 3).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 12.0, 27.0])


def test_identity_returning_its_input_gets_a_new_node():
    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.ones(3, requires_grad=True)
    y = Identity.apply(x)
    assert y is not x and x.grad_fn is None and y.grad_fn is not None
    y.sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_wrong_backward_results_are_errors():
    class TooFew(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.ones(2, requires_grad=True)
    with pytest.raises(GradError, match="returned 1 gradients for 2 arguments"):
        TooFew.apply(x, 2.0).sum().backward()


def test_backward_twice_needs_retain_graph():
    x = torch.randn(3, requires_grad=True)
    y = Exp.apply(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.exp(x.detach().numpy()), rtol=1e-6)
    with pytest.raises(GradError, match="second time"):
        y.backward()


def test_engine_style_functions_are_unchanged():
    class Double(torch.autograd.Function):
        def forward(self, a):
            return a * 2

        def backward(self, grad):
            return grad * 2

    x = torch.ones(2, requires_grad=True)
    Double.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]

"""Post-accumulate-grad hooks, backward's final callbacks, and the order leaves become ready in
(what DistributedDataParallel builds its overlap on)."""

import numpy as np
import pytest

import engine
from engine import autograd
from engine.errors import GradError


class Probe(engine.Function):
    """Identity that logs when its backward runs."""

    def __init__(self):
        self.log = None

    def forward(self, x, log=None):
        self.log = log
        return x.copy()

    def backward(self, grad):
        self.log.append("probe backward")
        return (grad,)


def test_hook_fires_once_with_the_final_gradient_of_a_parameter_used_twice():
    w = engine.tensor([1.0, 2.0], requires_grad=True)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.tolist()))
    ((w * 3).sum() + (w * w).sum()).backward()
    assert seen == [[5.0, 7.0]]
    ((w * 3).sum()).backward()  # accumulates: the hook sees the running total
    assert seen == [[5.0, 7.0], [8.0, 10.0]]


def test_leaves_are_ready_as_soon_as_their_last_user_has_run_backward():
    log = []
    w1 = engine.randn(3, 4, requires_grad=True)
    w2 = engine.randn(4, 2, requires_grad=True)
    w1.register_post_accumulate_grad_hook(lambda t: log.append("w1"))
    w2.register_post_accumulate_grad_hook(lambda t: log.append("w2"))
    x = engine.randn(5, 3)
    h = Probe.apply((x @ w1).relu(), log=log)
    (h @ w2).sum().backward()
    # w2's gradient is final before backward reaches the first layer; w1's comes last.
    assert log == ["w2", "probe backward", "w1"]


def test_callback_runs_after_every_hook_once_per_backward():
    log = []
    w = engine.ones(2, requires_grad=True)

    def hook(t):
        log.append("hook")
        autograd.queue_callback(lambda: log.append(("callback", t.grad.tolist())))

    handle = w.register_post_accumulate_grad_hook(hook)
    (w * 2).sum().backward()
    assert log == ["hook", ("callback", [2.0, 2.0])]
    handle.remove()
    handle.remove()  # a second remove is harmless
    (w * 2).sum().backward()
    assert len(log) == 2


def test_queue_callback_outside_backward_and_hooks_on_non_leaves_are_refused():
    with pytest.raises(GradError, match="no backward"):
        autograd.queue_callback(lambda: None)
    w = engine.ones(2, requires_grad=True)
    with pytest.raises(GradError, match="not a leaf"):
        (w * 2).register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(GradError, match="does not require grad"):
        engine.ones(2).register_post_accumulate_grad_hook(lambda t: None)


def test_gradients_unchanged_by_the_ready_order():
    rng = np.random.default_rng(0)
    a = engine.tensor(rng.standard_normal((4, 4)).astype(np.float32), requires_grad=True)
    b = engine.tensor(rng.standard_normal((4,)).astype(np.float32), requires_grad=True)
    y = ((a @ a).tanh() + b).sum() + (a * b).sum()
    y.backward()
    an, bn = a.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)
    t = np.tanh(an @ an)
    d = 1 - t * t  # d/dM sum(tanh(M)) with M = a@a: da = d @ a.T + a.T @ d
    np.testing.assert_allclose(a.grad.numpy(), d @ an.T + an.T @ d + np.broadcast_to(bn, (4, 4)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), 4 + an.sum(0), rtol=1e-5)

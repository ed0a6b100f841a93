"""Autograd under in-place ops: never a silently wrong gradient.

Every storage has a version (shared by its views and by ``detach()``), bumped by every in-place
op; a Function records the versions of the tensors it saved, and backward refuses to run it if
one moved. In-place changes that autograd cannot follow are refused at once; the others are
recorded in the graph, so gradients flow through them as PyTorch's do.
"""

import numpy as np
import pytest

import engine
from engine.errors import GradError
from tests.conftest import DEVICES

MODIFIED = "modified by an in-place operation"


def leaf(values, device="cpu", requires_grad=True):
    return engine.tensor(np.asarray(values, np.float32), device=device, requires_grad=requires_grad)


# ---- a saved tensor changed after forward: backward refuses --------------------------------------

def _mul_then_change(x):
    y = x * 2
    z = (y * y).sum()
    y.mul_(10)
    return z


def _exp_then_add(x):
    y = x.exp()
    y.add_(1)
    return y.sum()


def _input_changed_under_no_grad(x):
    w = leaf([1.0, 2.0, 3.0])
    z = (x * w).sum()
    with engine.no_grad():
        x.mul_(2)
    return z


def _input_changed_through_detach(x):
    z = (x * x).sum()
    x.detach().add_(1)
    return z


def _input_changed_through_a_view_under_no_grad(x):
    z = (x.exp() * x).sum()
    with engine.no_grad():
        x.reshape(-1)[0:1].fill_(5)
    return z


def _output_changed_through_detach(x):
    y = x.tanh()
    z = y.sum()
    y.detach().zero_()
    return z


def _copy_into_saved(x):
    y = x.sigmoid()
    z = (y * 3).sum()
    with engine.no_grad():
        y.copy_(engine.zeros(3))
    return z


def _setitem_on_saved(x):
    y = x * 1
    z = (y * y).sum()
    with engine.no_grad():
        y[1] = 7.0
    return z


def _zeroed_exp_output(x):
    # exp keeps its output for backward; zero_ overwrites it. The zero gradient zero_ sends back
    # still goes through exp's backward, which would read the overwritten output: PyTorch refuses
    # this graph too.
    return (x.exp().zero_() + x).sum()


CHANGED = [_zeroed_exp_output, _mul_then_change, _exp_then_add, _input_changed_under_no_grad, _input_changed_through_detach,
           _input_changed_through_a_view_under_no_grad, _output_changed_through_detach, _copy_into_saved,
           _setitem_on_saved]


@pytest.mark.parametrize("build", CHANGED, ids=[f.__name__.strip("_") for f in CHANGED])
def test_backward_refuses_a_saved_tensor_changed_in_place(build):
    x = leaf([0.5, -1.0, 2.0])
    z = build(x)
    with pytest.raises(GradError, match=MODIFIED):
        z.backward()


def _unsaved_operand_changed(x):
    y = x * 3  # Mul keeps the constant (for x's gradient), not x
    with engine.no_grad():
        x.add_(1)
    return y.sum(), np.full(3, 3.0)


def _sum_input_changed(x):
    y = x + 1  # Add keeps nothing
    with engine.no_grad():
        x.mul_(0)
    return y.sum(), np.ones(3)


def _clone_changed(x):
    y = x.exp()
    c = y.clone()
    c.add_(1)  # the clone is new memory: exp's saved output is untouched
    return (y * 2).sum() + c.sum(), 3 * np.exp([0.5, -1.0, 2.0])


UNCHANGED = [_unsaved_operand_changed, _sum_input_changed, _clone_changed]


@pytest.mark.parametrize("build", UNCHANGED, ids=[f.__name__.strip("_") for f in UNCHANGED])
def test_changes_backward_does_not_need_are_fine(build):
    x = leaf([0.5, -1.0, 2.0])
    z, expected = build(x)
    z.backward()
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


# ---- in-place changes autograd cannot follow: refused at once ------------------------------------

VIEW_EDITS = {
    "reshape-add_": lambda w: w.reshape(4).add_(1),
    "slice-mul_": lambda w: w[0:1].mul_(0),
    "transpose-fill_": lambda w: w.T.fill_(0),
    "row-copy_": lambda w: w[1].copy_(engine.zeros(2)),
    "flatten-zero_": lambda w: w.flatten().zero_(),
    "view-of-view-sub_": lambda w: w.reshape(4)[1:3].sub_(1),
    "setitem-on-view": lambda w: w.reshape(4).__setitem__(0, 3.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edit", list(VIEW_EDITS), ids=list(VIEW_EDITS))
def test_in_place_change_of_a_view_of_a_leaf_is_refused(edit, device):
    w = engine.tensor(np.arange(4, dtype=np.float32).reshape(2, 2), device=device, requires_grad=True)
    with pytest.raises(GradError, match="leaf that requires grad"):
        VIEW_EDITS[edit](w)
    np.testing.assert_array_equal(w.numpy(), np.arange(4).reshape(2, 2))  # untouched


@pytest.mark.parametrize("edit", list(VIEW_EDITS), ids=list(VIEW_EDITS))
def test_the_same_view_edits_are_allowed_under_no_grad(edit):
    w = engine.tensor(np.arange(4, dtype=np.float32).reshape(2, 2), requires_grad=True)
    before = w._version_value
    with engine.no_grad():
        VIEW_EDITS[edit](w)
    assert w._version_value > before
    assert not np.array_equal(w.numpy(), np.arange(4).reshape(2, 2))


def test_in_place_change_of_a_view_of_a_graph_tensor_is_refused():
    x = leaf([1.0, 2.0, 3.0, 4.0])
    y = x * 2
    with pytest.raises(GradError, match="part of a graph"):
        y[0:2].mul_(0)


def test_writing_a_tensor_that_requires_grad_into_a_buffer_joins_the_graph():
    # PyTorch records the write (CopySlices): the buffer now requires grad, and the value gets its gradient.
    buffer = engine.zeros(3)
    w = leaf([1.0, 2.0])
    buffer[0] = w[1] * 3
    assert buffer.requires_grad and buffer.grad_fn is not None
    (buffer * engine.tensor([2.0, 1.0, 1.0])).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [0.0, 6.0])


def test_direct_in_place_change_of_a_leaf_is_refused():
    w = leaf([1.0, 2.0])
    for change in (lambda: w.add_(1), lambda: w.mul_(2), lambda: w.zero_(), lambda: w.copy_(engine.ones(2))):
        with pytest.raises(GradError, match="leaf"):
            change()


# ---- in-place ops on graph tensors are recorded: the gradient flows through them -----------------

X = np.array([0.5, -1.0, 2.0], np.float32)
W = np.array([1.5, 0.25, -2.0], np.float32)

RECORDED = {
    # name: (function of x, w -> scalar, d/dx, d/dw)
    "mul_-scalar": (lambda x, w: (x * 2).mul_(10).sum(), np.full(3, 20.0), None),
    "add_-tensor": (lambda x, w: (x * 2).add_(w).sum(), np.full(3, 2.0), np.ones(3)),
    "add_-alpha": (lambda x, w: (x * 2).add_(w, alpha=3.0).sum(), np.full(3, 2.0), np.full(3, 3.0)),
    "sub_-tensor": (lambda x, w: (x * 2).sub_(x).sum(), np.ones(3), None),
    "mul_-tensor": (lambda x, w: (x * 2).mul_(w).sum(), 2 * W, 2 * X),
    "copy_": (lambda x, w: (x * 2).copy_(w).sum(), np.zeros(3), np.ones(3)),
    "fill_": (lambda x, w: ((x * 2).fill_(3.0) * w).sum(), np.zeros(3), np.full(3, 3.0)),
    "chain": (lambda x, w: ((x * 1).mul_(w).add_(x).mul_(2)).sum(), 2 * (W + 1), 2 * X),
    "in-place-then-used-twice": (lambda x, w: (lambda y: (y * y).sum())((x + 0).mul_(3)), 18 * X, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(RECORDED), ids=list(RECORDED))
def test_in_place_ops_on_graph_tensors_give_the_out_of_place_gradient(case, device):
    fn, dx, dw = RECORDED[case]
    x = engine.tensor(X, device=device, requires_grad=True)
    w = engine.tensor(W, device=device, requires_grad=dw is not None)
    fn(x, w).backward()
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-6, atol=1e-7)
    if dw is not None:
        np.testing.assert_allclose(w.grad.numpy(), dw, rtol=1e-6, atol=1e-7)


def test_a_plain_tensor_updated_with_a_tensor_that_requires_grad_joins_the_graph():
    w = leaf([1.0, 2.0, 3.0])
    acc = engine.zeros(3)
    acc.add_(w * 2)
    acc.mul_(w)
    assert acc.requires_grad
    acc.sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 4 * np.array([1.0, 2.0, 3.0]))


def test_an_in_place_result_that_cannot_be_written_back_is_refused():
    counts = engine.tensor(np.zeros(3, np.int64))
    with pytest.raises(Exception, match="in place|dtype"):
        counts.add_(leaf([0.5, 0.5, 0.5]))
    np.testing.assert_array_equal(counts.numpy(), 0)


# ---- gradients given or assigned follow PyTorch --------------------------------------------------

def test_a_float64_gradient_is_cast_to_the_output_dtype():
    x = leaf([1.0, 2.0])
    y = x * 3
    y.backward(engine.tensor(np.array([1.0, 0.5])))  # float64
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 1.5])


@pytest.mark.parametrize("bad", [np.ones(3, np.float32), np.ones((2, 1), np.float32), np.ones(2, np.float64)],
                         ids=["wrong-length", "wrong-rank", "wrong-dtype"])
def test_assigning_a_mismatched_grad_is_refused(bad):
    x = leaf([1.0, 2.0])
    with pytest.raises(GradError, match="does not match"):
        x.grad = engine.tensor(bad)
    assert x.grad is None
    with pytest.raises(GradError, match="Tensor or None"):
        x.grad = bad


def test_versions_count_in_place_changes_and_are_shared_by_views():
    x = engine.zeros(4)
    v = x.reshape(2, 2)
    d = x.detach()
    x.add_(1)
    v.mul_(2)
    d.fill_(3)
    assert x._version_value == v._version_value == d._version_value == 3
    assert engine.zeros(4)._version_value == 0
    assert x.clone()._version_value == 0


def test_an_optimizer_step_counts_as_an_in_place_change():
    w = leaf([1.0, 2.0])
    loss = (w * w).sum()
    opt = engine.optim.SGD([w], lr=0.1)
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(GradError, match=MODIFIED):
        loss.backward()  # the graph saved w before the step changed it

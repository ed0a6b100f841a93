"""Gradient accumulation in the backward pass: slice gradients added into one array, sums made in
place into arrays the pass owns, and the results bit for bit those of the dense path.

``GetItem`` with a basic index (a slice, an int, None, Ellipsis) hands its gradient to the engine
as ``(index, grad)`` (autograd._Scattered) instead of a zeros array of the input's size; the dense
path (``GetItem.backward``) stays the reference, reached here by turning ``scatters`` off. Values
are compared as bit patterns (signed zeros included), and against torch where torch computes the
same thing.
"""

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import autograd, ops, optim
from tests.conftest import DEVICES

torch = pytest.importorskip("torch")


@pytest.fixture
def dense_slices(monkeypatch):
    """Run GetItem's own backward (a zeros array per slice, summed) for every basic index."""
    forward = ops.GetItem.forward

    def dense_forward(self, a, index=None):
        out = forward(self, a, index=index)
        self.scatters = False
        return out

    def use():
        monkeypatch.setattr(ops.GetItem, "forward", dense_forward)
    return use


def bits(a):
    a = np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind == "f" else a


def assert_same_bits(a, b):
    np.testing.assert_array_equal(bits(a), bits(b))


def grads_of(build, leaves_data, dense, dense_slices, passes=1, retain=False):
    """``.grad`` of fresh leaves after ``passes`` backward passes of ``build(*leaves)``."""
    if dense:
        dense_slices()
    leaves = [engine.tensor(d, requires_grad=True) for d in leaves_data]
    loss = build(*leaves)
    for i in range(passes):
        loss.backward(retain_graph=retain and i < passes - 1)
    return [t.grad.numpy().copy() for t in leaves]


def torch_grads(build, leaves_data):
    leaves = [torch.tensor(d, requires_grad=True) for d in leaves_data]
    build(*leaves).backward()
    return [t.grad.numpy() for t in leaves]


RNG = np.random.default_rng(0)
W = RNG.standard_normal((9, 4)).astype(np.float32)
X = RNG.standard_normal((5, 4)).astype(np.float32)


def qkv_rows(w, x):  # the example GPT's row blocks of one packed weight
    return sum(((x @ w[3 * i:3 * (i + 1)].T) ** 2).sum() * (i + 1) for i in range(3))


def overlapping(w, x):  # every pair of slices overlaps: the dense sum is made as such
    return (x @ w[0:5].T).sum() + ((x @ w[2:7].T) ** 2).sum() + (w[:] * 3).sum() + (w[1:9:2] ** 3).sum()


def partly_overlapping(w, x):  # two overlap, one is disjoint from both
    return (w[0:4] ** 2).sum() + (w[2:6] * 5).sum() + (w[7:] ** 3).sum() + (x @ w[6].reshape(4, 1)).sum()


def many_views(w, x):  # a leaf sliced many times: each row, a column, None and Ellipsis indices
    rows = sum((w[i] * float(i + 1)).sum() for i in range(9))
    return rows + (w[..., 1] ** 2).sum() + (w[None, 2:4] * 7).sum() + (w[-1, -1] * 11) + (x[1:3] ** 2).sum()


def mixed(w, x):  # slice gradients before and after dense ones
    return (w[1:3] * 2).sum() + ((w * w).sum() * 0.5) + (w[4:8] ** 2).sum() + (x @ w.T).sum() + (w[0] * 3).sum()


def split_activation(w, x):  # slices of a non-leaf: nanoGPT's qkv(x).split(C, dim=2)
    h = x @ w.T
    a, b, c = h.split(3, dim=1)
    return (a * b).sum() + (c ** 2).sum() + (h[:, 4] * 3).sum()


BUILDS = [qkv_rows, overlapping, partly_overlapping, many_views, mixed, split_activation]


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__)
def test_slice_gradients_are_the_dense_sums_bit_for_bit_and_torchs(build, dense_slices):
    fast = grads_of(build, [W, X], False, dense_slices)
    dense = grads_of(build, [W, X], True, dense_slices)
    for a, b, t in zip(fast, dense, torch_grads(build, [W, X])):
        assert_same_bits(a, b)
        np.testing.assert_allclose(a, t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__)
def test_retained_graph_and_accumulation_into_an_existing_grad(build, dense_slices):
    fast = grads_of(build, [W, X], False, dense_slices, passes=3, retain=True)
    dense = grads_of(build, [W, X], True, dense_slices, passes=3, retain=True)
    once = torch_grads(build, [W, X])
    for a, b, t in zip(fast, dense, once):
        assert_same_bits(a, b)
        np.testing.assert_allclose(a, 3 * t, rtol=1e-5, atol=1e-4)


SIGNED_ZEROS = np.array([[-0.0, 1.0], [-0.0, -0.0], [2.0, -0.0], [-0.0, 0.0]], dtype=np.float32)


@pytest.mark.parametrize("slices", [
    [slice(0, 2)],  # one slice: the gradient as it is, -0.0 kept
    [slice(0, 2), slice(2, 4)],  # disjoint: the dense sum adds +0.0 everywhere
    [slice(0, 3), slice(1, 4)],  # overlapping: -0.0 + -0.0 stays -0.0 where both reach
    [slice(0, 4), slice(0, 4), slice(1, 3)],  # all overlap
    [slice(0, 2), slice(0, 2)],  # the same slice twice
])
def test_signed_zeros_match_the_dense_sums(slices, dense_slices):
    c = engine.tensor(SIGNED_ZEROS)

    def build(w):  # d(w[s] * c[s]).sum()/dw[s] = c[s]: gradients holding -0.0
        return sum((w[s] * c[s]).sum() for s in slices)

    fast = grads_of(build, [np.ones((4, 2), np.float32)], False, dense_slices)
    dense = grads_of(build, [np.ones((4, 2), np.float32)], True, dense_slices)
    assert_same_bits(fast[0], dense[0])


def test_a_16_bit_leaf_sliced_gives_the_dense_bits(dense_slices):
    w16 = W.astype(engine.bfloat16)

    def build(w):
        return sum((w[3 * i:3 * (i + 1)].float() ** 2).sum() * (i + 1) for i in range(3))

    fast = grads_of(build, [w16], False, dense_slices)
    dense = grads_of(build, [w16], True, dense_slices)
    assert fast[0].dtype == w16.dtype
    assert_same_bits(fast[0], dense[0])


def test_post_accumulate_hook_sees_the_final_gradient_of_a_sliced_leaf():
    w = engine.tensor(W, requires_grad=True)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.numpy().copy()))
    qkv_rows(w, engine.tensor(X)).backward()
    assert len(seen) == 1
    assert_same_bits(seen[0], w.grad)


def test_autograd_grad_of_sliced_leaves_and_non_leaves(dense_slices):
    def grads(dense):
        if dense:
            dense_slices()
        w, x = engine.tensor(W, requires_grad=True), engine.tensor(X, requires_grad=True)
        h = x @ w.T
        loss = qkv_rows(w, x) + split_activation(w, x) + (h[:, :3] ** 2).sum()
        out = autograd.grad(loss, (w, h), retain_graph=True)
        assert w.grad is None  # autograd.grad accumulates nothing
        return [g.numpy() for g in out]

    for a, b in zip(grads(False), grads(True)):
        assert_same_bits(a, b)


def test_optimizer_steps_with_sliced_weights_are_bit_identical(dense_slices):
    """The slice gradients go straight into AdamW's flat gradient buffer (the leaves' homes)."""
    def train(dense):
        if dense:
            dense_slices()
        engine.manual_seed(0)
        lin = engine.nn.Linear(4, 9)
        opt = optim.AdamW(lin.parameters(), lr=1e-2)
        x = engine.tensor(X)
        for _ in range(3):
            opt.zero_grad()
            w, b = lin.weight, lin.bias
            loss = sum((F.linear(x, w[3 * i:3 * (i + 1)], b[3 * i:3 * (i + 1)]) ** 2).sum() for i in range(3))
            loss.backward()
            opt.step()
        return [p.numpy().copy() for p in lin.parameters()] + [p.grad.numpy().copy() for p in lin.parameters()]

    for a, b in zip(train(False), train(True)):
        assert_same_bits(a, b)


def _shared_first(a, b):
    return ((a + b) * 2).sum() + (a * 3).sum() + (a ** 2).sum() + (b * a).sum()


def _shared_last(a, b):
    return (b * a).sum() + (a ** 2).sum() + (a * 3).sum() + (a + b).sum() + (b + a).exp().sum()


def _shared_chain(a, b):
    s = a + b  # a's and b's gradients start as the same array, then each gets more
    return ((s * a).exp() + b * 2 + a.tanh() + s).sum()


@pytest.mark.parametrize("build", [_shared_first, _shared_last, _shared_chain], ids=lambda f: f.__name__)
def test_sums_made_in_place_never_touch_a_shared_gradient(build):
    """Add hands one gradient array to both its inputs: a sum must not be made in place in it."""
    data = [W, W[::-1].copy()]
    ours = grads_of(build, data, False, None)
    for a, t in zip(ours, torch_grads(build, data)):
        np.testing.assert_allclose(a, t, rtol=1e-5, atol=1e-5)


def test_a_tensor_used_many_times_gets_the_sums_of_the_out_of_place_path(monkeypatch):
    """Three or more gradients of one tensor: the first sum is a new array, the next ones are added
    into it in place; the bits are those of summing out of place."""
    def build(x, w):
        h = x @ w.T
        return sum(((h * float(k)) ** 2).sum() for k in range(1, 6)) + h.exp().sum() + (x * x).sum()

    ours = grads_of(build, [X, W], False, None)
    sum_gradients = autograd._sum_gradients
    monkeypatch.setattr(autograd, "_sum_gradients", lambda pending, g, owned: sum_gradients(pending, g, False))
    out_of_place = grads_of(build, [X, W], False, None)
    for a, b, t in zip(ours, out_of_place, torch_grads(build, [X, W])):
        assert_same_bits(a, b)
        np.testing.assert_allclose(a, t, rtol=1e-5, atol=1e-4)


def test_outputs_of_a_multi_output_function_used_many_times():
    """A PyTorch-style Function's outputs' gradients are summed as _OutputGrads, not arrays."""
    class TorchThreeOutputs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2, x.exp(), x * x

        @staticmethod
        def backward(ctx, g_twice, g_exp, g_square):
            (x,) = ctx.saved_tensors
            return g_twice * 2 + g_exp * x.exp() + g_square * 2 * x

    class EngineThreeOutputs(autograd.Function):
        forward = staticmethod(TorchThreeOutputs.forward)
        backward = staticmethod(TorchThreeOutputs.backward)

    def run(lib, fn_cls):
        x = lib.tensor(W, requires_grad=True)
        twice, exp, square = fn_cls.apply(x)  # three outputs: three gradients of the packed node summed
        ((twice ** 2).sum() + (exp * twice).sum() + exp.sum() + (twice * square).sum()).backward()
        return x.grad.numpy()

    np.testing.assert_allclose(run(engine, EngineThreeOutputs), run(torch, TorchThreeOutputs), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [qkv_rows, partly_overlapping, many_views, split_activation],
                         ids=lambda f: getattr(f, "__name__", f))
def test_slice_gradients_on_each_device_with_an_optimizer_home(build, device, dense_slices):
    """On the device's arrays (cupy on a GPU): the parts written into AdamW's flat gradient buffer."""
    def grads(dense):
        if dense:
            dense_slices()
        w = engine.nn.Parameter(engine.tensor(W, device=device))
        x = engine.tensor(X, device=device, requires_grad=True)
        opt = optim.AdamW([w], lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            build(w, x).backward()
            opt.step()
        return [engine.tensor(t).cpu().numpy() for t in (w.grad, x.grad, w.detach())]

    for a, b in zip(grads(False), grads(True)):
        assert_same_bits(a, b)

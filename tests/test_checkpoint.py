"""Activation checkpointing (engine.utils.checkpoint): gradients, RNG replay, memory, errors."""

import gc
import warnings
import weakref

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import nn
from engine.autograd import saved_bytes
from engine.utils.checkpoint import checkpoint, checkpoint_sequential
from tests.conftest import DEVICES


def _mlp(seed=0, p=0.25):
    engine.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(p), nn.Linear(12, 5), nn.Tanh(),
                         nn.Dropout(p), nn.Linear(5, 3))


def _grads(tensors):
    return [t.grad.numpy().copy() for t in tensors]


def _run(model, x, wrap, seed=7):
    """One forward/backward with the generator seeded the same way; also what it draws after."""
    engine.manual_seed(seed)
    model.zero_grad()
    x.grad = None
    out = wrap(model, x)
    loss = (out * out).sum()
    loss.backward()
    after = engine.rand(4).numpy()  # the random stream must continue as without checkpointing
    return out.numpy().copy(), _grads([x, *model.parameters()]), after


def test_mlp_with_dropout_gradients_equal_the_plain_run_exactly():
    model = _mlp()
    x = engine.randn(9, 6, requires_grad=True)
    out_a, grads_a, after_a = _run(model, x, lambda m, t: m(t))
    out_b, grads_b, after_b = _run(model, x, lambda m, t: checkpoint(m, t, use_reentrant=False))
    assert np.array_equal(out_a, out_b)
    assert len(grads_a) == 7
    for a, b in zip(grads_a, grads_b):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    assert np.array_equal(after_a, after_b)
    # Dropout really dropped something, or the RNG replay would not be tested.
    assert (grads_b[0] == 0).sum() < grads_b[0].size and (out_a != 0).all()


def test_gradients_match_a_float64_numpy_reference_with_the_same_dropout_mask():
    p, seed = 0.5, 11
    engine.manual_seed(3)
    lin1, lin2 = nn.Linear(4, 8), nn.Linear(8, 2)
    x = engine.randn(5, 4, requires_grad=True)

    def block(t):
        return lin2(F.dropout(F.relu(lin1(t)), p, training=True))

    engine.manual_seed(seed)
    y = checkpoint(block, x)
    (y * y).sum().backward()
    # The mask the engine's CPU generator draws after manual_seed(seed), computed independently.
    mask = (np.random.Generator(np.random.PCG64(seed)).random((5, 8), dtype=np.float32) >= p) / (1 - p)
    w1, b1, w2, b2 = (t.numpy().astype(np.float64) for t in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    xs = x.numpy().astype(np.float64)
    pre = xs @ w1.T + b1
    h = np.maximum(pre, 0) * mask
    out = h @ w2.T + b2
    g_out = 2 * out
    g_h = g_out @ w2 * mask * (pre > 0)
    np.testing.assert_allclose(y.numpy(), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin2.weight.grad.numpy(), g_out.T @ h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin1.weight.grad.numpy(), g_h.T @ xs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin1.bias.grad.numpy(), g_h.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), g_h @ w1, rtol=1e-5, atol=1e-5)


def test_finite_differences_through_a_checkpointed_function():
    w = engine.randn(3, 4, dtype=engine.float64, requires_grad=True)

    def f(a, b):
        return checkpoint(lambda u, v: (u @ w).tanh() * v.exp(), a, b)

    assert engine.gradcheck(f, [engine.randn(2, 3), engine.randn(2, 4)])


def test_several_inputs_kwargs_tuple_outputs_and_non_tensor_values():
    engine.manual_seed(0)
    w = engine.randn(4, 4, requires_grad=True)
    a, b = engine.randn(3, 4, requires_grad=True), engine.randn(3, 4, requires_grad=True)
    c = engine.randn(3, 4)  # an input that requires no grad

    def f(u, v, k, *, scale, shift=None):
        s = F.dropout((u * v) @ w, 0.3) * scale + k
        return s.sum(1), (s + shift).relu(), "label", v.argmax(1)

    def run(ck):
        engine.manual_seed(5)
        for t in (w, a, b):
            t.grad = None
        out = checkpoint(f, a, b, c, scale=1.5, shift=0.2) if ck else f(a, b, c, scale=1.5, shift=0.2)
        (out[0].sum() * 3 + (out[1] ** 2).sum()).backward()
        return out, _grads([w, a, b])

    (s0, r0, label0, idx0), plain = run(False)
    (s1, r1, label1, idx1), ckpt = run(True)
    assert label1 == "label" and np.array_equal(idx0.numpy(), idx1.numpy()) and not idx1.requires_grad
    assert np.array_equal(s0.numpy(), s1.numpy()) and np.array_equal(r0.numpy(), r1.numpy())
    for x, y in zip(plain, ckpt):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("squared_first", [False, True])
def test_an_output_computed_from_another_output_gets_both_gradients(squared_first):
    # The recomputed graph has two roots, one of which the other reads: backward must add the
    # second root's contribution to the first before walking past it, in either output order.
    w = engine.randn(4, 4, requires_grad=True)
    x = engine.randn(3, 4, requires_grad=True)

    def f(u):
        h = (u @ w).tanh()
        return (h * h, h) if squared_first else (h, h * h)

    def run(ck):
        for t in (w, x):
            t.grad = None
        out = checkpoint(f, x) if ck else f(x)
        h, h2 = (out[1], out[0]) if squared_first else out
        (h.sum() * 2 + h2.sum()).backward()
        return _grads([w, x])

    for plain, ckpt in zip(run(False), run(True)):
        np.testing.assert_allclose(ckpt, plain, rtol=1e-6, atol=1e-7)


def test_parameters_get_gradients_when_no_input_requires_grad():
    model = _mlp(p=0.0)
    x = engine.randn(4, 6)  # data: no grad
    out_a, grads_a, _ = _run(model, x.requires_grad_(True), lambda m, t: m(t))
    x.requires_grad_(False)
    engine.manual_seed(7)
    model.zero_grad()
    out = checkpoint(model, x, use_reentrant=False)
    assert out.requires_grad
    (out * out).sum().backward()
    for a, p in zip(grads_a[1:], model.parameters()):
        assert np.array_equal(a, p.grad.numpy())


def test_reentrant_variant_keeps_pytorchs_rules():
    model = _mlp(p=0.0)
    with pytest.warns(UserWarning, match="none of the inputs"):
        out = checkpoint(model, engine.randn(2, 6), use_reentrant=True)
    assert not out.requires_grad
    with pytest.raises(TypeError, match="use_reentrant=True"):
        checkpoint(lambda x, k: x * k, engine.randn(2), k=2.0, use_reentrant=True)
    x = engine.randn(2, 6, requires_grad=True)
    checkpoint(model, x, use_reentrant=True).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_a_closed_over_tensor_inside_the_outer_graph_gets_its_gradient():
    a = engine.randn(3, requires_grad=True)
    x = engine.randn(3, requires_grad=True)
    hidden = a * 2  # not a leaf: the gradient must flow on into a, once

    def f(t):
        return (t * hidden).sin()

    checkpoint(f, x).sum().backward()
    expected = (np.cos(x.numpy() * hidden.numpy()) * x.numpy() * 2).astype(np.float32)
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-6)


def test_an_in_place_update_of_a_parameter_between_forward_and_backward_is_refused():
    lin = nn.Linear(3, 2)
    out = checkpoint(lin, engine.randn(4, 3, requires_grad=True))
    with engine.no_grad():
        lin.weight.mul_(2)  # an optimizer step before backward
    with pytest.raises(engine.GradError, match="in-place"):
        out.sum().backward()


def test_a_recomputation_that_returns_something_else_is_refused():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2 if len(calls) == 1 else x.sum()

    out = checkpoint(f, engine.randn(3, requires_grad=True))
    with pytest.raises(engine.GradError, match="recomputing"):
        out.sum().backward()


def test_bad_arguments():
    x = engine.randn(2, requires_grad=True)
    with pytest.raises(TypeError, match="callable"):
        checkpoint(3, x)
    with pytest.raises(TypeError, match="use_reentrant"):
        checkpoint(lambda t: t, x, use_reentrant="yes")
    with pytest.raises(TypeError, match="Tensor or a tuple"):
        checkpoint(lambda t: {"y": t}, x)
    with pytest.raises(ValueError, match="determinism_check"):
        checkpoint(lambda t: t, x, determinism_check="strict")
    with pytest.raises(ValueError, match="segments"):
        checkpoint_sequential([nn.ReLU(), nn.ReLU()], 3, x)
    with pytest.raises(ValueError, match="segments"):
        checkpoint_sequential([nn.ReLU()], 0, x)
    with pytest.raises(TypeError, match=r"functions\[1\]"):
        checkpoint_sequential([nn.ReLU(), 4], 1, x)


def test_under_no_grad_it_just_runs_the_function():
    lin = nn.Linear(3, 2)
    with engine.no_grad():
        out = checkpoint(lin, engine.randn(4, 3))
    assert out.grad_fn is None and not out.requires_grad


def test_twice_backward_with_retain_graph_and_nested_checkpoints():
    engine.manual_seed(2)
    inner, outer = nn.Linear(4, 4), nn.Linear(4, 4)
    x = engine.randn(3, 4, requires_grad=True)

    def block(t, ck):
        h = F.dropout(outer(t).relu(), 0.5)
        return (checkpoint(inner, h) if ck else inner(h)).tanh()

    engine.manual_seed(9)
    plain = block(x, False).sum()
    plain.backward()
    want = _grads([x, inner.weight, outer.weight])
    for t in (x, inner.weight, outer.weight):
        t.grad = None
    engine.manual_seed(9)
    loss = checkpoint(block, x, True).sum()
    loss.backward(retain_graph=True)
    assert all(np.array_equal(a, b) for a, b in zip(want, _grads([x, inner.weight, outer.weight])))
    loss.backward()  # recomputes again; gradients accumulate
    for a, b in zip(want, _grads([x, inner.weight, outer.weight])):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-6)


@pytest.mark.parametrize("segments", [1, 2, 3, 7])
def test_checkpoint_sequential_equals_the_plain_model(segments):
    model = _mlp()
    x = engine.randn(5, 6, requires_grad=True)
    out_a, grads_a, after_a = _run(model, x, lambda m, t: m(t))
    out_b, grads_b, after_b = _run(model, x, lambda m, t: checkpoint_sequential(m, segments, t))
    assert np.array_equal(out_a, out_b) and np.array_equal(after_a, after_b)
    assert all(np.array_equal(a, b) for a, b in zip(grads_a, grads_b))


# ---- memory -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_intermediate_activations_are_not_kept():
    engine.manual_seed(0)
    lins = [nn.Linear(32, 32) for _ in range(4)]
    kept = []

    def block(t):
        for lin in lins:
            t = F.dropout(lin(t).relu(), 0.1)
            kept.append(weakref.ref(t))
        return t

    x = engine.randn(64, 32, requires_grad=True)
    plain = block(x).sum()
    gc.collect()
    assert sum(r() is not None for r in kept) == 4  # the graph holds every activation
    plain_bytes = saved_bytes(plain)
    kept.clear()

    out = checkpoint(block, x)
    loss = out.sum()
    gc.collect()
    alive = [r() for r in kept if r() is not None]
    assert len(alive) == 1 and alive[0] is out  # only the block's output, which the caller holds
    ckpt_bytes = saved_bytes(loss)
    # Plain: per layer the input, the ReLU output, the mask (4 x 3 x 64 x 32 x 4 B); checkpointed:
    # the block's input and the parameters it reads (4 x (32 x 32 + 32) floats), nothing else.
    assert plain_bytes >= 4 * 3 * 64 * 32 * 4
    assert ckpt_bytes <= 64 * 32 * 4 + 4 * (32 * 32 + 32) * 4
    kept.clear()
    loss.backward()
    assert all(lin.weight.grad is not None for lin in lins)
    gc.collect()
    assert all(r() is None for r in kept)  # the recomputed activations are freed after use


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_dropout_mask_matches_the_forward_on_each_device(device):
    # With x = 1 and the loss sum(dropout(x)), dL/dx is the mask / (1 - p): the forward's output.
    x = engine.ones(64, 64, device=device, requires_grad=True)
    out = checkpoint(lambda t: F.dropout(t, 0.5), x)
    out.sum().backward()
    assert np.array_equal(x.grad.numpy(), out.numpy())
    assert 0 < (out.numpy() == 0).sum() < out.numel()


def test_warnings_free_default_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint(nn.Linear(2, 2), engine.randn(1, 2, requires_grad=True)).sum().backward()

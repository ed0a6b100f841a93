"""Backward writes a leaf's fresh gradient into the optimizer's flat gradient buffer (its home).

The step must be bit-identical to the path without homes (fresh gradient arrays gathered into the
buffer by the step), gather nothing when the gradients already live there, and keep PyTorch's
``zero_grad(set_to_none=True)`` semantics: a ``.grad`` the user kept keeps its values.
"""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn
from engine.optim import SGD, Adam, AdamW
from tests.conftest import DEVICES

OPTIMIZERS = [
    (Adam, {"lr": 1e-2, "weight_decay": 0.01}),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    (SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
]


def make_model(device="cpu", seed=0):
    engine.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5))  # odd sizes: padding between params
    return model.to(device)


def batches(n, device="cpu"):
    rng = np.random.default_rng(1)
    return [(engine.tensor(rng.standard_normal((6, 7)), dtype=np.float32, device=device),
             engine.tensor(rng.integers(0, 5, 6), device=device)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def buckets(opt):
    return [b for group in opt._buckets for b in group]


def train(opt_cls, kwargs, fused, set_to_none, homes, steps=4, accumulate=2, device="cpu"):
    model = make_model(device)
    opt = opt_cls(model.parameters(), fused=fused, **kwargs)
    if not homes:  # the path before homes: backward copies each gradient, the step gathers them
        for p in model.parameters():
            p._grad_home = None
    data = batches(steps * accumulate, device)
    copied = []
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        for x, y in data[step * accumulate:(step + 1) * accumulate]:
            loss_of(model, x, y).backward()
        before = sum(b.grads_copied for b in buckets(opt))
        opt.step()
        copied.append(sum(b.grads_copied for b in buckets(opt)) - before)
    return [p.numpy().copy() for p in model.parameters()], copied, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_steps_are_bit_identical_with_and_without_homes(opt_cls, kwargs, fused, set_to_none, device):
    with_homes, copied, _ = train(opt_cls, kwargs, fused, set_to_none, homes=True, device=device)
    without, copied_before, _ = train(opt_cls, kwargs, fused, set_to_none, homes=False, device=device)
    for a, b in zip(with_homes, without):
        np.testing.assert_array_equal(a, b)
    if fused:
        assert copied == [0, 0, 0, 0], "the fused step gathered gradients that backward wrote into the buffer"
        if set_to_none:
            assert copied_before[0] == 4, "without homes the step gathers every gradient (the count counts)"


def test_gradients_are_views_of_the_flat_buffer_and_correct():
    model = make_model()
    reference = make_model()
    opt = Adam(model.parameters(), lr=1e-3)
    (x, y), = batches(1)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    loss_of(reference, x, y).backward()
    (bucket,) = buckets(opt)
    for i, (p, q) in enumerate(zip(model.parameters(), reference.parameters())):
        assert p.grad._data is bucket.grad_views[i]
        assert np.shares_memory(p.grad.numpy(), bucket.grad_flat)
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


def test_unfused_optimizer_gives_no_homes():
    model = make_model()
    Adam(model.parameters(), fused=False)
    (x, y), = batches(1)
    loss_of(model, x, y).backward()
    assert all(p._grad_home is None for p in model.parameters())


def kept_part(grad, keep):
    if keep == "tensor":
        return grad
    if keep == "numpy":
        return grad.numpy()
    if keep == "numpy_view":
        return grad.numpy().ravel()[3:]
    return grad[1]  # a Tensor view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", ["tensor", "numpy", "numpy_view", "tensor_view"])
def test_a_grad_kept_across_set_to_none_keeps_its_values(keep, device):
    model = make_model(device)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = batches(3, device)
    opt.zero_grad()
    loss_of(model, *data[0]).backward()
    weight = model[0].weight
    kept = kept_part(weight.grad, keep)  # only this is kept: weight.grad itself goes to None below
    expected = np.array(kept.numpy() if isinstance(kept, engine.Tensor) else kept, copy=True)
    opt.step()
    opt.zero_grad()  # set_to_none: the kept tensor lives on with its values, as in PyTorch
    loss_of(model, *data[1]).backward()
    reference = make_model(device)
    reference.load_state_dict(model.state_dict())
    loss_of(reference, *data[1]).backward()
    np.testing.assert_array_equal(weight.grad.numpy(), reference[0].weight.grad.numpy())
    opt.step()
    opt.zero_grad(set_to_none=False)  # zeroing the buffer must not zero what the user kept either
    loss_of(model, *data[2]).backward()
    opt.step()
    got = kept.numpy() if isinstance(kept, engine.Tensor) else kept
    np.testing.assert_array_equal(got, expected)


def test_homes_are_used_again_once_the_kept_grad_is_dropped():
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2)
    data = batches(3)
    loss_of(model, *data[0]).backward()
    kept = model[2].bias.grad
    opt.step()
    opt.zero_grad()
    loss_of(model, *data[1]).backward()
    (bucket,) = buckets(opt)
    assert model[2].bias.grad._data is not bucket.grad_views[3], "a busy home was written"
    before = bucket.grads_copied
    opt.step()  # a new buffer: every gradient is copied into it once
    assert bucket.grads_copied - before == 4
    del kept
    opt.zero_grad()
    loss_of(model, *data[2]).backward()
    before = bucket.grads_copied
    opt.step()
    assert bucket.grads_copied == before


def test_an_assigned_grad_is_used_and_left_unchanged():
    model = make_model()
    opt = SGD(model.parameters(), lr=0.5)
    params = list(model.parameters())
    start = [p.numpy().copy() for p in params]
    assigned = [engine.full(p.shape, 0.25) for p in params]
    for p, g in zip(params, assigned):
        p.grad = g
    opt.step()
    for p, s, g in zip(params, start, assigned):
        np.testing.assert_array_equal(p.numpy(), s - np.float32(0.5) * np.float32(0.25))
        np.testing.assert_array_equal(g.numpy(), np.full(p.shape, 0.25, np.float32))


def test_a_rebound_parameter_gets_a_gradient_in_new_memory():
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2)
    weight = model[0].weight
    weight.data = weight.numpy().copy()  # no longer the optimizer's view: its home does not fit
    (x, y), = batches(1)
    loss_of(model, x, y).backward()
    (bucket,) = buckets(opt)
    assert not np.shares_memory(weight.grad.numpy(), bucket.grad_flat)
    opt.step()  # rebuilds the buckets, with new homes
    opt.zero_grad()
    loss_of(model, x, y).backward()
    (bucket,) = buckets(opt)
    assert weight.grad._data is bucket.grad_views[0]


def test_post_accumulate_hook_sees_the_gradient_in_its_home():
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2)
    (bucket,) = buckets(opt)
    seen = []
    bias = model[2].bias
    bias.register_post_accumulate_grad_hook(lambda p: seen.append((p.grad._data is bucket.grad_views[3],
                                                                   p.grad.numpy().copy())))
    (x, y), = batches(1)
    loss_of(model, x, y).backward()
    loss_of(model, x, y).backward()
    assert [s[0] for s in seen] == [True, True]
    np.testing.assert_allclose(seen[1][1], 2 * seen[0][1], rtol=1e-6)

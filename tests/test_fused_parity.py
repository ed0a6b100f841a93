"""Fused kernels vs the reference path, end to end: 20 training steps of a small MLP with the fused
linear+ReLU, softmax-cross-entropy and optimizer kernels give the same parameters as the same
steps composed of core ops, within float32 tolerance."""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn, optim
from tests.conftest import DEVICES


def _train(fused: bool, device: str, optimizer: str, steps: int = 20) -> dict:
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32, device=device), nn.ReLU(), nn.Linear(32, 24, device=device), nn.ReLU(),
                          nn.Linear(24, 7, device=device))
    make = {"adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.05, fused=fused),
            "sgd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, fused=fused),
            "rmsprop": lambda p: optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True, fused=fused)}[optimizer]
    opt = make(model.parameters())
    rng = np.random.default_rng(1)
    with F.fused_kernels(fused):
        for _ in range(steps):
            x = engine.tensor(rng.standard_normal((37, 13)), dtype=engine.float32, device=device)
            y = engine.tensor(rng.integers(0, 7, 37), device=device)
            y._data[3] = -100  # one ignored row
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "rmsprop"])
def test_fused_and_reference_training_agree(device, optimizer):
    fused, reference = _train(True, device, optimizer), _train(False, device, optimizer)
    for name in reference:
        np.testing.assert_allclose(fused[name], reference[name], rtol=2e-4, atol=2e-5, err_msg=name)
    start = _train(True, device, optimizer, steps=0)
    assert any(not np.allclose(start[k], fused[k]) for k in start), "training did not move the parameters"


def test_the_fused_path_really_uses_the_kernels():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = engine.randn(5, 4), engine.tensor([0, 1, 2, 0, 1])
    fused_loss = F.cross_entropy(model(x), y)
    assert type(fused_loss.grad_fn).__name__ == "SoftmaxCrossEntropy"
    assert any(type(t.grad_fn).__name__ == "LinearReLU" for t in _graph(model(x)))
    with F.fused_kernels(False):
        assert type(F.cross_entropy(model(x), y).grad_fn).__name__ != "SoftmaxCrossEntropy"
        assert not any(type(t.grad_fn).__name__ == "LinearReLU" for t in _graph(model(x)))


def _graph(root):
    seen, stack = [], [root]
    while stack:
        t = stack.pop()
        seen.append(t)
        if t.grad_fn is not None:
            stack.extend(getattr(t.grad_fn, "inputs", ()))
    return seen

"""Gradient homes on a (fake) GPU: backward writes fresh gradients into the optimizer's flat buffer,
the fused step copies none, a kept ``.grad`` keeps its values, and a captured step's backward
writes the homes (tests/cuda/fake_capture.py runs cupy's side on the CPU)."""

import numpy as np

import engine
from engine import optim
from tests.cuda import fake_optim_kernels
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)
from tests.cuda.test_capturable_optim import SHAPES, _params


def _host(array):
    return array.host.copy() if hasattr(array, "host") else np.asarray(array).copy()


def _backward(params, scale):
    loss = None
    for p in params:
        term = (p * p * scale).sum()
        loss = term if loss is None else loss + term
    loss.backward()


def test_backward_writes_the_homes_and_the_step_copies_nothing(fake_gpu, monkeypatch):
    fake_optim_kernels.install(monkeypatch, fake_gpu)
    gpu, cpu = _params("cuda"), _params("cpu")
    opt, ref = optim.Adam(gpu, lr=0.1), optim.Adam(cpu, lr=0.1)
    (bucket,) = opt._buckets[0]
    for step in range(3):
        for params, o in ((gpu, opt), (cpu, ref)):
            o.zero_grad()
            _backward(params, 1.0 + step)
            o.step()
        assert all(p.grad._data is view for p, view in zip(gpu, bucket.grad_views))
        for p, q in zip(gpu, cpu):
            np.testing.assert_allclose(_host(p._data), _host(q._data), rtol=1e-6, atol=1e-7)
    assert bucket.grads_copied == 0


def test_a_kept_grad_keeps_its_values_on_the_device(fake_gpu, monkeypatch):
    fake_optim_kernels.install(monkeypatch, fake_gpu)
    gpu = _params("cuda")
    opt = optim.SGD(gpu, lr=0.1, momentum=0.9)
    _backward(gpu, 1.0)
    kept = gpu[0].grad
    expected = _host(kept._data)
    opt.step()
    opt.zero_grad()
    _backward(gpu, 3.0)
    (bucket,) = opt._buckets[0]
    assert gpu[0].grad._data is not bucket.grad_views[0], "a home a kept tensor sees was written"
    opt.step()
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(_host(kept._data), expected)
    np.testing.assert_array_equal(_host(gpu[0].grad._data), np.zeros(SHAPES[0], np.float32))


def test_a_captured_backward_writes_the_homes_at_every_replay(fake_gpu, monkeypatch):
    fake_optim_kernels.install(monkeypatch, fake_gpu)
    gpu = _params("cuda")
    opt = optim.Adam(gpu, lr=0.1, capturable=True)
    scale = engine.tensor(1.0, device="cuda")

    def step():
        opt.zero_grad()
        _backward(gpu, scale)
        opt.step()

    step()  # warm-up: the states and device scalars exist before the capture
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        step()
    (bucket,) = opt._buckets[0]
    assert all(p.grad._data is view for p, view in zip(gpu, bucket.grad_views))
    for value in (2.0, 5.0):
        scale.fill_(value)
        before = [_host(p._data) for p in gpu]
        g.replay()
        for p, b in zip(gpu, before):  # d/dp of scale * p^2, read from the home the replay wrote
            np.testing.assert_allclose(_host(p.grad._data), 2 * value * b, rtol=1e-6)
    assert bucket.grads_copied == 0

"""engine.cuda on a real GPU: graphs against eager steps, events, streams and memory statistics.
Skipped without a device (the same logic runs on the CPU against tests/cuda/fake_capture.py)."""

import copy

import numpy as np
import pytest

import engine
from engine import nn
from engine.backend import CaptureError

pytestmark = pytest.mark.gpu


def test_a_captured_training_step_matches_eager_steps():
    rng = np.random.default_rng(0)
    x0, y0 = rng.standard_normal((64, 16)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    w0 = rng.standard_normal((16, 4)).astype(np.float32)

    def step(x, y, w, lr):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        with engine.no_grad():
            w -= lr * w.grad
        return loss

    w_ref = engine.tensor(w0, device="cuda", requires_grad=True)
    x, y = engine.tensor(x0, device="cuda"), engine.tensor(y0, device="cuda")
    w = engine.tensor(w0, device="cuda", requires_grad=True)
    lr = engine.tensor(0.05, device="cuda")
    with engine.cuda.stream(engine.cuda.Stream()):  # warm-up on copies: compile kernels, create handles
        scratch = engine.tensor(w0, device="cuda", requires_grad=True)
        for _ in range(2):
            step(x, y, scratch, lr)
            scratch.grad = None
    engine.cuda.synchronize()
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        static_loss = step(x, y, w, lr)
    assert set(map(id, g.static_inputs)) == {id(x), id(y), id(w), id(lr)}
    allocated = engine.cuda.memory_allocated()
    for i in range(5):
        g.replay()
        loss_ref = step(x, y, w_ref, 0.05)
        w_ref.grad = None
        np.testing.assert_allclose(static_loss.item(), loss_ref.item(), rtol=1e-5, err_msg=f"step {i}")
        np.testing.assert_allclose(w.detach().cpu().numpy(), w_ref.detach().cpu().numpy(), rtol=1e-5, atol=1e-6)
    assert engine.cuda.memory_allocated() == allocated, "replays allocated"
    lr.fill_(0.0)  # a device scalar changed between replays
    before = w.detach().cpu().numpy()
    g.replay()
    np.testing.assert_array_equal(w.detach().cpu().numpy(), before)


def test_a_graphed_module_matches_its_eager_copy():
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to("cuda")
    reference = copy.deepcopy(model)
    sample = engine.randn(16, 32, device="cuda")
    model = engine.cuda.make_graphed_callables(model, (sample,))
    for _ in range(3):
        x = engine.randn(16, 32, device="cuda")
        out, out_ref = model(x), reference(x)
        np.testing.assert_allclose(out.detach().cpu().numpy(), out_ref.detach().cpu().numpy(), rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            np.testing.assert_allclose(p.grad.cpu().numpy(), q.grad.cpu().numpy(), rtol=1e-4, atol=1e-5)
        model.zero_grad()
        reference.zero_grad()


def test_a_host_read_in_a_real_capture_raises_and_leaves_no_capture_behind():
    x = engine.ones(4, device="cuda")
    with pytest.raises(CaptureError, match="Tensor.item"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            (x * 2.0).sum().item()
    assert not engine.cuda.is_current_stream_capturing()
    assert (x * 2.0).sum().item() == 8.0  # the stream works normally afterwards


def test_events_streams_and_memory_statistics():
    engine.cuda.synchronize()
    engine.cuda.reset_peak_memory_stats()
    base = engine.cuda.memory_allocated()
    start, end = engine.cuda.Event(enable_timing=True), engine.cuda.Event(enable_timing=True)
    side = engine.cuda.Stream()
    side.wait_stream(engine.cuda.current_stream())
    with engine.cuda.stream(side):
        start.record()
        a = engine.randn(1024, 1024, device="cuda")
        b = a @ a
        end.record()
    end.synchronize()
    assert start.elapsed_time(end) > 0 and side.query()
    assert engine.cuda.memory_allocated() >= base + 2 * a._data.nbytes
    peak = engine.cuda.max_memory_allocated()
    del a, b
    assert engine.cuda.max_memory_allocated() == peak >= engine.cuda.memory_allocated()
    engine.cuda.empty_cache()
    assert engine.cuda.memory_reserved() >= engine.cuda.memory_allocated()
    assert isinstance(engine.cuda.get_device_name(), str) and engine.cuda.get_device_capability()[0] >= 5

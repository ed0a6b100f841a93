"""engine.cuda graphs: the capture logic on the fake stream-capture layer (tests/cuda/fake_capture.py),
and the CPU behaviour (CUDAGraph refuses with the device named; make_graphed_callables is a no-op).

The fake runs nothing at capture (its effects are undone, and what the capture allocated holds
NaN until a replay), so these tests check what a GPU shows: which memory is static, that a
replay reads the current values of static inputs and device scalars, that replays allocate
nothing, and that what a replay could not repeat raises a CaptureError naming the op.
"""

import copy

import numpy as np
import pytest

import engine
from engine import backend, nn
from engine.backend import CaptureError
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)


def _gpu(values, requires_grad=False):
    return engine.tensor(np.asarray(values, dtype=np.float32), device="cuda", requires_grad=requires_grad)


def _host(t):
    return t._data.host.copy()


# ---- without CUDA ----------------------------------------------------------------------------------

@pytest.mark.skipif(engine.cuda.is_available(), reason="this machine has CUDA")
def test_on_the_cpu_a_graph_is_refused_with_the_device_named():
    with pytest.raises(engine.DeviceError, match=r"engine\.cuda\.CUDAGraph: needs a CUDA device \(cuda:0\)"):
        engine.cuda.CUDAGraph()
    with pytest.raises(engine.DeviceError, match="graph_pool_handle"):
        engine.cuda.graph_pool_handle()
    assert engine.cuda.is_current_stream_capturing() is False


def test_on_the_cpu_make_graphed_callables_returns_the_callables_unchanged():
    model = nn.Linear(3, 2)
    x = engine.randn(4, 3)
    assert engine.cuda.make_graphed_callables(model, (x,)) is model
    assert "forward" not in vars(model)  # nothing replaced
    fns = (model, engine.tanh)
    assert engine.cuda.make_graphed_callables(fns, ((x,), (x,))) is fns
    out = engine.cuda.make_graphed_callables(model, (x,))(x)
    np.testing.assert_allclose(out.detach().numpy(), model(x).detach().numpy())


# ---- capture and replay ------------------------------------------------------------------------------

def test_the_static_inputs_are_the_tensors_read_from_outside_the_graph(fake_gpu):
    x, w = _gpu([1.0, 2.0, 3.0]), _gpu([0.5, -1.0, 2.0])
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        h = x * w
        y = h.tanh().sum()
    static = g.static_inputs
    assert len(static) == 2 and static[0] is x and static[1] is w  # not h, not y: those are the graph's own
    assert g.pool().owns(h._data.data.ptr) and g.pool().owns(y._data.data.ptr)
    assert not g.pool().owns(x._data.data.ptr)


def test_a_capture_runs_nothing_and_a_replay_computes(fake_gpu):
    x, w = _gpu([1.0, 2.0, 3.0]), _gpu([0.5, -1.0, 2.0])
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        y = (x * w).tanh().sum()
    assert np.isnan(_host(y))  # as on a GPU: the output is not computed until a replay
    g.replay()
    np.testing.assert_allclose(_host(y), np.tanh(np.array([0.5, -2.0, 6.0])).sum(), rtol=1e-6)


def test_a_replay_reads_new_values_of_static_inputs_and_device_scalars(fake_gpu):
    x, scale = _gpu([1.0, 2.0]), _gpu(2.0)
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        y = x * scale + 1.0  # 1.0: a device scalar the engine fills by a kernel, part of the graph
    g.replay()
    np.testing.assert_allclose(_host(y), [3.0, 5.0])
    with engine.no_grad():
        scale.fill_(10.0)  # a device scalar changed between replays (a learning rate, say)
        x.copy_(_gpu([-1.0, 0.5]))  # new values into the static input
    g.replay()
    np.testing.assert_allclose(_host(y), [-9.0, 6.0])


def test_an_in_place_update_in_the_region_happens_once_per_replay(fake_gpu):
    counter = _gpu([0.0])
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g), engine.no_grad():
        counter.add_(1.0)
    np.testing.assert_array_equal(_host(counter), [0.0])  # capture did not run it
    for _ in range(3):
        g.replay()
    np.testing.assert_array_equal(_host(counter), [3.0])


def test_replays_allocate_nothing_and_captures_allocate_from_the_private_pool(fake_gpu):
    x, w = _gpu(np.ones((4, 3))), _gpu(np.ones((3, 2)))
    default = fake_gpu.get_default_memory_pool()
    before = default.mallocs
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        (x @ w).tanh().sum()
    assert default.mallocs == before, "the capture allocated from the default pool"
    private = g.pool().pool
    assert private.mallocs > 0
    counts = default.mallocs, private.mallocs
    for _ in range(5):
        g.replay()
    assert (default.mallocs, private.mallocs) == counts
    assert fake_gpu.launches == 5


def test_a_whole_training_step_replays_like_eager_steps(fake_gpu):
    rng = np.random.default_rng(0)
    x0, w0 = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)

    def step(x, w, lr):
        loss = (x @ w).tanh().sum()
        loss.backward()
        with engine.no_grad():
            w -= lr * w.grad
        return loss

    x_ref, w_ref = engine.tensor(x0), engine.tensor(w0, requires_grad=True)
    x, w = _gpu(x0), _gpu(w0, requires_grad=True)
    lr = _gpu(0.1)
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):  # w.grad is None here: the graph makes it (so replays do not accumulate)
        static_loss = step(x, w, lr)
    np.testing.assert_array_equal(_host(w), w0)  # the capture changed nothing
    for i in range(4):
        g.replay()
        loss_ref = step(x_ref, w_ref, 0.1)
        w_ref.grad = None
        np.testing.assert_allclose(_host(static_loss), loss_ref.item(), rtol=1e-5, err_msg=f"step {i}")
        np.testing.assert_allclose(_host(w), w_ref.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {i}")


# ---- what cannot be captured ------------------------------------------------------------------------

def test_a_host_read_in_the_region_raises_naming_the_op_and_the_capture_is_dropped(fake_gpu):
    x = _gpu([1.0, 2.0])
    g = engine.cuda.CUDAGraph()
    with pytest.raises(CaptureError, match=r"^Tensor\.item \(tensor\.py:\d+, called from test_graphs\.py:\d+\) reads a "
                                           r"\(\) float32 array .* inside an engine\.cuda\.graph capture.*replay"):
        with engine.cuda.graph(g):
            y = x.sum()
            if y.item() > 0:  # a host decision: on a GPU it would be frozen at capture
                pass
    assert backend.capture_region() is None and not fake_gpu.get_current_stream().is_capturing()
    assert fake_gpu.host_reads == 0, "the engine refused the read before it reached the device"
    with pytest.raises(engine.EngineError, match="nothing is captured"):
        g.replay()
    with engine.cuda.graph(g):  # the graph can capture again
        y = x.sum()
    g.replay()
    assert _host(y) == 3.0


@pytest.mark.parametrize("read", [lambda t: t.numpy(), lambda t: float(t), lambda t: repr(t), lambda t: t.tolist(),
                                  lambda t: t.cpu()], ids=["numpy", "float", "repr", "tolist", "cpu"])
@pytest.mark.slow
def test_every_host_read_spelling_is_refused(fake_gpu, read):
    x = _gpu([1.0])
    with pytest.raises(CaptureError, match="reads a .* array from the device"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            read(x * 2.0)


@pytest.mark.slow
def test_a_cpu_tensor_in_the_region_raises_naming_the_op(fake_gpu):
    a = engine.tensor([1.0, 2.0])
    with pytest.raises(CaptureError, match=r"^mul: operand Tensor\(shape=\(2,\), dtype=float32, device=cpu\) is a "
                                           "CPU tensor"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            a * a
    with pytest.raises(CaptureError, match=r"^add_: .* CPU tensor"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()), engine.no_grad():
            a.add_(1.0)


@pytest.mark.slow
def test_a_host_to_device_copy_and_a_wait_in_the_region_raise(fake_gpu):
    with pytest.raises(CaptureError, match=r"copies a \(3,\) float32 host array to cuda:0"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            _gpu([1.0, 2.0, 3.0])
    with pytest.raises(CaptureError, match="waits for the device"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            engine.cuda.synchronize()
    event = engine.cuda.Event()
    event.record()
    with pytest.raises(CaptureError, match="Event.synchronize waits for an event"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            event.synchronize()


def test_random_draws_in_the_region_raise(fake_gpu):
    x = _gpu(np.ones(8))
    with pytest.raises(CaptureError, match=r"^dropout \(dropout\.py:\d+, called from test_graphs\.py:\d+\) draws "
                                           r"random numbers on cuda:0 \(a replay would repeat the same draw\)"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            engine.nn.functional.dropout(x, 0.5, training=True)


def test_a_shape_change_between_replays_raises_naming_the_op(fake_gpu):
    x = _gpu([1.0, 2.0])
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        y = x.tanh()
    x.data = _gpu([1.0, 2.0, 3.0])  # rebound to other memory, of another shape
    with pytest.raises(CaptureError, match=r"replay: tanh read a static input at capture, a \(2,\) float32 array"):
        g.replay()
    x.data = _gpu([5.0, 6.0])  # same shape, but other memory: a replay would read the old one
    with pytest.raises(CaptureError, match="rebinding between replays"):
        g.replay()
    assert y.shape == (2,)


@pytest.mark.slow
def test_capture_needs_a_side_stream_and_does_not_nest(fake_gpu):
    g = engine.cuda.CUDAGraph()
    with pytest.raises(CaptureError, match="default stream, which CUDA cannot capture"):
        g.capture_begin()
    with engine.cuda.graph(g):
        with pytest.raises(CaptureError, match="captures do not nest"):
            engine.cuda.CUDAGraph().capture_begin()
    with pytest.raises(engine.EngineError, match="already holds a capture"):
        with engine.cuda.graph(g):
            pass
    g.reset()
    with engine.cuda.graph(g):
        pass


@pytest.mark.slow
def test_graphs_can_share_a_pool(fake_gpu):
    x = _gpu([1.0, 2.0])
    first, second = engine.cuda.CUDAGraph(), engine.cuda.CUDAGraph()
    with engine.cuda.graph(first):
        y = x * 2.0
    with engine.cuda.graph(second, pool=first.pool()):
        z = y + 1.0  # reads the first graph's output: the pool's memory, so not a static input
    assert second.pool() is first.pool() and second.static_inputs == ()
    first.replay()
    second.replay()
    np.testing.assert_allclose(_host(z), [3.0, 5.0])
    with pytest.raises(engine.EngineError, match="pool must come from engine.cuda.graph_pool_handle"):
        with engine.cuda.graph(engine.cuda.CUDAGraph(), pool=object()):
            pass


def test_the_graph_pool_counts_in_the_memory_statistics(fake_gpu):
    x = _gpu(np.ones(256))
    before = engine.cuda.memory_allocated()
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        y = x * 3.0
    default, private = fake_gpu.get_default_memory_pool(), g.pool().pool
    assert private.used_bytes() >= y._data.nbytes and before > 0
    assert engine.cuda.memory_allocated() == default.used_bytes() + private.used_bytes()
    assert engine.cuda.max_memory_allocated() >= engine.cuda.memory_allocated()
    g.reset()


# ---- make_graphed_callables --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_graphed_module_matches_the_module_forward_and_backward(fake_gpu):
    engine.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(1)
    sample = _gpu(rng.standard_normal((5, 4)))
    graphed = engine.cuda.make_graphed_callables(model, (sample,), num_warmup_iters=2)
    assert graphed is model and "forward" in vars(model)
    for p in model.parameters():
        assert p.grad is None, "warm-up and capture leave .grad alone"
    for step in range(3):
        x0 = rng.standard_normal((5, 4)).astype(np.float32)
        out = model(_gpu(x0))
        out_ref = reference(engine.tensor(x0))
        np.testing.assert_allclose(_host(out), out_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
        (out * out).sum().backward()
        (out_ref * out_ref).sum().backward()
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            np.testing.assert_allclose(_host(p.grad), p_ref.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
        model.zero_grad()
        reference.zero_grad()
    model.eval()  # another mode than at capture: the module's own forward runs
    np.testing.assert_allclose(_host(model(_gpu(x0))), reference(engine.tensor(x0)).detach().numpy(), rtol=1e-5)


@pytest.mark.slow
def test_a_graphed_function_gives_its_arguments_gradients(fake_gpu):
    def f(a, b):
        return (a * b).tanh(), a.sum()

    a, b = _gpu([0.5, 1.0], requires_grad=True), _gpu([2.0, -1.0], requires_grad=True)
    graphed = engine.cuda.make_graphed_callables(f, (a, b))
    a1, b1 = _gpu([0.1, 0.2], requires_grad=True), _gpu([3.0, 4.0], requires_grad=True)
    y, s = graphed(a1, b1)
    (y.sum() + 2.0 * s).backward()
    a0, b0 = np.array([0.1, 0.2]), np.array([3.0, 4.0])
    dy = 1 - np.tanh(a0 * b0) ** 2
    np.testing.assert_allclose(_host(a1.grad), dy * b0 + 2.0, rtol=1e-5)
    np.testing.assert_allclose(_host(b1.grad), dy * a0, rtol=1e-5)
    with pytest.raises(CaptureError, match=r"got Tensor\(shape=\(3,\).* where the capture had Tensor\(shape=\(2,\)"):
        graphed(_gpu([1.0, 2.0, 3.0], requires_grad=True), b1)
    with pytest.raises(CaptureError, match="requires_grad=False, the sample had True"):
        graphed(_gpu([1.0, 2.0]), b1)


@pytest.mark.slow
def test_an_unused_input_needs_allow_unused_input(fake_gpu):
    a, b = _gpu([1.0], requires_grad=True), _gpu([2.0], requires_grad=True)
    with pytest.raises(engine.EngineError, match=r"input 1 .* is not used .* allow_unused_input=True"):
        engine.cuda.make_graphed_callables(lambda a, b: a * 2.0, (a, b))
    graphed = engine.cuda.make_graphed_callables(lambda a, b: a * 2.0, (a, b), allow_unused_input=True)
    a1, b1 = _gpu([3.0], requires_grad=True), _gpu([4.0], requires_grad=True)
    graphed(a1, b1).sum().backward()
    assert _host(a1.grad) == [2.0] and b1.grad is None


# ---- checks deferred to the next sync (kernels/deferred.py) ------------------------------------------

def test_a_replay_checks_its_own_indices_at_the_next_sync(fake_gpu):
    """A check the region defers (an index out of range) is computed by each replay, not at capture:
    a sync between capture and replay reads nothing the capture left, and a bad index fed to a later
    replay raises at the sync after it, naming the op, as it would eagerly."""
    from engine import kernels

    table = _gpu(np.arange(12.0).reshape(6, 2))
    index = engine.tensor(np.array([0, 5, 2], dtype=np.int64), device="cuda")
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        picked = engine.index_select(table, 0, index)
    assert kernels.deferred.pending() == 0  # the capture's check waits for a replay to compute it
    backend.synchronize(picked.device)  # nothing from the capture is read (its memory holds garbage)
    for rows in ([0, 5, 2], [1, 1, 4]):
        index.copy_(engine.tensor(np.array(rows, dtype=np.int64), device="cuda"))
        g.replay()
        assert kernels.deferred.pending() == 1
        backend.synchronize(picked.device)
        np.testing.assert_array_equal(_host(picked), np.arange(12.0).reshape(6, 2)[rows])
    index.copy_(engine.tensor(np.array([0, 6, 1], dtype=np.int64), device="cuda"))
    g.replay()
    with pytest.raises(engine.EngineError, match=r"index_select: indices must be in \[0, 6\).*index 6"):
        backend.synchronize(picked.device)
    index.copy_(engine.tensor(np.array([3, 3, 3], dtype=np.int64), device="cuda"))
    for _ in range(3):  # each replay queues its own values: three good replays, three quiet reads
        g.replay()
    assert kernels.deferred.pending() == 3
    backend.synchronize(picked.device)
    assert kernels.deferred.pending() == 0


def test_an_aborted_capture_leaves_no_deferred_check_behind(fake_gpu):
    from engine import kernels

    table = _gpu(np.arange(12.0).reshape(6, 2))
    index = engine.tensor(np.array([0, 5], dtype=np.int64), device="cuda")
    g = engine.cuda.CUDAGraph()
    with pytest.raises(CaptureError), engine.cuda.graph(g):
        engine.index_select(table, 0, index)
        table.sum().item()  # a host read: the capture is dropped
    assert kernels.deferred.pending() == 0
    engine.index_select(table, 0, index)  # eager again: queued as usual
    assert kernels.deferred.pending() == 1
    backend.synchronize(table.device)

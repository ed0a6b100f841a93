"""The APIs the third round of ported programs reach for, each checked against PyTorch 2.13:
``engine.accelerator``, ``engine.compile`` / ``engine._dynamo``, the attention switches of
``engine.backends.cuda``, the DataLoader's default collate, ``StepLR`` with a float step size and
LSTM projections (``proj_size``)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import engine
from engine.errors import DeviceError, EngineError

torch = pytest.importorskip("torch")


# ---- engine.accelerator ---------------------------------------------------------------------------------

def test_accelerator_answers_as_pytorch_on_a_machine_without_one():
    if engine.cuda.is_available():
        pytest.skip("a CUDA device answers here; this checks the machine without one")
    assert engine.accelerator.is_available() is torch.accelerator.is_available() is False
    assert engine.accelerator.current_accelerator() is None
    assert engine.accelerator.current_accelerator(check_available=True) is None
    assert engine.accelerator.device_count() == torch.accelerator.device_count() == 0
    for call in (engine.accelerator.current_device_index, lambda: engine.accelerator.set_device_index(0),
                 engine.accelerator.synchronize):
        with pytest.raises(DeviceError, match="no accelerator is available"):
            call()
    assert engine.accelerator.current_device_idx is engine.accelerator.current_device_index


def test_accelerator_device_pattern_of_the_tutorials_picks_cpu_here():
    device = engine.accelerator.current_accelerator().type if engine.accelerator.is_available() else "cpu"
    assert engine.zeros(2, device=device).device.type == ("cuda" if engine.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_accelerator_on_a_gpu():
    if not engine.cuda.is_available():
        pytest.skip("no CUDA device answers on this machine")
    assert engine.accelerator.current_accelerator() == engine.device("cuda:0")
    assert engine.accelerator.device_count() == engine.cuda.device_count()
    engine.accelerator.set_device_index("cuda:0")
    assert engine.accelerator.current_device_index() == 0
    engine.accelerator.synchronize()
    with engine.accelerator.device_index(0):
        assert engine.accelerator.current_device_index() == 0
    with pytest.raises(DeviceError, match="not the accelerator"):
        engine.accelerator.set_device_index(engine.device("cpu"))


# ---- engine.compile and engine._dynamo -----------------------------------------------------------------

def test_compile_returns_the_module_or_function_itself():
    net = engine.nn.Linear(3, 2)
    assert engine.compile(net) is net
    assert engine.compile(net, mode="max-autotune", fullgraph=True, dynamic=False, backend="aot_eager") is net
    assert net.compile() is None and isinstance(net, engine.nn.Linear)   # Module.compile works in place

    @engine.compile
    def double(x):
        return 2 * x

    @engine.compile(fullgraph=True, mode="reduce-overhead")
    def triple(x):
        return 3 * x

    assert double(2) == 4 and triple(2) == 6
    assert list(net.state_dict()) == ["weight", "bias"]                   # no _orig_mod. prefix
    engine._dynamo.reset()


@pytest.mark.parametrize("kwargs, fragment", [(dict(mode="fast"), "unrecognized mode"),
                                              (dict(mode="default", options={"a": 1}), "both"),
                                              (dict(backend="nope"), "invalid backend")])
def test_compile_refuses_what_pytorch_refuses(kwargs, fragment):
    with pytest.raises(Exception):  # noqa: B017 - torch's own error types differ by argument (RuntimeError, InvalidBackend, ...)
        torch.compile(lambda x: x, **kwargs)
    with pytest.raises(EngineError, match=fragment):
        engine.compile(lambda x: x, **kwargs)


def test_compile_refuses_a_model_that_is_not_callable():
    with pytest.raises(AssertionError):
        torch.compile(3)
    with pytest.raises(EngineError, match="callable"):
        engine.compile(3)
    with pytest.raises(EngineError, match="callable"):
        engine.compile(mode="default")(3)


def test_dynamo_lists_pytorchs_default_backends():
    assert engine._dynamo.list_backends() == torch._dynamo.list_backends()
    assert set(engine._dynamo.list_backends(exclude_tags=())) <= set(torch._dynamo.list_backends(exclude_tags=()))


# ---- backends.cuda attention switches ------------------------------------------------------------------

def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 3, 5, 4)).astype(np.float32) for _ in range(3)]


def test_sdp_switches_pick_the_implementation_and_restore():
    q, k, v = _qkv()
    expected = torch.nn.functional.scaled_dot_product_attention(*map(torch.tensor, (q, k, v)), is_causal=True)
    cuda = engine.backends.cuda
    assert cuda.flash_sdp_enabled() and cuda.math_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
    for flags in (dict(enable_flash=False, enable_mem_efficient=False, enable_cudnn=False), dict(enable_math=False)):
        with cuda.sdp_kernel(**flags):
            out = engine.nn.functional.scaled_dot_product_attention(*map(engine.tensor, (q, k, v)), is_causal=True)
        np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5)
    assert cuda.flash_sdp_enabled() and cuda.math_sdp_enabled()
    cuda.enable_math_sdp(False)
    cuda.enable_flash_sdp(False)
    cuda.enable_mem_efficient_sdp(False)
    cuda.enable_cudnn_sdp(False)
    try:
        assert not (cuda.math_sdp_enabled() or cuda.flash_sdp_enabled() or cuda.cudnn_sdp_enabled())
        with pytest.raises(RuntimeError, match="no available kernel"):
            engine.nn.functional.scaled_dot_product_attention(*map(engine.tensor, (q, k, v)))
    finally:
        for name in ("math", "flash", "mem_efficient", "cudnn"):
            getattr(cuda, f"enable_{name}_sdp")(True)
    with pytest.raises(TypeError, match="bool"):
        cuda.enable_flash_sdp("yes")


def test_dropout_attention_needs_the_math_implementation():
    q, k, v = _qkv(1)
    with engine.backends.cuda.sdp_kernel(enable_math=False):
        with pytest.raises(RuntimeError, match="does not take these inputs"):
            engine.nn.functional.scaled_dot_product_attention(*map(engine.tensor, (q, k, v)), dropout_p=0.5)


# ---- default collate -----------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "a b")


def _as_plain(value):
    """Containers of tensors -> the same containers of numpy arrays, for comparing engine with torch."""
    if isinstance(value, (engine.Tensor, torch.Tensor)):
        return ("tensor", value.numpy().tolist(), str(value.numpy().dtype))
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return (type(value).__name__, *(_as_plain(v) for v in value))
    if isinstance(value, dict):
        return (type(value).__name__, {k: _as_plain(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_as_plain(v) for v in value])
    return value


@pytest.mark.parametrize("batch", [
    [(1, 2), (3, 4)], [[1, 2], [3, 4]], [Pair(1, 2), Pair(3, 4)], [{"x": 1, "y": (1, 2)}, {"x": 2, "y": (3, 4)}],
    [("a", 1), ("b", 2)], ["a", "b"], [collections.OrderedDict(a=1, b=[True, False])] * 2,
    [(np.array([1, 2], np.int64), np.float32(1.5))] * 3,
], ids=["tuples", "lists", "namedtuples", "dicts", "strings-in-tuples", "strings", "ordereddict", "numpy"])
def test_default_collate_matches_pytorchs_containers(batch):
    from torch.utils.data import default_collate as torch_collate

    from engine.utils.data import default_collate

    assert _as_plain(default_collate(batch)) == _as_plain(torch_collate(batch))


def test_default_collate_python_floats_are_float32_by_design():
    from engine.utils.data import default_collate

    assert default_collate([1.5, 2.5]).dtype == engine.float32   # PyTorch: float64 (docs/compat.md)


def test_dataloader_yields_a_list_for_tuple_samples_as_pytorch():
    data = engine.utils.data.TensorDataset(engine.arange(6), engine.arange(6) * 2)
    batch = next(iter(engine.utils.data.DataLoader(data, batch_size=4)))
    t_data = torch.utils.data.TensorDataset(torch.arange(6), torch.arange(6) * 2)
    t_batch = next(iter(torch.utils.data.DataLoader(t_data, batch_size=4)))
    assert type(batch) is type(t_batch) is list
    assert [b.tolist() for b in batch] == [b.tolist() for b in t_batch]


# ---- StepLR with a float step size ---------------------------------------------------------------------

@pytest.mark.parametrize("step_size", [1.0, 2.5, 3])
def test_steplr_takes_a_float_step_size_as_pytorch(step_size):
    def lrs(lib):
        param = lib.nn.Parameter(lib.zeros(1))
        opt = lib.optim.SGD([param], lr=1.0)
        sched = lib.optim.lr_scheduler.StepLR(opt, step_size, gamma=0.5)
        out = []
        for _ in range(8):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    assert lrs(engine) == lrs(torch)


def test_steplr_refuses_a_step_size_that_cannot_work():
    opt = engine.optim.SGD([engine.nn.Parameter(engine.zeros(1))], lr=1.0)
    for bad in (0, -1.0, "2", float("nan")):
        with pytest.raises(EngineError, match="step_size"):
            engine.optim.lr_scheduler.StepLR(opt, bad)


# ---- LSTM projections ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_proj_size_matches_pytorch(bidirectional, packed):
    torch.manual_seed(0)
    t_lstm = torch.nn.LSTM(5, 8, num_layers=2, proj_size=3, bidirectional=bidirectional, batch_first=True)
    e_lstm = engine.nn.LSTM(5, 8, num_layers=2, proj_size=3, bidirectional=bidirectional, batch_first=True)
    assert list(e_lstm.state_dict()) == list(t_lstm.state_dict())
    e_lstm.load_state_dict({k: engine.tensor(v.detach().numpy()) for k, v in t_lstm.state_dict().items()})
    x = np.random.default_rng(2).standard_normal((4, 6, 5)).astype(np.float32)
    h0 = np.random.default_rng(3).standard_normal((2 * (1 + bidirectional), 4, 3)).astype(np.float32)
    c0 = np.random.default_rng(4).standard_normal((2 * (1 + bidirectional), 4, 8)).astype(np.float32)
    tx, ex = torch.tensor(x, requires_grad=True), engine.tensor(x, requires_grad=True)

    def run(lib, lstm, inp, states):
        if packed:
            pack = lib.nn.utils.rnn.pack_padded_sequence(inp, [6, 4, 5, 2], batch_first=True, enforce_sorted=False)
            out, (h, c) = lstm(pack, states)
            out = lib.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        else:
            out, (h, c) = lstm(inp, states)
        (out.sum() + (h * h).sum() + c.sum()).backward()
        return out, h, c

    expected = run(torch, t_lstm, tx, (torch.tensor(h0), torch.tensor(c0)))
    got = run(engine, e_lstm, ex, (engine.tensor(h0), engine.tensor(c0)))
    for e, t in zip(got, expected):
        assert tuple(e.shape) == tuple(t.shape)
        np.testing.assert_allclose(e.detach().numpy(), t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ex.grad.numpy(), tx.grad.numpy(), atol=1e-5)
    for (name, t_param), e_param in zip(t_lstm.named_parameters(), e_lstm.parameters()):
        np.testing.assert_allclose(e_param.grad.numpy(), t_param.grad.numpy(), atol=1e-4, err_msg=name)


def test_lstm_proj_size_refusals_are_pytorchs():
    for kwargs in (dict(proj_size=8), dict(proj_size=-1)):
        with pytest.raises(ValueError):
            torch.nn.LSTM(4, 8, **kwargs)
        with pytest.raises(ValueError, match="proj_size"):
            engine.nn.LSTM(4, 8, **kwargs)
    with pytest.raises(ValueError, match="only supported for LSTM"):
        engine.nn.rnn.RNNBase("GRU", 4, 8, proj_size=2)
    with pytest.raises(Exception, match="hidden size"):
        engine.nn.LSTM(4, 8, proj_size=3)(engine.zeros(2, 1, 4), (engine.zeros(1, 1, 8), engine.zeros(1, 1, 8)))


# ---- small integer work without autograd's price (bigram get_batch) ------------------------------------

def test_index_arithmetic_on_0d_integer_tensors_matches_pytorch():
    i, t_i = engine.tensor(5), torch.tensor(5)
    for op in (lambda a: a + 8, lambda a: 8 + a, lambda a: a - 3, lambda a: 3 - a, lambda a: a * 4, lambda a: 4 * a):
        e, t = op(i), op(t_i)
        assert isinstance(e, engine.Tensor) and e.ndim == 0
        assert (e.item(), str(e.dtype)) == (t.item(), "int64") and t.dtype == torch.int64
    small = engine.tensor(5, dtype=engine.int32)   # not int64: the general path, PyTorch's dtype rule
    assert (small + 1).dtype == engine.int32 and (torch.tensor(5, dtype=torch.int32) + 1).dtype == torch.int32
    assert (i + 0.5).dtype == engine.float32 and (i + 0.5).item() == 5.5


def test_slicing_by_0d_index_tensors_gives_pytorchs_values_and_views():
    data = engine.arange(20)
    t_data = torch.arange(20)
    ix, t_ix = engine.tensor([3, 11]), torch.tensor([3, 11])
    got = engine.stack([data[i:i + 4] for i in ix])
    expected = torch.stack([t_data[i:i + 4] for i in t_ix])
    assert got.tolist() == expected.tolist() and got.dtype == engine.int64
    view = data[ix[0]:ix[0] + 2]
    view.add_(100)                                  # a view, as PyTorch's slice: the data changes
    t_view = t_data[t_ix[0]:t_ix[0] + 2]
    t_view.add_(100)
    assert data.tolist() == t_data.tolist()
    assert view._version is data._version           # one storage, one version counter


def test_iterating_a_tensor_as_pytorch():
    with pytest.raises(TypeError, match="0-d"):
        iter(torch.tensor(3))
    with pytest.raises(TypeError, match="0-d"):
        iter(engine.tensor(3))
    assert [v.item() for v in engine.arange(4)] == [v.item() for v in torch.arange(4)]
    rows = list(engine.ones(3, 2))
    rows[1].mul_(5)                                 # rows of a 2-d tensor are views, as in PyTorch
    t_rows = list(torch.ones(3, 2))
    t_rows[1].mul_(5)
    w = engine.randn(3, 2, requires_grad=True)      # with grad: each row is a recorded getitem
    sum(r.sum() * k for k, r in enumerate(w)).backward()
    assert w.grad.tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]


def test_index_of_non_integer_tensors_is_refused_as_in_pytorch():
    data = list(range(5))
    for bad in (engine.tensor(1.0), engine.tensor(True), engine.tensor([1, 2])):
        with pytest.raises(TypeError, match="integer tensors of a single element"):
            data[bad]
    with pytest.raises(TypeError):
        data[torch.tensor(1.0)]


def test_stack_is_one_node_with_pytorchs_gradients_and_promotion():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    e_in = [engine.tensor(a, requires_grad=True) for a in arrays]
    t_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    weights = rng.standard_normal((2, 3, 3)).astype(np.float32)
    e_out, t_out = engine.stack(e_in, dim=-1), torch.stack(t_in, dim=-1)
    (e_out * engine.tensor(weights)).sum().backward()
    (t_out * torch.tensor(weights)).sum().backward()
    np.testing.assert_array_equal(e_out.detach().numpy(), t_out.detach().numpy())
    for e, t in zip(e_in, t_in):
        np.testing.assert_allclose(e.grad.numpy(), t.grad.numpy(), rtol=1e-6)
    mixed = engine.stack([engine.tensor([1], dtype=engine.int32), engine.tensor([2])])
    assert mixed.dtype == engine.int64 == np.dtype(str(torch.stack([torch.tensor([1], dtype=torch.int32),
                                                                   torch.tensor([2])]).dtype).split(".")[1])
    with pytest.raises(Exception, match="shapes"):
        engine.stack([engine.zeros(2), engine.zeros(3)])
    with pytest.raises(TypeError, match="Tensors"):
        engine.stack([engine.zeros(2), [1.0, 2.0]])


# ---- smooth L1 and Huber losses (pytorch/examples regression) -------------------------------------------

@pytest.mark.parametrize("name, kwargs", [("smooth_l1_loss", {}), ("smooth_l1_loss", {"beta": 0.5}),
                                          ("smooth_l1_loss", {"beta": 0.0}), ("smooth_l1_loss", {"reduction": "sum"}),
                                          ("smooth_l1_loss", {"size_average": False}),
                                          ("smooth_l1_loss", {"reduce": False}),
                                          ("huber_loss", {}), ("huber_loss", {"delta": 0.3, "reduction": "none"})])
def test_smooth_l1_and_huber_losses_match_pytorch(name, kwargs):
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 3)).astype(np.float32) * 2, rng.standard_normal((6, 3)).astype(np.float32)
    ex, tx = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    e = getattr(engine.nn.functional, name)(ex, engine.tensor(y), **kwargs)
    t = getattr(torch.nn.functional, name)(tx, torch.tensor(y), **kwargs)
    np.testing.assert_allclose(e.detach().numpy(), t.detach().numpy(), rtol=1e-5, atol=1e-6)
    e.sum().backward()
    t.sum().backward()
    np.testing.assert_allclose(ex.grad.numpy(), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_smooth_l1_and_huber_modules_match_pytorch():
    x, y = np.linspace(-3, 3, 12, dtype=np.float32), np.zeros(12, np.float32)
    for e_loss, t_loss in ((engine.nn.SmoothL1Loss(beta=2.0), torch.nn.SmoothL1Loss(beta=2.0)),
                           (engine.nn.HuberLoss(delta=2.0), torch.nn.HuberLoss(delta=2.0))):
        assert np.isclose(e_loss(engine.tensor(x), engine.tensor(y)).item(), t_loss(torch.tensor(x), torch.tensor(y)).item())
    with pytest.raises(ValueError, match="beta"):
        engine.nn.functional.smooth_l1_loss(engine.zeros(2), engine.zeros(2), beta=-1.0)
    with pytest.raises(ValueError, match="delta"):
        engine.nn.functional.huber_loss(engine.zeros(2), engine.zeros(2), delta=0.0)


# ---- torch.autograd.Variable (old tutorials) ------------------------------------------------------------

def test_variable_is_pytorchs_detached_alias():
    x = engine.ones(2)
    v = engine.autograd.Variable(x)
    assert v is not x and not v.requires_grad and isinstance(x, engine.autograd.Variable)
    v.add_(1)                                         # shares memory, as PyTorch's
    assert x.tolist() == [2.0, 2.0]
    y = engine.ones(2, requires_grad=True) * 2
    assert engine.autograd.Variable(y).grad_fn is None
    w = engine.autograd.Variable(x, requires_grad=True)
    assert w.requires_grad and not x.requires_grad
    tv = torch.autograd.Variable(torch.ones(2), requires_grad=True)
    assert tv.requires_grad and isinstance(torch.ones(1), torch.autograd.Variable)
    with pytest.raises(TypeError, match="has to be a tensor"):
        engine.autograd.Variable(3)
    with pytest.warns(UserWarning, match="volatile"):
        engine.autograd.Variable(x, volatile=True)


def test_legacy_tensor_constructor_of_a_list_is_float32_as_pytorch():
    # torch.Tensor([0]) (the word-embeddings tutorial's running total) is a FloatTensor
    for data in ([0], [[1, 2]], [True, False], (3, 4), [0.5]):
        assert engine.Tensor(data).dtype == engine.float32 and torch.Tensor(data).dtype == torch.float32
        assert engine.Tensor(data).tolist() == torch.Tensor(data).tolist()
    total = engine.Tensor([0])
    total += engine.tensor(1.5)
    assert total.tolist() == [1.5]


# ---- log1p / expm1 (pytorch/examples mnist_forward_forward) ---------------------------------------------

@pytest.mark.parametrize("name", ["log1p", "expm1"])
def test_log1p_and_expm1_match_pytorch(name):
    x = np.array([-0.5, -1e-7, 0.0, 1e-7, 0.3, 2.0], dtype=np.float32)
    ex, tx = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    e, t = getattr(engine, name)(ex), getattr(torch, name)(tx)
    np.testing.assert_allclose(e.detach().numpy(), t.detach().numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(getattr(ex, name)().detach().numpy(), t.detach().numpy(), rtol=1e-6)
    e.sum().backward()
    t.sum().backward()
    np.testing.assert_allclose(ex.grad.numpy(), tx.grad.numpy(), rtol=1e-6)
    assert getattr(engine, name)(engine.tensor([1, 2])).dtype == engine.float32   # integers give float32

"""engine.autocast against torch.autocast on the CPU as the oracle: op-by-op output dtypes and
values, gradients, the weight-cast cache, nesting, threads, and a small training loop."""

import threading
import warnings

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine.amp import autocast_mode
from engine.ops import Cast

torch = pytest.importorskip("torch")
TF = torch.nn.functional

LOW = [(engine.bfloat16, torch.bfloat16), (engine.float16, torch.float16)]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}
TORCH_OF = {np.dtype(engine.bfloat16): torch.bfloat16, np.dtype(engine.float16): torch.float16,
            np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _pair(shape, dtype="f32", seed=0, positive=False):
    """The same random values as an engine tensor and a torch tensor, in ``dtype``."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a = np.abs(a) + 0.5 if positive else a
    e, t = engine.tensor(a), torch.tensor(a)
    if dtype == "bf16":
        return e.bfloat16(), t.bfloat16()
    if dtype == "f16":
        return e.half(), t.half()
    if dtype == "f64":
        return e.double(), t.double()
    return e, t


def _ints(shape, high, seed=1):
    a = np.random.default_rng(seed).integers(0, high, shape)
    return engine.tensor(a), torch.tensor(a)


def _sdpa(m, f, q, k, v):
    return f.scaled_dot_product_attention(q, k, v)


# name -> (input specs, fn(m, F, *inputs)); a spec is (shape, dtype) or ("int", shape, high).
CASES = {
    "linear": ([((4, 6), "f32"), ((5, 6), "f32"), ((5,), "f32")], lambda m, f, x, w, b: f.linear(x, w, b)),
    "linear_mixed": ([((4, 6), "bf16"), ((5, 6), "f32")], lambda m, f, x, w: f.linear(x, w)),
    "matmul": ([((3, 4), "f32"), ((4, 5), "f32")], lambda m, f, a, b: a @ b),
    "matmul_mixed": ([((3, 4), "f16"), ((4, 5), "f32")], lambda m, f, a, b: m.matmul(a, b)),
    "mm": ([((3, 4), "f32"), ((4, 5), "f32")], lambda m, f, a, b: m.mm(a, b)),
    "bmm": ([((2, 3, 4), "f32"), ((2, 4, 5), "f32")], lambda m, f, a, b: m.matmul(a, b)),
    "conv1d": ([((2, 3, 9), "f32"), ((4, 3, 3), "f32"), ((4,), "f32")], lambda m, f, x, w, b: f.conv1d(x, w, b)),
    "conv2d": ([((2, 3, 6, 6), "f32"), ((4, 3, 3, 3), "f32")], lambda m, f, x, w: f.conv2d(x, w, padding=1)),
    "sdpa": ([((2, 2, 5, 8), "f32"), ((2, 2, 5, 8), "f32"), ((2, 2, 5, 8), "f32")], _sdpa),
    "softmax": ([((4, 7), "f32")], lambda m, f, x: f.softmax(x, dim=-1)),
    "softmax_bf16": ([((4, 7), "bf16")], lambda m, f, x: f.softmax(x, dim=-1)),
    "log_softmax": ([((4, 7), "f32")], lambda m, f, x: f.log_softmax(x, dim=-1)),
    "cross_entropy": ([((6, 5), "f32"), ("int", (6,), 5)], lambda m, f, x, y: f.cross_entropy(x, y)),
    "cross_entropy_bf16": ([((6, 5), "bf16"), ("int", (6,), 5)], lambda m, f, x, y: f.cross_entropy(x, y)),
    "nll_loss_bf16": ([((6, 5), "bf16"), ("int", (6,), 5)],
                      lambda m, f, x, y: f.nll_loss(f.log_softmax(x, dim=-1), y)),
    "mse_loss_bf16": ([((4, 3), "bf16"), ((4, 3), "bf16")], lambda m, f, a, b: f.mse_loss(a, b)),
    "l1_loss_f16": ([((4, 3), "f16"), ((4, 3), "f16")], lambda m, f, a, b: f.l1_loss(a, b)),
    "bce_logits_bf16": ([((4, 3), "bf16"), ((4, 3), "bf16")],
                        lambda m, f, a, b: f.binary_cross_entropy_with_logits(a, b.sigmoid())),
    "cosine_embedding_loss_bf16": ([((4, 3), "bf16"), ((4, 3), "bf16")],
                                   lambda m, f, a, b: f.cosine_embedding_loss(a, b, m.tensor([1, -1, 1, -1], device=a.device))),
    "layer_norm": ([((4, 6), "f32"), ((6,), "f32"), ((6,), "f32")], lambda m, f, x, w, b: f.layer_norm(x, (6,), w, b)),
    "layer_norm_mixed": ([((4, 6), "bf16"), ((6,), "f32"), ((6,), "f32")],
                         lambda m, f, x, w, b: f.layer_norm(x, (6,), w, b)),
    "sdpa_float_mask": ([((2, 5, 8), "f32"), ((2, 5, 8), "f32"), ((2, 5, 8), "f32"), ((5, 5), "f32")],
                        lambda m, f, q, k, v, mask: f.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    "linear_float64": ([((4, 6), "f64"), ((5, 6), "f64")], lambda m, f, x, w: f.linear(x, w)),
    "gelu": ([((4, 6), "f32")], lambda m, f, x: f.gelu(x)),
    "relu_bf16": ([((4, 6), "bf16")], lambda m, f, x: f.relu(x)),
    "add_mixed": ([((4, 6), "bf16"), ((4, 6), "f32")], lambda m, f, a, b: a + b),
    "mul_mixed": ([((4, 6), "f16"), ((4, 6), "bf16")], lambda m, f, a, b: a * b),
    "div_mixed": ([((4, 6), "bf16"), ((4, 6), "f32", True)], lambda m, f, a, b: a / b),
    "sum": ([((4, 6), "f32")], lambda m, f, x: x.sum()),
    "sum_bf16": ([((4, 6), "bf16")], lambda m, f, x: x.sum()),
    "mean": ([((4, 6), "f32")], lambda m, f, x: x.mean(dim=0)),
    "prod_bf16": ([((2, 3), "bf16", True)], lambda m, f, x: x.prod()),
    "exp": ([((4, 6), "f32")], lambda m, f, x: x.exp()),
    "log_bf16": ([((4, 6), "bf16", True)], lambda m, f, x: x.log()),
    "pow": ([((4, 6), "f32", True)], lambda m, f, x: x ** 2.5),
    "tanh_bf16": ([((4, 6), "bf16")], lambda m, f, x: x.tanh()),
    "sigmoid": ([((4, 6), "f32")], lambda m, f, x: x.sigmoid()),
    "cat_mixed": ([((2, 3), "bf16"), ((2, 3), "f32")], lambda m, f, a, b: m.cat([a, b])),
    "cat_low": ([((2, 3), "bf16"), ((2, 3), "bf16")], lambda m, f, a, b: m.cat([a, b])),
    "stack_mixed": ([((2, 3), "bf16"), ((2, 3), "f32")], lambda m, f, a, b: m.stack([a, b])),
    "embedding": ([("int", (3, 4), 10), ((10, 6), "f32")], lambda m, f, i, w: f.embedding(i, w)),
    "dropout_eval": ([((4, 6), "bf16")], lambda m, f, x: f.dropout(x, p=0.5, training=False)),
    "max_pool2d": ([((2, 3, 6, 6), "f32")], lambda m, f, x: f.max_pool2d(x, 2)),
    "linear_then_relu": ([((4, 6), "f32"), ((5, 6), "f32")], lambda m, f, x, w: f.relu(f.linear(x, w))),
    "norm": ([((4, 6), "bf16")], lambda m, f, x: x.norm()),
}

PROMOTE_BFLOAT16 = {"cat_low", "cat_mixed", "stack_mixed"}  # promote ops with bfloat16 inputs


def _inputs(specs):
    engine_inputs, torch_inputs = [], []
    for i, spec in enumerate(specs):
        e, t = _ints(spec[1], spec[2], seed=i) if spec[0] == "int" else _pair(*spec[:2], seed=i,
                                                                              positive=len(spec) > 2)
        engine_inputs.append(e)
        torch_inputs.append(t)
    return engine_inputs, torch_inputs


def _assert_close(mine, theirs, region_dtype):
    """Within a few units in the last place of the region's dtype, relative to the largest element
    (an op kept in float32 may have float32 inputs that were rounded to the low dtype before it)."""
    eps = EPS[region_dtype]
    ref = theirs.detach().double().numpy()
    got = np.asarray(mine.detach().float().numpy(), dtype=np.float64)
    assert got.shape == ref.shape
    scale = max(np.abs(ref).max(), 1e-3)
    assert np.abs(got - ref).max() <= 8 * eps * scale, (np.abs(got - ref).max(), scale)


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.slow
def test_op_dtype_and_value_match_torch(name, dtype, torch_dtype):
    specs, fn = CASES[name]
    if torch_dtype == torch.float16 and name in PROMOTE_BFLOAT16:
        pytest.skip("torch refuses to promote bfloat16 in a float16 region: test_promote_of_the_other_low_dtype")
    engine_inputs, torch_inputs = _inputs(specs)
    with torch.autocast("cpu", dtype=torch_dtype):
        theirs = fn(torch, TF, *torch_inputs)
    with engine.autocast("cpu", dtype=dtype):
        mine = fn(engine, F, *engine_inputs)
    assert TORCH_OF[np.dtype(mine.dtype)] == theirs.dtype, (name, mine.dtype, theirs.dtype)
    _assert_close(mine, theirs, torch_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_op_dtype_and_value_match_torch_cuda_autocast(name, dtype, torch_dtype):
    """The CUDA table (implemented, looked up on the CPU) against ``torch.autocast("cuda")`` on a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    specs, fn = CASES[name]
    if torch_dtype == torch.float16 and name in PROMOTE_BFLOAT16:
        pytest.skip("torch refuses to promote bfloat16 in a float16 region: test_promote_of_the_other_low_dtype")
    engine_inputs, torch_inputs = _inputs(specs)
    engine_inputs, torch_inputs = [t.to("cuda") for t in engine_inputs], [t.cuda() for t in torch_inputs]
    with torch.autocast("cuda", dtype=torch_dtype):
        theirs = fn(torch, TF, *torch_inputs)
    with engine.autocast("cuda", dtype=dtype):
        mine = fn(engine, F, *engine_inputs)
    assert TORCH_OF[np.dtype(mine.dtype)] == theirs.dtype, (name, mine.dtype, theirs.dtype)
    _assert_close(mine.cpu(), theirs.cpu(), torch_dtype)


MODULES = {
    "Linear": (lambda m: m.nn.Linear(6, 5), (3, 6)),
    "Linear_LayerNorm": (lambda m: m.nn.Sequential(m.nn.Linear(6, 6), m.nn.LayerNorm(6)), (3, 6)),
    "BatchNorm1d": (lambda m: m.nn.BatchNorm1d(3), (4, 3, 5)),
    "Conv2d_BatchNorm2d": (lambda m: m.nn.Sequential(m.nn.Conv2d(3, 4, 3), m.nn.BatchNorm2d(4), m.nn.ReLU()),
                           (2, 3, 6, 6)),
    "Linear_BatchNorm1d": (lambda m: m.nn.Sequential(m.nn.Linear(6, 4), m.nn.BatchNorm1d(4)), (5, 6)),
    "MultiheadAttention": (lambda m: m.nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
    "TransformerEncoderLayer": (lambda m: m.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                (2, 5, 8)),
}



@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_forward_matches_torch(name, dtype, torch_dtype, training):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    theirs_module = make(torch).train(training)
    mine_module = make(engine).train(training)
    mine_module.load_state_dict({k: engine.tensor(v.detach().numpy()) for k, v in theirs_module.state_dict().items()})
    x, tx = _pair(shape)
    args, targs = ((x, x, x), (tx, tx, tx)) if name == "MultiheadAttention" else ((x,), (tx,))
    with torch.autocast("cpu", dtype=torch_dtype):
        theirs = theirs_module(*targs)
    with engine.autocast("cpu", dtype=dtype):
        mine = mine_module(*args)
    theirs, mine = (theirs[0], mine[0]) if name == "MultiheadAttention" else (theirs, mine)
    assert TORCH_OF[np.dtype(mine.dtype)] == theirs.dtype
    assert engine.tensor(np.zeros(1)).dtype  # engine usable after the region
    ref = theirs.detach().double().numpy()
    got = mine.detach().float().numpy().astype(np.float64)
    assert np.abs(got - ref).max() <= 32 * EPS[torch_dtype] * max(np.abs(ref).max(), 1.0)
    for key, value in theirs_module.state_dict().items():  # running statistics, in their dtype
        mine_value = mine_module.state_dict()[key]
        assert TORCH_OF.get(np.dtype(mine_value.dtype), value.dtype) == value.dtype
        np.testing.assert_allclose(mine_value.numpy().astype(np.float64), value.double().numpy(), rtol=0.02, atol=0.02)


def test_promote_of_the_other_low_dtype_gives_float32():
    """PyTorch's promote raises ("Unexpected floating ScalarType") for a bfloat16 input in a float16
    region; the engine promotes as torch.promote_types does, to float32, which holds both."""
    (a, ta), (b, tb) = _pair((2, 3), "bf16"), _pair((2, 3), "bf16", seed=1)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="ScalarType"):
        torch.cat([ta, tb])
    with engine.autocast("cpu", dtype=engine.float16):
        mine = engine.cat([a, b])
        assert engine.stack([a, b.float()]).dtype == engine.float32
    assert mine.dtype == engine.float32
    _assert_close(mine, torch.cat([ta, tb]).float(), torch.bfloat16)


# ---- gradients, the cache, regions -------------------------------------------------------------

def test_backward_gives_float32_gradients_on_float32_leaves():
    x, w, b = (engine.randn(*s, requires_grad=True) for s in ((4, 6), (5, 6), (5,)))
    tx, tw, tb = (torch.tensor(t.numpy(), requires_grad=True) for t in (x, w, b))
    with engine.autocast("cpu"):
        loss = F.mse_loss(F.linear(x, w, b), engine.zeros(4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tloss = TF.mse_loss(TF.linear(tx, tw, tb), torch.zeros(4, 5))
    loss.backward()
    tloss.backward()
    for mine, theirs in ((x, tx), (w, tw), (b, tb)):
        assert mine.grad.dtype == engine.float32 and theirs.grad.dtype == torch.float32
        _assert_close(mine.grad, theirs.grad, torch.bfloat16)


def _count_casts(monkeypatch):
    calls = []
    forward = Cast.forward
    monkeypatch.setattr(Cast, "forward", lambda self, a, dtype=None: calls.append(dtype) or forward(self, a, dtype))
    return calls


@pytest.mark.parametrize("cache_enabled, casts_of_weight", [(True, 1), (False, 2)])
def test_a_weight_used_twice_is_cast_once_per_region(monkeypatch, cache_enabled, casts_of_weight):
    w = engine.randn(5, 6, requires_grad=True)
    x1, x2 = engine.randn(3, 6).bfloat16(), engine.randn(2, 6).bfloat16()  # no casts of their own
    expected_grad = np.ones((5, 1)) * (x1.float().sum(0) + x2.float().sum(0)).numpy()
    calls = _count_casts(monkeypatch)
    with engine.autocast("cpu", cache_enabled=cache_enabled):
        y = F.linear(x1, w).sum() + F.linear(x2, w).sum()
        assert len(calls) == casts_of_weight
    assert autocast_mode.state.cache == {}  # the outermost exit clears it
    y.backward()
    assert w.grad.dtype == engine.float32
    # the low-precision gradient is rounded to bfloat16 before it reaches the float32 weight
    np.testing.assert_allclose(w.grad.numpy(), expected_grad, atol=2 ** -7 * np.abs(expected_grad).max())
    with engine.autocast("cpu"):  # a new region casts again
        F.linear(x1, w)
    assert len(calls) == casts_of_weight + 1


def test_nested_regions_and_enabled_false():
    x, w = engine.randn(3, 4), engine.randn(5, 4)
    with engine.autocast("cpu"):
        assert F.linear(x, w).dtype == engine.bfloat16
        with engine.autocast("cpu", enabled=False):
            assert F.linear(x, w).dtype == engine.float32 and not engine.is_autocast_enabled("cpu")
            with engine.autocast("cpu", dtype=engine.float16):
                assert F.linear(x, w).dtype == engine.float16
                assert engine.get_autocast_dtype("cpu") == engine.float16
        assert F.linear(x, w).dtype == engine.bfloat16 and engine.is_autocast_enabled("cpu")
        assert engine.get_autocast_dtype("cpu") == engine.bfloat16
    assert F.linear(x, w).dtype == engine.float32 and not engine.is_autocast_enabled("cpu")


def test_an_exception_inside_a_region_restores_the_state():
    x, w = engine.randn(3, 4), engine.randn(5, 4, requires_grad=True)
    with pytest.raises(engine.ShapeError):
        with engine.autocast("cpu"):
            F.linear(x, w)
            F.linear(x, engine.randn(5, 3))  # wrong in_features
    assert not engine.is_autocast_enabled("cpu") and autocast_mode.state.cache == {}
    assert autocast_mode.state.nesting == 0 and F.linear(x, w).dtype == engine.float32


def test_an_error_inside_a_composite_op_restores_autocast():
    x = engine.randn(3, 4).bfloat16()
    with engine.autocast("cpu"):
        with pytest.raises(engine.EngineError):
            F.mse_loss(x, engine.randn(2, 7))
        assert engine.is_autocast_enabled("cpu") and F.linear(x, engine.randn(5, 4)).dtype == engine.bfloat16


def test_autocast_as_a_decorator():
    @engine.autocast("cpu", dtype=engine.float16)
    def forward(x, w):
        return F.linear(x, w)

    assert forward(engine.randn(3, 4), engine.randn(5, 4)).dtype == engine.float16
    assert not engine.is_autocast_enabled("cpu")


def test_regions_are_thread_local():
    x, w = engine.randn(3, 4), engine.randn(5, 4)
    seen = []
    thread = threading.Thread(target=lambda: seen.append((F.linear(x, w).dtype, engine.is_autocast_enabled("cpu"))))
    with engine.autocast("cpu"):
        thread.start()
        thread.join(timeout=60)
        assert F.linear(x, w).dtype == engine.bfloat16
    assert seen == [(np.dtype(np.float32), False)]


def test_a_cuda_region_leaves_cpu_tensors_alone():
    x, w = engine.randn(3, 4), engine.randn(5, 4)
    with engine.autocast("cuda"):
        assert engine.is_autocast_enabled("cuda") and not engine.is_autocast_enabled("cpu")
        assert engine.get_autocast_dtype("cuda") == engine.float16
        assert F.linear(x, w).dtype == engine.float32 and F.softmax(x.half(), -1).dtype == engine.float16


def test_the_cuda_list_differs_from_the_cpu_list():
    """The CUDA table (implemented, not run on a GPU here): softmax, layer_norm, sum, exp, log and pow
    in float32; matmul, linear, conv and attention in the low dtype; cat promotes."""
    for op in ("softmax", "log_softmax", "logsoftmax", "layer_norm", "sum", "exp", "log", "pow", "norm2"):
        assert autocast_mode.policy_for(op, "cuda") == "fp32"
        assert autocast_mode.policy_for(op, "cpu") is None
    for op in ("matmul", "linear", "linear_relu", "conv2d", "scaled_dot_product_attention", "bmm", "baddbmm"):
        assert autocast_mode.policy_for(op, "cuda") == autocast_mode.policy_for(op, "cpu") == "lower"
    for op in ("mse_loss", "nll_loss", "cross_entropy", "kl_div", "binary_cross_entropy_with_logits"):
        assert autocast_mode.policy_for(op, "cuda") == autocast_mode.policy_for(op, "cpu") == "fp32"
    assert autocast_mode.policy_for("concatenate", "cuda") == "promote"
    assert autocast_mode.policy_for("relu", "cuda") is None


def test_default_dtypes_and_argument_checks_as_torch():
    assert engine.autocast("cpu").fast_dtype == engine.bfloat16
    assert engine.amp.autocast("cuda").fast_dtype == engine.float16
    with pytest.raises(ValueError, match="device_type"):
        engine.autocast(3)
    with pytest.raises(ValueError, match="xyz"):
        engine.autocast("xyz")
    with pytest.warns(UserWarning, match="Disabling autocast"):
        region = engine.autocast("cpu", dtype=engine.float32)
    with region:
        assert not engine.is_autocast_enabled("cpu")
        assert F.linear(engine.randn(2, 3), engine.randn(4, 3)).dtype == engine.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autocast("cpu", dtype=torch.float32)
    assert any("Disabling autocast" in str(w.message) for w in caught)


def test_device_spellings_warn_as_deprecated():
    import engine.cpu.amp
    import engine.cuda.amp

    with pytest.warns(FutureWarning, match="engine.amp.autocast"):
        region = engine.cpu.amp.autocast()
    with region:
        assert F.linear(engine.randn(2, 3), engine.randn(4, 3)).dtype == engine.bfloat16
    with pytest.warns(FutureWarning):
        assert engine.cuda.amp.autocast(dtype=engine.bfloat16).fast_dtype == engine.bfloat16


def test_outside_a_region_nothing_changes():
    x, w = engine.randn(3, 4).bfloat16(), engine.randn(5, 4).bfloat16()
    assert F.linear(x, w).dtype == engine.bfloat16 and F.mse_loss(x, x).dtype == engine.bfloat16


# ---- training ------------------------------------------------------------------------------------

def _train(use_autocast: bool) -> list[float]:
    engine.manual_seed(0)
    rng = np.random.default_rng(0)
    x = engine.tensor(rng.standard_normal((64, 16)).astype(np.float32))
    y = engine.tensor(rng.standard_normal((64, 1)).astype(np.float32))
    model = engine.nn.Sequential(engine.nn.Linear(16, 32), engine.nn.ReLU(), engine.nn.Linear(32, 1))
    optimizer = engine.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        with engine.autocast("cpu", enabled=use_autocast):
            loss = F.mse_loss(model(x), y)
        assert loss.dtype == engine.float32
        loss.backward()
        assert all(p.grad.dtype == engine.float32 for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_small_mlp_trains_under_bfloat16_autocast_as_in_float32():
    full, mixed = _train(False), _train(True)
    assert full[-1] < 0.8 * full[0]
    assert abs(mixed[-1] - full[-1]) <= 0.05 * full[-1], (mixed[-1], full[-1])


def test_a_cast_made_with_grad_off_is_not_cached():
    """A first use under no_grad must not leave a gradient-less cast for a later use (torch agrees)."""
    x, w = engine.randn(3, 4), engine.randn(5, 4, requires_grad=True)
    with engine.autocast("cpu"):
        with engine.no_grad():
            F.linear(x, w)
        y = F.linear(x, w)
    assert y.requires_grad
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == engine.float32


def test_a_weight_changed_in_place_is_cast_again():
    """PyTorch's cache returns the stale cast here; the engine casts the new values."""
    x, w = engine.randn(3, 4), engine.randn(5, 4, requires_grad=True)
    with engine.autocast("cpu"):
        before = F.linear(x, w)
        with engine.no_grad():
            w.mul_(2)
        after = F.linear(x, w)
    np.testing.assert_allclose(after.float().numpy(), 2 * before.float().numpy(), rtol=2 ** -7, atol=1e-6)


def test_a_users_function_named_like_an_engine_op_is_not_cast():
    class Linear(engine.autograd.Function):  # op name "linear", as the engine's own Function
        def forward(self, a):
            return a * 2

        def backward(self, g):
            return g * 2

    with engine.autocast("cpu"):
        assert Linear.apply(engine.randn(3)).dtype == engine.float32


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "f16"])
def test_layer_norm_takes_float32_parameters_with_a_16_bit_input(dtype, torch_dtype):
    """PyTorch's mixed dtype (CPU) layer_norm, also outside autocast; gradients in each tensor's dtype."""
    (x, tx), (w, tw), (b, tb) = _pair((4, 6), seed=0), _pair((6,), seed=1), _pair((6,), seed=2)
    x, tx = x.to(dtype).detach().requires_grad_(), tx.to(torch_dtype).detach().requires_grad_()
    for t in (w, b, tw, tb):
        t.requires_grad_()
    mine, theirs = F.layer_norm(x, (6,), w, b), TF.layer_norm(tx, (6,), tw, tb)
    assert TORCH_OF[np.dtype(mine.dtype)] == theirs.dtype == torch_dtype
    _assert_close(mine, theirs, torch_dtype)
    mine.float().pow(2).sum().backward()
    theirs.float().pow(2).sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == b.grad.dtype == engine.float32
    for got, ref in ((x.grad, tx.grad), (w.grad, tw.grad), (b.grad, tb.grad)):
        _assert_close(got, ref.float(), torch_dtype)
    with pytest.raises(engine.ShapeError, match="float32 for a float16/bfloat16 input"):
        F.layer_norm(x.detach().float(), (6,), w.detach().to(dtype))  # torch refuses this mix too

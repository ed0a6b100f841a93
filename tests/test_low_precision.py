"""bfloat16 and float16: the dtypes, PyTorch's type promotion, the float32 compute rule, and
save/load, against torch on the CPU as the oracle."""

import itertools

import numpy as np
import pytest

import engine
from engine import dtypes
from engine.errors import DTypeError
from tests.conftest import DEVICES

torch = pytest.importorskip("torch")

TORCH_TO_ENGINE = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                   torch.int32: np.int32, torch.int64: np.int64, torch.float16: engine.float16,
                   torch.bfloat16: engine.bfloat16, torch.float32: engine.float32, torch.float64: engine.float64}
LOW = [(engine.bfloat16, torch.bfloat16), (engine.float16, torch.float16)]


def _engine_dtype(torch_dtype):
    return np.dtype(TORCH_TO_ENGINE[torch_dtype])


# ---- the dtypes --------------------------------------------------------------------------------

def test_bfloat16_is_ml_dtypes_and_a_floating_dtype():
    import ml_dtypes

    assert engine.bfloat16 is ml_dtypes.bfloat16
    assert dtypes.is_floating(engine.bfloat16) and dtypes.is_floating(engine.half)
    assert not dtypes.is_floating(np.int64)


@pytest.mark.parametrize("dtype, torch_dtype", LOW)
def test_casts_factories_and_names(dtype, torch_dtype):
    x = engine.tensor([[1.5, -2.25], [3.0, 0.1]])
    cast = x.bfloat16() if dtype is engine.bfloat16 else x.half()
    assert cast.dtype == np.dtype(dtype)
    assert x.to(dtype).dtype == np.dtype(dtype) and x.type(dtype).dtype == np.dtype(dtype)
    assert cast.type() == torch.tensor(x.numpy()).to(torch_dtype).type()
    assert cast.tolist() == torch.tensor(x.numpy()).to(torch_dtype).tolist()
    assert isinstance(cast[0, 0].item(), float) and cast[1, 1].item() == torch.tensor(0.1, dtype=torch_dtype).item()
    made = [engine.zeros(2, 3, dtype=dtype), engine.ones(2, dtype=dtype), engine.full((2,), 1.5, dtype=dtype),
            engine.randn(4, dtype=dtype), engine.rand(4, dtype=dtype), engine.tensor([1.0, 2.0], dtype=dtype),
            engine.arange(0, 3, dtype=dtype), engine.empty(2, dtype=dtype), engine.zeros_like(cast),
            engine.ones_like(cast), engine.full_like(cast, 2.0), engine.rand_like(cast), engine.randn_like(cast)]
    assert all(t.dtype == np.dtype(dtype) for t in made)
    assert "dtype=" in repr(cast) and "0.1" in repr(cast) and "0.1000" not in repr(x)


@pytest.mark.parametrize("dtype, _", LOW)
def test_rand_never_returns_one(dtype, _):
    engine.manual_seed(0)
    assert float(engine.rand(200_000, dtype=dtype).max()) < 1.0  # about 400 samples round to 1.0 in bf16 otherwise


@pytest.mark.parametrize("dtype, _", LOW)
def test_requires_grad_and_differentiable_casts(dtype, _):
    w = engine.randn(3, dtype=dtype, requires_grad=True)
    x = engine.randn(3, requires_grad=True)
    (w.float() * x.to(dtype)).sum().backward()
    assert w.grad.dtype == np.dtype(dtype) and x.grad.dtype == np.float32  # each in its source dtype
    np.testing.assert_allclose(w.grad.numpy().astype(np.float32), x.numpy(), rtol=2 ** -7)


# ---- promotion: torch.result_type over every pair --------------------------------------------

SHAPES = [((3,), (3,)), ((), (3,)), ((3,), ()), ((), ())]


@pytest.mark.parametrize("ta, tb", list(itertools.product(TORCH_TO_ENGINE, repeat=2)))
def test_promotion_matches_torch_result_type(ta, tb):
    for sa, sb in SHAPES:
        want = torch.result_type(torch.zeros(sa, dtype=ta), torch.zeros(sb, dtype=tb))
        a = engine.zeros(sa, dtype=_engine_dtype(ta))
        b = engine.zeros(sb, dtype=_engine_dtype(tb))
        got = engine.where(engine.tensor(True), a, b) if ta == torch.bool and tb == torch.bool else a + b
        assert got.dtype == _engine_dtype(want), (ta, sa, tb, sb)


@pytest.mark.parametrize("ta", list(TORCH_TO_ENGINE))
@pytest.mark.parametrize("scalar", [True, 3, 2.5])
def test_promotion_with_python_scalars_matches_torch(ta, scalar):
    if ta == torch.bool and scalar is True:
        return  # bool + bool is an error in both
    for shape in [(3,), ()]:
        want = torch.result_type(torch.zeros(shape, dtype=ta), scalar)
        got = engine.zeros(shape, dtype=_engine_dtype(ta)) * scalar
        assert got.dtype == _engine_dtype(want), (ta, shape, scalar)


def test_promotion_keeps_each_gradient_in_its_operand_dtype():
    a = engine.randn(4, dtype=engine.bfloat16, requires_grad=True)
    b = engine.randn(4, dtype=engine.float16, requires_grad=True)
    out = a * b
    assert out.dtype == np.float32
    out.sum().backward()
    assert a.grad.dtype == np.dtype(engine.bfloat16) and b.grad.dtype == np.float16


def test_matmul_refuses_mixed_float_dtypes_as_torch():
    with pytest.raises(DTypeError, match=r"matmul: .*bfloat16.*float32"):
        engine.randn(2, 3, dtype=engine.bfloat16) @ engine.randn(3, 2)


# ---- the compute rule: float32 inside, one rounding to the storage dtype ----------------------

EPS = {engine.bfloat16: 2.0 ** -8, engine.float16: 2.0 ** -11}


def _ce(e, t, x, y=None):
    target = [1, 0, 3, 2]
    return (e.nn.functional.cross_entropy(x, e.tensor(target, device=x.device)) if e is engine
            else t.nn.functional.cross_entropy(x, t.tensor(target)))


# name -> (fn(module, x, y) where module is engine or torch, shapes of x and y, positive inputs)
OPS = {
    "add": (lambda m, x, y: x + y, (4, 5), (4, 5)),
    "sub": (lambda m, x, y: x - y, (4, 5), (5,)),
    "mul": (lambda m, x, y: x * y, (4, 5), (4, 5)),
    "div": (lambda m, x, y: x / y, (4, 5), "pos"),
    "pow": (lambda m, x, y: x ** 2.5, "pos", None),
    "pow_tensor": (lambda m, x, y: x ** y, "pos", "pos"),
    "neg": (lambda m, x, y: -x, (4, 5), None),
    "scalar_mul": (lambda m, x, y: 0.1 * x + 3, (4, 5), None),
    "exp": (lambda m, x, y: m.exp(x), (4, 5), None),
    "log": (lambda m, x, y: m.log(x), "pos", None),
    "sqrt": (lambda m, x, y: m.sqrt(x), "pos", None),
    "tanh": (lambda m, x, y: m.tanh(x), (4, 5), None),
    "sigmoid": (lambda m, x, y: m.sigmoid(x), (4, 5), None),
    "relu": (lambda m, x, y: m.relu(x), (4, 5), None),
    "sum": (lambda m, x, y: x.sum(), (64, 33), None),
    "sum_dim": (lambda m, x, y: x.sum(dim=1), (8, 300), None),
    "mean": (lambda m, x, y: x.mean(dim=0), (300, 8), None),
    "max": (lambda m, x, y: x.max(dim=1)[0], (4, 5), None),
    "amax": (lambda m, x, y: x.amax(), (4, 5), None),
    "matmul": (lambda m, x, y: x @ y, (6, 64), (64, 7)),
    "bmm": (lambda m, x, y: x @ y, (2, 5, 40), (2, 40, 3)),
    "softmax": (lambda m, x, y: m.softmax(x, dim=-1), (4, 9), None),
    "log_softmax": (lambda m, x, y: m.log_softmax(x, dim=-1), (4, 9), None),
    "linear": (lambda m, x, y: m.nn.functional.linear(x, y), (5, 16), (3, 16)),
    "linear_relu": (lambda m, x, y: m.relu(m.nn.functional.linear(x, y)), (5, 16), (3, 16)),
    "layer_norm": (lambda m, x, y: m.nn.functional.layer_norm(x, (9,), y), (4, 9), (9,)),
    "gelu": (lambda m, x, y: m.nn.functional.gelu(x), (4, 5), None),
    "gelu_tanh": (lambda m, x, y: m.nn.functional.gelu(x, approximate="tanh"), (4, 5), None),
    "cross_entropy": (lambda m, x, y: _ce(m, torch, x), (4, 6), None),
    "cross_entropy_weighted": (lambda m, x, y: m.nn.functional.cross_entropy(
        x, m.tensor([1, 0, 3, 2], device=x.device), weight=(m.arange(6, device=x.device) * 0.25 + 0.5).to(x.dtype)),
        (4, 6), None),
    "cross_entropy_soft": (lambda m, x, y: m.nn.functional.cross_entropy(x, y.detach().abs()),
                           (4, 6), (4, 6)),
    "mse_loss": (lambda m, x, y: m.nn.functional.mse_loss(x, y), (4, 5), (4, 5)),
    "reshape_transpose_index": (lambda m, x, y: x.reshape(5, 4).transpose(0, 1)[1:, ::2] * 2, (4, 5), None),
    "cat": (lambda m, x, y: m.cat([x, y], dim=1) * 3, (4, 5), (4, 2)),
    "stack": (lambda m, x, y: m.stack([x, y], dim=1) * 3, (4, 5), (4, 5)),
    "where": (lambda m, x, y: m.where(x > 0, x, y), (4, 5), (4, 5)),
    "clamp": (lambda m, x, y: m.clamp(x, -0.5, 0.5), (4, 5), None),
    "sdpa": (lambda m, x, y: m.nn.functional.scaled_dot_product_attention(x, y, y.detach() * 2), (1, 2, 5, 8),
             (1, 2, 5, 8)),  # value detached: a leaf used twice sums two rounded gradients
}


# torch's CPU attention rounds its probabilities to bfloat16/float16 before the second product;
# the engine rounds once at the end, as the float32 oracle: elements differ by more than 2 ulps
# where they are small, so this one is compared normwise (every error within 2 ulps of the largest).
TORCH_ROUNDS_INSIDE = {"sdpa"}


def _inputs(spec, rng):
    if spec is None:
        return None
    if spec == "pos":
        return rng.uniform(0.5, 2.0, (4, 5))
    return rng.standard_normal(spec)


def _assert_close_in_ulps(got, want, eps, what, ulps=2, normwise=False):
    """Each element within ``ulps`` ulps of ``want`` (relative to the largest element where it
    cancels to near 0), or with ``normwise`` every error within ``ulps`` ulps of the largest."""
    got, want = got.detach().float().cpu().numpy(), want.detach().float().cpu().numpy()
    top = np.abs(want).max()
    scale = np.full(want.shape, top) if normwise else np.maximum(np.abs(want), top * eps)
    err = np.abs(got - want) / np.maximum(scale, np.finfo(np.float32).tiny)
    assert err.max() <= (ulps + 0.01) * eps, f"{what}: off by {err.max() / eps:.1f} ulps"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(OPS))
def test_op_matches_torch_in_the_same_low_dtype(name, dtype, torch_dtype, device):
    """On the GPU too (the gpu case): the GEMMs (matmul, bmm, linear) run natively in 16 bits
    there, the other ops through float32 copies; both within 2 ulps of float32 rounded once."""
    fn, xs, ys = OPS[name]
    rng = np.random.default_rng(0)
    arrays = [a for a in (_inputs(xs, rng), _inputs(ys, rng)) if a is not None]
    ours = [engine.tensor(a.astype(np.float32)).to(dtype).to(device).requires_grad_() for a in arrays]
    theirs = [torch.tensor(a.astype(np.float32)).to(torch_dtype).requires_grad_() for a in arrays]
    out, ref = fn(engine, *ours, *([None] * (2 - len(ours)))), fn(torch, *theirs, *([None] * (2 - len(theirs))))
    # The float32 oracle: torch on float32 copies of the same low-precision values, rounded once.
    exact = [t.detach().float().requires_grad_() for t in theirs]
    exact_out = fn(torch, *exact, *([None] * (2 - len(exact))))
    assert out.dtype == np.dtype(dtype)
    _assert_close_in_ulps(out, exact_out.to(torch_dtype), EPS[dtype], f"{name} forward vs float32 rounded")
    _assert_close_in_ulps(out, ref, EPS[dtype], f"{name} forward vs torch", normwise=name in TORCH_ROUNDS_INSIDE)
    seed = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    out.backward(engine.tensor(seed).to(dtype).to(device))
    ref.backward(torch.tensor(seed).to(torch_dtype))
    exact_out.backward(torch.tensor(seed).to(torch_dtype).float())
    for i, (a, b, c) in enumerate(zip(ours, theirs, exact)):
        if b.grad is None:  # an input the op detaches (a target)
            assert a.grad is None
            continue
        assert a.grad.dtype == np.dtype(dtype)
        _assert_close_in_ulps(a.grad, c.grad.to(torch_dtype), EPS[dtype], f"{name} grad {i} vs float32 rounded")
        # torch's own low-precision backward reads its rounded saved outputs (tanh, softmax ...),
        # so where a gradient cancels it is itself off: compare normwise.
        _assert_close_in_ulps(a.grad, b.grad, EPS[dtype], f"{name} grad {i} vs torch", ulps=4, normwise=True)


# ---- save / load, Module casts ---------------------------------------------------------------

@pytest.mark.parametrize("dtype, _", LOW)
def test_save_load_round_trips_low_precision_tensors_and_state_dicts(tmp_path, dtype, _):
    model = engine.nn.Sequential(engine.nn.Linear(3, 4), engine.nn.LayerNorm(4)).to(dtype)
    t = engine.randn(5, 3, dtype=dtype)
    engine.save({"t": t, "empty": engine.zeros(0, 2, dtype=dtype), "array": t.numpy(), "model": model.state_dict()},
                tmp_path / "ckpt.npz")
    back = engine.load(tmp_path / "ckpt.npz")
    assert back["t"].dtype == np.dtype(dtype) and back["empty"].shape == (0, 2)
    assert back["empty"].dtype == np.dtype(dtype) and back["array"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back["t"].numpy().view(np.uint16), t.numpy().view(np.uint16))  # bit for bit
    fresh = engine.nn.Sequential(engine.nn.Linear(3, 4), engine.nn.LayerNorm(4)).to(dtype)
    fresh.load_state_dict(back["model"])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a.numpy().view(np.uint16), b.numpy().view(np.uint16))


def test_bfloat16_checkpoint_is_plain_numpy_bits():
    import io
    import zipfile

    buffer = io.BytesIO()
    engine.save(engine.tensor([1.0, -2.5]).bfloat16(), buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        assert '"dtype": "bfloat16"' in archive.read("structure.json").decode()
    raw = np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False)["arr_0"]
    assert raw.dtype == np.uint16 and raw.view(engine.bfloat16).tolist() == [1.0, -2.5]


@pytest.mark.parametrize("method, dtype", [("bfloat16", engine.bfloat16), ("half", engine.float16)])
def test_module_casts_float_parameters_and_buffers_only(method, dtype):
    model = engine.nn.Linear(3, 2)
    model.register_buffer("steps", engine.tensor([7]))
    model.register_buffer("running", engine.ones(2))
    assert getattr(model, method)() is model
    assert model.weight.dtype == np.dtype(dtype) and model.bias.dtype == np.dtype(dtype)
    assert model.running.dtype == np.dtype(dtype) and model.steps.dtype == np.int64
    out = model(engine.randn(4, 3, dtype=dtype))
    out.float().sum().backward()
    assert out.dtype == np.dtype(dtype) and model.weight.grad.dtype == np.dtype(dtype)


# ---- the GPU: bfloat16 needs CuPy 14 -----------------------------------------------------------

@pytest.mark.parametrize("version, refused", [("13.6.0", True), ("14.0.1", False), ("15.0.0a1", False)])
def test_bfloat16_on_cuda_needs_cupy_14(version, refused):
    from types import SimpleNamespace

    from engine import backend

    cupy = SimpleNamespace(__version__=version)
    backend.check_cuda_dtype(np.dtype(np.float16), cupy)  # float16 is in every CuPy
    if refused:
        with pytest.raises(DTypeError, match=r"bfloat16 on the GPU needs CuPy 14 .* 13\.6\.0"):
            backend.check_cuda_dtype(np.dtype(engine.bfloat16), cupy)
    else:
        backend.check_cuda_dtype(np.dtype(engine.bfloat16), cupy)


@pytest.mark.gpu
def test_bfloat16_on_the_gpu_round_trips_and_its_native_matmul_matches_the_cpu():
    if not engine.cuda_available():
        pytest.skip("no CUDA device answers on this machine")
    x = engine.randn(64, 32).bfloat16().requires_grad_()
    w = engine.randn(32, 16).bfloat16().requires_grad_()
    cpu = x @ w
    gx, gw = x.cuda(), w.cuda()
    out = gx @ gw
    assert out.dtype == np.dtype(engine.bfloat16) and out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().float().numpy(), cpu.float().numpy(), rtol=2 ** -7, atol=2 ** -7)
    out.float().sum().backward()
    assert x.grad.dtype == np.dtype(engine.bfloat16) and x.grad.device.type == "cpu"


def test_inplace_op_writes_a_promoted_result_back_in_the_tensor_dtype_as_torch():
    values = np.array([0.3, -1.7, 2.2], np.float32)
    ours = engine.tensor(values).bfloat16().requires_grad_()
    theirs = torch.tensor(values).bfloat16().requires_grad_()
    other = np.array([0.01, 0.02, 0.03], np.float32)
    out, ref = (ours * 1).add_(engine.tensor(other)), (theirs * 1).add_(torch.tensor(other))
    assert out.dtype == np.dtype(engine.bfloat16)
    assert out.float().tolist() == ref.float().tolist()
    (out.float() * 3).sum().backward()
    (ref.float() * 3).sum().backward()
    assert ours.grad.dtype == np.dtype(engine.bfloat16) and ours.grad.float().tolist() == theirs.grad.float().tolist()
    with pytest.raises(DTypeError, match="add_"):  # a float result into an integer tensor: refused, as torch
        engine.zeros(3, dtype=engine.int64).add_(engine.randn(3, requires_grad=True))
    for a, b in itertools.product(TORCH_TO_ENGINE, repeat=2):
        assert dtypes.can_cast(_engine_dtype(a), _engine_dtype(b)) == torch.can_cast(a, b), (a, b)


@pytest.mark.parametrize("dtype, _", LOW)
def test_uniform_never_returns_its_upper_bound(dtype, _):
    engine.manual_seed(0)
    for low, high in [(0.0, 1.0), (-1.0, 1.0), (0.0, 0.3)]:
        values = engine.zeros(100_000, dtype=dtype).uniform_(low, high).float().numpy()
        assert values.max() < high and values.min() >= np.float32(np.asarray(low, dtype))


@pytest.mark.parametrize("scalar", [np.float16(2.5), np.float64(2.5), 2.5])
def test_a_numpy_float_scalar_promotes_an_integer_tensor_to_float32_as_torch(scalar):
    for values in ([1, 2], [True, False]):
        want = (torch.tensor(values) * scalar).dtype
        assert (engine.tensor(values) * scalar).dtype == _engine_dtype(want)


# ---- dtype checks elsewhere that read dtype.kind == "f" (bfloat16's kind is "V") ---------------

def test_bfloat16_is_a_float_for_the_checks_outside_ops():
    from engine.data.preprocessing import clean
    from engine.nn.utils.rnn import pad_sequence

    with pytest.raises(DTypeError, match="overflows the sequences' dtype bfloat16"):  # was a silent inf
        pad_sequence([engine.ones(2, dtype=engine.bfloat16), engine.ones(1, dtype=engine.bfloat16)],
                     padding_value=1e39)
    x = np.array([[1.0, 2.0], [np.nan, 1.0], [3.0, np.inf]], np.float32).astype(engine.bfloat16)
    cleaned, _, _ = clean(x)  # the NaN and inf rows were kept as finite
    assert cleaned.shape == (1, 2) and cleaned.dtype == np.dtype(engine.bfloat16)
    scores = engine.tensor([0.2, 0.9, 0.6]).bfloat16()  # binary scores, was refused as non-labels
    assert engine.metrics.accuracy(scores, engine.tensor([0, 1, 1])) == 1.0


# ---- optimizers on 16-bit parameters: float32 update, rounded once --------------------------

OPTIMIZERS = [("SGD", {"lr": 0.01, "momentum": 0.9}), ("Adam", {"lr": 0.01}), ("AdamW", {"lr": 0.01}),
              ("RMSprop", {"lr": 0.01}), ("Adagrad", {"lr": 0.01})]


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, kwargs", OPTIMIZERS)
def test_optimizer_step_on_low_precision_params_is_float32_rounded_once(name, kwargs, dtype, torch_dtype):
    rng = np.random.default_rng(0)
    start = rng.standard_normal(64).astype(np.float32)
    g = (rng.standard_normal(64) * 10.0 ** rng.integers(-4, 1, 64)).astype(np.float32)
    ours = engine.tensor(start).to(dtype).requires_grad_()
    oracle = torch.tensor(start).to(torch_dtype).float().requires_grad_()
    ours.grad = engine.tensor(g).to(dtype)
    oracle.grad = torch.tensor(g).to(torch_dtype).float()
    getattr(engine.optim, name)([ours], **kwargs).step()
    getattr(torch.optim, name)([oracle], **kwargs).step()
    assert ours.dtype == np.dtype(dtype)
    _assert_close_in_ulps(ours, oracle.to(torch_dtype), EPS[dtype], f"{name} step")


def test_float16_adam_with_small_gradients_stays_finite():
    # Op by op in float16 (torch's foreach=False path) Adam's eps=1e-8 rounds to 0 and sqrt(v) + eps
    # divides by zero once v underflows: torch's float16 Adam returns inf here.
    rng = np.random.default_rng(0)
    p = engine.tensor(rng.standard_normal(64).astype(np.float32)).half().requires_grad_()
    opt = engine.optim.Adam([p], lr=0.01)
    for _ in range(5):
        p.grad = engine.tensor((rng.standard_normal(64) * 1e-4).astype(np.float32)).half()
        opt.step()
    assert np.isfinite(p.float().numpy()).all()


def test_torch_dtype_helpers_know_bfloat16():
    assert engine.finfo(engine.bfloat16).eps == torch.finfo(torch.bfloat16).eps
    assert float(engine.finfo(engine.bfloat16).max) == torch.finfo(torch.bfloat16).max
    assert engine.promote_types(engine.bfloat16, engine.float16) == np.float32
    assert engine.can_cast(engine.float32, engine.bfloat16) and not engine.can_cast(engine.bfloat16, engine.int64)
    assert engine.randn(2).bfloat16().is_floating_point() and not engine.arange(2).is_floating_point()
    x = engine.randn(3).bfloat16()
    for other, torch_other in [(2.5, 2.5), (engine.tensor(1.0), torch.tensor(1.0)), (engine.randn(3), torch.randn(3))]:
        want = torch.result_type(torch.zeros(3, dtype=torch.bfloat16), torch_other)
        assert engine.result_type(x, other) == _engine_dtype(want)


@pytest.mark.parametrize("ta, tb", [(torch.bfloat16, torch.float32), (torch.int64, torch.float16),
                                    (torch.bfloat16, torch.float16), (torch.uint8, torch.int8)])
def test_cat_and_stack_promote_as_torch(ta, tb):
    a = engine.ones(2, dtype=_engine_dtype(ta), requires_grad=ta.is_floating_point)
    b = engine.ones(2, dtype=_engine_dtype(tb))
    want = torch.cat([torch.ones(2, dtype=ta), torch.ones(2, dtype=tb)]).dtype
    assert engine.cat([a, b]).dtype == _engine_dtype(want)
    assert engine.stack([a, b]).dtype == _engine_dtype(want)
    if ta.is_floating_point:
        engine.cat([a, b]).float().sum().backward()
        assert a.grad.dtype == a.dtype  # the gradient in the source dtype

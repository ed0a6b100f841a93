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
    "layer_norm": ([((4, 6), "f32"), ((6,), "f32"), ((6,), "f32")], lambda m, f, x, w, b: f.layer_norm(x, (6,), w, b)),
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


MODULES = {
    "Linear": (lambda m: m.nn.Linear(6, 5), (3, 6)),
    "MultiheadAttention": (lambda m: m.nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
    "TransformerEncoderLayer": (lambda m: m.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                (2, 5, 8)),
}



@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_forward_matches_torch(name, dtype, torch_dtype):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    theirs_module = make(torch).eval()
    mine_module = make(engine).eval()
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

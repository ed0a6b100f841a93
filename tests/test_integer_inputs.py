"""Integer and bool input to float-valued ops, against PyTorch itself.

Each case runs the engine and torch (the venv's torch, on the CPU) on the same integer or bool
tensor and asserts the same outcome: the same result dtype and values (an integer input of a
float function gives float32, PyTorch's default dtype: never float64, never integer zeros), or an
error on both sides, the engine's naming the op. The engine used to return int64 zeros from
``sigmoid`` and ``gelu``, float64 from ``exp``, float16 from ``exp(bool)``, and ``mask * 2 == True``.
"""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine.errors import DTypeError

torch = pytest.importorskip("torch")
TF = torch.nn.functional

DTYPES = ["int64", "int32", "uint8", "bool"]
VALUES = np.array([[1, 0, 2], [3, 1, -2]])

# (name, engine call, torch call[, the op an engine error must name: the name's first word by default])
CASES = [
    ("exp", engine.exp, torch.exp),
    ("log", engine.log, torch.log),
    ("sqrt", engine.sqrt, torch.sqrt),
    ("sin", engine.sin, torch.sin),
    ("cos", engine.cos, torch.cos),
    ("tanh", F.tanh, torch.tanh),
    ("sigmoid", F.sigmoid, torch.sigmoid),
    ("sigmoid method", lambda x: x.sigmoid(), lambda x: x.sigmoid()),
    ("softmax", lambda x: F.softmax(x, -1), lambda x: TF.softmax(x, -1)),
    ("log_softmax", lambda x: F.log_softmax(x, 1), lambda x: TF.log_softmax(x, 1)),
    ("softmax dtype=float32", lambda x: F.softmax(x, -1, dtype=engine.float32),
     lambda x: TF.softmax(x, -1, dtype=torch.float32)),
    ("relu", F.relu, TF.relu),
    ("gelu", F.gelu, TF.gelu),
    ("gelu tanh", lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh")),
    ("leaky_relu", F.leaky_relu, TF.leaky_relu),
    ("abs", engine.abs, torch.abs),
    ("neg", lambda x: -x, lambda x: -x, "neg"),
    ("mean", lambda x: x.mean(), lambda x: x.mean()),
    ("mean dim", lambda x: x.mean(1), lambda x: x.mean(1)),
    ("mean dtype=float32", lambda x: engine.mean(x, dtype=engine.float32),
     lambda x: torch.mean(x, dtype=torch.float32)),
    ("var", lambda x: x.var(), lambda x: x.var()),
    ("std", lambda x: x.std(1), lambda x: x.std(1)),
    ("norm", lambda x: x.norm(), lambda x: x.norm()),
    ("norm p=1", lambda x: x.norm(1), lambda x: x.norm(1)),
    ("layer_norm", lambda x: F.layer_norm(x, (3,)), lambda x: TF.layer_norm(x, (3,))),
    ("linear", lambda x: F.linear(x, x), lambda x: TF.linear(x, x)),
    ("matmul", lambda x: x @ x.t(), lambda x: x @ x.t()),
    ("true division", lambda x: x / (x + 1), lambda x: x / (x + 1), "div"),
    ("division by an int", lambda x: x / 2, lambda x: x / 2, "div"),
    ("int over a tensor", lambda x: 2 / (x + 1), lambda x: 2 / (x + 1), "div"),
    ("power -1", lambda x: x ** -1, lambda x: x ** -1, "pow"),
    ("power 0.5", lambda x: (x * x) ** 0.5, lambda x: (x * x) ** 0.5, "pow"),
    ("power 2", lambda x: x ** 2, lambda x: x ** 2, "pow"),
    ("square", lambda x: x.square(), lambda x: x.square()),
    ("times an int", lambda x: x * 2, lambda x: x * 2, "mul"),
    ("plus an int", lambda x: x + 1, lambda x: x + 1, "add"),
    ("minus an int", lambda x: x - 1, lambda x: x - 1, "sub"),
    ("equals an int", lambda x: x == 2, lambda x: x == 2, "equal"),
    ("times a float", lambda x: x * 0.5, lambda x: x * 0.5, "mul"),
    ("sum", lambda x: x.sum(), lambda x: x.sum()),
    ("mse_loss", lambda x: F.mse_loss(x, x), lambda x: TF.mse_loss(x, x)),
    ("cross_entropy", lambda x: F.cross_entropy(x, engine.tensor([0, 2])),
     lambda x: TF.cross_entropy(x, torch.tensor([0, 2]))),
    ("dropout", lambda x: F.dropout(x, 0.5), lambda x: TF.dropout(x, 0.5)),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x[None], 1), lambda x: TF.adaptive_avg_pool2d(x[None], 1)),
]


def _outcome(call, x):
    """("raises", the exception) or ("value", (dtype name, float64 values))."""
    try:
        result = call(x)
    except Exception as error:  # noqa: BLE001 - either side's error is the outcome
        return "raises", error
    values = result.detach().numpy() if hasattr(result, "detach") else result.numpy()
    return "value", (str(result.dtype).replace("torch.", ""), np.asarray(values, dtype=np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, ours, theirs, op", [c if len(c) == 4 else c + (c[0].split()[0],) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_integer_input_matches_pytorch(name, ours, theirs, op, dtype):
    data = VALUES.astype(dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # log(0), 1 / 0, exp(254): as torch
        kind, got = _outcome(ours, engine.tensor(data))
    torch_kind, expected = _outcome(theirs, torch.from_numpy(data.copy()))
    assert kind == torch_kind, f"{name} on {dtype}: engine {kind} {got!r}, torch {torch_kind} {expected!r}"
    if kind == "raises":
        assert str(got).startswith(f"{op}: "), f"{name} on {dtype}: the engine's error does not name {op}: {got}"
        return
    assert got[0] == expected[0], f"{name} on {dtype}: engine gives {got[0]}, torch {expected[0]}"
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_the_engine_errors_say_what_to_do():
    x = engine.tensor(VALUES)
    with pytest.raises(DTypeError, match=r"gelu: expected a floating point input, got .*dtype=int64.*\.float\(\)"):
        F.gelu(x)
    with pytest.raises(DTypeError, match=r"mean: .*dtype=int64.* pass dtype=engine\.float32"):
        x.mean()
    with pytest.raises(DTypeError, match=r"softmax: .*dtype=bool.* pass dtype=engine\.float32"):
        F.softmax(x > 0, -1)
    with pytest.raises(DTypeError, match=r"relu: bool input is not supported"):
        F.relu(x > 0)


@pytest.mark.parametrize("call", [
    lambda x: F.conv2d(x, x), lambda x: F.conv1d(x[0], x[0]), lambda x: F.max_pool2d(x, 1),
    lambda x: F.avg_pool2d(x, 1), lambda x: F.avg_pool1d(x[0], 1),
], ids=["conv2d", "conv1d", "max_pool2d", "avg_pool2d", "avg_pool1d"])
def test_integer_convolution_and_pooling_are_refused_clearly(call):
    """A documented difference: PyTorch computes these on integers on the CPU (not on CUDA, for the
    convolutions); the engine refuses them with an error that names the op and dtype."""
    with pytest.raises(DTypeError, match=r"(conv|pool)[12]d: .*floating.* dtype=int64"):
        call(engine.tensor(VALUES[None, None]))

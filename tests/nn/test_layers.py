"""Layers vs NumPy float64, Sequential's Linear+ReLU fusion, dropout, and init statistics."""

import math
from collections import OrderedDict

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES


def _t(array, device="cpu", dtype=None, **kw):
    array = np.asarray(array)
    if dtype is None and array.dtype == np.float64:
        dtype = np.float32
    return engine.tensor(array, device=device, dtype=dtype, **kw)


# ---- Linear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_numpy_forward_and_backward(rng, device, bias):
    layer = nn.Linear(5, 3, bias=bias, device=device)
    x_np = rng.standard_normal((4, 5))
    x = _t(x_np, device, requires_grad=True)
    out = layer(x)
    w = layer.weight.numpy().astype(np.float64)
    b = layer.bias.numpy().astype(np.float64) if bias else 0.0
    np.testing.assert_allclose(out.numpy(), x_np @ w.T + b, rtol=1e-5, atol=1e-6)
    g = rng.standard_normal((4, 3))
    out.backward(_t(g, device))
    np.testing.assert_allclose(x.grad.numpy(), g @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.T @ x_np, rtol=1e-5, atol=1e-6)
    if bias:
        np.testing.assert_allclose(layer.bias.grad.numpy(), g.sum(axis=0), rtol=1e-5, atol=1e-6)
    else:
        assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]


def test_linear_default_init_is_pytorchs():
    engine.manual_seed(0)
    layer = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) gives 1/sqrt(fan_in)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    assert layer.weight.dtype == np.float32 and layer.weight.requires_grad
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # std of U(-a, a) is a / sqrt(3)
    assert np.abs(b).max() <= bound and b.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_linear_accepts_batched_inputs_and_dtype():
    layer = nn.Linear(3, 2, dtype=engine.float64)
    out = layer(engine.ones(2, 4, 3, dtype=engine.float64))
    assert out.shape == (2, 4, 2) and out.dtype == np.float64
    with pytest.raises(ShapeError, match="linear"):
        layer(engine.ones(2, 5, dtype=engine.float64))


# ---- Sequential and fusion ------------------------------------------------------------------------

def test_sequential_construction_styles_indexing_and_append():
    a, b, c = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)
    torch_style, keras_style = nn.Sequential(a, b, c), nn.Sequential([a, b, c])
    named = nn.Sequential(OrderedDict(hidden=a, act=b))
    assert list(torch_style) == list(keras_style) == [a, b, c]
    assert len(torch_style) == 3 and torch_style[0] is a and torch_style[-1] is c
    assert [name for name, _ in named.named_children()] == ["hidden", "act"]
    head = torch_style[:2]
    assert isinstance(head, nn.Sequential) and list(head) == [a, b]
    grown = nn.Sequential().append(a).append(b)
    assert [name for name, _ in grown.named_children()] == ["0", "1"]
    with pytest.raises(IndexError, match="out of range"):
        torch_style[3]
    with pytest.raises(TypeError, match="element 1 is a function"):
        nn.Sequential(a, F.relu)


def test_sequential_matches_numpy_mlp(rng):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2), nn.Sigmoid())
    x = rng.standard_normal((3, 4))
    (w1, b1), (w2, b2) = [(m.weight.numpy().astype(np.float64), m.bias.numpy()) for m in (model[0], model[2])]
    expected = 1 / (1 + np.exp(-(np.tanh(x @ w1.T + b1) @ w2.T + b2)))
    np.testing.assert_allclose(model(_t(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def _graph_op_names(out):
    names, stack, seen = [], [out], set()
    while stack:
        t = stack.pop()
        fn = t.grad_fn
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.append(type(fn).op_name())
        stack.extend(getattr(fn, "inputs", ()))
    return names


@pytest.mark.parametrize("device", DEVICES)
def test_sequential_fuses_linear_relu_with_equal_results(rng, device):
    engine.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 5, device=device), nn.ReLU(), nn.Linear(5, 3, device=device), nn.ReLU(),
                          nn.Linear(3, 2, device=device))
    x_np = rng.standard_normal((6, 7))
    results = {}
    for fused in (True, False):
        model.zero_grad()
        x = _t(x_np, device, requires_grad=True)
        with F.fused_kernels(fused):
            out = model(x)
        names = _graph_op_names(out)
        assert names.count("linear_relu") == (2 if fused else 0)
        assert ("relu" in names) == (not fused)
        (out * out).sum().backward()
        results[fused] = [out.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in model.parameters()]
    for fused_value, plain_value in zip(results[True], results[False]):
        np.testing.assert_allclose(fused_value, plain_value, rtol=1e-5, atol=1e-6)


def test_fused_and_unfused_training_steps_reach_the_same_parameters(rng):
    """A few plain SGD steps of an MLP + CrossEntropyLoss, fused kernels on vs off."""
    x = _t(rng.standard_normal((32, 10)))
    y = _t(rng.integers(0, 4, 32))
    final = {}
    for fused in (True, False):
        engine.manual_seed(11)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        criterion = nn.CrossEntropyLoss()
        with F.fused_kernels(fused):
            for _ in range(5):
                model.zero_grad()
                criterion(model(x), y).backward()
                with engine.no_grad():
                    for p in model.parameters():
                        p.sub_(p.grad * 0.1)
        final[fused] = [p.numpy() for p in model.parameters()]
    for a, b in zip(final[True], final[False]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_output_is_the_linear_relu_function():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    out = model(engine.randn(2, 3))
    assert out.grad_fn is not None and type(out.grad_fn).op_name() == "linear_relu"
    assert repr(out.grad_fn) == "<LinearReLUBackward>"


def test_fusion_only_for_adjacent_plain_linear_relu():
    class LoudLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    not_adjacent = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.ReLU())
    overridden = nn.Sequential(LoudLinear(3, 4), nn.ReLU())
    no_bias = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU())
    x = engine.randn(2, 3, requires_grad=True)
    assert "linear_relu" not in _graph_op_names(not_adjacent(x))
    assert "linear_relu" not in _graph_op_names(overridden(x))
    out = no_bias(x)
    assert "linear_relu" in _graph_op_names(out)
    expected = np.maximum(x.numpy() @ no_bias[0].weight.numpy().T, 0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_module_list_registers_its_modules():
    blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert len(blocks) == 3 and len(list(blocks.parameters())) == 6
    assert [n for n, _ in blocks.named_parameters()][:2] == ["0.weight", "0.bias"]


# ---- activations, flatten, identity ---------------------------------------------------------------

def _gelu_exact(x):
    return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_activations_match_numpy(rng, device):
    x_np = rng.standard_normal((4, 5)) * 3
    x = _t(x_np, device)
    shifted = np.exp(x_np - x_np.max(axis=0, keepdims=True))
    cases = [
        (nn.ReLU(), np.maximum(x_np, 0)),
        (nn.Sigmoid(), 1 / (1 + np.exp(-x_np))),
        (nn.Tanh(), np.tanh(x_np)),
        (nn.GELU(), _gelu_exact(x_np)),
        (nn.GELU(approximate="tanh"), _gelu_tanh(x_np)),
        (nn.Softmax(dim=0), shifted / shifted.sum(axis=0, keepdims=True)),
        (nn.LogSoftmax(dim=0), np.log(shifted / shifted.sum(axis=0, keepdims=True))),
        (nn.Identity(54, unused=True), x_np),
    ]
    for layer, expected in cases:
        np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=2e-6, err_msg=repr(layer))


def test_activation_layers_on_integer_input_follow_pytorch():
    x = engine.tensor(np.array([[-2, 0, 3]]))
    assert nn.Sigmoid()(x).dtype == np.float32 and nn.Tanh()(x).dtype == np.float32  # not int zeros
    np.testing.assert_allclose(nn.Sigmoid()(x).numpy(), 1 / (1 + np.exp([[2.0, 0.0, -3.0]])), rtol=1e-6)
    assert nn.ReLU()(x).numpy().tolist() == [[0, 0, 3]] and nn.ReLU()(x).dtype == np.int64
    for layer, op in ((nn.GELU(), "gelu"), (nn.LeakyReLU(), "leaky_relu"), (nn.Softmax(-1), "softmax")):
        with pytest.raises(DTypeError, match=rf"{op}: expected a floating point input, got .*int64"):
            layer(x)


def test_activation_gradients_gradcheck(rng):
    x = engine.tensor(rng.standard_normal((3, 4)))
    for layer in (nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU("tanh"), nn.Softmax(1), nn.LogSoftmax(0)):
        assert engine.gradcheck(layer, [x])
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("fast")


def test_flatten():
    x = engine.randn(2, 3, 4, 5)
    assert nn.Flatten()(x).shape == (2, 60)
    assert nn.Flatten(0, 1)(x).shape == (6, 4, 5)
    np.testing.assert_array_equal(nn.Flatten()(x).numpy(), x.numpy().reshape(2, 60))


# ---- dropout ----------------------------------------------------------------------------------------

def test_dropout_is_identity_in_eval_mode():
    layer = nn.Dropout(0.5).eval()
    x = engine.randn(100)
    assert layer(x) is x


def test_dropout_zeroes_about_p_and_keeps_the_expectation():
    engine.manual_seed(0)
    p = 0.3
    x = engine.ones(200_000)
    out = nn.Dropout(p)(x).numpy()
    zero_fraction = (out == 0).mean()
    assert abs(zero_fraction - p) < 4 * math.sqrt(p * (1 - p) / out.size)
    np.testing.assert_allclose(out[out != 0], 1 / (1 - p), rtol=1e-6)
    assert out.mean() == pytest.approx(1.0, abs=0.01)


def test_dropout_gradient_uses_the_same_mask():
    engine.manual_seed(1)
    x = engine.randn(50, requires_grad=True)
    out = F.dropout(x, 0.4, training=True)
    out.sum().backward()
    kept = out.numpy() != 0
    np.testing.assert_allclose(x.grad.numpy(), kept / 0.6, rtol=1e-6)


def test_dropout_is_reproducible_after_manual_seed():
    engine.manual_seed(42)
    first = F.dropout(engine.ones(64), 0.5).numpy()
    second_draw = F.dropout(engine.ones(64), 0.5).numpy()
    engine.manual_seed(42)
    again = F.dropout(engine.ones(64), 0.5).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second_draw)


def test_dropout_edge_probabilities():
    x = engine.randn(10, requires_grad=True)
    assert F.dropout(x, 0.0) is x
    zeros = F.dropout(x, 1.0)
    np.testing.assert_array_equal(zeros.numpy(), np.zeros(10))
    with pytest.raises(ValueError, match="dropout: p must be"):
        F.dropout(x, 1.5)
    with pytest.raises(ValueError, match="Dropout: p must be"):
        nn.Dropout(-0.1)


# ---- LayerNorm ------------------------------------------------------------------------------------

def _layer_norm_reference(x, axes, w, b, eps=1e-5):
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_matches_numpy(rng, device):
    x = rng.standard_normal((3, 4, 5)) * 2 + 1
    layer = nn.LayerNorm((4, 5), device=device)
    w, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    layer.load_state_dict({"weight": w.astype(np.float32), "bias": b.astype(np.float32)})
    expected = _layer_norm_reference(x, (1, 2), w, b)
    np.testing.assert_allclose(layer(_t(x, device)).numpy(), expected, rtol=1e-4, atol=1e-5)
    plain = nn.LayerNorm(5, elementwise_affine=False)
    assert list(plain.parameters()) == []
    np.testing.assert_allclose(plain(_t(x)).numpy(), _layer_norm_reference(x, (2,), 1, 0), rtol=1e-4, atol=1e-5)


def test_layer_norm_gradcheck_all_affine_variants(rng):
    x = engine.tensor(rng.standard_normal((3, 4)) * 2)
    w = engine.tensor(rng.standard_normal(4))
    b = engine.tensor(rng.standard_normal(4))
    assert engine.gradcheck(lambda a, c, d: F.layer_norm(a, 4, c, d), [x, w, b])
    assert engine.gradcheck(lambda a, c: F.layer_norm(a, (4,), weight=c), [x, w])
    assert engine.gradcheck(lambda a, d: F.layer_norm(a, (4,), bias=d), [x, b])
    assert engine.gradcheck(lambda a: F.layer_norm(a, (3, 4), eps=1e-3), [x])


def test_layer_norm_shape_errors():
    with pytest.raises(ShapeError, match=r"layer_norm: normalized_shape \(3,\)"):
        F.layer_norm(engine.ones(2, 4), 3)
    with pytest.raises(ShapeError, match="layer_norm: weight"):
        F.layer_norm(engine.ones(2, 4), 4, engine.ones(3))


# ---- Embedding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_embedding_lookup_and_gradient_accumulation(rng, device):
    emb = nn.Embedding(6, 3, device=device)
    idx = np.array([[1, 4, 1], [0, 5, 1]])
    out = emb(_t(idx, device))
    table = emb.weight.numpy()
    np.testing.assert_array_equal(out.numpy(), table[idx])
    g = rng.standard_normal((2, 3, 3))
    out.backward(_t(g, device))
    expected = np.zeros((6, 3))
    np.add.at(expected, idx, g)
    np.testing.assert_allclose(emb.weight.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_embedding_padding_row_is_zero_and_gets_no_gradient():
    emb = nn.Embedding(5, 2, padding_idx=0)
    np.testing.assert_array_equal(emb.weight.numpy()[0], [0, 0])
    out = emb(_t(np.array([0, 2, 0, 3])))
    out.sum().backward()
    np.testing.assert_array_equal(emb.weight.grad.numpy(), [[0, 0], [0, 0], [1, 1], [1, 1], [0, 0]])
    assert repr(emb) == "Embedding(5, 2, padding_idx=0)"


def test_embedding_errors_name_the_problem():
    emb = nn.Embedding(4, 2)
    with pytest.raises(EngineError, match=r"embedding: indices must be in \[0, 4\).*\[0, 9\]"):
        emb(_t(np.array([0, 9])))
    with pytest.raises(DTypeError, match="embedding: indices must be integers"):
        emb(engine.zeros(3))


# ---- init -----------------------------------------------------------------------------------------

FAN_OUT, FAN_IN = 256, 512


def _big():
    return nn.Parameter(engine.empty(FAN_OUT, FAN_IN))


def test_calculate_gain_table():
    assert nn.init.calculate_gain("linear") == 1.0
    assert nn.init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert nn.init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert nn.init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert nn.init.calculate_gain("selu") == 0.75
    with pytest.raises(ValueError, match="unsupported nonlinearity"):
        nn.init.calculate_gain("swish")


@pytest.mark.parametrize("name, kwargs, bound, std", [
    ("kaiming_uniform_", dict(nonlinearity="relu"), math.sqrt(6 / FAN_IN), math.sqrt(2 / FAN_IN)),
    ("kaiming_uniform_", dict(mode="fan_out", nonlinearity="relu"), math.sqrt(6 / FAN_OUT), math.sqrt(2 / FAN_OUT)),
    ("kaiming_normal_", dict(nonlinearity="relu"), None, math.sqrt(2 / FAN_IN)),
    ("kaiming_normal_", dict(mode="fan_out"), None, math.sqrt(2 / FAN_OUT)),
    ("xavier_uniform_", dict(), math.sqrt(6 / (FAN_IN + FAN_OUT)), math.sqrt(2 / (FAN_IN + FAN_OUT))),
    ("xavier_normal_", dict(gain=2.0), None, 2 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
    ("uniform_", dict(a=-0.5, b=0.5), 0.5, 1 / math.sqrt(12)),
    ("normal_", dict(mean=0.0, std=0.02), None, 0.02),
])
def test_init_statistics(name, kwargs, bound, std):
    engine.manual_seed(7)
    w = getattr(nn.init, name)(_big(), **kwargs)
    values = w.numpy().astype(np.float64)
    assert w.dtype == np.float32 and w.requires_grad and w.grad is None
    assert values.std() == pytest.approx(std, rel=0.01)
    assert abs(values.mean()) < 5 * std / math.sqrt(values.size)
    if bound is not None:
        assert np.abs(values).max() <= bound * (1 + 1e-6)
        assert np.abs(values).max() > 0.999 * bound


def test_init_normal_mean_and_constants():
    engine.manual_seed(0)
    w = nn.init.normal_(_big(), mean=3.0, std=0.5).numpy()
    assert w.mean() == pytest.approx(3.0, abs=0.01)
    np.testing.assert_array_equal(nn.init.zeros_(_big()).numpy(), 0)
    np.testing.assert_array_equal(nn.init.ones_(_big()).numpy(), 1)
    np.testing.assert_array_equal(nn.init.constant_(_big(), 0.25).numpy(), 0.25)


def test_init_is_reproducible_and_keeps_dtype():
    engine.manual_seed(5)
    a = nn.init.kaiming_normal_(_big()).numpy()
    engine.manual_seed(5)
    b = nn.init.kaiming_normal_(_big()).numpy()
    np.testing.assert_array_equal(a, b)
    w64 = nn.init.xavier_uniform_(nn.Parameter(engine.empty(3, 4, dtype=engine.float64)))
    assert w64.dtype == np.float64
    with pytest.raises(ShapeError, match="at least 2 dims"):
        nn.init.xavier_uniform_(nn.Parameter(engine.empty(5)))


def test_init_fan_of_conv_shaped_weight():
    engine.manual_seed(1)
    w = nn.init.kaiming_uniform_(nn.Parameter(engine.empty(64, 32, 3, 3)), nonlinearity="relu")
    bound = math.sqrt(6 / (32 * 9))
    assert np.abs(w.numpy()).max() <= bound * (1 + 1e-6)
    assert np.abs(w.numpy()).max() > 0.99 * bound

"""Conv1d/Conv2d, pooling, BatchNorm2d and Dropout2d layers: PyTorch's parameters, init, state-dict
keys, numerics against NumPy float64, and errors that name the op and the shapes.

The ops' forward and gradients are in the op table (tests/test_ops.py); this file tests the layers."""

import math
import re

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import nn
from engine.errors import DTypeError, ShapeError
from tests.conftest import DEVICES


def _t(array, device="cpu", **kw):
    return engine.tensor(np.asarray(array, dtype=np.float32), device=device, **kw)


# ---- Conv2d / Conv1d -----------------------------------------------------------------------------

def test_conv2d_parameters_state_dict_and_repr():
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2)
    assert conv.weight.shape == (6, 2, 3, 2) and conv.bias.shape == (6,)
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 2), (2, 2), (1, 1), (1, 1))
    assert repr(conv) == "Conv2d(4, 6, kernel_size=(3, 2), stride=(2, 2), padding=(1, 1), groups=2)"
    no_bias = nn.Conv2d(1, 2, 3, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    assert [name for name, _ in nn.Sequential(conv, nn.ReLU()).named_parameters()] == ["0.weight", "0.bias"]


def test_conv2d_default_init_is_pytorchs():
    # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = in/groups * kh * kw
    engine.manual_seed(0)
    conv = nn.Conv2d(8, 64, (3, 5), groups=2)
    bound = 1 / math.sqrt(4 * 3 * 5)
    w, b = conv.weight.numpy(), conv.bias.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # the std of U(-a, a) is a / sqrt(3)
    assert np.abs(b).max() <= bound and b.std() > 0.3 * bound
    assert conv.weight.dtype == np.float32


def test_conv2d_module_matches_functional_and_numpy(rng):
    conv = nn.Conv2d(2, 3, 2)
    x = rng.standard_normal((1, 2, 3, 3))
    w, b = conv.weight.numpy().astype(np.float64), conv.bias.numpy().astype(np.float64)
    expected = np.zeros((1, 3, 2, 2))
    for o in range(3):
        for i in range(2):
            for j in range(2):
                expected[0, o, i, j] = (x[0, :, i:i + 2, j:j + 2] * w[o]).sum() + b[o]
    np.testing.assert_allclose(conv(_t(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_conv_padding_same_keeps_the_size_and_dtype_float64():
    x = engine.randn(2, 3, 7, 6, dtype=engine.float64)
    conv = nn.Conv2d(3, 5, (4, 3), padding="same", dilation=2, dtype=engine.float64)
    y = conv(x)
    assert y.shape == (2, 5, 7, 6) and y.dtype == np.float64


def test_conv1d_layer_shapes_and_backward():
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)
    assert conv.weight.shape == (6, 2, 3) and conv.kernel_size == (3,) and conv.stride == (2,)
    x = engine.randn(2, 4, 9, requires_grad=True)
    y = conv(x)
    assert y.shape == (2, 6, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.shape == conv.weight.shape
    assert conv(engine.randn(4, 9)).shape == (6, 5)  # unbatched


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_runs_on_each_device(device):
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device)
    x = engine.randn(2, 3, 5, 5, device=device, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    assert y.device == engine.device(device) and x.grad.device == engine.device(device)


def test_conv_errors_name_op_and_shapes():
    x = engine.randn(2, 3, 5, 5)
    with pytest.raises(ShapeError, match=r"conv2d: input .*\(2, 3, 5, 5\).* has 3 channels .* expects 4"):
        F.conv2d(x, engine.randn(6, 4, 3, 3))
    with pytest.raises(ShapeError, match=r"conv2d: padded input size per channel \(7, 5\).*kernel size \(8, 3\)"):
        F.conv2d(x, engine.randn(6, 3, 8, 3), padding=(1, 0))
    with pytest.raises(ShapeError, match=r"groups=2 must divide"):
        F.conv2d(x, engine.randn(6, 1, 3, 3), groups=2)
    with pytest.raises(ShapeError, match=r"bias .* must have shape \(6,\)"):
        F.conv2d(x, engine.randn(6, 3, 3, 3), engine.randn(5))
    with pytest.raises(ShapeError, match=r"conv2d: expected \(N, C, H, W\)"):
        F.conv2d(engine.randn(5, 5), engine.randn(6, 3, 3, 3))
    with pytest.raises(DTypeError, match="conv2d: input, weight and bias must share one floating dtype"):
        F.conv2d(x, engine.randn(6, 3, 3, 3, dtype=engine.float64))
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        F.conv2d(x, engine.randn(6, 3, 3, 3), stride=2, padding="same")
    with pytest.raises(ValueError, match="stride must be positive"):
        F.conv2d(x, engine.randn(6, 3, 3, 3), stride=0)
    with pytest.raises(NotImplementedError, match="padding_mode='reflect' is not implemented"):
        nn.Conv2d(3, 6, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="groups=2 must be a positive int and divide in_channels=3"):
        nn.Conv2d(3, 6, 3, groups=2)



# What PyTorch 2.13 refuses, each checked there; the engine ran some of them (a (3, 4, 0, 0) weight
# gave an 8x8 output from a 7x7 input, an empty H with padding=1 a (2, 9) output).
BAD_CONV2D = [
    ("zero kernel", (3, 4, 0, 0), {}, ShapeError, r"conv2d: kernel size must be greater than zero, got \(0, 0\)"),
    ("zero kernel height", (3, 4, 0, 3), {}, ShapeError, r"kernel size must be greater than zero, got \(0, 3\)"),
    ("no output channels", (0, 4, 3, 3), {}, ShapeError, r"conv2d: weight .*\(0, 4, 3, 3\).* has 0 output channels"),
    ("groups not dividing", (3, 4, 3, 3), {"groups": 2}, ShapeError, "conv2d: groups=2 must divide"),
    ("groups 0", (3, 4, 3, 3), {"groups": 0}, ValueError, "conv2d: groups must be a positive int, got 0"),
    ("groups float", (3, 4, 3, 3), {"groups": 1.5}, ValueError, "conv2d: groups must be a positive int, got 1.5"),
    ("negative padding", (3, 4, 3, 3), {"padding": -1}, ValueError, "conv2d: padding must be non-negative"),
    ("stride 0", (3, 4, 3, 3), {"stride": 0}, ValueError, r"conv2d: stride must be positive, got \(0, 0\)"),
    ("negative stride", (3, 4, 3, 3), {"stride": (1, -1)}, ValueError, r"stride must be positive, got \(1, -1\)"),
    ("dilation 0", (3, 4, 3, 3), {"dilation": 0}, ValueError, r"conv2d: dilation must be positive, got \(0, 0\)"),
    ("float stride", (3, 4, 3, 3), {"stride": (1, 1.5)}, TypeError, "conv2d: stride must be an int or a tuple of 2"),
]


@pytest.mark.parametrize("weight_shape, kwargs, error, message", [c[1:] for c in BAD_CONV2D],
                         ids=[c[0] for c in BAD_CONV2D])
def test_conv2d_refuses_what_pytorch_refuses(weight_shape, kwargs, error, message):
    with pytest.raises(error, match=message):
        F.conv2d(engine.randn(1, 4, 7, 7), engine.randn(*weight_shape), **kwargs)


BAD_CONV1D = [
    ("zero kernel", (3, 4, 0), {}, ShapeError, r"conv1d: kernel size must be greater than zero, got \(0,\)"),
    ("no input channels", (3, 0, 3), {}, ShapeError, r"conv1d: weight .*\(3, 0, 3\).* 0 input channels per group"),
    ("channels differ", (3, 5, 3), {}, ShapeError, r"conv1d: input .*\(1, 4, 7\).* has 4 channels but weight .*"
                                                   r"\(3, 5, 3\).* expects 5"),
    ("groups not dividing", (3, 4, 3), {"groups": 2}, ShapeError, r"conv1d: groups=2 must divide .*\(1, 4, 7\)"),
    ("stride 0", (3, 4, 3), {"stride": 0}, ValueError, r"conv1d: stride must be positive, got \(0,\)"),
    ("dilation 0", (3, 4, 3), {"dilation": 0}, ValueError, r"conv1d: dilation must be positive, got \(0,\)"),
    ("negative padding", (3, 4, 3), {"padding": -1}, ValueError, "conv1d: padding must be non-negative, got -1"),
    ("pair padding", (3, 4, 3), {"padding": (1, 1)}, ValueError, "conv1d: padding must be an int or a tuple of 1 int"),
    ("kernel too large", (3, 4, 9), {}, ShapeError, r"conv1d: padded input size per channel \(7,\) of input "
                                                   r".*\(1, 4, 7\).* kernel size \(9,\)"),
    ("bias", (3, 4, 3), {"bias": 5}, ShapeError, r"conv1d: bias .*\(5,\).* must have shape \(3,\)"),
    ("dtypes", (3, 4, 3), {"dtype": engine.float64}, DTypeError, r"conv1d: input, weight .*\(1, 4, 7\).*float32.*"
                                                                r"\(3, 4, 3\).*float64"),
    ("same and strided", (3, 4, 3), {"padding": "same", "stride": 2}, ValueError, r"conv1d: padding='same' .* "
                                                                                  r"\(stride=\(2,\)\)"),
    ("4-d weight", (3, 4, 3, 3), {}, ShapeError, r"conv1d: weight must be an \(out_channels, in_channels / groups, "
                                                r"k\) Tensor, got .*\(3, 4, 3, 3\)"),
]


@pytest.mark.parametrize("weight_shape, kwargs, error, message", [c[1:] for c in BAD_CONV1D],
                         ids=[c[0] for c in BAD_CONV1D])
def test_conv1d_errors_name_conv1d_and_the_shapes_passed(weight_shape, kwargs, error, message):
    """conv1d runs the 2-d op with H = 1; its errors used to name conv2d and (N, C, 1, L) shapes."""
    kwargs = dict(kwargs)
    weight = engine.randn(*weight_shape, dtype=kwargs.pop("dtype", engine.float32))
    if "bias" in kwargs:
        kwargs["bias"] = engine.randn(kwargs["bias"])
    with pytest.raises(error, match=message) as raised:
        F.conv1d(engine.randn(1, 4, 7), weight, **kwargs)
    assert "conv2d" not in str(raised.value) and ", 1, 7)" not in str(raised.value)


def test_conv1d_input_of_the_wrong_rank_is_named_as_passed():
    with pytest.raises(ShapeError, match=r"conv1d: expected \(N, C, L\) or unbatched \(C, L\) input, got "
                                         r".*\(1, 4, 7, 7\)"):
        F.conv1d(engine.randn(1, 4, 7, 7), engine.randn(3, 4, 3))
    with pytest.raises(ShapeError, match=r"conv1d: input .*shape=\(4, 0\).* is empty in its spatial dims"):
        F.conv1d(engine.randn(4, 0), engine.randn(3, 4, 1))  # unbatched: named without the added batch dim


def test_conv_with_an_empty_batch_gives_an_empty_output_and_gradient():
    x, w = engine.randn(0, 4, 7, 7, requires_grad=True), engine.randn(3, 4, 3, 3, requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    assert y.shape == (0, 3, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and np.all(w.grad.numpy() == 0)
    assert F.conv1d(engine.randn(0, 4, 7), engine.randn(3, 4, 3)).shape == (0, 3, 5)


@pytest.mark.parametrize("shape", [(1, 4, 0, 7), (1, 4, 7, 0), (4, 0, 7)])
def test_conv2d_refuses_an_empty_spatial_dim_even_with_padding(shape):
    """PyTorch: "only zero batch or zero channel inputs are supported"; padding=1 used to give a (2, 9) output."""
    with pytest.raises(ShapeError, match=r"conv2d: input .* is empty in its spatial dims; only the batch dim"):
        F.conv2d(engine.randn(*shape), engine.randn(3, 4, 1, 1), padding=1)


@pytest.mark.parametrize("layer, args, kwargs, message", [
    (nn.Conv2d, (3, 3, 0), {}, r"Conv2d: kernel_size must be positive, got \(0, 0\)"),
    (nn.Conv1d, (3, 3, 3), {"stride": 0}, r"Conv1d: stride must be positive, got \(0,\)"),
    (nn.Conv2d, (3, 3, 3), {"padding": -1}, "Conv2d: padding must be non-negative, got -1"),
    (nn.Conv1d, (3, 3, 3), {"dilation": 0}, r"Conv1d: dilation must be positive, got \(0,\)"),
    (nn.Conv2d, (3, 3, 3), {"groups": 1.5}, "Conv2d: groups=1.5 must be a positive int"),
])
def test_conv_layers_check_their_geometry_when_built(layer, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(*args, **kwargs)

# ---- pooling ---------------------------------------------------------------------------------------

def test_max_pool2d_return_indices_and_first_max_gradient():
    # ties: PyTorch sends the whole gradient to the first maximum of the window
    x = _t([[[[1.0, 3.0, 3.0, 0.0],
              [2.0, 3.0, 5.0, 5.0]]]], requires_grad=True)
    values, indices = nn.MaxPool2d(2, return_indices=True)(x)
    assert values.numpy().tolist() == [[[[3.0, 5.0]]]]
    assert indices.numpy().tolist() == [[[[1, 6]]]] and indices.dtype == np.int64
    values.sum().backward()
    assert x.grad.numpy().tolist() == [[[[0, 1, 0, 0], [0, 0, 1, 0]]]]


def test_max_pool2d_padding_is_minus_infinity():
    x = _t(-np.ones((1, 1, 3, 3)))
    assert np.all(F.max_pool2d(x, 3, 1, 1).numpy() == -1)  # zero padding would give 0


def test_avg_pool2d_count_include_pad_and_divisor_override():
    x = _t(np.ones((1, 1, 2, 2)))
    assert F.avg_pool2d(x, 2, 1, 1).numpy()[0, 0, 0, 0] == 0.25
    assert F.avg_pool2d(x, 2, 1, 1, count_include_pad=False).numpy()[0, 0, 0, 0] == 1.0
    assert F.avg_pool2d(x, 2, divisor_override=1).numpy()[0, 0, 0, 0] == 4.0


def test_pooling_modules_repr_and_default_stride():
    assert repr(nn.MaxPool2d(2)) == "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)"
    assert nn.AvgPool2d(3).stride == 3
    assert nn.AdaptiveAvgPool2d((2, 3))(engine.randn(2, 4, 7, 9)).shape == (2, 4, 2, 3)
    assert nn.AdaptiveAvgPool2d((None, 3))(engine.randn(2, 4, 7, 9)).shape == (2, 4, 7, 3)
    assert not list(nn.MaxPool2d(2).state_dict())


def test_pool_errors_name_op_and_shapes():
    with pytest.raises(ShapeError, match=r"max_pool2d: input .*\(1, 2, 2, 2\).* too small .* output size would be"):
        F.max_pool2d(engine.randn(1, 2, 2, 2), 3)
    with pytest.raises(ValueError, match="avg_pool2d: padding .* at most half"):
        F.avg_pool2d(engine.randn(1, 2, 6, 6), 2, padding=2)
    with pytest.raises(ShapeError, match=r"max_pool2d: expected \(N, C, H, W\)"):
        F.max_pool2d(engine.randn(6, 6), 2)
    with pytest.raises(DTypeError, match="avg_pool2d: input must be floating point"):
        F.avg_pool2d(engine.ones(1, 1, 4, 4, dtype=engine.int64), 2)
    with pytest.raises(ValueError, match="adaptive_avg_pool2d: output_size must be non-negative"):
        F.adaptive_avg_pool2d(engine.randn(1, 1, 4, 4), (2, -1))



BAD_POOL = [  # what PyTorch 2.13 refuses, each checked there
    ("max_pool2d", (1, 2, 6, 6), (0,), {}, ValueError, r"max_pool2d: kernel_size must be positive, got \(0, 0\)"),
    ("max_pool2d", (1, 2, 6, 6), (2,), {"stride": 0}, ValueError, r"stride must be positive, got \(0, 0\)"),
    ("max_pool2d", (1, 2, 6, 6), (2,), {"dilation": 0}, ValueError, r"dilation must be positive, got \(0, 0\)"),
    ("max_pool2d", (1, 2, 6, 6), (2,), {"padding": -1}, ValueError, r"padding must be non-negative, got \(-1, -1\)"),
    # at most half the kernel whatever the dilation (the engine used to allow half the dilated kernel)
    ("max_pool2d", (1, 2, 8, 8), (3,), {"padding": 2, "dilation": 2}, ValueError,
     r"max_pool2d: padding \(2, 2\) must be at most half of kernel_size \(3, 3\)"),
    ("max_pool2d", (1, 2, 6, 6), (2.5,), {}, TypeError, "max_pool2d: kernel_size must be an int or a tuple of 2"),
    ("avg_pool2d", (1, 2, 6, 6), (2,), {"padding": 2}, ValueError, r"padding \(2, 2\) must be at most half"),
    ("avg_pool2d", (1, 2, 6, 6), (2,), {"divisor_override": 0}, ValueError, "divisor_override must be a non-zero"),
    ("avg_pool1d", (1, 2, 6), (0,), {}, ValueError, r"avg_pool1d: kernel_size must be positive, got \(0,\)"),
    ("avg_pool1d", (1, 2, 6), (2,), {"stride": 0}, ValueError, r"avg_pool1d: stride must be positive, got \(0,\)"),
    ("avg_pool1d", (1, 2, 6), (2,), {"padding": 2}, ValueError,
     r"avg_pool1d: padding \(2,\) must be at most half of kernel_size \(2,\)"),
    ("avg_pool1d", (1, 2, 6), (2,), {"padding": -1}, ValueError, r"avg_pool1d: padding must be non-negative"),
    ("avg_pool1d", (1, 2, 1), (2,), {}, ShapeError, r"avg_pool1d: input .*\(1, 2, 1\).* too small for "
                                                    r"kernel_size=\(2,\).* output size would be \(0,\)"),
    ("avg_pool1d", (1, 2, 6, 6), (2,), {}, ShapeError, r"avg_pool1d: expected \(N, C, L\) or unbatched \(C, L\) "
                                                       r"input, got .*\(1, 2, 6, 6\)"),
    ("avg_pool1d", (1, 2, 6), ((2, 2),), {}, ValueError, "avg_pool1d: kernel_size must be an int or a tuple of 1"),
    ("adaptive_avg_pool2d", (1, 1, 4, 4), ((2, 2, 2),), {}, TypeError, "output_size must be an int, None or a tuple"),
    ("adaptive_avg_pool2d", (1, 1, 4, 4), (2.5,), {}, TypeError, "output_size must be an int, None or a tuple"),
]


@pytest.mark.parametrize("op, shape, args, kwargs, error, message", BAD_POOL,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in BAD_POOL])
def test_pooling_refuses_what_pytorch_refuses_naming_the_op_called(op, shape, args, kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        getattr(F, op)(engine.randn(*shape), *args, **kwargs)
    if op == "avg_pool1d":  # run as avg_pool2d with H = 1: neither that name nor a 4-d shape may show
        assert "avg_pool2d" not in str(raised.value) and "(1, 2, 1, " not in str(raised.value)


@pytest.mark.parametrize("op, args", [("max_pool2d", (2,)), ("avg_pool2d", (2,)), ("adaptive_avg_pool2d", (2,)),
                                      ("adaptive_avg_pool2d", (1,))])
@pytest.mark.parametrize("shape", [(1, 1, 0, 4), (1, 1, 4, 0), (1, 0, 4)])
def test_pooling_refuses_an_empty_spatial_dim(op, args, shape):
    """As PyTorch; adaptive_avg_pool2d raised a bare ZeroDivisionError (or gave NaN for output 1),
    max_pool2d with padding gave the max of the padding (-inf)."""
    with pytest.raises(ShapeError, match=rf"{op}: input .*shape={re.escape(str(shape))}.* is empty in its "):
        getattr(F, op)(engine.randn(*shape), *args, **({"padding": 1} if op == "max_pool2d" else {}))


def test_max_and_avg_pooling_refuse_an_empty_channel_dim_as_pytorch():
    for op in ("max_pool2d", "avg_pool2d"):
        with pytest.raises(ShapeError, match=rf"{op}: input .*\(1, 0, 4, 4\).* empty in its channel or spatial"):
            getattr(F, op)(engine.randn(1, 0, 4, 4), 2)
    with pytest.raises(ShapeError, match=r"avg_pool1d: input .*\(1, 0, 4\).* empty in its channel or spatial"):
        F.avg_pool1d(engine.randn(1, 0, 4), 2)
    assert F.adaptive_avg_pool2d(engine.randn(1, 0, 4, 4), 2).shape == (1, 0, 2, 2)  # PyTorch allows this one


@pytest.mark.parametrize("op, args, out_shape", [
    ("max_pool2d", (2,), (0, 2, 3, 3)), ("avg_pool2d", (2,), (0, 2, 3, 3)), ("avg_pool1d", (2,), (0, 2, 3)),
    ("adaptive_avg_pool2d", (2,), (0, 2, 2, 2)), ("adaptive_avg_pool2d", (1,), (0, 2, 1, 1)),
])
def test_pooling_an_empty_batch_gives_an_empty_output_and_gradient(op, args, out_shape):
    x = engine.randn(0, 2, *(6,) * (len(out_shape) - 2), requires_grad=True)
    y = getattr(F, op)(x, *args)
    assert y.shape == out_shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_adaptive_avg_pool2d_output_size_zero_is_empty_as_pytorch():
    x = engine.randn(1, 1, 4, 4, requires_grad=True)
    assert F.adaptive_avg_pool2d(x, 0).shape == (1, 1, 0, 0)
    y = F.adaptive_avg_pool2d(x, (None, 0))
    assert y.shape == (1, 1, 4, 0)
    y.sum().backward()
    assert np.all(x.grad.numpy() == 0)

# ---- BatchNorm2d, Dropout2d --------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (4, 3)), ("BatchNorm2d", (2, 3, 2, 2))])
def test_batchnorm_refuses_integer_input_naming_itself(name, shape, training):
    """As PyTorch; training used to fail inside (naming mean), evaluation to compute in float32."""
    layer = getattr(nn, name)(3).train(training)
    with pytest.raises(DTypeError, match=rf"{name}: input must be floating point, got .*dtype=int64"):
        layer(engine.tensor(np.arange(math.prod(shape)).reshape(shape)))


def test_batchnorm2d_train_and_eval_match_numpy(rng):
    bn = nn.BatchNorm2d(3)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    with engine.no_grad():
        bn.weight.copy_(_t([1.0, 2.0, 0.5]))
        bn.bias.copy_(_t([0.0, -1.0, 3.0]))
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    scale, shift = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])

    def expected(m, v):
        return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5) * scale[:, None, None] + shift[:, None, None]

    np.testing.assert_allclose(bn(_t(x)).numpy(), expected(mean, var), rtol=1e-4, atol=1e-4)
    count = 4 * 5 * 6
    running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * var * count / (count - 1)  # unbiased, momentum 0.1
    np.testing.assert_allclose(bn.running_mean.numpy(), running_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), running_var, rtol=1e-5)
    assert bn.num_batches_tracked.item() == 1
    bn.eval()
    np.testing.assert_allclose(bn(_t(x)).numpy(), expected(running_mean, running_var), rtol=1e-4, atol=1e-4)


def test_batchnorm2d_cumulative_momentum_and_no_running_stats(rng):
    bn = nn.BatchNorm2d(2, momentum=None, affine=False)
    batches = [rng.standard_normal((2, 2, 3, 3)) + k for k in range(3)]
    for b in batches:
        bn(_t(b))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0),
                               rtol=1e-5)
    plain = nn.BatchNorm2d(2, track_running_stats=False).eval()  # batch statistics even in eval mode
    assert plain.running_mean is None and list(plain.state_dict()) == ["weight", "bias"]
    out = plain(_t(batches[0])).numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_batchnorm2d_gradient_and_errors(rng):
    bn = nn.BatchNorm2d(2).double()
    x = engine.tensor(rng.standard_normal((2, 2, 3, 2)), dtype=engine.float64)
    assert engine.gradcheck(lambda t: bn(t), [x], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected \(N, 2, H, W\) input, got shape \(2, 3, 4, 4\)"):
        bn(engine.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="BatchNorm2d: expected more than 1 value per channel"):
        nn.BatchNorm2d(2)(engine.randn(1, 2, 1, 1))


def test_dropout2d_zeroes_whole_channels_and_scales_the_rest():
    engine.manual_seed(0)
    x = engine.ones(8, 16, 3, 4, requires_grad=True)
    y = nn.Dropout2d(0.5)(x)
    values = y.numpy().reshape(8, 16, -1)
    assert np.all(values == values[..., :1])  # one draw per channel
    assert set(np.unique(values)) == {0.0, 2.0} and 0.3 < (values[..., 0] == 0).mean() < 0.7
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), y.numpy())
    assert nn.Dropout2d(0.5).eval()(x) is x


def test_dropout2d_on_2d_and_3d_input_follows_pytorch():
    # PyTorch 2.x: a 3-d input is (N, C, L), one draw per (n, c); a 2-d input gets element-wise
    # dropout (deprecated); both warn. mnist_rnn's Dropout2d on (N, 64) features relies on the latter.
    engine.manual_seed(0)
    with pytest.warns(UserWarning, match="3D input"):
        y = nn.Dropout2d(0.5)(engine.ones(6, 8, 5))
    values = y.numpy()
    assert np.all(values == values[..., :1]) and 0.2 < (values[..., 0] == 0).mean() < 0.8
    with pytest.warns(UserWarning, match="2-D input"):
        z = nn.Dropout2d(0.5)(engine.ones(64, 64)).numpy()
    assert set(np.unique(z)) == {0.0, 2.0} and not np.all(z == z[:, :1])  # not one draw per row

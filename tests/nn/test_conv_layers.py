"""Conv1d/Conv2d, pooling, BatchNorm2d and Dropout2d layers: PyTorch's parameters, init, state-dict
keys, numerics against NumPy float64, and errors that name the op and the shapes.

The ops' forward and gradients are in the op table (tests/test_ops.py); this file tests the layers."""

import math

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
    with pytest.raises(ValueError, match="groups=2 must be positive and divide in_channels=3"):
        nn.Conv2d(3, 6, 3, groups=2)


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
    with pytest.raises(ValueError, match="adaptive_avg_pool2d: output_size must be positive"):
        F.adaptive_avg_pool2d(engine.randn(1, 1, 4, 4), 0)


# ---- BatchNorm2d, Dropout2d --------------------------------------------------------------------------

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

"""The op table: every core op's forward against a NumPy float64 reference and its gradient
against finite differences, on every available device."""

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import engine
from engine import functional as F
from tests.conftest import DEVICES


def _gelu_ref(x):
    from math import erf

    return x * 0.5 * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def _gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Direct convolution, one output element at a time (PyTorch's cross-correlation)."""
    (sh, sw), (dh, dw) = _two(stride), _two(dilation)
    o_ch, cg, kh, kw = w.shape
    if padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in ((kh, dh), (kw, dw))]
    else:
        pads = [(p, p) for p in _two(padding)]
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], o_ch, oh, ow))
    per_group = o_ch // groups
    for n in range(x.shape[0]):
        for o in range(o_ch):
            first = (o // per_group) * cg
            for i in range(oh):
                for j in range(ow):
                    for c in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                out[n, o, i, j] += xp[n, first + c, i * sh + u * dh, j * sw + v * dw] * w[o, c, u, v]
            if b is not None:
                out[n, o] += b[o]
    return out


def _pool_out(size, k, s, p, d, ceil):
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= size + p else out


def _pool2d_ref(x, kind, kernel, stride=None, padding=0, dilation=1, ceil_mode=False, count_include_pad=True):
    """Max or average pooling, one window at a time: the window's positions that fall inside the
    (implicitly padded) input; max ignores padding, avg counts it when count_include_pad."""
    (kh, kw), (ph, pw), (dh, dw) = _two(kernel), _two(padding), _two(dilation)
    sh, sw = _two(kernel if stride is None else stride)
    n, c, h, w = x.shape
    oh, ow = _pool_out(h, kh, sh, ph, dh, ceil_mode), _pool_out(w, kw, sw, pw, dw, ceil_mode)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            rows = [i * sh - ph + u * dh for u in range(kh)]
            cols = [j * sw - pw + v * dw for v in range(kw)]
            inside = [(r, q) for r in rows for q in cols if 0 <= r < h and 0 <= q < w]
            values = np.stack([x[:, :, r, q] for r, q in inside], axis=-1)
            if kind == "max":
                out[:, :, i, j] = values.max(axis=-1)
            else:
                padded = [(r, q) for r in rows for q in cols if -ph <= r < h + ph and -pw <= q < w + pw]
                out[:, :, i, j] = values.sum(axis=-1) / (len(padded) if count_include_pad else len(inside))
    return out


def _adaptive_avg_ref(x, size):
    oh, ow = _two(size)
    h, w = x.shape[2:]
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
            c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


@dataclass
class Op:
    name: str
    fn: Callable  # engine tensors -> tensor
    ref: Callable  # float64 numpy arrays -> array
    shapes: list
    domain: tuple = (-2.0, 2.0)
    grad: bool = True
    extra: dict = field(default_factory=dict)


IDX = np.array([2, 0, 2, 1])  # repeats: the scatter-add backward must accumulate

OPS = [
    Op("add", lambda a, b: a + b, np.add, [(3, 4), (3, 4)]),
    Op("add_broadcast", lambda a, b: a + b, np.add, [(3, 1, 4), (5, 1)]),
    Op("add_scalar", lambda a: 2.5 + a, lambda a: 2.5 + a, [(3, 4)]),
    Op("sub", lambda a, b: a - b, np.subtract, [(2, 3), (3,)]),
    Op("rsub_scalar", lambda a: 1.0 - a, lambda a: 1.0 - a, [(4,)]),
    Op("mul", lambda a, b: a * b, np.multiply, [(4, 1), (1, 5)]),
    Op("div", lambda a, b: a / b, np.divide, [(3, 4), (4,)], domain=(0.5, 2.0)),
    Op("rdiv_scalar", lambda a: 1.0 / a, lambda a: 1.0 / a, [(5,)], domain=(0.5, 2.0)),
    Op("pow_scalar", lambda a: a ** 3, lambda a: a ** 3, [(3, 4)]),
    Op("pow_tensor", lambda a, b: a ** b, np.power, [(3, 4), (3, 4)], domain=(0.5, 2.0)),
    Op("neg", lambda a: -a, np.negative, [(3, 4)]),
    Op("matmul", lambda a, b: a @ b, np.matmul, [(3, 4), (4, 5)]),
    Op("matmul_batched", lambda a, b: a @ b, np.matmul, [(2, 3, 4), (4, 5)]),
    Op("matmul_batched_both", lambda a, b: engine.matmul(a, b), np.matmul, [(2, 1, 3, 4), (3, 4, 2)]),
    Op("matmul_vec_mat", lambda a, b: a @ b, np.matmul, [(4,), (4, 3)]),
    Op("matmul_mat_vec", lambda a, b: a @ b, np.matmul, [(3, 4), (4,)]),
    Op("exp", engine.exp, np.exp, [(3, 4)]),
    Op("log", engine.log, np.log, [(3, 4)], domain=(0.2, 3.0)),
    Op("sqrt", engine.sqrt, np.sqrt, [(3, 4)], domain=(0.2, 3.0)),
    Op("abs", engine.abs, np.abs, [(3, 4)]),
    Op("tanh", engine.tanh, np.tanh, [(3, 4)]),
    Op("sigmoid", engine.sigmoid, lambda a: 1 / (1 + np.exp(-a)), [(3, 4)], domain=(-6.0, 6.0)),
    Op("relu", engine.relu, lambda a: np.maximum(a, 0), [(3, 4)]),
    Op("gelu", F.gelu, _gelu_ref, [(3, 4)], domain=(-3.0, 3.0)),
    Op("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), _gelu_tanh_ref, [(3, 4)], domain=(-3.0, 3.0)),
    Op("maximum", engine.maximum, np.maximum, [(3, 4), (4,)]),
    Op("minimum", engine.minimum, np.minimum, [(3, 4), (3, 1)]),
    Op("clip", lambda a: engine.clip(a, -0.5, 0.7), lambda a: np.clip(a, -0.5, 0.7), [(4, 5)]),
    Op("where", lambda a, b: engine.where(a > 0, a, b), lambda a, b: np.where(a > 0, a, b), [(3, 4), (4,)]),
    Op("sum_all", lambda a: a.sum(), np.sum, [(3, 4)]),
    Op("sum_axis", lambda a: a.sum(axis=1), lambda a: a.sum(axis=1), [(3, 4, 2)]),
    Op("sum_keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True),
       lambda a: a.sum(axis=(0, 2), keepdims=True), [(3, 4, 2)]),
    Op("mean_axis", lambda a: a.mean(axis=-1), lambda a: a.mean(axis=-1), [(3, 4)]),
    Op("max_all", lambda a: a.max(), np.max, [(3, 4)]),
    Op("max_axis", lambda a: a.max(axis=0).values, lambda a: a.max(axis=0), [(5, 3)]),
    Op("max_dim_values", lambda a: engine.max(a, 1)[0], lambda a: a.max(axis=1), [(4, 5)]),
    Op("min_keepdims", lambda a: a.min(axis=1, keepdims=True).values, lambda a: a.min(axis=1, keepdims=True), [(3, 4)]),
    Op("min_dim_keepdim", lambda a: a.min(dim=0, keepdim=True).values, lambda a: a.min(axis=0, keepdims=True),
       [(3, 4)]),
    Op("amax_dims", lambda a: engine.amax(a, dim=(0, 2)), lambda a: a.max(axis=(0, 2)), [(3, 4, 2)]),
    Op("max_two_tensors", lambda a, b: engine.max(a, b), np.maximum, [(3, 4), (4,)]),
    Op("min_two_tensors", lambda a, b: engine.min(a, b), np.minimum, [(3, 4), (3, 4)]),
    Op("sum_dim_keepdim", lambda a: a.sum(dim=1, keepdim=True), lambda a: a.sum(axis=1, keepdims=True), [(3, 4)]),
    Op("mean_dim_tuple", lambda a: engine.mean(a, dim=(0, 1)), lambda a: a.mean(axis=(0, 1)), [(3, 4, 2)]),
    Op("std_dim", lambda a: a.std(dim=1, keepdim=True), lambda a: a.std(axis=1, ddof=1, keepdims=True), [(3, 5)]),
    Op("var_unbiased_false", lambda a: engine.var(a, 0, False), lambda a: a.var(axis=0), [(4, 3)]),
    Op("prod_all", lambda a: a.prod(), np.prod, [(2, 3)]),
    Op("prod_dim", lambda a: engine.prod(a, dim=1), lambda a: a.prod(axis=1), [(3, 4)]),
    Op("prod_dim_keepdim", lambda a: a.prod(0, keepdim=True), lambda a: a.prod(axis=0, keepdims=True), [(3, 4)]),
    Op("sin", engine.sin, np.sin, [(3, 4)], domain=(-3.0, 3.0)),
    Op("cos", lambda a: a.cos(), np.cos, [(3, 4)], domain=(-3.0, 3.0)),
    Op("square", engine.square, np.square, [(3, 4)]),
    Op("pow_function", lambda a: engine.pow(a, 3), lambda a: a ** 3, [(3, 4)]),
    Op("pow_method_tensor", lambda a, b: a.pow(b), np.power, [(3, 4), (4,)], domain=(0.5, 2.0)),
    Op("norm_all", lambda a: engine.norm(a), np.linalg.norm, [(3, 4)]),
    Op("norm_dim", lambda a: a.norm(dim=1), lambda a: np.linalg.norm(a, axis=1), [(3, 4)]),
    Op("norm_dim_keepdim", lambda a: a.norm(2, dim=0, keepdim=True),
       lambda a: np.linalg.norm(a, axis=0, keepdims=True), [(3, 4)]),
    Op("norm_p1", lambda a: a.norm(p=1, dim=1), lambda a: np.abs(a).sum(axis=1), [(3, 4)]),
    Op("norm_p3", lambda a: a.norm(p=3), lambda a: (np.abs(a) ** 3).sum() ** (1 / 3), [(3, 4)]),
    Op("norm_fro", lambda a: a.norm(p="fro"), lambda a: np.linalg.norm(a, "fro"), [(3, 4)]),
    Op("mm", engine.mm, np.matmul, [(3, 4), (4, 2)]),
    Op("flatten_function", lambda a: engine.flatten(a, 1), lambda a: a.reshape(2, -1), [(2, 3, 4)]),
    Op("leaky_relu", lambda a: engine.nn.LeakyReLU(0.2)(a), lambda a: np.where(a > 0, a, 0.2 * a), [(3, 4)]),
    Op("relu_inplace_module", lambda a: engine.nn.ReLU(inplace=True)(a * 1), lambda a: np.maximum(a, 0), [(3, 4)]),
    Op("var", lambda a: a.var(axis=1), lambda a: a.var(axis=1, ddof=1), [(3, 5)]),
    Op("var_population", lambda a: a.var(correction=0), lambda a: a.var(), [(3, 5)]),
    Op("reshape", lambda a: a.reshape(4, -1), lambda a: a.reshape(4, -1), [(2, 3, 4)]),
    Op("flatten", lambda a: a.flatten(1), lambda a: a.reshape(2, -1), [(2, 3, 4)]),
    Op("transpose", lambda a: a.T, lambda a: a.T, [(3, 4)]),
    Op("permute", lambda a: a.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), [(2, 3, 4)]),
    Op("expand", lambda a: a.expand(3, 2, 4), lambda a: np.broadcast_to(a, (3, 2, 4)), [(2, 1)]),
    Op("unsqueeze_squeeze", lambda a: a.unsqueeze(1).squeeze(1), lambda a: a, [(3, 4)]),
    Op("getitem_slice", lambda a: a[1:, ::2], lambda a: a[1:, ::2], [(4, 5)]),
    Op("getitem_int_array", lambda a: a[IDX], lambda a: a[IDX], [(3, 4)]),
    Op("getitem_pairs", lambda a: a[np.arange(4), IDX], lambda a: a[np.arange(4), IDX], [(4, 3)]),
    Op("getitem_bool_mask", lambda a: a[a > 0], lambda a: a[a > 0], [(4, 3)]),
    Op("cat_dim", lambda a, b: engine.cat([a, b], dim=1), lambda a, b: np.concatenate([a, b], axis=1),
       [(2, 3), (2, 4)]),
    Op("stack_dim", lambda a, b: engine.stack([a, b], dim=-1), lambda a, b: np.stack([a, b], axis=-1),
       [(2, 3), (2, 3)]),
    Op("softmax_dim", lambda a: F.softmax(a, dim=0), lambda a: _softmax_ref(a, 0), [(3, 5)]),
    Op("log_softmax_dim_method", lambda a: a.log_softmax(dim=1), lambda a: np.log(_softmax_ref(a, 1)), [(3, 5)]),
    Op("concatenate", lambda a, b: engine.concatenate([a, b], axis=1),
       lambda a, b: np.concatenate([a, b], axis=1), [(2, 3), (2, 4)]),
    Op("stack", lambda a, b: engine.stack([a, b], axis=1), lambda a, b: np.stack([a, b], axis=1), [(2, 3), (2, 3)]),
    Op("softmax", lambda a: F.softmax(a, axis=-1), lambda a: _softmax_ref(a, -1), [(3, 5)]),
    Op("softmax_axis0", lambda a: F.softmax(a, axis=0), lambda a: _softmax_ref(a, 0), [(3, 5)]),
    Op("log_softmax", lambda a: F.log_softmax(a, axis=1), lambda a: np.log(_softmax_ref(a, 1)), [(3, 5)]),
    Op("linear", lambda x, w, b: F.linear(x, w, b), lambda x, w, b: x @ w.T + b, [(3, 4), (5, 4), (5,)]),
    Op("linear_no_bias", lambda x, w: F.linear(x, w), lambda x, w: x @ w.T, [(3, 4), (5, 4)]),
    Op("linear_3d_input", lambda x, w, b: F.linear(x, w, b), lambda x, w, b: x @ w.T + b, [(2, 3, 4), (5, 4), (5,)]),
    Op("linear_1d_input", lambda x, w, b: F.linear(x, w, b), lambda x, w, b: x @ w.T + b, [(4,), (5, 4), (5,)]),
    # convolution: odd sizes, batch 1, stride, padding, dilation, non-square kernels, groups, depthwise
    Op("conv2d", lambda x, w, b: F.conv2d(x, w, b), _conv2d_ref, [(2, 3, 5, 6), (4, 3, 3, 3), (4,)]),
    Op("conv2d_stride2_pad1_batch1", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
       lambda x, w, b: _conv2d_ref(x, w, b, 2, 1), [(1, 2, 7, 6), (3, 2, 3, 3), (3,)]),
    Op("conv2d_dilation_nonsquare", lambda x, w: F.conv2d(x, w, stride=(1, 2), padding=(1, 2), dilation=(2, 1)),
       lambda x, w: _conv2d_ref(x, w, None, (1, 2), (1, 2), (2, 1)), [(2, 2, 7, 8), (3, 2, 2, 3)]),
    Op("conv2d_groups2", lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
       lambda x, w, b: _conv2d_ref(x, w, b, 1, 1, 1, 2), [(2, 4, 5, 5), (6, 2, 3, 3), (6,)]),
    Op("conv2d_depthwise_same", lambda x, w: F.conv2d(x, w, padding="same", groups=3),
       lambda x, w: _conv2d_ref(x, w, None, 1, "same", 1, 3), [(2, 3, 6, 5), (3, 1, 3, 3)]),
    Op("conv2d_same_even_kernel_dilated", lambda x, w: F.conv2d(x, w, padding="same", dilation=(1, 2)),
       lambda x, w: _conv2d_ref(x, w, None, 1, "same", (1, 2)), [(1, 2, 5, 6), (2, 2, 2, 4)]),
    Op("conv2d_valid_unbatched", lambda x, w: F.conv2d(x, w, padding="valid"),
       lambda x, w: _conv2d_ref(x[None], w)[0], [(2, 5, 4), (3, 2, 3, 2)]),
    Op("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1),
       lambda x, w, b: _conv2d_ref(x[:, :, None], w[:, :, None], b, (1, 2), (0, 1))[:, :, 0],
       [(2, 3, 9), (4, 3, 3), (4,)]),
    Op("conv1d_groups_dilation", lambda x, w: F.conv1d(x, w, dilation=2, groups=2),
       lambda x, w: _conv2d_ref(x[:, :, None], w[:, :, None], None, 1, 0, (1, 2), 2)[:, :, 0],
       [(1, 4, 8), (2, 2, 2)]),
    # pooling
    Op("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda x: _pool2d_ref(x, "max", 2), [(2, 3, 7, 6)]),
    Op("max_pool2d_stride2_pad1", lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: _pool2d_ref(x, "max", 3, 2, 1),
       [(1, 2, 7, 6)]),
    Op("max_pool2d_ceil_dilation_nonsquare", lambda x: F.max_pool2d(x, (2, 3), 2, (1, 0), (2, 1), ceil_mode=True),
       lambda x: _pool2d_ref(x, "max", (2, 3), 2, (1, 0), (2, 1), ceil_mode=True), [(2, 2, 8, 7)]),
    Op("max_pool2d_module_unbatched", lambda x: engine.nn.MaxPool2d(2, stride=1)(x),
       lambda x: _pool2d_ref(x[None], "max", 2, 1)[0], [(2, 4, 5)]),
    Op("avg_pool2d", lambda x: F.avg_pool2d(x, 2), lambda x: _pool2d_ref(x, "avg", 2), [(2, 3, 7, 6)]),
    Op("avg_pool2d_pad_ceil", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
       lambda x: _pool2d_ref(x, "avg", 3, 2, 1, ceil_mode=True), [(1, 2, 6, 7)]),
    Op("avg_pool2d_exclude_pad", lambda x: engine.nn.AvgPool2d((3, 2), 2, 1, count_include_pad=False)(x),
       lambda x: _pool2d_ref(x, "avg", (3, 2), 2, 1, count_include_pad=False), [(2, 2, 7, 5)]),
    Op("adaptive_avg_pool2d_1", lambda x: engine.nn.AdaptiveAvgPool2d(1)(x), lambda x: _adaptive_avg_ref(x, 1),
       [(2, 3, 5, 4)]),
    Op("adaptive_avg_pool2d_uneven", lambda x: F.adaptive_avg_pool2d(x, (3, 4)), lambda x: _adaptive_avg_ref(x, (3, 4)),
       [(2, 2, 7, 6)]),
]


def _inputs(op: Op, seed: int = 0):
    rng = np.random.default_rng(seed)
    lo, hi = op.domain
    arrays = [rng.uniform(lo, hi, size=s) for s in op.shapes]
    for a in arrays:  # keep away from the kinks of abs/relu/max at 0
        a[np.abs(a) < 0.05] += 0.1
    return arrays


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
def test_forward_matches_float64_reference(op, device):
    arrays = _inputs(op)
    tensors = [engine.tensor(a, dtype=engine.float32, device=device) for a in arrays]
    out = op.fn(*tensors)
    expected = op.ref(*[a.astype(np.float32).astype(np.float64) for a in arrays])
    assert out.dtype == np.float32, f"{op.name} changed dtype to {out.dtype}"
    assert out.device == engine.device(device)
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [o for o in OPS if o.grad], ids=[o.name for o in OPS if o.grad])
@pytest.mark.slow
def test_gradient_matches_finite_differences(op, device):
    tensors = [engine.tensor(a, dtype=engine.float64, device=device) for a in _inputs(op, seed=1)]
    assert engine.gradcheck(op.fn, tensors, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_weight_grad_arrives_in_the_weights_layout(device):
    # A transposed weight gradient would make every accumulation into W.grad a strided pass.
    x = engine.randn(6, 4, device=device)
    w = engine.randn(3, 4, device=device, requires_grad=True)
    F.linear(x, w).sum().backward()
    assert w.grad._data.flags.c_contiguous
    F.linear(x, w).sum().backward()  # accumulates
    np.testing.assert_allclose(w.grad.numpy(), 2 * np.ones((6, 3)).T @ x.numpy(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4), (4,), (2, 0, 4), (2, 2, 3, 4)])
def test_linear_of_other_than_2d_input_is_one_node_with_torchs_gradients(shape):
    """An N-d input is flattened to rows inside the Linear node (no Reshape nodes around it), with
    the output shape and the gradients torch gives, a strided input too."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x0, w0, b0 = (rng.standard_normal(s) for s in (shape, (5, 4), (5,)))
    x, w, b = (engine.tensor(a, requires_grad=True) for a in (x0, w0, b0))
    y = F.linear(x, w, b)
    assert type(y.grad_fn).__name__ == "Linear" and y.grad_fn.inputs[0] is x
    g0 = rng.standard_normal(y.shape)
    y.backward(engine.tensor(g0))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x0, w0, b0))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(g0))
    assert y.shape == tuple(ty.shape)
    for ours, theirs in ((y, ty), (x.grad, tx.grad), (w.grad, tw.grad), (b.grad, tb.grad)):
        np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-12, atol=1e-12)
    xt = engine.tensor(rng.standard_normal((3, 4, 2)), requires_grad=True)  # (3, 2, 4) strided view
    F.linear(xt.transpose(1, 2), w).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), np.broadcast_to(w0.sum(0)[:, None], (3, 4, 2)), rtol=1e-12)


def test_linear_of_a_3d_input_modified_in_place_refuses_backward():
    """x is saved as a (rows, in) view of its array: an in-place change still fails backward."""
    x = engine.randn(2, 3, 4)
    w = engine.randn(5, 4, requires_grad=True)
    y = F.linear(x, w)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="Linear saved one of its inputs.*modified by an in-place operation"):
        y.sum().backward()


def test_comparisons_return_bool_without_grad():
    a = engine.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = engine.tensor([3.0, 2.0, 1.0])
    for result, expected in [(a < b, [1, 0, 0]), (a <= b, [1, 1, 0]), (a > b, [0, 0, 1]),
                             (a >= b, [0, 1, 1]), (a == b, [0, 1, 0]), (a != b, [1, 0, 1]), (a > 1.5, [0, 1, 1])]:
        assert result.dtype == np.bool_
        assert not result.requires_grad
        assert result.numpy().tolist() == [bool(v) for v in expected]
    assert engine.argmax(a).item() == 2 and a.argmin().item() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64, np.bool_])
def test_operators_of_one_dtype_agree_with_the_functional_ops(dtype):
    """``a + b``, ``a - b``, ``a * b`` and ``a @ b`` of two tensors of one dtype skip the functional
    layer (Tensor's operators call the op's Function): same values, dtype, grad_fn and errors."""
    rng = np.random.default_rng(3)
    a_np, b_np = (rng.standard_normal((3, 3)) * 3).astype(dtype), (rng.standard_normal((3, 3)) * 3).astype(dtype)
    grad = np.dtype(dtype).kind == "f"
    pairs = [(lambda a, b: a + b, engine.add), (lambda a, b: a - b, engine.sub), (lambda a, b: a * b, engine.mul),
             (lambda a, b: a @ b, engine.matmul), (lambda a, b: a @ b[:2], lambda a, b: engine.matmul(a, b[:2]))]
    for operator, functional in pairs:
        outcomes = []
        for op in (operator, functional):
            a = engine.tensor(a_np, requires_grad=grad)
            b = engine.tensor(b_np, requires_grad=grad)
            try:
                r = op(a, b)
            except Exception as e:  # noqa: BLE001  (the two paths must raise the same)
                outcomes.append((type(e), str(e)))
                continue
            grads = ()
            if grad:
                r.float().sum().backward()
                grads = (a.grad.numpy().tobytes(), b.grad.numpy().tobytes())
            outcomes.append((r.numpy().tobytes(), r.dtype, type(r.grad_fn), grads))
        assert outcomes[0] == outcomes[1]


def test_a_node_saving_one_memory_twice_records_and_tells_it_once():
    x = engine.randn(3, requires_grad=True)
    y = x * x
    assert len(y.grad_fn.saved_versions) == 1
    assert [r() for r in x._version._savers] == [y.grad_fn]
    with engine.no_grad():
        x.add_(1)
    with pytest.raises(engine.errors.GradError, match="modified by an in-place operation"):
        y.sum().backward()

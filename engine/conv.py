"""Convolution and pooling over (N, C, H, W) and (N, C, L) input, PyTorch's ``F.conv2d`` / ``F.max_pool2d`` family.

Every op views the (padded) input as sliding windows with ``as_strided`` (no copy), so one code
path serves numpy and cupy:

- ``conv2d`` copies the windows once into an im2col matrix and does one (grouped) GEMM; the
  input gradient goes back through the windows by a loop over the kh * kw kernel offsets, each
  adding one strided slice (col2im without a scatter).
- ``max_pool2d`` keeps the argmax offset of each window (the first maximum, as PyTorch) and its
  backward adds the gradient at that offset, again one strided slice per kernel offset.
- ``avg_pool2d`` sums the windows and divides by a per-position count computed on the host from
  the shapes alone (count_include_pad, ceil_mode overhang and divisor_override all reduce to it).
- ``adaptive_avg_pool2d`` is two averaging matrices, ``P_h @ x @ P_w.T``, so any output size works.

1-d variants run the 2-d Function with H = 1, after every check has been made in 1-d terms, so
that an error names the op the user called and the shapes the user passed.
"""

from __future__ import annotations

import numpy as np

from engine import backend, ops
from engine.kernels import accumulation_dtype
from engine.amp.autocast_mode import autocast_op
from engine.autograd import ON_CPU, Function
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, ShapeError, describe
from engine.tensor import Tensor

_SPATIAL = {1: "L", 2: "H, W"}  # the spatial dims of an n-d op's input, for messages
_KERNEL = {1: "k", 2: "kH, kW"}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _pair(op: str, name: str, value, n: int = 2) -> tuple:
    """An int, or a sequence of ``n`` ints (or of one), as a tuple of ``n`` ints (PyTorch's ``_pair``).

    Floats and bools are refused, not truncated: PyTorch's functional ops refuse them too, and ``int(1.5)``
    would silently run another geometry than the one asked for.
    """
    expected = f"{op}: {name} must be an int or a tuple of {n} int{'s' if n > 1 else ''}, got {value!r}"
    if _is_int(value):
        return (int(value),) * n
    try:
        values = tuple(value)
    except TypeError:
        raise TypeError(expected) from None
    if not all(_is_int(v) for v in values):
        raise TypeError(expected)
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise ValueError(expected)
    return tuple(int(v) for v in values)


def _batched(op: str, input, n: int) -> tuple[Tensor, bool]:
    """(N, C, *spatial) input as is, unbatched (C, *spatial) with a batch dim of 1 added; else raises."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.ndim == n + 1:
        return ops.unsqueeze(input, 0), True
    if input.ndim != n + 2:
        raise ShapeError(f"{op}: expected (N, C, {_SPATIAL[n]}) or unbatched (C, {_SPATIAL[n]}) input, "
                         f"got {describe(input)}")
    return input, False


def _require_nonempty(op: str, input: Tensor, x: Tensor, first: int) -> None:
    """Refuse a zero size in dims ``first``.. of the batched ``x``: as in PyTorch only the batch may be
    empty (a window over an empty dim would average nothing, or take the max of padding alone)."""
    if any(size == 0 for size in x.shape[first:]):
        dims = "channel or spatial dims" if first == 1 else "spatial dims"
        raise ShapeError(f"{op}: input {describe(input)} is empty in its {dims}; only the batch dim may be 0, "
                         "as in PyTorch")


def _positive(op: str, name: str, values: tuple) -> tuple:
    if any(v <= 0 for v in values):
        raise ValueError(f"{op}: {name} must be positive, got {values}")
    return values


def _unit_height(stride: tuple, dilation: tuple, out: tuple, pads: tuple) -> tuple:
    """A 1-d op's geometry as the 2-d Function's: an H of 1 that the window never moves along."""
    return (1,) + stride, (1,) + dilation, (1,) + out, ((0, 0),) + pads


def _check_float(op: str, input: Tensor) -> None:
    if not is_floating(input.dtype):
        raise DTypeError(f"{op}: input must be floating point, got {describe(input)}; convert with .float()")


def _windows(a, kernel: tuple, stride: tuple, dilation: tuple, out: tuple):
    """A read-only (N, C, oh, ow, kh, kw) view of the windows of ``a`` (N, C, H, W); no copy."""
    xp = backend.array_module(a)
    s_n, s_c, s_h, s_w = a.strides
    shape = a.shape[:2] + tuple(out) + tuple(kernel)
    strides = (s_n, s_c, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1])
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def _add_windows(target, grad_windows, kernel: tuple, stride: tuple, dilation: tuple, out: tuple) -> None:
    """``target`` (N, C, H, W) += each window's gradient (N, C, oh, ow, kh, kw), overlaps summed.

    One strided slice per kernel offset: kh * kw vectorised adds, no scatter and no atomics.
    """
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (oh - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (ow - 1) * sw + 1, sw)
            target[:, :, rows, cols] += grad_windows[..., i, j]


def _pad(a, pads: tuple, value=0):
    """Pad the last two dims by ((top, bottom), (left, right)); the array itself when no padding."""
    if not any(p for pair in pads for p in pair):
        return a
    xp = backend.array_module(a)
    return xp.pad(a, ((0, 0), (0, 0)) + tuple(pads), mode="constant", constant_values=value)


def _crop(a, pads: tuple, size: tuple):
    (top, _), (left, _) = pads
    return a[:, :, top:top + size[0], left:left + size[1]]


# ---- convolution ---------------------------------------------------------------------------------

def _grouped_matmul(a, b):
    """``a[g] @ b[g]`` for each group g. On numpy, one 2-D product per group: numpy's stacked matmul
    leaves BLAS when an operand is a transposed view (slower for the weight gradient; docs/benchmarks.md)."""
    xp = backend.array_module(a)
    if xp is not np:
        return backend.matmul(a, b, "conv")  # one strided-batched cuBLAS GEMM, transposed views in place
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=np.result_type(a, b))
    for group in range(a.shape[0]):
        np.matmul(a[group], b[group], out=out[group])
    return out


class Conv2d(Function):
    """Grouped 2-d cross-correlation (PyTorch's convolution) as im2col + one batched GEMM.

    16-bit GPU arrays are used as they are (``ON_CPU``, as ``linear``): the GEMMs run on them with
    float32 accumulation, and backward's sums (the overlapping windows of dx, db) are float32,
    each result rounded once; numpy ones go through float32 copies (Function.apply).
    """

    name = "conv2d"
    computes_in_float32 = ON_CPU

    def forward(self, x, weight, bias=None, *, stride, pads, dilation, groups, out):
        xp = backend.array_module(x)
        n, c, h, w = x.shape
        o, cg, kh, kw = weight.shape
        k = cg * kh * kw
        windows = _windows(_pad(x, pads), (kh, kw), stride, dilation, out)
        # (C, kh, kw, N, oh, ow) -> (groups, Cg*kh*kw, N*oh*ow): the one copy of the input
        cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(groups, k, n * out[0] * out[1])
        wmat = weight.reshape(groups, o // groups, k)
        result = _grouped_matmul(wmat, cols)  # (groups, O/g, N*oh*ow)
        result = xp.ascontiguousarray(result.reshape(o, n, *out).transpose(1, 0, 2, 3))
        if bias is not None:
            result += bias.reshape(1, o, 1, 1)  # in 16 bits: a second rounding, as linear's bias
        self.geometry = (x.shape, weight.shape, pads, stride, dilation, groups, out)
        self.dtype = x.dtype
        self.has_bias = bias is not None
        # cols is a copy, so in-place changes of x after forward cannot corrupt the weight gradient
        self.save(cols if self.needs_input_grad[1] else None, weight if self.needs_input_grad[0] else None)
        return result

    def backward(self, g):
        cols, weight = self.saved
        (n, c, h, w), (o, cg, kh, kw), pads, stride, dilation, groups, out = self.geometry
        xp = backend.array_module(g)
        g = g.astype(self.dtype, copy=False)  # the GEMMs take one dtype (16-bit operands on the GPU)
        acc = accumulation_dtype(g.dtype)  # float32 sums for 16-bit g
        gmat = g.transpose(1, 0, 2, 3).reshape(groups, o // groups, n * out[0] * out[1])
        grads = [None, None]
        if self.needs_input_grad[1]:
            grads[1] = _grouped_matmul(gmat, cols.transpose(0, 2, 1)).reshape(o, cg, kh, kw)
        if self.needs_input_grad[0]:
            wmat = weight.reshape(groups, o // groups, cg * kh * kw)
            gcols = _grouped_matmul(wmat.transpose(0, 2, 1), gmat).reshape(c, kh, kw, n, *out)
            padded = xp.zeros((n, c, h + sum(pads[0]), w + sum(pads[1])), dtype=acc)
            _add_windows(padded, gcols.transpose(3, 0, 4, 5, 1, 2), (kh, kw), stride, dilation, out)
            grads[0] = _crop(padded, pads, (h, w)).astype(g.dtype, order="C", copy=False)  # rounded once
        if self.has_bias:
            grads.append(g.sum(axis=(0, 2, 3), dtype=acc).astype(g.dtype, copy=False)
                         if self.needs_input_grad[2] else None)
        return tuple(grads)


# ---- convolution: checks and the functional ops -----------------------------------------------------

def _conv_padding(op: str, padding, kernel: tuple, stride: tuple, dilation: tuple) -> tuple:
    """PyTorch's padding argument (int, tuple, 'valid', 'same') as one (before, after) pair per dim."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * len(kernel)
        if padding != "same":
            raise ValueError(f"{op}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride}), "
                             "as in PyTorch")
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)  # PyTorch puts the odd one on the bottom/right
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    pad = _pair(op, "padding", padding, len(kernel))
    if any(p < 0 for p in pad):
        raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
    return tuple((p, p) for p in pad)


def _check_conv(op: str, input: Tensor, x: Tensor, weight: Tensor, bias, groups: int) -> None:
    """The conv checks, each naming ``op`` and the tensors as the user passed them (``x`` is
    ``input`` with its batch dim)."""
    out_channels, in_per_group, *kernel = weight.shape
    if any(k == 0 for k in kernel):
        raise ShapeError(f"{op}: kernel size must be greater than zero, got {tuple(kernel)} from weight "
                         f"{describe(weight)}")
    if out_channels == 0 or in_per_group == 0:
        raise ShapeError(f"{op}: weight {describe(weight)} has {out_channels} output channels and {in_per_group} "
                         "input channels per group; both must be at least 1")
    if x.shape[1] % groups or out_channels % groups:
        raise ShapeError(f"{op}: groups={groups} must divide both the input's {x.shape[1]} channels and the "
                         f"weight's {out_channels} output channels (input {describe(input)}, weight "
                         f"{describe(weight)})")
    if x.shape[1] != in_per_group * groups:
        raise ShapeError(f"{op}: input {describe(input)} has {x.shape[1]} channels but weight {describe(weight)} "
                         f"with groups={groups} expects {in_per_group * groups} (weight.shape[1] * groups)")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_channels,)):
        raise ShapeError(f"{op}: bias {describe(bias)} must have shape ({out_channels},), one per output channel")
    tensors = [t for t in (input, weight, bias) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise DeviceError(f"{op}: input, weight and bias are on different devices: "
                          f"{', '.join(describe(t) for t in tensors)}; move them to one device with .to(device)")
    if not all(is_floating(t.dtype) for t in tensors) or len({t.dtype for t in tensors}) > 1:
        raise DTypeError(f"{op}: input, weight and bias must share one floating dtype, got "
                         f"{', '.join(describe(t) for t in tensors)}; convert with .to(dtype)")


def _out_size(op: str, input: Tensor, padded: tuple, kernel: tuple, stride: tuple, dilation: tuple) -> tuple:
    effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    if any(p < e for p, e in zip(padded, effective)):
        raise ShapeError(f"{op}: padded input size per channel {padded} of input {describe(input)} is smaller than "
                         f"the (dilated) kernel size {effective}; the kernel can't be greater than the input")
    return tuple((p - e) // s + 1 for p, e, s in zip(padded, effective, stride))


def _conv(op: str, n: int, input: Tensor, weight: Tensor, bias, stride, padding, dilation, groups) -> Tensor:
    """The n-d convolution (n = 1 or 2): every check in the caller's terms, then the 2-d Function."""
    if not isinstance(weight, Tensor) or weight.ndim != n + 2:
        raise ShapeError(f"{op}: weight must be an (out_channels, in_channels / groups, {_KERNEL[n]}) Tensor, got "
                         f"{describe(weight)}")
    x, unbatched = _batched(op, input, n)
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    _check_conv(op, input, x, weight, bias, int(groups))
    _require_nonempty(op, input, x, 2)
    kernel = tuple(weight.shape[2:])
    stride = _positive(op, "stride", _pair(op, "stride", stride, n))
    dilation = _positive(op, "dilation", _pair(op, "dilation", dilation, n))
    pads = _conv_padding(op, padding, kernel, stride, dilation)
    padded = tuple(size + sum(p) for size, p in zip(x.shape[2:], pads))
    out = _out_size(op, input, padded, kernel, stride, dilation)
    if n == 1:
        x, weight = ops.unsqueeze(x, 2), ops.unsqueeze(weight, 2)
        stride, dilation, out, pads = _unit_height(stride, dilation, out, pads)
    params = dict(stride=stride, pads=pads, dilation=dilation, groups=int(groups), out=out)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    result = Conv2d.apply(*inputs, **params)
    if n == 1:
        result = ops.squeeze(result, 2)
    return ops.squeeze(result, 0) if unbatched else result


@autocast_op("conv2d")
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """2-d convolution (cross-correlation) of (N, C, H, W) input with (O, C / groups, kH, kW) weight.

    PyTorch's semantics: ``padding`` is an int, a pair, ``'valid'`` (none) or ``'same'`` (output as
    large as the input; stride 1 only, the odd extra row/column padded at the bottom/right);
    ``groups`` splits the channels into independent convolutions (``groups == C`` is depthwise).
    Unbatched (C, H, W) input gives (O, oH, oW). An empty batch gives an empty output; an empty
    kernel, channel or spatial dim, a stride or dilation below 1 and a negative padding raise.

    Example:
        >>> y = F.conv2d(x, w, b, stride=2, padding=1)   # x (N, 3, 32, 32), w (16, 3, 3, 3)  # doctest: +SKIP
    """
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


@autocast_op("conv1d")
def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """1-d convolution of (N, C, L) (or unbatched (C, L)) input with (O, C / groups, k) weight; arguments
    and checks as :func:`conv2d`'s, with ints (or 1-tuples) for the sizes."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


# ---- pooling ---------------------------------------------------------------------------------------

def _pool_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of one pooled dim, PyTorch's formula (a ceil-mode window must start inside
    the input or its left padding)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _default_stride(stride) -> bool:
    """PyTorch's ``stride=None`` or an empty sequence: the stride is the kernel size."""
    return stride is None or (not _is_int(stride) and hasattr(stride, "__len__") and len(stride) == 0)


def _pool_geometry(op: str, input: Tensor, spatial: tuple, kernel_size, stride, padding, dilation,
                   ceil_mode: bool) -> tuple:
    """(kernel, stride, dilation, out, pads) of a pooling op over ``spatial``, checked as PyTorch checks them.

    ``pads`` includes the extra bottom/right rows a ceil-mode window can overhang by.
    """
    n = len(spatial)
    kernel = _positive(op, "kernel_size", _pair(op, "kernel_size", kernel_size, n))
    stride = kernel if _default_stride(stride) else _positive(op, "stride", _pair(op, "stride", stride, n))
    dilation = _positive(op, "dilation", _pair(op, "dilation", dilation, n))
    pad = _pair(op, "padding", padding, n)
    if any(p < 0 for p in pad):
        raise ValueError(f"{op}: padding must be non-negative, got {pad}")
    if any(p > k // 2 for p, k in zip(pad, kernel)):  # PyTorch's rule, whatever the dilation
        raise ValueError(f"{op}: padding {pad} must be at most half of kernel_size {kernel}, as in PyTorch")
    out = tuple(_pool_size(s, k, st, p, d, ceil_mode) for s, k, st, p, d in zip(spatial, kernel, stride, pad,
                                                                              dilation))
    if any(o <= 0 for o in out):
        raise ShapeError(f"{op}: input {describe(input)} is too small for kernel_size={kernel}, stride={stride}, "
                         f"padding={pad}, dilation={dilation}: the output size would be {out}")
    pads = []
    for size, k, st, p, d, o in zip(spatial, kernel, stride, pad, dilation, out):
        overhang = max(0, (o - 1) * st + d * (k - 1) + 1 - (size + 2 * p))
        pads.append((p, p + overhang))
    return kernel, stride, dilation, out, tuple(pads)


class MaxPool2d(Function):
    """Window maxima; the gradient goes to the first maximum of each window, as in PyTorch.

    The caller finds the maxima and ``argmax`` (each window's offset of its maximum), which it
    also turns into ``return_indices``' indices, so the windows are read once whether or not a
    graph is recorded; this node keeps ``argmax`` for the backward.
    """

    name = "max_pool2d"

    def forward(self, x, *, values, argmax, kernel, stride, dilation, out, pads):
        self.argmax = argmax
        self.geometry = (x.shape, kernel, stride, dilation, out, pads)
        return values

    def backward(self, g):
        xp = backend.array_module(g)
        (n, c, h, w), kernel, stride, dilation, out, pads = self.geometry
        padded = xp.zeros((n, c, h + sum(pads[0]), w + sum(pads[1])), dtype=g.dtype)
        _add_windows(padded, _ArgmaxWindows(g, self.argmax, kernel[1]), kernel, stride, dilation, out)
        return xp.ascontiguousarray(_crop(padded, pads, (h, w)))


def _window_maxima(windows, kernel: tuple):
    """(maxima, argmax): each window's maximum and the offset (i * kw + j) of its first maximum
    (a NaN counts as the maximum, as in PyTorch)."""
    xp = backend.array_module(windows)
    flat = windows.reshape(windows.shape[:4] + (kernel[0] * kernel[1],))  # the one copy of the windows
    argmax = flat.argmax(axis=-1)
    return xp.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0], argmax


class _ArgmaxWindows:
    """``grad_windows[..., i, j]`` of max pooling: ``g`` where offset (i, j) is the argmax, else 0.

    Indexed by ``_add_windows`` one offset at a time, so the (N, C, oh, ow, kh, kw) array is never built.
    """

    def __init__(self, g, argmax, kernel_width: int):
        self.g, self.argmax, self.kernel_width = g, argmax, kernel_width

    def __getitem__(self, index):
        _, i, j = index
        xp = backend.array_module(self.g)
        return xp.where(self.argmax == i * self.kernel_width + j, self.g, 0)


def _max_indices(xp, argmax, shape: tuple, kernel, stride, dilation, out, pads):
    """PyTorch's return_indices: each maximum's flat index into the unpadded H * W plane (int64)."""
    i, j = argmax // kernel[1], argmax % kernel[1]
    rows = xp.arange(out[0]).reshape(-1, 1) * stride[0] + i * dilation[0] - pads[0][0]
    cols = xp.arange(out[1]).reshape(1, -1) * stride[1] + j * dilation[1] - pads[1][0]
    return (rows * shape[3] + cols).astype(np.int64)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max over (kH, kW) windows of (N, C, H, W) input; ``stride`` defaults to ``kernel_size``.

    Padding is implicit -inf (at most half the kernel, as PyTorch requires). With
    ``return_indices=True`` returns ``(values, indices)``, the indices flat into each H * W plane.
    """
    op = "max_pool2d"
    x, unbatched = _batched(op, input, 2)
    _check_float(op, input)
    _require_nonempty(op, input, x, 1)
    kernel, stride, dilation, out, pads = _pool_geometry(op, input, x.shape[2:], kernel_size, stride, padding,
                                                         dilation, ceil_mode)
    values, argmax = _window_maxima(_windows(_pad(x._data, pads, -np.inf), kernel, stride, dilation, out), kernel)
    result = MaxPool2d.apply(x, values=values, argmax=argmax, kernel=kernel, stride=stride, dilation=dilation,
                             out=out, pads=pads)
    result = ops.squeeze(result, 0) if unbatched else result
    if not return_indices:
        return result
    indices = Tensor(_max_indices(x.xp, argmax, x.shape, kernel, stride, dilation, out, pads))
    return result, (ops.squeeze(indices, 0) if unbatched else indices)


def _avg_counts(size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool) -> np.ndarray:
    """How many elements each output position of one dim averages over (PyTorch's divisor)."""
    start = np.arange(out) * stride - pad
    lo, hi = (-pad, size + pad) if include_pad else (0, size)
    return np.maximum(np.minimum(start + kernel, hi) - np.maximum(start, lo), 0)


class AvgPool2d(Function):
    """Window sums divided by a per-position count; the backward spreads ``g / count`` over each window."""

    name = "avg_pool2d"

    def forward(self, x, *, kernel, stride, out, pads, divisor):
        windows = _windows(_pad(x, pads), kernel, stride, (1, 1), out)
        self.divisor = backend.array_module(x).asarray(divisor, dtype=x.dtype)
        self.geometry = (x.shape, kernel, stride, out, pads)
        return windows.sum(axis=(4, 5)) / self.divisor

    def backward(self, g):
        xp = backend.array_module(g)
        (n, c, h, w), kernel, stride, out, pads = self.geometry
        share = xp.broadcast_to((g / self.divisor)[..., None, None], g.shape + tuple(kernel))
        padded = xp.zeros((n, c, h + sum(pads[0]), w + sum(pads[1])), dtype=g.dtype)
        _add_windows(padded, share, kernel, stride, (1, 1), out)
        return xp.ascontiguousarray(_crop(padded, pads, (h, w)))


def _avg_divisor(op: str, spatial: tuple, kernel: tuple, stride: tuple, pads: tuple, out: tuple,
                 count_include_pad: bool, divisor_override) -> np.ndarray:
    """What each output position of average pooling divides its window sum by."""
    if divisor_override is not None:
        if not _is_int(divisor_override) or divisor_override == 0:
            raise ValueError(f"{op}: divisor_override must be a non-zero int, got {divisor_override!r}")
        return np.full(out, float(divisor_override))
    counts = [_avg_counts(s, k, st, p[0], o, count_include_pad) for s, k, st, p, o in zip(spatial, kernel, stride,
                                                                                          pads, out)]
    return np.outer(counts[0], counts[1]).astype(np.float64)


def _avg_pool(op: str, n: int, input: Tensor, kernel_size, stride, padding, ceil_mode: bool,
              count_include_pad: bool, divisor_override=None) -> Tensor:
    """The n-d average pooling (n = 1 or 2): every check in the caller's terms, then the 2-d Function."""
    x, unbatched = _batched(op, input, n)
    _check_float(op, input)
    _require_nonempty(op, input, x, 1)
    kernel, stride, _, out, pads = _pool_geometry(op, input, x.shape[2:], kernel_size, stride, padding, 1,
                                                  ceil_mode)
    if n == 1:
        x, kernel = ops.unsqueeze(x, 2), (1,) + kernel
        stride, _, out, pads = _unit_height(stride, (1,), out, pads)
    divisor = _avg_divisor(op, x.shape[2:], kernel, stride, pads, out, count_include_pad, divisor_override)
    result = AvgPool2d.apply(x, kernel=kernel, stride=stride, out=out, pads=pads, divisor=divisor)
    if n == 1:
        result = ops.squeeze(result, 2)
    return ops.squeeze(result, 0) if unbatched else result


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """Mean over (kH, kW) windows of (N, C, H, W) input; ``stride`` defaults to ``kernel_size``.

    As in PyTorch, zero padding counts in the mean when ``count_include_pad`` (the default), the
    part of a ceil-mode window beyond the padding never does, and ``divisor_override`` replaces
    the count.
    """
    return _avg_pool("avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def avg_pool1d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> Tensor:
    """Mean over windows of length k of (N, C, L) or unbatched (C, L) input, as :func:`avg_pool2d` with H = 1.

    As in PyTorch a 2-D input is one unbatched (C, L) sample, so ``avg_pool1d(x, 2)`` on an (N, F)
    batch of flattened features halves F (the knowledge-distillation tutorial's use).
    """
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def _adaptive_matrix(size: int, out: int, dtype) -> np.ndarray:
    """(out, size) averaging matrix of adaptive pooling: row i averages [floor(i*size/out), ceil((i+1)*size/out))."""
    matrix = np.zeros((out, size), dtype=dtype)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _adaptive_output_size(op: str, output_size, spatial: tuple) -> tuple:
    """PyTorch's output_size (an int, None, or one int or None per spatial dim; None keeps that dim)
    as a tuple of non-negative ints."""
    n = len(spatial)
    sizes = (output_size,) * n if output_size is None or _is_int(output_size) else output_size
    try:
        sizes = tuple(sizes)
    except TypeError:
        sizes = ()
    if len(sizes) != n or not all(s is None or _is_int(s) for s in sizes):
        raise TypeError(f"{op}: output_size must be an int, None or a tuple of {n} ints or Nones, got "
                        f"{output_size!r}")
    sizes = tuple(size if s is None else int(s) for s, size in zip(sizes, spatial))
    if any(s < 0 for s in sizes):
        raise ValueError(f"{op}: output_size must be non-negative, got {output_size!r}")
    return sizes


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """Average pooling to a fixed (oH, oW) output whatever the input's size (PyTorch's windows:
    row i covers [floor(i H / oH), ceil((i + 1) H / oH)) ). ``None`` in ``output_size`` keeps that dim.

    Computed as ``P_h @ x @ P_w.T`` with constant averaging matrices, so every size works and the
    gradient is the matrices' transpose. As in PyTorch an empty batch or channel dim gives an empty
    output and an empty H or W raises (there is nothing to average).
    """
    op = "adaptive_avg_pool2d"
    x, unbatched = _batched(op, input, 2)
    _check_float(op, input)
    _require_nonempty(op, input, x, 2)
    oh, ow = _adaptive_output_size(op, output_size, x.shape[2:])
    h, w = x.shape[2:]
    if (oh, ow) == (1, 1):
        result = ops.mean(x, dim=(2, 3), keepdim=True)
    else:
        p_h = Tensor(_adaptive_matrix(h, oh, x.dtype), device=x.device)
        p_w = Tensor(_adaptive_matrix(w, ow, x.dtype).T.copy(), device=x.device)
        result = ops.matmul(ops.matmul(p_h, x), p_w)
    return ops.squeeze(result, 0) if unbatched else result

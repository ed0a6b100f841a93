"""Convolution and pooling layers: Conv1d, Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (PyTorch's
names, arguments, initialisation, attributes and state-dict keys)."""

from __future__ import annotations

import math

from engine import functional as F
from engine.conv import _is_int, _pair, _positive
from engine.nn import init
from engine.nn.module import Module, Parameter
from engine.tensor import Tensor, empty


class _ConvNd(Module):
    """What Conv1d and Conv2d share: arguments, parameters and PyTorch's default initialisation."""

    _dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        name, n = type(self).__name__, self._dims
        if not _is_int(groups) or groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: groups={groups!r} must be a positive int and divide "
                             f"in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode={padding_mode!r} is not implemented; only 'zeros' "
                                      "(pad explicitly with engine ops before a padding=0 convolution instead)")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
            if padding == "same" and any(s != 1 for s in _pair(name, "stride", stride, n)):
                raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        # Checked here, before any parameter exists (PyTorch defers these to the first forward).
        self.kernel_size = _positive(name, "kernel_size", _pair(name, "kernel_size", kernel_size, n))
        self.stride = _positive(name, "stride", _pair(name, "stride", stride, n))
        self.padding = padding if isinstance(padding, str) else _pair(name, "padding", padding, n)
        if not isinstance(padding, str) and any(p < 0 for p in self.padding):
            raise ValueError(f"{name}: padding must be non-negative, got {padding!r}")
        self.dilation = _positive(name, "dilation", _pair(name, "dilation", dilation, n))
        self.padding_mode = padding_mode
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(empty(*shape, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(empty(out_channels, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default: weight from kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        with fan_in = in_channels / groups * prod(kernel_size), and the bias from the same bound."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._dims:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self._dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class Conv2d(_ConvNd):
    """2-d convolution over (N, C, H, W) input (or unbatched (C, H, W)), as PyTorch's ``nn.Conv2d``.

    Args:
        in_channels, out_channels: C in and out.
        kernel_size, stride, dilation: int or (h, w) pair.
        padding: int, (h, w) pair, ``'valid'`` or ``'same'`` (stride 1 only).
        groups: split channels into this many independent convolutions (``in_channels``: depthwise).
        bias: learn a per-output-channel bias.
        padding_mode: only ``'zeros'``; others raise NotImplementedError.
        device, dtype: where and in which floating dtype to create the parameters.

    Example:
        >>> conv = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)   # doctest: +SKIP
        >>> conv(x).shape   # x (64, 1, 28, 28) -> (64, 16, 14, 14)         # doctest: +SKIP
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(_ConvNd):
    """1-d convolution over (N, C, L) input (or unbatched (C, L)), as PyTorch's ``nn.Conv1d``;
    arguments as Conv2d's, with ints for the sizes."""

    _dims = 1

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding if isinstance(self.padding, str) else self.padding[0]
        return F.conv1d(x, self.weight, self.bias, self.stride[0], padding, self.dilation[0], self.groups)


class MaxPool2d(Module):
    """Max over (kH, kW) windows (``F.max_pool2d``); ``stride`` defaults to ``kernel_size``."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), bool(ceil_mode)

    def forward(self, x: Tensor):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                            self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """Mean over (kH, kW) windows (``F.avg_pool2d``); ``stride`` defaults to ``kernel_size``."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.ceil_mode = padding, bool(ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (``F.adaptive_avg_pool2d``): int, pair, None keeps a dim."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"

"""Linear layers: ``linear`` and the fused ``linear_relu`` (kernels.linear_relu_*)."""

from __future__ import annotations

import math

import numpy as np

from engine import kernels
from engine import backend, dtypes, ops
from engine.amp.autocast_mode import autocast_op
from engine.autograd import ON_CPU, Function, unbroadcast
from engine.kernels import accumulation_dtype
from engine.errors import DTypeError, ShapeError, describe
from engine.ops import relu
from engine.tensor import Tensor
from engine.functional._common import _contiguous, _contiguous_tensor, _use_fused


def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    # Read from the arrays (what Tensor.shape and .dtype return): the properties build a tuple or
    # run a Python call each, and this runs on every layer call.
    xd, wd = x._data, weight._data
    if wd.ndim != 2 or xd.ndim < 1 or xd.shape[-1] != wd.shape[1]:
        raise ShapeError(f"{op}: input {describe(x)} does not fit weight {describe(weight)}: the input's last "
                         f"dim must equal weight.shape[1] (weight is (out_features, in_features))")
    if bias is not None and bias._data.shape != (wd.shape[0],):
        raise ShapeError(f"{op}: bias {describe(bias)} must have shape ({weight.shape[0]},)")
    dtype = xd.dtype
    if wd.dtype != dtype or (bias is not None and bias._data.dtype != dtype):
        tensors = [t for t in (x, weight, bias) if t is not None]
        raise DTypeError(f"{op}: dtypes differ: {', '.join(describe(t) for t in tensors)}; convert with .to(dtype)")
    if dtype == np.bool_:
        raise DTypeError(f"{op}: bool operands are not supported (as in PyTorch): {describe(x)} and "
                         f"{describe(weight)}; convert with .float()")


class Linear(Function):
    """``x @ W.T + b`` as one node (the GEMM and the bias add share it), for x of any number of dims.

    Built from matmul and transpose, W's gradient would arrive transposed (``(x.T @ g).T``) and
    accumulating it into ``W.grad`` would be a strided pass over the largest array of the step;
    here it is made in W's own layout, ``g.T @ x``. An x of other than two dims is flattened to
    (N, in_features) on the arrays, inside the node: two Reshape nodes per call would cost a
    Transformer ~50 nodes per step (and decode ~34 per token) for nothing but bookkeeping.
    """

    name = "linear"
    # 16-bit GPU arrays go to cuBLAS as they are (float32 accumulation on tensor cores, x and W
    # saved in 16 bits); numpy ones are computed in float32 and rounded once (Function.apply).
    computes_in_float32 = ON_CPU
    x_shape = None  # x's shape where forward flattened it to rows (x not 2-D)

    def forward(self, x, weight, bias=None):
        lead = x.shape[:-1]
        if len(lead) != 1:  # a view where x's layout allows, else a copy (as ops.reshape)
            self.x_shape = x.shape
            x = x.reshape(math.prod(lead), x.shape[-1])  # 1 row for a 1-D x
        self.saved = (x, weight)  # self.save's work, without its call
        self.has_bias = bias is not None
        backend.size_cpu_gemm(x, x.shape[0], weight.shape[0], x.shape[1])
        out = backend.matmul(x, weight.T, "linear")
        if bias is not None:
            out += bias  # in 16 bits: computed in float32 and rounded again (docs/precision.md)
        return out if len(lead) == 1 else out.reshape(lead + (weight.shape[0],))

    def backward(self, g):
        x, weight = self.saved
        g = g.astype(x.dtype, copy=False)  # the GEMMs take one dtype (16-bit operands on the GPU)
        x_shape = self.x_shape
        if x_shape is not None:
            g = g.reshape(x.shape[0], weight.shape[0])
        backend.size_cpu_gemm(x, x.shape[0], weight.shape[0], x.shape[1])
        gx = backend.matmul(g, weight, "linear") if self.needs_input_grad[0] else None
        if gx is not None and x_shape is not None:
            gx = gx.reshape(x_shape)
        gw = backend.matmul(g.T, x, "linear") if self.needs_input_grad[1] else None
        if not self.has_bias:
            return gx, gw
        # db: the column sums of g, accumulated in float32 for 16-bit g and rounded once.
        gb = _bias_grad(g, weight.shape[:1]) if self.needs_input_grad[2] else None
        return gx, gw, gb


def _bias_grad(g, shape):
    """Linear's db: on the GPU one fixed-order column-sum pass (kernels.gpu_bias_grad: one or two
    launches; cupy's ``sum(0)`` costs a reduction launch with far more host work), elsewhere, and
    for a g the kernel does not take (strided, another dtype), ``unbroadcast``."""
    if type(g) is not np.ndarray and g.ndim == 2 and g.flags.c_contiguous and g.dtype in _BIAS_GRAD_DTYPES:
        return kernels.gpu_bias_grad(g)
    return unbroadcast(g, shape, accumulation_dtype(g.dtype))


_BIAS_GRAD_DTYPES = frozenset(np.dtype(d) for d in ("float32", "float64", "float16", dtypes.bfloat16))


@autocast_op("linear")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``, weight of shape (out_features, in_features) as in PyTorch.

    Inputs with more than two dims (or one) are computed as (N, in_features) rows, inside one node.
    """
    _check_linear("linear", x, weight, bias)
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


class LinearReLU(Function):
    """relu(x @ W.T + b) through kernels.linear_relu_forward/backward; saves only x, W and y.

    The kernels take float16 / bfloat16 arrays themselves (float32 accumulation, each result rounded
    once: the rule ``Function.apply`` applies), so 16-bit tensors reach them as they are, with no
    float32 copies, and the saved arrays stay 16-bit.
    """

    name = "linear_relu"
    computes_in_float32 = False  # the kernels do it

    def forward(self, x, weight, bias=None):
        out = kernels.linear_relu_forward(x, weight, bias)
        self.save(x, weight, out)
        self.has_bias = bias is not None
        return out

    def backward(self, g):
        x, weight, out = self.saved
        g = _contiguous(g).astype(out.dtype, copy=False)  # the kernels take one dtype
        gx, gw, gb = kernels.linear_relu_backward(g, x, weight, out, compute_grad_x=self.needs_input_grad[0])
        return (gx, gw, gb) if self.has_bias else (gx, gw)


@autocast_op("linear_relu")
def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, fused: bool | None = None) -> Tensor:
    """``relu(x @ weight.T + bias)``, fused into one kernel pair on both devices.

    Inputs with more than two dims are flattened to (N, in_features) and reshaped back.
    """
    _check_linear("linear_relu", x, weight, bias)
    if not _use_fused(fused):
        return relu(linear(x, weight, bias))
    lead = x.shape[:-1]
    flat = x if x.ndim == 2 else ops.reshape(x, (-1, x.shape[-1]))
    inputs = (flat, weight) if bias is None else (flat, weight, bias)
    out = LinearReLU.apply(*(_contiguous_tensor(t) for t in inputs))
    return out if x.ndim == 2 else ops.reshape(out, lead + (weight.shape[0],))

"""Normalization: ``layer_norm`` (the fused layer_norm kernels, or the LayerNorm Function)."""

from __future__ import annotations

import math

import numpy as np

from engine import kernels
from engine import dtypes, ops
from engine.amp.autocast_mode import autocast_op
from engine.autograd import Function
from engine.backend import array_module
from engine.dtypes import is_floating
from engine.errors import DTypeError, ShapeError, describe
from engine.tensor import Tensor
from engine.functional._common import _contiguous, _contiguous_tensor, _use_fused


class LayerNorm(Function):
    """Layer normalisation over the trailing ``len(axes)`` dims, with an analytic backward.

    A Function rather than a composite of mean/var/sub/mul ops: forward saves only the
    normalised input and the reciprocal std (a composite keeps about six intermediates and a
    dozen graph nodes), and the backward is the textbook formula
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``, checked by gradcheck.
    Both formulas are the numpy reference kernel's (``kernels.layer_norm_normalize`` and
    ``kernels.layer_norm_input_grad``), here over any trailing axes and on numpy or cupy arrays.
    """

    name = "layer_norm"

    def forward(self, x, *affine, axes=(), eps=1e-5, has_weight=False, has_bias=False):
        weight = affine[0] if has_weight else None
        bias = affine[-1] if has_bias else None
        out, xhat, _, rstd = kernels.layer_norm_normalize(array_module(x), x, weight, bias, axes=axes, eps=eps)
        self.save(xhat, rstd, weight)
        self.axes, self.has_bias = axes, has_bias
        return out

    def backward(self, g):
        xhat, rstd, weight = self.saved
        lead = tuple(range(g.ndim - len(self.axes)))
        grads = []
        if self.needs_input_grad[0]:
            gxhat = g if weight is None else g * weight
            grads.append(kernels.layer_norm_input_grad(gxhat, xhat, rstd, axes=self.axes))
        else:
            grads.append(None)
        if weight is not None:
            grads.append((g * xhat).sum(axis=lead) if self.needs_input_grad[1] else None)
        if self.has_bias:
            grads.append(g.sum(axis=lead) if self.needs_input_grad[-1] else None)
        return tuple(grads)


@autocast_op("layer_norm")
def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, fused: bool | None = None) -> Tensor:
    """Normalise over the last ``len(normalized_shape)`` dims, then scale by weight and add bias.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, as PyTorch.

    Args:
        input: (..., *normalized_shape).
        normalized_shape: int or tuple, the trailing shape to normalise over.
        weight, bias: optional tensors of shape ``normalized_shape``.
        eps: added to the variance for stability.
        fused: use the layer_norm kernels on the rows flattened to (N, D) (default:
            ``fused_enabled()``); the unfused path is the LayerNorm Function here.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or input.shape[input.ndim - len(shape):] != shape or input.ndim < len(shape):
        raise ShapeError(f"layer_norm: normalized_shape {shape} must be the trailing dims of the input "
                         f"{describe(input)} and not empty")
    if not is_floating(input.dtype):
        raise DTypeError(f"layer_norm: input must be floating point, got {describe(input)}")
    # PyTorch's mixed dtype (CPU) rule: float32 weight and bias with a 16-bit input (a LayerNorm after a
    # Linear under autocast); the result keeps the input's dtype, each gradient its tensor's dtype.
    param_dtypes = {input.dtype, np.dtype(np.float32)} if dtypes.is_low_precision(input.dtype) else {input.dtype}
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != shape or t.dtype not in param_dtypes or t.device != input.device):
            raise ShapeError(f"layer_norm: {name} {describe(t)} must have shape {shape} and the input's dtype (or "
                             f"float32 for a float16/bfloat16 input) and device ({describe(input)})")
    affine = [t for t in (weight, bias) if t is not None]
    flags = dict(eps=float(eps), has_weight=weight is not None, has_bias=bias is not None)
    width = math.prod(shape)
    if _use_fused(fused) and input.dtype in _LAYER_NORM_KERNEL_DTYPES and width > 0:
        rows = _contiguous_tensor(ops.reshape(input, (-1, width)))
        flat_affine = [ops.reshape(t, (width,)) if t.ndim != 1 else t for t in affine]
        out = FusedLayerNorm.apply(rows, *(_contiguous_tensor(t) for t in flat_affine), **flags)
        return ops.reshape(out, input.shape)
    axes = tuple(range(input.ndim - len(shape), input.ndim))
    return LayerNorm.apply(input, *affine, axes=axes, **flags)


# The dtypes kernels.layer_norm_* take: float16 and bfloat16 natively (float32 statistics and sums,
# one rounding where y and dx are stored), with weight and bias in the input's dtype or float32.
_LAYER_NORM_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16),
                             np.dtype(dtypes.bfloat16))


class FusedLayerNorm(Function):
    """Layer norm of (N, D) rows through kernels.layer_norm_forward/backward.

    Saves x and the per-row mean and rstd (N,) instead of a normalised (N, D) copy; the backward
    kernel recomputes xhat from them and reduces dweight / dbias in one pass over the rows. The
    kernels take a float16 / bfloat16 x (and float32 or 16-bit weight and bias) themselves, so
    ``apply`` hands them the 16-bit arrays as they are: no float32 copy of the rows, x saved in
    16 bits, mean and rstd in float32.
    """

    name = "layer_norm"
    computes_in_float32 = False  # the kernels compute 16-bit inputs in float32 themselves

    def forward(self, x, *affine, eps=1e-5, has_weight=False, has_bias=False):
        weight = affine[0] if has_weight else None
        bias = affine[-1] if has_bias else None
        y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, eps=eps)
        self.save(x, weight, mean, rstd)
        self.has_weight, self.has_bias = has_weight, has_bias
        self.bias_dtype = None if bias is None else bias.dtype
        return y

    def backward(self, g):
        x, weight, mean, rstd = self.saved
        # the gradient in y's dtype, as PyTorch casts an incoming gradient to its output's dtype
        g = g.astype(x.dtype, order="C") if g.dtype != x.dtype else _contiguous(g)
        wants_affine = any(self.needs_input_grad[1:])
        gx, gw, gb = kernels.layer_norm_backward(g, x, weight, mean, rstd, compute_weight_grads=wants_affine)
        grads = [gx if self.needs_input_grad[0] else None]
        if self.has_weight:
            grads.append(gw if self.needs_input_grad[1] else None)
        if self.has_bias:
            # Without a weight the kernel returns no column sums: the bias gradient is g's, summed
            # in float32 for a 16-bit g. The kernel's sums come in weight's dtype.
            wanted = self.needs_input_grad[-1]
            if gb is None and wanted:
                gb = g.sum(axis=0, dtype=dtypes.COMPUTE_DTYPE if dtypes.is_low_precision(g.dtype) else g.dtype)
            grads.append(gb.astype(self.bias_dtype, copy=False) if wanted else None)
        return tuple(grads)

"""Functional API (``import engine.functional as F``): activations, linear layers, losses.

``linear_relu`` and ``cross_entropy`` run the fused kernels of kernels/ on both devices. The
unfused composition of core ops stays available with ``fused=False`` or, for a whole block of
code, ``with F.fused_kernels(False):`` so fused-vs-reference parity can be tested end to end.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from engine import kernels
from engine import backend, backends, dtypes, indexing, ops
from engine.amp.autocast_mode import autocast_op
from engine.autograd import Function, is_grad_enabled, is_unit_seed, unbroadcast
from engine.backend import array_module
from engine.conv import adaptive_avg_pool2d, avg_pool1d, avg_pool2d, conv1d, conv2d, max_pool2d  # noqa: F401  (public API)
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, EngineError, ShapeError, describe
from engine.ops import gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh  # noqa: F401  (public API)
from engine.ops import fused_enabled, fused_kernels  # noqa: F401  (public API; ops.GELU reads it too)
from engine.tensor import Tensor
from engine.kernels.cpu.attention import GPU_DTYPES as _ATTENTION_GPU_DTYPES
from engine.kernels.cpu.attention import GPU_MAX_HEAD_DIM as _ATTENTION_GPU_MAX_HEAD_DIM
from engine.kernels.cpu.attention import default_scale as _attention_default_scale
from engine.kernels.precision import accumulation_dtype

def _use_fused(fused: bool | None) -> bool:
    return fused_enabled() if fused is None else fused


# ---- linear layers ------------------------------------------------------------------------------

def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"{op}: input {describe(x)} does not fit weight {describe(weight)}: the input's last "
                         f"dim must equal weight.shape[1] (weight is (out_features, in_features))")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"{op}: bias {describe(bias)} must have shape ({weight.shape[0]},)")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        raise DTypeError(f"{op}: dtypes differ: {', '.join(describe(t) for t in tensors)}; convert with .to(dtype)")
    if x.dtype == np.bool_:
        raise DTypeError(f"{op}: bool operands are not supported (as in PyTorch): {describe(x)} and "
                         f"{describe(weight)}; convert with .float()")


class Linear(Function):
    """``x @ W.T + b`` for 2-D x as one node (the GEMM and the bias add share it).

    Built from matmul and transpose, W's gradient would arrive transposed (``(x.T @ g).T``) and
    accumulating it into ``W.grad`` would be a strided pass over the largest array of the step;
    here it is made in W's own layout, ``g.T @ x``.
    """

    name = "linear"

    def forward(self, x, weight, bias=None):
        self.save(x, weight)
        self.has_bias = bias is not None
        backend.size_cpu_gemm(x, x.shape[0], weight.shape[0], x.shape[1])
        out = x @ weight.T
        if bias is not None:
            out += bias
        return out

    def backward(self, g):
        x, weight = self.saved
        backend.size_cpu_gemm(x, x.shape[0], weight.shape[0], x.shape[1])
        gx = g @ weight if self.needs_input_grad[0] else None
        gw = g.T @ x if self.needs_input_grad[1] else None
        if not self.has_bias:
            return gx, gw
        return gx, gw, (g.sum(axis=0) if self.needs_input_grad[2] else None)


@autocast_op("linear")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``, weight of shape (out_features, in_features) as in PyTorch.

    Inputs with more than two dims (or one) are flattened to (N, in_features) and reshaped back.
    """
    _check_linear("linear", x, weight, bias)
    lead = x.shape[:-1]
    flat = x if x.ndim == 2 else ops.reshape(x, (-1, x.shape[-1]))
    out = Linear.apply(flat, weight) if bias is None else Linear.apply(flat, weight, bias)
    return out if x.ndim == 2 else ops.reshape(out, lead + (weight.shape[0],))


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


def _contiguous(a):
    return a if a.flags.c_contiguous else a.copy(order="C")


def _contiguous_tensor(t: Tensor) -> Tensor:
    return t if t._data.flags.c_contiguous else ops.clone(t)


# ---- cross-entropy ------------------------------------------------------------------------------

class SoftmaxCrossEntropy(Function):
    """Loss and gradient in one kernel pass; backward only rescales the saved gradient.

    Nothing here reads a device value on the host: the 'mean' denominator (the weight sum of the
    non-ignored rows; for unweighted class indices, their count, which the kernel itself takes in
    the pass that checks the targets: ``denominator_out``) and its reciprocal stay on the device,
    where the kernel reads the scale
    (``grad_scale`` as a one-element array), and backward skips the multiply by the incoming
    gradient when it is backward()'s own unit seed rather than asking the device whether it is 1.

    float16 / bfloat16 logits go to the kernel as they are: it computes in float32, returns the
    per-row loss in float32 and the gradient rounded once to the logits' dtype. The denominator,
    the scale and the reduction run in float32 too, and the result is rounded once to the logits'
    dtype, which is the loss dtype PyTorch returns.
    """

    name = "cross_entropy"
    computes_in_float32 = False  # the kernel does it

    def forward(self, logits, targets=None, weight=None, ignore_index=-100, label_smoothing=0.0,
                reduction="mean", compute_grad=True):
        xp = array_module(logits)
        acc = accumulation_dtype(logits.dtype)
        extra = {}
        if reduction == "mean" and targets.ndim == 1 and weight is None:  # counted by the kernel's target pass
            denominator, scale = xp.empty(1, dtype=acc), 1.0
            extra["denominator_out"] = denominator
        elif reduction == "mean":
            denominator = _mean_denominator(xp, logits, targets, weight, ignore_index, acc)
            scale = _reciprocal_or_zero(xp, denominator)
        else:
            denominator, scale = None, 1.0
        loss, self.grad = kernels.softmax_cross_entropy(
            logits, targets, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
            grad_scale=scale, compute_grad=compute_grad, **extra)
        self.reduction = reduction
        if reduction == "none":
            return loss.astype(logits.dtype, copy=False)
        total = loss.sum(dtype=acc)
        if reduction == "sum":
            return xp.asarray(total).astype(logits.dtype, copy=False)
        # Every row ignored: 0 / 0 = NaN, as in PyTorch.
        with np.errstate(invalid="ignore", divide="ignore"):
            return xp.asarray(total / denominator.reshape(())).astype(logits.dtype, copy=False)

    def backward(self, g):
        if self.reduction == "none":
            return self.grad * g[:, None]
        return self.grad if is_unit_seed(g) else self.grad * g


def _mean_denominator(xp, logits, targets, weight, ignore_index, dtype):
    """What 'mean' divides by (PyTorch): the weight sum of non-ignored rows, or N for soft targets.

    A one-element array of ``dtype`` (the logits' accumulation dtype: float32 for 16-bit logits,
    where a count above 256 would not be exact in bfloat16) on their device: computed there,
    never read back.
    """
    if targets.ndim == 2:
        return xp.full(1, logits.shape[0], dtype=dtype)
    valid = targets != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype).reshape(1)
    safe = xp.where(valid, targets, 0)
    return (weight[safe].astype(dtype, copy=False) * valid).sum(dtype=dtype).reshape(1)


def _reciprocal_or_zero(xp, denominator):
    """1 / denominator, or 0 where it is 0 (every row ignored: the gradient is all zeros)."""
    positive = denominator > 0
    return positive / xp.where(positive, denominator, denominator.dtype.type(1))


@autocast_op("cross_entropy")
def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, fused: bool | None = None) -> Tensor:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits (N, C), or (N, C, d1, ...) with the class dim second, or (C,).
        target: class indices (N,) / (N, d1, ...) of an integer dtype, or class probabilities
            with the same shape as ``input`` (soft targets; no gradient flows into them).
        weight: optional (C,) class weights for class imbalance.
        ignore_index: rows with this target contribute nothing (integer targets).
        reduction: "mean", "sum" or "none".
        label_smoothing: blends the target with the uniform distribution, in [0, 1].
        fused: use the fused kernel (default: ``fused_enabled()``).

    Raises:
        DTypeError: class-index targets of a non-integer dtype (bool, complex, strings ...).
        kernels.KernelError: a class index outside [0, C) that is not ``ignore_index`` (named
            with its position and value, uint64 values near 2**64 included), or an
            ``ignore_index`` that is not an int64. Both paths (fused or not) raise the same
            error: at the call on the CPU, at the next sync point on a GPU.

    Example:
        >>> loss = F.cross_entropy(logits, labels, label_smoothing=0.1)   # doctest: +SKIP
    """
    logits, targets, w = _cross_entropy_inputs(input, target, weight, reduction, label_smoothing, ignore_index)
    if _use_fused(fused):
        out = SoftmaxCrossEntropy.apply(logits, targets=targets, weight=w, ignore_index=ignore_index,
                                        label_smoothing=float(label_smoothing), reduction=reduction,
                                        compute_grad=is_grad_enabled() and logits.requires_grad)
    else:
        out = _cross_entropy_reference(logits, targets, w, ignore_index, reduction, float(label_smoothing))
    return _restore_shape(out, input, target, reduction)


def _cross_entropy_inputs(input, target, weight, reduction, label_smoothing, ignore_index=-100):
    """Validate and bring the inputs to rows: logits (M, C) tensor, targets (M,) or (M, C) array.

    Both paths (fused kernel and unfused reference) take their targets from here, so both refuse
    the same bad targets with the same error: an integer dtype is required, and on the CPU a class
    index outside [0, C) that is not ``ignore_index`` raises KernelError at once, naming it (on a
    GPU the fused kernel, or the reference, checks on the device and raises at the next sync).
    """
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)) \
            or not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise kernels.KernelError(f"cross_entropy: ignore_index must be an int in the int64 range, got "
                                  f"{ignore_index!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(target, Tensor):
        target = Tensor(np.asarray(target), device=input.device)
    if target.device != input.device:
        raise DeviceError(f"cross_entropy: input {describe(input)} and target {describe(target)} are on "
                         "different devices; move the target with .to(input.device)")
    if not is_floating(input.dtype):
        raise DTypeError(f"cross_entropy: input must be floating point logits, got {describe(input)}")
    soft = is_floating(target.dtype)
    if not soft and np.dtype(target.dtype).kind not in "iu":
        raise DTypeError(f"cross_entropy: target {describe(target)} must hold class indices of an integer dtype "
                         "(int64, as PyTorch) or probabilities of the input's float dtype")
    original_target = target
    if input.ndim == 1:
        input, target = ops.unsqueeze(input, 0), (ops.unsqueeze(target, 0) if soft else ops.reshape(target, (1,)))
    expected = input.shape if soft else (input.shape[0],) + input.shape[2:]
    if target.shape != expected:
        kind = "probabilities" if soft else "class indices"
        raise ShapeError(f"cross_entropy: target {describe(target)} ({kind}) does not fit input {describe(input)}; "
                         f"expected target shape {expected}")
    if soft and target.dtype != input.dtype:
        raise DTypeError(f"cross_entropy: soft targets {describe(target)} must have the input's dtype {input.dtype}")
    classes = input.shape[1]
    if not soft and isinstance(original_target._data, np.ndarray):  # on a GPU: checked on the device
        _check_class_indices(original_target._data, classes, int(ignore_index))
    if input.ndim > 2:  # (N, C, d...) -> (N * d..., C)
        perm = (0,) + tuple(range(2, input.ndim)) + (1,)
        input = ops.reshape(ops.permute(input, perm), (-1, classes))
        target = ops.reshape(ops.permute(target, perm), (-1, classes)) if soft else ops.reshape(target, (-1,))
    w = None
    if weight is not None:
        if weight.shape != (classes,) or weight.device != input.device or weight.dtype != input.dtype:
            raise ShapeError(f"cross_entropy: weight {describe(weight)} must be ({classes},) with the input's dtype "
                             f"and device ({describe(input)})")
        w = weight._data
    logits = input if input._data.flags.c_contiguous else ops.clone(input)
    targets = target._data if soft else _int64_class_indices(target._data, int(ignore_index))
    if soft and not targets.flags.c_contiguous:
        targets = targets.copy()
    return logits, targets, w


_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def _bad_class_index_message(at: str, value: int, classes: int, ignore_index: int) -> str:
    return (f"cross_entropy: {at} = {value} is outside the classes [0, C) = [0, {classes}) and is not "
            f"ignore_index={ignore_index}; class indices must be in [0, {classes}) or equal ignore_index")


def _check_class_indices(targets: np.ndarray, classes: int, ignore_index: int) -> None:
    """Raise KernelError naming the first class index outside [0, C) that is not ignore_index.

    Compared in the targets' own dtype (NumPy 2 compares with Python ints exactly), so a uint64
    near 2**64 is seen as itself, not as the negative int64 it would wrap to.
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= classes))
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad)[0]), targets.shape)
        at = f"target[{', '.join(map(str, where))}]" if where else "target"
        raise kernels.KernelError(_bad_class_index_message(at, int(targets[where]), classes, ignore_index))


def _checked_rows(indices: Tensor, count: int, weight: Tensor):
    """``indices``' array, checked to lie in [0, count) (embedding rows): read at once on the CPU,
    a deferred check with clipped indices on a GPU (see :func:`engine.indexing.checked_index`)."""
    return indexing.checked_index("embedding", indices, count, weight)


def _int64_class_indices(targets, ignore_index: int):
    """Targets as int64 without wrapping: uint64 values past int64 become int64's largest value (still
    outside [0, C), never equal to ignore_index), so a GPU check sees them as out of range."""
    if targets.dtype == np.uint64:
        largest = _INT64_MAX if ignore_index != _INT64_MAX else _INT64_MAX - 1
        targets = array_module(targets).minimum(targets, np.uint64(largest))
    return targets.astype(np.int64, copy=False)


def _defer_class_index_check(xp, targets, classes: int, ignore_index: int) -> None:
    """The unfused path's target check on a GPU: the non-ignored targets' min and max reduced on the
    device and read at the next sync point (kernels/deferred.py), as the fused kernel does."""
    bounds = _valid_target_bounds(xp, targets, ignore_index)

    def check(host_bounds) -> None:
        lo, hi = int(host_bounds[0]), int(host_bounds[1])
        if lo <= hi and (lo < 0 or hi >= classes):
            message = _bad_class_index_message("a target", lo if lo < 0 else hi, classes, ignore_index)
            raise kernels.KernelError(f"{message} [found on the GPU by an unfused cross_entropy on ({len(targets)}, "
                                      f"{classes}) logits, read at the next sync point; kernels.eager_checks(True) "
                                      "raises at the call itself]")

    kernels.deferred.defer(bounds, check)  # int64, as defer wants: the targets are int64 here


def _valid_target_bounds(xp, targets, ignore_index: int):
    """(min, max) of the targets that are not ``ignore_index``, as an int64 device array (min > max
    when every target is ignored): what a deferred class-index check reads."""
    valid = targets != ignore_index
    return xp.stack([xp.where(valid, targets, _INT64_MAX).min(), xp.where(valid, targets, _INT64_MIN).max()])


def _restore_shape(out: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    if reduction != "none":
        return out
    if input.ndim == 1:
        return ops.reshape(out, ())
    if input.ndim > 2:
        return ops.reshape(out, (input.shape[0],) + input.shape[2:])
    return out


def _cross_entropy_reference(logits: Tensor, targets, weight, ignore_index, reduction, eps) -> Tensor:
    """The same loss composed of core ops (autograd differentiates it)."""
    n, classes = logits.shape
    logp = log_softmax(logits, axis=1)
    xp = logits.xp
    w = weight if weight is not None else xp.ones(classes, dtype=logits.dtype)
    if targets.ndim == 2:  # soft targets
        q = targets * (1 - eps) + eps / classes if eps else targets
        per_row = -(logp * Tensor(q * w)).sum(axis=1)
        denominator = n
    else:
        if xp is not np and n:  # on the CPU _cross_entropy_inputs checked them already
            _defer_class_index_check(xp, targets, classes, ignore_index)
        valid = targets != ignore_index
        safe = xp.where(valid, targets, 0)
        row_w = (w[safe] * valid).astype(logits.dtype)
        picked = logp[xp.arange(n), safe]
        per_row = -picked * Tensor(row_w) * (1 - eps)
        if eps:
            per_row = per_row - (logp * Tensor(w)).sum(axis=1) * Tensor(valid.astype(logits.dtype) * (eps / classes))
        denominator = row_w.sum()  # stays on the device; 0 (every row ignored) gives NaN, as PyTorch
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / Tensor(xp.asarray(denominator, dtype=logits.dtype))


# ---- shared checks for the losses below ------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op: str, reduction: str, allowed: tuple = _REDUCTIONS) -> None:
    if reduction not in allowed:
        choices = ", ".join(repr(r) for r in allowed)
        raise ValueError(f"{op}: reduction must be one of {choices}, got {reduction!r}")


def _as_tensor_like(value, like: Tensor, dtype=None) -> Tensor:
    """``value`` as a Tensor on ``like``'s device (Tensors are returned unchanged)."""
    if isinstance(value, Tensor):
        return value
    return Tensor(np.asarray(value), dtype=dtype, device=like.device)


def _loss_operands(op: str, input: Tensor, target) -> tuple[Tensor, Tensor]:
    """Input and target of an elementwise loss: same shape, same floating dtype, same device.

    Shapes must match exactly: broadcasting an (N, 1) prediction against an (N,) target silently
    builds an (N, N) loss, a classic bug, so it is refused with the fix in the message.
    """
    target = _as_tensor_like(target, input, dtype=input.dtype)
    if target.device != input.device:
        raise DeviceError(f"{op}: input {describe(input)} and target {describe(target)} are on different "
                          "devices; move the target with .to(input.device)")
    if not is_floating(input.dtype) or input.dtype != target.dtype:
        raise DTypeError(f"{op}: input and target must share one floating dtype, got {describe(input)} and "
                         f"{describe(target)}; convert with .to(dtype)")
    if input.shape != target.shape:
        raise ShapeError(f"{op}: input {describe(input)} and target {describe(target)} must have the same shape "
                         "(reshape one of them, e.g. prediction.reshape(-1) for an (N, 1) output)")
    return input, target


def _elementwise_weight(op: str, name: str, weight, input: Tensor) -> Tensor | None:
    """A per-element weight that must broadcast to the input's shape without enlarging it."""
    if weight is None:
        return None
    weight = _as_tensor_like(weight, input, dtype=input.dtype)
    try:
        fits = np.broadcast_shapes(weight.shape, input.shape) == input.shape
    except ValueError:
        fits = False
    if not fits or weight.dtype != input.dtype or weight.device != input.device:
        raise ShapeError(f"{op}: {name} {describe(weight)} must broadcast to the input {describe(input)} "
                         "and share its dtype and device")
    return weight


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return ops.sum(loss) if reduction == "sum" else ops.mean(loss)


# ---- regression losses ---------------------------------------------------------------------------

@autocast_op("mse_loss")
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error ``(input - target)**2``, reduced by ``reduction`` ("mean", "sum" or "none").

    Example:
        >>> F.mse_loss(prediction, target)   # doctest: +SKIP
    """
    _check_reduction("mse_loss", reduction)
    input, target = _loss_operands("mse_loss", input, target)
    diff = input - target
    return _reduce(diff * diff, reduction)


@autocast_op("l1_loss")
def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Absolute error ``|input - target|`` (gradient 0 where they are equal, as in PyTorch)."""
    _check_reduction("l1_loss", reduction)
    input, target = _loss_operands("l1_loss", input, target)
    return _reduce(ops.abs(input - target), reduction)


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's rule for the deprecated ``size_average``/``reduce`` arguments: when either is given
    it decides the reduction ("mean" unless one of them is False), else ``reduction`` does."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "mean" if size_average and reduce else ("sum" if reduce else "none")


@autocast_op("smooth_l1_loss")
def smooth_l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0) -> Tensor:
    """PyTorch's smooth L1 loss: ``0.5 d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``
    (``d = input - target``); ``beta = 0`` is the L1 loss. ``size_average``/``reduce`` are
    PyTorch's deprecated spellings of ``reduction``.

    Raises:
        ValueError: a negative ``beta`` (as PyTorch).
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_reduction("smooth_l1_loss", reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be non-negative, got {beta}")
    input, target = _loss_operands("smooth_l1_loss", input, target)
    if beta == 0:
        return l1_loss(input, target, reduction)
    return _reduce(_huber(input - target, beta) / beta, reduction)


@autocast_op("huber_loss")
def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Tensor | None = None) -> Tensor:
    """PyTorch's Huber loss: ``0.5 d**2`` where ``|d| < delta``, else ``delta (|d| - 0.5 delta)``;
    ``weight`` (broadcastable to the loss) scales each element before the reduction.

    Raises:
        ValueError: a ``delta`` that is not positive (as PyTorch).
    """
    _check_reduction("huber_loss", reduction)
    if delta <= 0:
        raise ValueError(f"huber_loss: delta must be positive, got {delta}")
    input, target = _loss_operands("huber_loss", input, target)
    loss = _huber(input - target, delta)
    return _reduce(loss if weight is None else loss * weight, reduction)


def _huber(diff: Tensor, delta: float) -> Tensor:
    """``0.5 d**2`` inside ``|d| < delta``, ``delta (|d| - 0.5 delta)`` outside: both branches'
    gradients are finite, so ``where`` passes only the chosen one's."""
    size = ops.abs(diff)
    return ops.where(size < delta, 0.5 * diff * diff, delta * (size - 0.5 * delta))


@autocast_op("cosine_embedding_loss")
def cosine_embedding_loss(input1: Tensor, input2: Tensor, target, margin: float = 0.0,
                          reduction: str = "mean") -> Tensor:
    """PyTorch's cosine embedding loss of (N, D) (or unbatched (D,)) pairs with targets 1 or -1:
    ``1 - cos(x1, x2)`` where the target is 1, ``max(0, cos(x1, x2) - margin)`` where it is -1, 0
    for any other target. ``cos = <x1, x2> / sqrt((|x1|^2 + 1e-12) (|x2|^2 + 1e-12))``, PyTorch's
    formula, so a zero vector gives cos = 0 and a finite gradient.

    Example:
        >>> F.cosine_embedding_loss(student_features, teacher_features, torch.ones(n))   # doctest: +SKIP
    """
    _check_reduction("cosine_embedding_loss", reduction)
    if not isinstance(input1, Tensor) or not isinstance(input2, Tensor):
        raise TypeError("cosine_embedding_loss: input1 and input2 must be Tensors")
    if not is_floating(input1.dtype) or input1.dtype != input2.dtype:
        raise DTypeError(f"cosine_embedding_loss: input1 and input2 must share one floating dtype, got "
                         f"{describe(input1)} and {describe(input2)}; convert with .to(dtype)")
    target = _as_tensor_like(target, input1)
    if input1.shape != input2.shape or input1.ndim not in (1, 2) or target.ndim != input1.ndim - 1 \
            or (input1.ndim == 2 and target.shape[0] != input1.shape[0]):
        raise ShapeError(f"cosine_embedding_loss: expected input1 and input2 of one shape (N, D) with target (N,), "
                         f"or (D,) with a 0-d target; got {describe(input1)}, {describe(input2)}, "
                         f"{describe(target)}")
    if target.device != input1.device or input2.device != input1.device:
        raise DeviceError(f"cosine_embedding_loss: {describe(input1)}, {describe(input2)} and target "
                          f"{describe(target)} must be on one device; move them with .to(device)")
    dim = input1.ndim - 1
    eps = 1e-12
    prod_sum = ops.sum(input1 * input2, dim=dim)
    denom = ops.sqrt((ops.sum(input1 * input1, dim=dim) + eps) * (ops.sum(input2 * input2, dim=dim) + eps))
    cos = prod_sum / denom
    labels = target._data
    positive = Tensor(cos.xp.asarray(labels == 1, dtype=cos.dtype), device=cos.device)
    negative = Tensor(cos.xp.asarray(labels == -1, dtype=cos.dtype), device=cos.device)
    loss = positive * (1.0 - cos) + negative * ops.relu(cos - margin)
    return _reduce(loss, reduction)


# ---- binary classification -----------------------------------------------------------------------

class BinaryCrossEntropy(Function):
    """``-(y log p + (1 - y) log(1 - p))`` with each log clamped at -100, as PyTorch does, so that
    p in {0, 1} gives a finite loss; the input gradient divides by ``max(p (1 - p), 1e-12)``."""

    name = "binary_cross_entropy"

    def forward(self, p, y):
        xp = array_module(p)
        with np.errstate(divide="ignore"):  # log(0) = -inf is clamped just below
            log_p = xp.maximum(xp.log(p), -100)
            log_1mp = xp.maximum(xp.log(1 - p), -100)
        self.save(p, y, log_p, log_1mp)
        return -(y * log_p + (1 - y) * log_1mp)

    def backward(self, g):
        p, y, log_p, log_1mp = self.saved
        xp = array_module(p)
        gp = g * (p - y) / xp.maximum(p * (1 - p), 1e-12) if self.needs_input_grad[0] else None
        gy = g * (log_1mp - log_p) if self.needs_input_grad[1] else None
        return gp, gy


@autocast_op("binary_cross_entropy")
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                         reduction: str = "mean") -> Tensor:
    """Binary cross-entropy between probabilities ``input`` in [0, 1] and ``target`` in [0, 1].

    Prefer :func:`binary_cross_entropy_with_logits` on raw scores: it is stable for large logits.

    Args:
        input: probabilities, any shape.
        target: same shape and dtype as ``input``.
        weight: optional rescaling of each element's loss, broadcast to ``input``'s shape.
        reduction: "mean" (over all elements), "sum" or "none".
    """
    _check_reduction("binary_cross_entropy", reduction)
    input, target = _loss_operands("binary_cross_entropy", input, target)
    weight = _elementwise_weight("binary_cross_entropy", "weight", weight, input)
    _check_probabilities(input)
    loss = BinaryCrossEntropy.apply(input, target)
    return _reduce(loss if weight is None else loss * weight, reduction)


def _check_probabilities(input: Tensor) -> None:
    """binary_cross_entropy's input must lie in [0, 1]. Checked at once on the CPU; on a GPU the
    min and max are queued as a deferred check (kernels/deferred.py, read at the next sync point)
    instead of a host sync in every forward; meanwhile an out-of-range input gives a NaN loss."""
    data = input._data
    if not data.size:
        return

    def check(bounds) -> None:
        low, high = (float(b) for b in bounds)
        if low < 0 or high > 1:
            raise EngineError(f"binary_cross_entropy: every input element must be a probability in [0, 1], got "
                              f"values in [{low:.4g}, {high:.4g}] for {describe(input)}; apply sigmoid first, or use "
                              "binary_cross_entropy_with_logits on the raw scores")

    if isinstance(data, np.ndarray):
        check((data.min(), data.max()))
        return
    xp = array_module(data)
    # The deferred queue reads int64 arrays in one transfer: the float64 bounds travel bit for bit as int64.
    bounds = xp.stack([data.min(), data.max()]).astype(np.float64).view(np.int64)
    kernels.deferred.defer(bounds, lambda raw: check(np.asarray(raw).view(np.float64)))


class BinaryCrossEntropyWithLogits(Function):
    """BCE on logits x, with an optional positive-class weight p (1 when absent).

    With ``L = log1p(exp(-|x|))`` and ``lw = 1 + (p - 1) y`` the loss is
    ``lw * L + (1 - y) x`` for x >= 0 and ``lw * L - p y x`` for x < 0. Both branches add only
    non-negative terms of one sign for the common targets, so nothing cancels: without
    ``pos_weight`` it is exactly ``max(x, 0) - x y + log1p(exp(-|x|))``.
    """

    name = "binary_cross_entropy_with_logits"

    def forward(self, x, y, pos_weight=None):
        xp = array_module(x)
        log_term = xp.log1p(xp.exp(-xp.abs(x)))
        p = 1 if pos_weight is None else pos_weight
        lw = 1 + (p - 1) * y
        self.save(x, y, pos_weight, log_term)
        return lw * log_term + xp.where(x >= 0, (1 - y) * x, -(p * y) * x)

    def backward(self, g):
        x, y, pos_weight, log_term = self.saved
        xp = array_module(x)
        p = 1 if pos_weight is None else pos_weight
        e = xp.exp(-xp.abs(x))
        sigmoid_neg = xp.where(x >= 0, e / (1 + e), 1 / (1 + e))  # sigmoid(-x) without overflow
        softplus_neg = log_term + xp.maximum(-x, 0)  # log(1 + exp(-x))
        grads = [None] * (2 if pos_weight is None else 3)
        if self.needs_input_grad[0]:
            grads[0] = g * ((1 - y) - (1 + (p - 1) * y) * sigmoid_neg)
        if self.needs_input_grad[1]:
            grads[1] = unbroadcast(g * ((p - 1) * softplus_neg - x), y.shape)
        if pos_weight is not None and self.needs_input_grad[2]:
            grads[2] = unbroadcast(g * y * softplus_neg, pos_weight.shape)
        return tuple(grads)


@autocast_op("binary_cross_entropy_with_logits")
def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     reduction: str = "mean", pos_weight: Tensor | None = None) -> Tensor:
    """Sigmoid plus binary cross-entropy in one numerically stable formula (PyTorch semantics).

    ``loss = -w [p y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]``, computed without exp
    overflow for any logit.

    Args:
        input: logits, any shape.
        target: probabilities in [0, 1], same shape and dtype as ``input``.
        weight: optional rescaling of each element's loss, broadcast to ``input``'s shape.
        reduction: "mean" (over all elements), "sum" or "none".
        pos_weight: weight of the positive term, broadcast along the last (class) dim, e.g. a
            (C,) tensor of ``negatives / positives`` per class for imbalanced multi-label data.

    Example:
        >>> pos_weight = engine.tensor([3.0])                                                # doctest: +SKIP
        >>> F.binary_cross_entropy_with_logits(scores, labels.float(), pos_weight=pos_weight)  # doctest: +SKIP
    """
    op = "binary_cross_entropy_with_logits"
    _check_reduction(op, reduction)
    input, target = _loss_operands(op, input, target)
    weight = _elementwise_weight(op, "weight", weight, input)
    pos_weight = _elementwise_weight(op, "pos_weight", pos_weight, input)
    inputs = (input, target) if pos_weight is None else (input, target, pos_weight)
    loss = BinaryCrossEntropyWithLogits.apply(*inputs)
    return _reduce(loss if weight is None else loss * weight, reduction)


# ---- negative log-likelihood and KL divergence ----------------------------------------------------

def _class_rows(op: str, input: Tensor, target) -> tuple[Tensor, object, tuple]:
    """(N, C, d...) scores and (N, d...) integer targets as (M, C) rows and an (M,) int64 array.

    Also returns the shape a ``reduction="none"`` result takes (the target's shape).
    """
    target = _as_tensor_like(target, input)
    if target.device != input.device:
        raise DeviceError(f"{op}: input {describe(input)} and target {describe(target)} are on different devices; "
                          "move the target with .to(input.device)")
    if not is_floating(input.dtype):
        raise DTypeError(f"{op}: input must be floating point, got {describe(input)}")
    if not np.issubdtype(target.dtype, np.integer):
        raise DTypeError(f"{op}: target must hold integer class indices, got {describe(target)}; "
                         "convert with .long()")
    if input.ndim == 0:
        raise ShapeError(f"{op}: input {describe(input)} needs a class dim: (C,), (N, C) or (N, C, d1, ...)")
    expected = () if input.ndim == 1 else (input.shape[0],) + input.shape[2:]
    if target.shape != expected:
        raise ShapeError(f"{op}: target {describe(target)} does not fit input {describe(input)}; expected target "
                         f"shape {expected} (one class index per row, the class dim of the input being dim 1)")
    classes = input.shape[-1] if input.ndim == 1 else input.shape[1]
    if input.ndim > 2:  # (N, C, d...) -> (N * d..., C)
        input = ops.permute(input, (0,) + tuple(range(2, input.ndim)) + (1,))
    rows = ops.reshape(input, (-1, classes))
    return rows, target._data.reshape(-1).astype(np.int64, copy=False), expected


def _class_weight(op: str, weight, rows: Tensor):
    """The (C,) class-weight array, or None; validated against the (M, C) rows."""
    if weight is None:
        return None
    classes = rows.shape[1]
    if not isinstance(weight, Tensor) or weight.shape != (classes,) or weight.dtype != rows.dtype \
            or weight.device != rows.device:
        raise ShapeError(f"{op}: weight {describe(weight)} must be a ({classes},) Tensor with the input's dtype and "
                         f"device ({describe(rows)})")
    return weight._data


@autocast_op("nll_loss")
def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
             reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of log-probabilities ``input`` at the ``target`` classes.

    ``loss_i = -weight[t_i] * input[i, t_i]``, 0 where ``t_i == ignore_index``; "mean" divides the
    sum by the total weight of the non-ignored rows (PyTorch semantics; NaN if every row is ignored).
    ``cross_entropy(x, t) == nll_loss(log_softmax(x, 1), t)``.

    Args:
        input: log-probabilities (C,), (N, C) or (N, C, d1, ...).
        target: integer class indices (), (N,) or (N, d1, ...).
        weight: optional (C,) class weights (not differentiated).
        ignore_index: target value whose rows contribute nothing.
        reduction: "mean", "sum" or "none" (the target's shape).
    """
    _check_reduction("nll_loss", reduction)
    rows, targets, out_shape = _class_rows("nll_loss", input, target)
    w = _class_weight("nll_loss", weight, rows)
    xp, (n, classes) = rows.xp, rows.shape
    valid = targets != ignore_index
    safe = xp.where(valid, targets, 0)
    if xp is np:
        out_of_range = valid & ((targets < 0) | (targets >= classes))
        if out_of_range.any():
            _raise_bad_nll_target(int(targets[out_of_range][0]), classes, ignore_index, input)
    elif n:  # on a GPU: a deferred check, and the gather reads clipped indices meanwhile
        _defer_nll_target_check(xp, targets, classes, ignore_index, input)
        safe = xp.clip(safe, 0, classes - 1)
    row_weight = valid.astype(rows.dtype) if w is None else w[safe] * valid
    picked = rows[xp.arange(n), safe]
    per_row = -picked * Tensor(row_weight)
    if reduction == "none":
        return ops.reshape(per_row, out_shape)
    total = ops.sum(per_row)
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):  # every row ignored: 0 / 0 = NaN, as in PyTorch
        return total / Tensor(xp.asarray(row_weight.sum(dtype=rows.dtype)))


def _raise_bad_nll_target(bad: int, classes: int, ignore_index: int, input: Tensor, where: str = "") -> None:
    raise EngineError(f"nll_loss: target {bad} is out of range for {classes} classes (input {describe(input)}); "
                      f"targets must be in [0, {classes - 1}] or equal ignore_index={ignore_index}{where}")


def _defer_nll_target_check(xp, targets, classes: int, ignore_index: int, input: Tensor) -> None:
    """nll_loss's target check on a GPU: the non-ignored targets' min and max reduced on the device
    and read at the next sync point (kernels/deferred.py), not a host sync in every forward."""

    def check(host_bounds) -> None:
        low, high = int(host_bounds[0]), int(host_bounds[1])
        if low <= high and (low < 0 or high >= classes):
            _raise_bad_nll_target(low if low < 0 else high, classes, ignore_index, input,
                                  " [found on the GPU, read at the next sync point; kernels.eager_checks(True) "
                                  "raises at the call itself]")

    kernels.deferred.defer(_valid_target_bounds(xp, targets, ignore_index), check)


class KLDivPointwise(Function):
    """``t (log t - x)`` (0 where t == 0), or ``exp(t) (t - x)`` for log-space targets."""

    name = "kl_div"

    def forward(self, x, t, log_target=False):
        xp = array_module(x)
        self.log_target = log_target
        self.save(x, t)
        if log_target:
            return xp.exp(t) * (t - x)
        log_t = xp.log(xp.where(t > 0, t, 1))  # xlogy(t, t): the t == 0 terms are 0
        return t * log_t - t * x

    def backward(self, g):
        x, t = self.saved
        xp = array_module(x)
        gx = gt = None
        if self.log_target:
            p = xp.exp(t)
            gx = -g * p if self.needs_input_grad[0] else None
            gt = g * p * (t - x + 1) if self.needs_input_grad[1] else None
            return gx, gt
        if self.needs_input_grad[0]:
            gx = -g * t
        if self.needs_input_grad[1]:
            # d/dt [t log t - t x] = log t + 1 - x; at t == 0 (where it is -inf) the log term is
            # taken as 0, the convention of xlogy's gradient, so a zero target never yields NaN.
            gt = g * (xp.log(xp.where(t > 0, t, 1)) + 1 - x)
        return gx, gt


@autocast_op("kl_div")
def kl_div(input: Tensor, target: Tensor, reduction: str = "mean", log_target: bool = False) -> Tensor:
    """KL divergence ``sum target * (log target - input)`` with ``input`` given as log-probabilities.

    Args:
        input: log-probabilities (e.g. ``log_softmax(student_logits, -1)``).
        target: probabilities, or log-probabilities when ``log_target=True``; same shape.
        reduction: "batchmean" (sum / batch size: the mathematical KL per sample; use this one),
            "mean" (sum / number of elements, PyTorch's default for compatibility), "sum" or "none".
        log_target: ``target`` holds log-probabilities (more accurate for tiny probabilities).
    """
    _check_reduction("kl_div", reduction, _REDUCTIONS + ("batchmean",))
    input, target = _loss_operands("kl_div", input, target)
    pointwise = KLDivPointwise.apply(input, target, log_target=bool(log_target))
    if reduction == "batchmean":
        batch = input.shape[0] if input.ndim else 1
        return ops.sum(pointwise) / float(batch)
    return _reduce(pointwise, reduction)


# ---- dropout, layer norm, embedding ----------------------------------------------------------------

class Dropout(Function):
    """Multiply by a saved mask of 0 and 1 / (1 - p); the backward is the same product."""

    name = "dropout"

    def forward(self, x, mask=None):
        self.mask = mask
        return x * mask

    def backward(self, g):
        return g * self.mask


def _uniform_samples(dev, shape: tuple, dtype):
    """Uniform [0, 1) samples on ``dev`` from the engine's seeded generator for that device."""
    gen = backend.generator(dev)
    sample_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    with backend.on_device(dev):
        if dev.type == "cpu":
            return gen.random(shape, dtype=sample_dtype)
        return gen.random_sample(shape, dtype=sample_dtype)


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    The expectation is unchanged, so nothing needs rescaling at evaluation time. Identity when
    ``training`` is False or ``p == 0``. The mask comes from ``engine.backend.generator`` of the
    input's device, so ``engine.manual_seed(s)`` makes it reproducible.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if not is_floating(input.dtype):
        raise DTypeError(f"dropout: input must be floating point, got {describe(input)}")
    if p == 1.0:
        mask = input.xp.zeros(input.shape, dtype=input.dtype)
    else:
        keep = _uniform_samples(input.device, input.shape, input.dtype) >= p
        mask = keep.astype(input.dtype) * input.dtype.type(1.0 / (1.0 - p))
    return Dropout.apply(input, mask=mask)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Channel dropout of (N, C, H, W) input: each whole channel is zeroed with probability ``p``
    and the rest scaled by 1 / (1 - p) (adjacent pixels of a feature map are correlated, so
    element-wise dropout would barely regularise them).

    Other ranks follow PyTorch 2.x, with its warnings: a 3-d input is taken as (N, C, L) (one draw
    per (n, c), PyTorch's current reading, announced to change to unbatched (C, H, W)); a 2-d input
    gets element-wise dropout (deprecated there, as ``dropout`` does it)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout2d: p must be a probability in [0, 1], got {p}")
    if input.ndim not in (2, 3, 4):
        raise ShapeError(f"dropout2d: expected (N, C, H, W) input, got {describe(input)}")
    if input.ndim == 2:
        warnings.warn("dropout2d: Received a 2-D input to dropout2d, which is deprecated and will result in an "
                      "error in a future release. To retain the behavior and silence this warning, please use "
                      "dropout instead.", UserWarning, stacklevel=3)
        return dropout(input, p, training)
    if input.ndim == 3:
        warnings.warn("dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout "
                      "behavior is desired - input is interpreted as shape (N, C, L), where C is the channel dim "
                      "(as PyTorch does; use dropout1d to keep this behaviour).", UserWarning, stacklevel=3)
    if not training or p == 0.0:
        return input
    if not is_floating(input.dtype):
        raise DTypeError(f"dropout2d: input must be floating point, got {describe(input)}")
    # one draw per channel, broadcast over the spatial dims ((H, W), or L for a 3-d input)
    shape = input.shape[:2] + (1,) * (input.ndim - 2)
    keep = _uniform_samples(input.device, shape, input.dtype) >= p
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    mask = keep.astype(input.dtype) * input.dtype.type(scale)
    return Dropout.apply(input, mask=mask)


class LayerNorm(Function):
    """Layer normalisation over the trailing ``len(axes)`` dims, with an analytic backward.

    A Function rather than a composite of mean/var/sub/mul ops: forward saves only the
    normalised input and the reciprocal std (a composite keeps about six intermediates and a
    dozen graph nodes), and the backward is the textbook formula
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``, checked by gradcheck.
    """

    name = "layer_norm"

    def forward(self, x, *affine, axes=(), eps=1e-5, has_weight=False, has_bias=False):
        xp = array_module(x)
        weight = affine[0] if has_weight else None
        bias = affine[-1] if has_bias else None
        mean = x.mean(axis=axes, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=axes, keepdims=True)
        rstd = 1 / xp.sqrt(var + x.dtype.type(eps))
        xhat = centered * rstd
        self.save(xhat, rstd, weight)
        self.axes, self.has_bias = axes, has_bias
        out = xhat if weight is None else xhat * weight
        return out if bias is None else out + bias

    def backward(self, g):
        xhat, rstd, weight = self.saved
        lead = tuple(range(g.ndim - len(self.axes)))
        grads = []
        if self.needs_input_grad[0]:
            gxhat = g if weight is None else g * weight
            mean_g = gxhat.mean(axis=self.axes, keepdims=True)
            mean_gx = (gxhat * xhat).mean(axis=self.axes, keepdims=True)
            grads.append(rstd * (gxhat - mean_g - xhat * mean_gx))
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


# ---- scaled-dot-product attention --------------------------------------------------------------------

class ScaledDotProductAttention(Function):
    """``softmax(scale * q @ k^T + mask) @ v`` on (B, L, E) arrays through kernels.attention_*.

    Saves q, k, v, the output and the per-row log-sum-exp (B, L), never the B x L x S
    probabilities: backward recomputes them tile by tile. The additive mask is a parameter, not an
    input, so it gets no gradient (a float mask that requires grad takes the unfused path).

    bfloat16 / float16 on the CPU are widened by ``Function.apply`` (float32 compute, one rounding,
    and backward's D = dO . out from the unrounded float32 out); on a GPU they go to the kernels as
    they are (:class:`ScaledDotProductAttention16`).
    """

    name = "scaled_dot_product_attention"

    def forward(self, q, k, v, mask=None, scale=1.0, causal=False):
        precision = _attention_precision(q.dtype)
        out, lse = kernels.attention_forward(q, k, v, mask, scale=scale, causal=causal, precision=precision)
        self.save(q, k, v, out, lse)
        self.mask, self.scale, self.causal, self.precision = mask, scale, causal, precision
        return out

    def backward(self, g):
        q, k, v, out, lse = self.saved
        return kernels.attention_backward(_contiguous(g), q, k, v, out, lse, self.mask, scale=self.scale,
                                          causal=self.causal, precision=self.precision)


class ScaledDotProductAttention16(ScaledDotProductAttention):
    """bfloat16 / float16 attention on a GPU: the arrays reach the kernels unwidened, whose forward
    runs the 16-bit operands on tensor cores (fp32 accumulation, one rounding) and whose backward
    takes D = dO . out from the rounded out, as FlashAttention-2 does; saved state is half the size."""

    computes_in_float32 = False


def _attention_function(device_type: str, dtype) -> type:
    """The Function class for attention on ``device_type`` with inputs of ``dtype``."""
    if device_type != "cpu" and dtypes.is_low_precision(dtype):
        return ScaledDotProductAttention16
    return ScaledDotProductAttention


# MERGE POINT (float32 matmul precision): the one place that chooses how the attention kernels
# multiply float32 inputs. ``None`` keeps float32 on CUDA cores (exact: what "highest" asks for);
# ``"3xtf32"`` runs it on tensor cores as three TF32 products (float32-level error; issue 22 makes
# it the default once it passes the float32 agreement tests on a GPU:
# tests/kernels/test_attention_tc.py -m gpu). Connect it to engine.set_float32_matmul_precision
# here, e.g. ``"3xtf32" if get_float32_matmul_precision() != "highest" else None``.
def _attention_precision(dtype) -> str | None:
    """The ``precision`` argument of the attention kernels for inputs of ``dtype``."""
    return None


@autocast_op("scaled_dot_product_attention")
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 fused: bool | None = None) -> Tensor:
    """Attention ``softmax(query @ key^T * scale + mask) @ value``, as PyTorch's function.

    With fused kernels enabled (the default) this runs ``kernels.attention_forward/backward``
    (flash style: no L x S matrix is kept for backward). The unfused composition (matmul, masked
    softmax, dropout, matmul) runs instead under ``F.fused_kernels(False)`` or ``fused=False``,
    when ``dropout_p > 0`` (the kernels have no dropout), when a float ``attn_mask`` requires grad,
    or for what the kernel refuses (dtypes other than float32, bfloat16, float16 and float64; on a
    GPU float64 or head dims over 128). bfloat16 and float16 are computed in float32 and rounded
    once; on a GPU they reach the kernels as they are, with the 16-bit operands on tensor cores.

    A query row that may attend to no key (every mask entry False or -inf) gets an output of
    zeros and no gradient, on both paths, as in PyTorch. NaN and inf in the inputs or in a float
    mask propagate as in PyTorch (a NaN score makes its row NaN; see docs/kernels/attention.md).

    Args:
        query: (..., L, E).
        key: (..., S, E).
        value: (..., S, Ev). The leading dims of the three broadcast together.
        attn_mask: None, a boolean mask (True = may attend) or a float mask added to the scores
            (query's dtype), broadcastable to (..., L, S): e.g. (L, S) shared, or (N, 1, 1, S) key
            padding for (N, H, L, E) queries.
        dropout_p: dropout probability on the attention weights, from the engine's seeded RNG
            (pass 0 in evaluation, as PyTorch's callers do: this function has no training flag).
        is_causal: query i attends to keys j <= i (top-left aligned, ``ones(L, S).tril()``);
            must not be combined with ``attn_mask`` (PyTorch raises too).
        scale: the score scale; None means ``1 / sqrt(E)`` (for E = 0 every score is 0 and the
            output is the mean of value over the keys a row sees, as in PyTorch).
        enable_gqa: grouped-query attention: query has Hq heads in dim -3, key/value H heads with
            Hq a multiple of H; each key/value head serves Hq / H query heads.
        fused: use the attention kernel where it applies (default: ``fused_enabled()``).

    Returns:
        (..., L, Ev) attention output.

    Raises:
        ShapeError: shapes that do not fit (naming all of them), DTypeError: mixed or non-float
            dtypes, DeviceError: tensors on different devices, RuntimeError: ``attn_mask`` with
            ``is_causal=True``.

    Example:
        >>> q = k = v = engine.randn(2, 4, 16, 8)                                   # doctest: +SKIP
        >>> out = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # (2, 4, 16, 8)
    """
    op = "scaled_dot_product_attention"
    q, k, v = query, key, value
    _check_attention_operands(op, q, k, v)
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{op}: an explicit attn_mask must not be set when is_causal=True (as in PyTorch); "
                           "fold the causal mask into attn_mask instead")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a probability in [0, 1], got {dropout_p}")
    if enable_gqa:
        k, v = _repeat_kv_heads(op, q, k, v)
    batch = _attention_batch(op, q, k, v)
    length, keys = q.shape[-2], k.shape[-2]
    bias = _attention_bias(op, attn_mask, q, batch, length, keys)
    scale = _attention_default_scale(q.shape[-1]) if scale is None else float(scale)
    kernel_fits = dropout_p == 0.0 and _attention_kernel_takes(q, v, bias)
    if _use_fused(fused) and kernel_fits and backends.cuda.fused_sdp_allowed():
        return _attention_fused(q, k, v, bias, scale, bool(is_causal), batch)
    if not backends.cuda.math_sdp_enabled():
        raise RuntimeError(f"{op}: no available kernel: the math implementation is switched off "
                           "(backends.cuda.enable_math_sdp(False) or sdp_kernel) and the fused kernel "
                           + ("is switched off too" if kernel_fits else "does not take these inputs (dropout_p > 0, "
                              "or a dtype/head size it refuses)"))
    return attention_unfused(q, k, v, bias, scale, bool(is_causal), dropout_p)[0]


def _check_attention_operands(op: str, q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    shapes = f"query {describe(q)}, key {describe(k)}, value {describe(v)}"
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError(f"{op}: query, key and value need at least 2 dims (..., L or S, E): {shapes}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"{op}: need query (..., L, E), key (..., S, E), value (..., S, Ev) with one E and one S: "
                         f"{shapes}")
    if len({q.device, k.device, v.device}) > 1:
        raise DeviceError(f"{op}: operands are on different devices: {shapes}; move them to one device")
    if not is_floating(q.dtype) or len({q.dtype, k.dtype, v.dtype}) > 1:
        raise DTypeError(f"{op}: query, key and value must share one floating dtype: {shapes}")


def _repeat_kv_heads(op: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """GQA: repeat each key/value head Hq / H times along dim -3 (``repeat_interleave``)."""
    if q.ndim < 3 or k.ndim < 3 or v.ndim < 3 or k.shape[-3] != v.shape[-3] or q.shape[-3] % k.shape[-3]:
        raise ShapeError(f"{op}: enable_gqa needs heads in dim -3 with query's a multiple of key's and value's: "
                         f"query {describe(q)}, key {describe(k)}, value {describe(v)}")
    groups = q.shape[-3] // k.shape[-3]
    if groups == 1:
        return k, v

    def repeat(t: Tensor) -> Tensor:
        lead, heads = t.shape[:-3], t.shape[-3]
        wide = ops.broadcast_to(ops.unsqueeze(t, -3), lead + (heads, groups) + t.shape[-2:])
        return ops.reshape(wide, lead + (heads * groups,) + t.shape[-2:])

    return repeat(k), repeat(v)


def _attention_batch(op: str, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """The broadcast leading (batch) dims of query, key and value."""
    try:
        return tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    except ValueError:
        raise ShapeError(f"{op}: the leading (batch) dims of query {describe(q)}, key {describe(k)} and value "
                         f"{describe(v)} do not broadcast") from None


def _attention_bias(op: str, attn_mask, q: Tensor, batch: tuple, length: int, keys: int) -> Tensor | None:
    """The mask as an additive float Tensor in its own (broadcastable) shape, or None.

    A boolean mask becomes a constant 0 / -inf bias of the same shape (no expansion); a float
    mask is used as given (it may require grad: the unfused path differentiates through it).
    """
    if attn_mask is None:
        return None
    mask = _as_tensor_like(attn_mask, q)
    target = batch + (length, keys)
    if mask.device != q.device:
        raise DeviceError(f"{op}: attn_mask {describe(mask)} and query {describe(q)} are on different devices")
    try:
        fits = np.broadcast_shapes(mask.shape, target) == target
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{op}: attn_mask {describe(mask)} does not broadcast to (..., L, S) = {target} "
                         f"(query {describe(q)})")
    if mask.dtype == np.bool_:
        return Tensor(q.xp.where(mask._data, q.dtype.type(0), q.dtype.type(-np.inf)))
    if mask.dtype != q.dtype:
        raise DTypeError(f"{op}: attn_mask {describe(mask)} must be boolean or have the query's dtype {q.dtype}")
    return mask


def _kernel_dtype(dtype) -> np.dtype:
    """The dtype a fused kernel sees for ``dtype``: float16 and bfloat16 run the float32 kernel
    (``Function.apply`` upcasts them and rounds the result once), other dtypes themselves."""
    return dtypes.COMPUTE_DTYPE if dtypes.is_low_precision(dtype) else np.dtype(dtype)


def _attention_kernel_takes(q: Tensor, v: Tensor, bias: Tensor | None) -> bool:
    """Whether the attention kernel computes this call (else the unfused composition does): float32,
    bfloat16 and float16 (float64 on the CPU), head dims <= 128 on the GPU, a mask without grad."""
    dtype = np.dtype(q.dtype)
    if _kernel_dtype(dtype) not in (np.float32, np.float64) or (bias is not None and bias.requires_grad):
        return False
    if q.device.type == "cpu":
        return True
    return dtype in _ATTENTION_GPU_DTYPES and max(q.shape[-1], v.shape[-1]) <= _ATTENTION_GPU_MAX_HEAD_DIM


def _attention_fused(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool,
                     batch: tuple) -> Tensor:
    """Flatten the batch dims into B, run the kernel Function, restore the batch dims."""
    rows = math.prod(batch)

    def as_3d(t: Tensor) -> Tensor:
        if t.shape[:-2] != batch:
            t = ops.broadcast_to(t, batch + t.shape[-2:])
        return _contiguous_tensor(ops.reshape(t, (rows,) + t.shape[-2:]))

    mask = None if bias is None else _kernel_mask(dtypes.upcast(bias._data), batch, rows, k.shape[-2])
    function = _attention_function(q.device.type, q.dtype)
    out = function.apply(as_3d(q), as_3d(k), as_3d(v), mask=mask, scale=scale, causal=causal)
    return ops.reshape(out, batch + out.shape[-2:])


def _kernel_mask(bias, batch: tuple, rows: int, keys: int):
    """The bias as the kernel's contiguous (1 or B, 1 or L, S) array.

    A bias shared by every batch entry stays (1, Lm, S) and a per-row (key padding) bias stays
    (B, 1, S): neither is expanded to B x L x S. Only a bias that varies over some batch dims but
    not others (e.g. per head, shared over N) is broadcast over the batch dims it lacks.
    """
    xp = array_module(bias)
    bias = bias.reshape((1,) * (len(batch) + 2 - bias.ndim) + bias.shape)
    tail = (bias.shape[-2], keys)
    if all(d == 1 for d in bias.shape[:-2]):
        mask = xp.broadcast_to(bias.reshape((1,) + bias.shape[-2:]), (1,) + tail)
    else:
        mask = xp.broadcast_to(bias, batch + tail).reshape((rows,) + tail)
    return xp.ascontiguousarray(mask)


def attention_unfused(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool,
                      dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """The reference composition: ``(out, weights)`` with weights (..., L, S) after dropout.

    ``bias`` is an additive float Tensor broadcastable to (..., L, S) (see ``_attention_bias``).
    Rows that see no key get weights 0 (softmax of an all -inf row would be NaN), so their output
    is 0 and they pass no gradient, as in the kernel. Used by ``scaled_dot_product_attention``
    and by ``nn.MultiheadAttention`` when it must return the weights.
    """
    xp = q.xp
    length, keys = q.shape[-2], k.shape[-2]
    scores = ops.matmul(q, ops.transpose(k, -2, -1)) * scale
    if keys == 0 or length == 0:  # nothing to attend to (or no query): zeros, as the kernel gives;
        weights = scores * 0.0  # from the scores, so that q, k and v get (zero) gradients as in PyTorch
        return ops.matmul(weights, v), weights
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = ops.where(xp.tril(xp.ones((length, keys), dtype=bool)), scores, float("-inf"))
    if bias is None:  # no mask, or only the top-left causal one: every row sees key 0 at least
        weights = ops.softmax(scores, -1)
    else:
        dead = xp.isneginf(scores._data).all(axis=-1, keepdims=True)  # on the device: no host read
        weights = ops.where(dead, 0.0, ops.softmax(ops.where(dead, 0.0, scores), -1))
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, training=True)
    return ops.matmul(weights, v), weights


def embedding(input, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of ``weight`` at the integer ``input`` indices: output shape ``input.shape + (dim,)``.

    Args:
        input: integer indices of any shape, each in [0, num_embeddings).
        weight: (num_embeddings, embedding_dim) table.
        padding_idx: rows looked up at this index get no gradient (they stay at their value,
            usually zeros, during training).
    """
    indices = _as_tensor_like(input, weight)
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be (num_embeddings, embedding_dim), got {describe(weight)}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise DTypeError(f"embedding: indices must be integers, got {describe(indices)}; convert with .long()")
    if indices.device != weight.device:
        raise DeviceError(f"embedding: indices {describe(indices)} and weight {describe(weight)} are on different "
                          "devices; move the indices with .to(weight.device)")
    count = weight.shape[0]
    idx = _checked_rows(indices, count, weight)
    rows = ops.getitem(weight, idx)
    if padding_idx is None:
        return rows
    if not -count <= padding_idx < count:
        raise ShapeError(f"embedding: padding_idx={padding_idx} is outside the table of {count} rows")
    # Same values either way; only the first branch carries gradient back to the table.
    keep = (idx != padding_idx % count)[..., None]
    return ops.where(keep, rows, rows.detach())


def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """int64 one-hot encoding of integer class indices: shape ``tensor.shape + (num_classes,)``, as
    ``torch.nn.functional.one_hot``. ``num_classes=-1`` takes the largest index + 1 (one host read).

    Example:
        >>> F.one_hot(engine.tensor([0, 2]), 3).tolist()    # doctest: +SKIP
        [[1, 0, 0], [0, 0, 1]]
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"one_hot: expected an integer Tensor, got {type(tensor).__name__}")
    if not np.issubdtype(tensor.dtype, np.integer):
        raise DTypeError(f"one_hot: class indices must be an integer tensor, got {describe(tensor)}; use .long()")
    xp, idx = tensor.xp, tensor._data
    if num_classes == -1:
        num_classes = int(backend.to_host(idx.max())) + 1 if idx.size else 0
    if idx.size and bool(backend.to_host(((idx < 0) | (idx >= num_classes)).any())):
        raise EngineError(f"one_hot: class values must be in [0, {num_classes}), got values in "
                          f"[{int(backend.to_host(idx.min()))}, {int(backend.to_host(idx.max()))}]")
    out = (idx[..., None] == xp.arange(num_classes)).astype(np.int64)
    return Tensor(out)


# ---- padding --------------------------------------------------------------------------------------

_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class PadConstant(Function):
    """``input`` with ``widths`` (numpy's per-dim (before, after), all >= 0) of ``value`` around it."""

    computes_in_float32 = False  # moves memory: no arithmetic to do in float32

    def forward(self, a, widths=(), value=0):
        self.inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, a.shape))
        return array_module(a).pad(a, widths, mode="constant", constant_values=value)

    def backward(self, g):
        return g[self.inner]


def pad(input: Tensor, pad, mode: str = "constant", value: float | None = None) -> Tensor:
    """Pad the last ``len(pad) // 2`` dims of ``input`` (``torch.nn.functional.pad``).

    ``pad`` lists (left, right) widths from the last dim backwards: ``(1, 2)`` pads the last dim by 1
    before and 2 after, ``(1, 1, 2, 0)`` also the one before it. Modes, as PyTorch's:

    - ``"constant"``: fill with ``value`` (0 by default), any number of dims; negative widths crop.
    - ``"reflect"``: mirror without repeating the edge (a width must be smaller than the dim).
    - ``"replicate"``: repeat the edge value.
    - ``"circular"``: wrap around (a width may be at most the dim's size).

    The non-constant modes pad the last 1, 2 or 3 dims of a (C, *) or (N, C, *) input, as PyTorch
    requires. Differentiable: the constant border gets no gradient; reflected, replicated and
    wrapped entries send theirs back to the entries they copy.
    """
    op = "pad"
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(input).__name__}")
    widths = tuple(int(p) for p in pad)
    if len(widths) % 2 or len(widths) // 2 > input.ndim:
        raise ShapeError(f"{op}: padding length must be even and at most 2 * input.dim() ({2 * input.ndim}), got "
                         f"{len(widths)} for {describe(input)}")
    pairs = {input.ndim - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)}
    if mode == "constant":
        return _pad_constant(input, pairs, 0 if value is None else value)
    if mode not in _PAD_MODES:
        raise ValueError(f"{op}: unrecognised padding mode {mode!r}; use 'constant', 'reflect', 'replicate' or "
                         "'circular'")
    if value is not None and value != 0:
        raise ValueError(f"{op}: padding mode {mode!r} does not take a value (only 'constant' does)")
    dims = len(pairs)
    if dims > 3 or input.ndim not in (dims + 1, dims + 2):
        raise ShapeError(f"{op}: {mode} padding of the last {dims} dim(s) needs a {dims + 1}-d or {dims + 2}-d input "
                         f"(unbatched or batched), got {describe(input)}")
    out = input
    for dim, (lo, hi) in pairs.items():
        size = input.shape[dim]
        too_wide = {"reflect": max(lo, hi) >= size, "circular": max(lo, hi) > size}.get(mode, size == 0)
        if min(lo, hi) < 0 or too_wide:
            limit = {"reflect": "smaller than its size", "circular": "at most its size"}.get(mode, "of a non-empty dim")
            raise ShapeError(f"{op}: {mode} padding widths ({lo}, {hi}) of dim {dim} must be non-negative and "
                             f"{limit} ({size}; {describe(input)})")
        if lo or hi:
            source = np.pad(np.arange(size), (lo, hi), mode=_PAD_MODES[mode])  # which entry each position copies
            out = indexing.index_select(out, dim, Tensor(backend.to_device(source, input.device)))
    return out


def _pad_constant(input: Tensor, pairs: dict, value) -> Tensor:
    from engine.tensor import _check_fill

    _check_fill("pad", value, np.dtype(input.dtype))
    crop = [slice(None)] * input.ndim
    widths = [(0, 0)] * input.ndim
    for dim, (lo, hi) in pairs.items():
        size = input.shape[dim]
        start, stop = max(-lo, 0), size - max(-hi, 0)
        if stop < start:
            raise ShapeError(f"pad: negative widths ({lo}, {hi}) crop more than the {size} entries of dim {dim} of "
                             f"{describe(input)}")
        crop[dim], widths[dim] = slice(start, stop), (max(lo, 0), max(hi, 0))
    if any(s != slice(None) for s in crop):
        input = ops.getitem(input, tuple(crop))
    return PadConstant.apply(input, widths=tuple(widths), value=value)

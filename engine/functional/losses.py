"""Losses: cross-entropy (the fused softmax-CE kernel), regression, binary, NLL and KL."""

from __future__ import annotations


import numpy as np

from engine import kernels
from engine import indexing, ops
from engine.amp.autocast_mode import autocast_op
from engine.autograd import Function, is_grad_enabled, is_implicit_ones_grad, unbroadcast
from engine.backend import array_module
from engine import dtypes
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, EngineError, ShapeError, describe
from engine.ops import log_softmax
from engine.tensor import Tensor
from engine.kernels import accumulation_dtype
from engine.functional._common import _use_fused


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
        xp = np if type(logits) is np.ndarray else array_module(logits)
        acc = _ACCUMULATION.get(logits.dtype)
        if acc is None:
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
        total = _ADD_REDUCE(loss, 0, acc) if xp is np else loss.sum(dtype=acc)  # loss.sum's own call
        if reduction == "sum":
            return xp.asarray(total).astype(logits.dtype, copy=False)
        if xp is np:  # the CPU: the count is free to read; numpy scalars divide as the 0-d arrays would
            count = denominator[0]
            if count:
                mean = total / count
                return mean if acc == logits.dtype else mean.astype(logits.dtype)
        with np.errstate(invalid="ignore", divide="ignore"):  # every row ignored: 0 / 0 = NaN, as in PyTorch
            mean = total / denominator.reshape(())  # (or a GPU: no host read)
        return xp.asarray(mean).astype(logits.dtype, copy=False)

    def backward(self, g):
        if self.reduction == "none":
            return self.grad * g[:, None]
        return self.grad if is_implicit_ones_grad(g) else self.grad * g


_ADD_REDUCE = np.add.reduce
_ACCUMULATION = {np.dtype(np.float32): np.dtype(np.float32), np.dtype(np.float64): np.dtype(np.float64)}  # the rest: asked


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
    common = _common_rows(input, target, weight, reduction, label_smoothing, ignore_index)
    if common is not None:
        return common
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
    if not _on_cpu_arrays(input, target) and target.device != input.device:
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
_INT64 = np.dtype(np.int64)
_FLOATS = frozenset(np.dtype(d) for d in ("float32", "float64", "float16", dtypes.bfloat16))


def _common_rows(input, target, weight, reduction, label_smoothing, ignore_index):
    """:func:`_cross_entropy_inputs`' answer for the common call, or None (then the full checks run
    and name any problem): CPU tensors, contiguous (N, C) float logits, (N,) int64 class indices, no
    weight, an int ignore_index, a float label_smoothing in [0, 1]. The same checks in one pass, and
    the class-index check that both paths make."""
    if weight is not None or type(ignore_index) is not int or type(label_smoothing) is not float \
            or not isinstance(target, Tensor) or not 0.0 <= label_smoothing <= 1.0 \
            or reduction not in _REDUCTIONS or not _INT64_MIN <= ignore_index <= _INT64_MAX:
        return None
    if not _on_cpu_arrays(input, target):
        return None
    x, y = input._data, target._data
    if x.ndim != 2 or y.ndim != 1 or y.dtype != _INT64 or x.dtype not in _FLOATS or y.shape[0] != x.shape[0] \
            or not x.flags.c_contiguous:
        return None
    _check_class_indices(y, x.shape[1], ignore_index)
    return input, y, None


def _on_cpu_arrays(*tensors) -> bool:
    """Do all ``tensors`` hold numpy arrays (so share the CPU) with no device of their own? The
    test Function.apply makes before it compares Device objects (a dataclass __eq__ per pair)."""
    for t in tensors:
        if type(t._data) is not np.ndarray or not t._device_is_its_arrays:
            return False
    return True


def _bad_class_index_message(at: str, value: int, classes: int, ignore_index: int) -> str:
    return (f"cross_entropy: {at} = {value} is outside the classes [0, C) = [0, {classes}) and is not "
            f"ignore_index={ignore_index}; class indices must be in [0, {classes}) or equal ignore_index")


def _check_class_indices(targets: np.ndarray, classes: int, ignore_index: int) -> None:
    """Raise KernelError naming the first class index outside [0, C) that is not ignore_index.

    Compared in the targets' own dtype (NumPy 2 compares with Python ints exactly), so a uint64
    near 2**64 is seen as itself, not as the negative int64 it would wrap to.
    """
    if kernels.registry.indices_in_range(targets, classes):  # the common case, one reduction
        return
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

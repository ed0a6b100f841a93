"""Softmax cross-entropy and its gradient on the CPU (PyTorch ``F.cross_entropy``, reduction='none').

One call returns the per-row loss and, in the same pass over the logits, the gradient of that loss
with respect to the logits (scaled by ``grad_scale``), so training never stores the softmax.

The math every impl shares (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy`` elsewhere).
Per row, with ``z`` the logits, ``m = max_c z_c``, ``s = sum_c exp(z_c - m)``, ``L = log s``:

    logp_c = (z_c - m) - L                     (log-softmax, stable for any finite z)
    p_c    = exp(z_c - m) / s                  (softmax)

Every target is a weighted target distribution ``u_c`` over the classes:

    hard t: u_c = (1 - eps) w_t [c == t] + (eps / C) w_c        (w = 1 when weight is None)
    soft q: u_c = w_c ((1 - eps) q_c + eps / C)

    loss   = -sum_c u_c logp_c = S L - sum_c u_c (z_c - m),   S = sum_c u_c
    grad_c = grad_scale * (S p_c - u_c)

For hard targets the ``(1 - eps) w_t`` part is taken from ``z_t`` directly (never as a sum of
``0 * logp_c``), so logits of -inf on other classes (masked classes) give a finite loss, as in
PyTorch. Rows whose hard target equals ``ignore_index`` get loss 0 and gradient 0; a hard target
outside ``[0, C)`` that is not ``ignore_index`` is an error (:func:`check_targets_host` here; the
GPU impls do a device-side min/max of the targets first).

float16 and bfloat16 logits (kernels/precision.py) are computed in float32: the per-row loss is
returned in float32 (the caller reduces it before rounding once, as PyTorch's nll_loss accumulates
in float32), the gradient is rounded once to the logits' dtype, and a ``grad_scale`` array is
float32. Both CPU impls widen the logits (and soft targets and weights) to float32 at the boundary
and narrow the gradient back (numba takes no 16-bit arrays): ``numpy`` with NumPy's astype,
``numba_cpu`` with the bit loops of kernels/cpu/convert.py (equal bits; NumPy's float16 rounding
is slow for the subnormal results most probabilities of a wide row round to).
docs/kernels/softmax_cross_entropy.md has the cost.

This module also holds the validator every impl calls first (:func:`validate_softmax_cross_entropy`).
``import engine.kernels.cpu.softmax_cross_entropy`` does not import numba: the jitted code is built on
first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..cpu import convert
from ..precision import FLOAT_NAMES, accumulation_dtype, float_name, is_low_precision, narrow, widen
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import module_of as _module_of
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..registry import numba_parallel as _numba_parallel
from ..registry import indices_in_range as _indices_in_range
from ..registry import real_number as _real_number

KERNEL = "softmax_cross_entropy"
_FLOATS = ", ".join(FLOAT_NAMES)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # ignore_index is compared with int64 targets
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossEntropySpec:
    """What one validated call asks for."""

    n: int  # rows
    c: int  # classes
    dtype: np.dtype  # of the logits and the gradient (and of the loss, unless 16-bit: then float32)
    soft: bool  # targets are (N, C) probabilities
    ignore_index: int
    eps: float  # label smoothing
    grad_scale: float  # the scale as a number (1.0 placeholder when it is a cupy array)
    compute_grad: bool
    array_module: str  # "numpy" or "cupy"
    grad_scale_array: object = None  # the one-element array when the scale lives on the device

    @property
    def acc_dtype(self) -> np.dtype:
        """What the kernels compute in, and the dtype of the loss and of a grad_scale array."""
        return accumulation_dtype(self.dtype)


def _is_array(a) -> bool:
    if type(a) is np.ndarray or type(a) is float:  # the common cases, without hasattr's exceptions
        return type(a) is np.ndarray
    return hasattr(a, "shape") and hasattr(a, "dtype") and _module_of(a) in ("numpy", "cupy")


def validate_softmax_cross_entropy(logits, targets, weight, *, ignore_index, label_smoothing, grad_scale,
                                   compute_grad) -> CrossEntropySpec:
    """Check the arguments of one call (every impl calls this first); raise KernelError naming the problem."""
    spec = _common_call_spec(logits, targets, weight, ignore_index, label_smoothing, grad_scale, compute_grad)
    if spec is not None:
        return spec

    def where() -> str:  # described only on failure: this check runs on every call
        return f"{KERNEL}({_describe('logits', logits)}, {_describe('targets', targets)}, {_describe('weight', weight)})"

    arrays = {"logits": logits, "targets": targets}
    if weight is not None:
        arrays["weight"] = weight
    problem = _misplaced_arrays_message(arrays)
    if problem:
        raise KernelError(f"{where()}: {problem}")
    module = _module_of(logits)
    if logits.ndim != 2:
        raise KernelError(f"{where()}: logits must be 2-D (N, C), got {logits.ndim}-D; reshape to (-1, C) "
                          "with the class dimension last")
    n, c = (int(d) for d in logits.shape)
    if c < 1:
        raise KernelError(f"{where()}: logits has C = 0 classes; cross-entropy needs at least one class")
    if float_name(logits.dtype) is None:
        raise KernelError(f"{where()}: logits has dtype {logits.dtype}; only {_FLOATS} are supported")
    soft = float_name(targets.dtype) is not None  # bfloat16 has kind "V"
    if soft:
        if targets.dtype != logits.dtype:
            raise KernelError(f"{where()}: soft targets (probabilities) must have the logits' dtype {logits.dtype}, "
                              f"got {targets.dtype}; cast them with .astype(logits.dtype) (no silent promotion)")
        if tuple(targets.shape) != (n, c):
            raise KernelError(f"{where()}: soft targets must have the logits' shape {(n, c)}, got "
                              f"{tuple(targets.shape)}; pass class indices as an (N,) integer array instead")
    else:
        if targets.dtype not in INDEX_DTYPES:
            raise KernelError(f"{where()}: targets has dtype {targets.dtype}; pass class indices as int32 or int64 "
                              "(e.g. .astype(np.int64)) or probabilities with the logits' float dtype")
        if tuple(targets.shape) != (n,):
            raise KernelError(f"{where()}: class-index targets must have shape (N,) = {(n,)}, got "
                              f"{tuple(targets.shape)}")
    if weight is not None:
        if weight.dtype != logits.dtype:
            raise KernelError(f"{where()}: weight must have the logits' dtype {logits.dtype}, got {weight.dtype}; "
                              "cast it with .astype(logits.dtype) (no silent promotion)")
        if tuple(weight.shape) != (c,):
            raise KernelError(f"{where()}: weight must have shape (C,) = {(c,)}, one weight per class, got "
                              f"{tuple(weight.shape)}")
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise KernelError(f"{where()}: {name} is not C-contiguous; pass a contiguous array "
                              "(e.g. ascontiguousarray)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise KernelError(f"{KERNEL}: ignore_index must be an int, got {ignore_index!r}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:  # the kernels compare it with int64 targets
        raise KernelError(f"{KERNEL}: ignore_index must be an int in the int64 range [-2**63, 2**63 - 1] "
                          f"(PyTorch's index type; it raises too), got {ignore_index!r}")
    eps = _real_number(KERNEL, "label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise KernelError(f"{KERNEL}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    scale_array = None
    if _is_array(grad_scale):
        scale_array = _scale_array(grad_scale, logits, module)
        # On the CPU the value is free to read (and the CPU impls use it); on a GPU it stays there.
        scale = _real_number(KERNEL, "grad_scale", scale_array[0]) if _module_of(scale_array) == "numpy" else 1.0
    else:
        scale = _real_number(KERNEL, "grad_scale", grad_scale)
    if not isinstance(compute_grad, (bool, np.bool_)):
        raise KernelError(f"{KERNEL}: compute_grad must be True or False, got {compute_grad!r}")
    return CrossEntropySpec(n, c, logits.dtype, soft, int(ignore_index), eps, scale, bool(compute_grad),
                            module, scale_array)


_FAST_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _common_call_spec(logits, targets, weight, ignore_index, label_smoothing, grad_scale, compute_grad):
    """The spec of the common call, or None (then the full checks run, and name any problem).

    The common call: numpy float32 / float64 logits (N, C), C >= 1, C-contiguous; C-contiguous
    (N,) int32 / int64 class indices; no weight; a Python int ignore_index in the int64 range; a
    Python float label_smoothing in [0, 1] and a finite Python float grad_scale; a bool
    compute_grad. The same checks as the full path, in one pass with no error text prepared (this
    runs on every call); tests/kernels/test_validation_fast_path.py holds the two in agreement.
    """
    if not _is_common_call(logits, targets, weight, ignore_index, label_smoothing, grad_scale, compute_grad):
        return None
    n, c = logits.shape
    return CrossEntropySpec(n, c, logits.dtype, False, ignore_index, label_smoothing, grad_scale, compute_grad,
                            "numpy")


def _is_common_call(logits, targets, weight, ignore_index, label_smoothing, grad_scale, compute_grad) -> bool:
    """Whether a call is the common call of :func:`_common_call_spec` (the checks, without the spec)."""
    if type(logits) is not np.ndarray or type(targets) is not np.ndarray or weight is not None \
            or logits.dtype not in _FAST_FLOATS or targets.dtype not in INDEX_DTYPES \
            or logits.ndim != 2 or targets.ndim != 1:
        return False
    n, c = logits.shape
    if targets.shape[0] != n or c < 1 or not logits.flags.c_contiguous or not targets.flags.c_contiguous:
        return False
    return type(ignore_index) is int and INT64_MIN <= ignore_index <= INT64_MAX \
        and type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0 \
        and type(grad_scale) is float and math.isfinite(grad_scale) and type(compute_grad) is bool


def validate_denominator_out(spec: CrossEntropySpec, logits, weight, grad_scale, denominator_out) -> None:
    """Check ``denominator_out`` (see :func:`engine.kernels.softmax_cross_entropy`): one element of the
    accumulation dtype beside the logits, for unweighted hard targets with no other grad_scale."""
    if denominator_out is None:
        return
    if spec.soft or weight is not None:
        raise KernelError(f"{KERNEL}: denominator_out counts the non-ignored rows of unweighted hard targets "
                          f"(class indices without weight); with {'soft targets' if spec.soft else 'class weights'} "
                          "compute the 'mean' denominator outside and pass its reciprocal as grad_scale")
    if _is_array(grad_scale) or float(grad_scale) != 1.0:
        raise KernelError(f"{KERNEL}: denominator_out scales the gradient by 1 / the count it writes; grad_scale "
                          f"must then be 1, got {grad_scale!r}")
    acc = spec.acc_dtype
    if not _is_array(denominator_out) or denominator_out.size != 1 or denominator_out.dtype != acc \
            or _module_of(denominator_out) != spec.array_module or not denominator_out.flags.c_contiguous \
            or (spec.array_module == "cupy" and denominator_out.device.id != logits.device.id):
        raise KernelError(f"{KERNEL}: denominator_out must be a one-element {acc} array beside the logits "
                          f"({_describe('logits', logits)}), got {_describe('denominator_out', denominator_out)}")


def host_mean_scale(spec: CrossEntropySpec, targets, denominator_out):
    """The CPU impls' 'mean' denominator: writes the number of non-ignored rows to ``denominator_out``
    and returns the gradient's scale, ``1 / count`` in the accumulation dtype (0 when every row is
    ignored, whose gradient is then all zeros)."""
    acc = spec.acc_dtype.type
    count = acc(np.count_nonzero(targets != spec.ignore_index))
    denominator_out[...] = count
    return float(acc(1) / count) if count else 0.0  # the float32 quotient, as a (weak) Python float


def _scale_array(grad_scale, logits, module):
    """A grad_scale given as an array: one element of the logits' accumulation dtype (their own;
    float32 for 16-bit logits), on their device (read there)."""
    acc = accumulation_dtype(logits.dtype)
    if grad_scale.size != 1 or grad_scale.dtype != acc or _module_of(grad_scale) != module:
        raise KernelError(f"{KERNEL}: grad_scale given as an array must hold one element of the logits' "
                          f"accumulation dtype ({acc} for {logits.dtype} logits) on the logits' device "
                          f"({_module_of(logits)}), got {_describe('grad_scale', grad_scale)}")
    if _module_of(grad_scale) == "cupy" and grad_scale.device != logits.device:
        raise KernelError(f"{KERNEL}: grad_scale is on {grad_scale.device} but the logits are on {logits.device}")
    return grad_scale.reshape(1)


def bad_target_message(value: int, c: int, ignore_index: int, row: int | None = None) -> str:
    """The error for a class index outside [0, C) (shared by every impl)."""
    at = f"targets[{row}] = {value}" if row is not None else f"a target equals {value}, which"
    return (f"{KERNEL}: {at} is outside the classes [0, C) = [0, {c}) and is not ignore_index={ignore_index}; "
            f"class indices must be in [0, {c}) or equal ignore_index")


def check_target_range(lo: int, hi: int, spec: CrossEntropySpec) -> None:
    """Raise KernelError if the smallest (``lo``) or largest (``hi``) non-ignored hard target is
    outside [0, C); ``lo > hi`` means every row is ignored. The GPU impls reduce to these two."""
    if lo > hi:
        return
    if lo < 0:
        raise KernelError(bad_target_message(lo, spec.c, spec.ignore_index))
    if hi >= spec.c:
        raise KernelError(bad_target_message(hi, spec.c, spec.ignore_index))


def check_target_bounds(bounds, spec: CrossEntropySpec, impl: str) -> None:
    """check_target_range on the (min, max) a GPU impl reduced on the device, read back at a sync
    point (kernels/deferred.py); the error says which call the bounds came from."""
    try:
        check_target_range(int(bounds[0]), int(bounds[1]), spec)
    except KernelError as error:
        raise KernelError(f"{error} [found on the GPU by a {KERNEL} ({impl}) call on logits ({spec.n}, {spec.c}) "
                          f"{spec.dtype}, read at the next sync point; kernels.eager_checks(True) raises at the "
                          "call itself]") from None


def check_targets_host(spec: CrossEntropySpec, targets) -> None:
    """Raise KernelError naming the first hard target outside [0, C) that is not ignore_index."""
    if spec.soft or _indices_in_range(targets, spec.c):
        return
    bad = (targets != spec.ignore_index) & ((targets < 0) | (targets >= spec.c))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KernelError(bad_target_message(int(targets[row]), spec.c, spec.ignore_index, row))


# --------------------------------------------------------------------------------------------
# numpy: the reference, written as the formulas above (whole-array ops, dtype kept)
# --------------------------------------------------------------------------------------------


def _cpu_call(inner, conversions, logits, targets, weight, *, ignore_index, label_smoothing, grad_scale,
              compute_grad, denominator_out):
    """A CPU impl's opening: validate, take the mean's denominator from ``denominator_out``, run a
    16-bit call on float32 copies of the logits, soft targets and weight (the loss stays float32,
    the gradient is rounded once to the logits' dtype; ``conversions`` is the (widen, narrow) pair:
    NumPy's astype for the reference, kernels/cpu/convert.py for numba), check hard targets, then
    ``inner(logits, targets, weight, spec) -> (loss, grad or None)``."""
    spec = validate_softmax_cross_entropy(logits, targets, weight, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad_scale=grad_scale,
                                          compute_grad=compute_grad)
    if denominator_out is not None:
        validate_denominator_out(spec, logits, weight, grad_scale, denominator_out)
        grad_scale = host_mean_scale(spec, targets, denominator_out)
        spec = _with_grad_scale(spec, grad_scale)
    if is_low_precision(spec.dtype):
        to_float32, to_low = conversions
        loss, grad = _cpu_call(inner, conversions, to_float32(logits), to_float32(targets) if spec.soft else targets,
                               to_float32(weight), ignore_index=ignore_index, label_smoothing=label_smoothing,
                               grad_scale=grad_scale, compute_grad=compute_grad, denominator_out=None)
        return loss, to_low(grad, spec.dtype)
    check_targets_host(spec, targets)
    return inner(logits, targets, weight, spec)


def _with_grad_scale(spec: CrossEntropySpec, grad_scale: float) -> CrossEntropySpec:
    """dataclasses.replace(spec, grad_scale=...) without re-running __init__ (it ran per call)."""
    new = object.__new__(CrossEntropySpec)
    new.__dict__.update(spec.__dict__, grad_scale=grad_scale)
    return new


def softmax_cross_entropy_numpy(logits, targets, weight=None, *, ignore_index=-100, label_smoothing=0.0,
                                grad_scale=1.0, compute_grad=True, denominator_out=None):
    return _cpu_call(_softmax_cross_entropy_numpy, (widen, narrow), logits, targets, weight,
                     ignore_index=ignore_index, label_smoothing=label_smoothing, grad_scale=grad_scale,
                     compute_grad=compute_grad, denominator_out=denominator_out)


def _softmax_cross_entropy_numpy(logits, targets, weight, spec: CrossEntropySpec):
    n, c, dt = spec.n, spec.c, spec.dtype
    one = dt.type(1)
    eps, eps_c = dt.type(spec.eps), dt.type(spec.eps / c)
    w = weight if weight is not None else np.ones(c, dt)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        m = logits.max(axis=1, keepdims=True) if n else np.zeros((0, 1), dt)
        shifted = logits - m
        e = np.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        logp = shifted - np.log(s)
        if spec.soft:
            q = targets if spec.eps == 0 else targets * (one - eps) + eps_c
            u = q * w
            loss = -(u * logp).sum(axis=1)
            valid = np.ones(n, bool)
        else:
            valid = targets != spec.ignore_index
            safe = np.where(valid, targets, 0)
            rows = np.arange(n)
            w_t = np.where(valid, w[safe], dt.type(0))
            loss = np.where(valid, -((one - eps) * w_t) * logp[rows, safe], dt.type(0))
            u = np.zeros((n, c), dt)
            u[rows, safe] = (one - eps) * w_t
            if spec.eps:
                # eps / C inside the sum: the sum of C terms may overflow where the result does not
                loss = loss + np.where(valid, -(logp * (eps_c * w)).sum(axis=1), dt.type(0))
                u += np.where(valid[:, None], eps_c * w, dt.type(0))
        loss = loss.astype(dt, copy=False)
        if not spec.compute_grad:
            return loss, None
        p = e / s
        grad = dt.type(spec.grad_scale) * (u.sum(axis=1, keepdims=True) * p - u)
    grad[~valid] = 0
    return loss, grad.astype(dt, copy=False)


# --------------------------------------------------------------------------------------------
# numba_cpu: rows in parallel (prange). Per row: a max pass, an exp pass that leaves exp(z - m) in
# the grad row (one exp per element), sums over that cache-resident row, and the gradient pass in
# place. Two passes over the logits in memory, one write of the gradient. float32 uses a
# vectorizable exp (below): numba's scalar expf call is what made the first version slow.
# --------------------------------------------------------------------------------------------


def softmax_cross_entropy_numba(logits, targets, weight=None, *, ignore_index=-100, label_smoothing=0.0,
                                grad_scale=1.0, compute_grad=True, denominator_out=None):
    if logits.size < PARALLEL_MIN and _is_common_call(logits, targets, weight, ignore_index, label_smoothing,
                                                      grad_scale, compute_grad) \
            and _plain_count_out(denominator_out, logits, grad_scale):
        return _small_hard_call(logits, targets, ignore_index, label_smoothing, grad_scale, compute_grad,
                                denominator_out)
    # numba takes no 16-bit arrays: _cpu_call hands them over as float32 copies
    return _cpu_call(_softmax_cross_entropy_numba, (convert.widen, convert.narrow), logits, targets, weight,
                     ignore_index=ignore_index, label_smoothing=label_smoothing, grad_scale=grad_scale,
                     compute_grad=compute_grad, denominator_out=denominator_out)


def _softmax_cross_entropy_numba(logits, targets, weight, spec: CrossEntropySpec):
    n, c, dt = spec.n, spec.c, spec.dtype
    loss = np.empty(n, dt)
    grad = np.empty((n, c), dt) if spec.compute_grad else np.empty((0, c), dt)
    if n == 0:
        return loss, (grad if spec.compute_grad else None)
    has_weight = weight is not None
    w = weight if has_weight else np.ones(1, dt)
    one_minus_eps, eps_c, scale = dt.type(1.0 - spec.eps), dt.type(spec.eps / c), dt.type(spec.grad_scale)
    fast_exp = dt == np.float32
    parallel = n > 1 and n * c >= PARALLEL_MIN
    rows_hard, rows_soft = _numba_kernels(parallel)
    # Rows are handed to threads in small groups, so a group can share one scratch row.
    rows_per_task = max(1, min(16, n // (4 * _num_threads()))) if parallel else n
    if spec.soft:
        rows_soft(logits, targets, w, has_weight, one_minus_eps, eps_c, scale, spec.compute_grad, fast_exp,
                  rows_per_task, loss, grad)
    else:
        # int32 targets widened (N values): one compiled specialization per float dtype, not two
        rows_hard(logits, targets.astype(np.int64, copy=False), w, has_weight, np.int64(spec.ignore_index),
                  one_minus_eps, eps_c, spec.eps > 0, scale, spec.compute_grad, fast_exp, rows_per_task, loss, grad)
    return loss, (grad if spec.compute_grad else None)


def _plain_count_out(denominator_out, logits, grad_scale) -> bool:
    """Whether ``denominator_out`` is None, or what :func:`validate_denominator_out` accepts for a
    common call (a writable one-element array of the logits' dtype, grad_scale 1); else the full
    path runs and names the problem."""
    return denominator_out is None or (type(denominator_out) is np.ndarray and denominator_out.size == 1
                                       and denominator_out.dtype == logits.dtype and grad_scale == 1.0
                                       and denominator_out.flags.c_contiguous and denominator_out.flags.writeable)


def _small_hard_call(logits, targets, ignore_index, label_smoothing, grad_scale, compute_grad, denominator_out):
    """numba_cpu on a small common call (float32 / float64 logits small enough for one thread, class
    indices, no weight): the work of :func:`_cpu_call` (target check, the 'mean' count and scale)
    done in one jitted call, which then runs the serial row kernel with the very arguments
    :func:`_softmax_cross_entropy_numba` passes it (equal bits). Its scalars go in as Python
    numbers, cast to the logits' dtype inside: numpy scalars cost numba a type lookup each."""
    n, c = logits.shape
    dt = logits.dtype
    loss = np.empty(n, dt)
    grad = np.empty((n, c) if compute_grad else (0, c), dt)
    mean = denominator_out is not None  # without it the count goes nowhere: loss stands in, never written
    bad = _small_hard_kernel()(logits, targets.astype(np.int64, copy=False), ignore_index, 1.0 - label_smoothing,
                               label_smoothing / c, label_smoothing > 0, grad_scale,
                               denominator_out if mean else loss, mean, compute_grad, dt == np.float32, loss, grad)
    if bad >= 0:
        raise KernelError(bad_target_message(int(targets[bad]), c, ignore_index, bad))
    return loss, (grad if compute_grad else None)


# Set by _small_hard_kernel(): the serial row kernel, a module global for the same reason as the
# helpers of _numba_helpers().
_nb_rows_hard_serial = None


@functools.cache
def _small_hard_kernel():
    import numba

    globals()["_nb_rows_hard_serial"] = _numba_kernels(False)[0]

    @numba.njit(cache=True)
    def small_hard(logits, targets, ignore_index, one_minus_eps, eps_c, smooth, grad_scale, count_out, mean,
                   compute_grad, fast_exp, loss, grad):
        """-1, or the first row whose target is outside [0, C) and not ignore_index (nothing computed)."""
        n, c = logits.shape
        count = 0
        for i in range(n):  # check_targets_host and host_mean_scale's count, in one pass
            t = targets[i]
            if t != ignore_index:
                if t < 0 or t >= c:
                    return i
                count += 1
        cast = logits.dtype.type
        if mean:  # host_mean_scale: 1 / count in the logits' dtype (0 when every row is ignored)
            count_out[0] = count
            scale = cast(1.0) / cast(count) if count else cast(0.0)
        else:
            scale = cast(grad_scale)
        if n:
            _nb_rows_hard_serial(logits, targets, np.ones(1, logits.dtype), False, ignore_index, cast(one_minus_eps),
                                 cast(eps_c), smooth, scale, compute_grad, fast_exp, n, loss, grad)
        return -1

    return small_hard


# float32 exp(x) for x <= 0 (Cephes expf): x = t ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7
# polynomial, 2^t added to the exponent bits. Branch-free, so LLVM vectorizes it (numba has no
# SVML here and calls scalar expf otherwise). Max error 1.4 ulp (measured against float64 exp);
# x < -87 (results below 1.6e-38, i.e. denormal) gives 0, NaN stays NaN.
_F32 = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F32(v) for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                   4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_EXP_LO, _HALF, _ONE = _F32(-87.0), _F32(0.5), _F32(1.0)


# Set by _numba_helpers() (module globals that the row kernels read; see there).
_nb_row_max = _nb_exp_shifted = _nb_row_sum = _nb_weighted_shift_sums = _nb_target_sums = None

# Logits (N * C) from which the rows run in parallel: below it one thread finishes in about the
# time a parallel region takes to start, so smaller calls stay on the caller's thread
# (docs/benchmarks.md, "Why the thresholds are where they are").
# The parallel builds are called through registry.numba_parallel, a process-wide lock: workqueue
# aborts the process when two Python threads run parallel regions at once.
PARALLEL_MIN = 1 << 15


def _num_threads() -> int:
    import numba

    return numba.get_num_threads()


@functools.cache
def _numba_helpers() -> None:
    """Compile the per-row helpers and publish them as module globals for the row kernels.

    The row kernels reach the helpers as module globals, not closure variables: numba's cache key
    hashes the pickled closure cells, and a pickled dispatcher differs between processes, so a
    closure would miss the on-disk cache on every run.
    """
    import numba

    module = globals()
    helper = numba.njit(cache=True)
    # Reductions may be reordered (vectorized partial sums); the sums run in float64.
    summing = numba.njit(cache=True, fastmath={"reassoc"})

    @numba.njit(cache=True, fastmath={"nnan", "nsz"})
    def row_max(z):
        # nnan lets LLVM vectorize the max; a NaN in the row still reaches the result through exp.
        m = z[0]
        for k in range(1, z.shape[0]):
            if z[k] > m:
                m = z[k]
        return m

    @helper
    def exp_shifted(z, m, out, fast_exp):
        """out[k] = exp(z[k] - m)."""
        n = z.shape[0]
        if not fast_exp:
            for k in range(n):
                out[k] = np.exp(z[k] - m)
            return
        for k in range(n):  # exp(r) and the exponent t, clamped so 2^t stays a normal scale
            x = z[k] - m
            if x < _EXP_LO:
                x = _EXP_LO
            t = np.floor(x * _LOG2E + _HALF)
            r = x - t * _LN2_HI
            r = r - t * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            out[k] = p * (r * r) + r + _ONE
        bits = out.view(np.int32)
        for k in range(n):  # times 2^t: add t to the exponent field (t recomputed, same rounding)
            x = z[k] - m
            xc = _EXP_LO if x < _EXP_LO else x
            t = np.floor(xc * _LOG2E + _HALF)
            ti = np.int32(t) if t >= -126 else np.int32(0)  # NaN: bits untouched
            scaled = bits[k] + (ti << 23)
            bits[k] = 0 if x < _EXP_LO else scaled

    @summing
    def row_sum(e):
        s = 0.0
        for k in range(e.shape[0]):
            s += e[k]
        return s

    @summing
    def weighted_shift_sums(z, m, w, has_weight):
        """(sum_c w_c (z_c - m), sum_c w_c)."""
        a = 0.0
        total = 0.0
        for k in range(z.shape[0]):
            wk = w[k] if has_weight else 1.0
            a += wk * (z[k] - m)
            total += wk
        return a, total

    @summing
    def target_sums(z, m, q, w, has_weight, one_minus_eps, eps_c):
        """(sum_c u_c (z_c - m), sum_c u_c) with u = w ((1 - eps) q + eps / C)."""
        a = 0.0
        total = 0.0
        for k in range(z.shape[0]):
            u = (one_minus_eps * q[k] + eps_c) * (w[k] if has_weight else 1.0)
            a += u * (z[k] - m)
            total += u
        return a, total

    module.update(_nb_row_max=row_max, _nb_exp_shifted=exp_shifted, _nb_row_sum=row_sum,
                  _nb_weighted_shift_sums=weighted_shift_sums, _nb_target_sums=target_sums)


@functools.cache
def _numba_kernels(parallel: bool):
    """(rows_hard, rows_soft): over rows in parallel (prange) or on the calling thread."""
    import numba

    _numba_helpers()
    # `loop` (prange or range, which pickle by name) is a closure variable, so the serial and the
    # parallel build of one function get different keys in numba's on-disk cache.
    loop = numba.prange if parallel else range
    jit = numba.njit(cache=True, parallel=parallel, fastmath=False)

    @jit
    def rows_hard(logits, targets, w, has_weight, ignore_index, one_minus_eps, eps_c, smooth, scale,
                  compute_grad, fast_exp, rows_per_task, loss, grad):
        n, c = logits.shape
        for task in loop((n + rows_per_task - 1) // rows_per_task):
            scratch = np.empty(0 if compute_grad else c, logits.dtype)  # exp row when no grad is kept
            for i in range(task * rows_per_task, min(n, (task + 1) * rows_per_task)):
                t = targets[i]
                if t == ignore_index:
                    loss[i] = 0
                    if compute_grad:
                        grad[i, :] = 0
                    continue
                z = logits[i]
                g = grad[i] if compute_grad else scratch
                m = _nb_row_max(z)
                _nb_exp_shifted(z, m, g, fast_exp)
                s = _nb_row_sum(g)
                log_s = np.log(s)
                w_t = w[t] if has_weight else 1.0
                value = one_minus_eps * w_t * (log_s - (z[t] - m))
                total_w = 0.0
                if smooth:
                    a, total_w = _nb_weighted_shift_sums(z, m, w, has_weight)
                    value += eps_c * (total_w * log_s - a)
                loss[i] = value
                if compute_grad:
                    coef = z.dtype.type(scale * (one_minus_eps * w_t + eps_c * total_w) / s)
                    if smooth and has_weight:
                        smooth_scale = scale * eps_c
                        for k in range(c):
                            g[k] = coef * g[k] - smooth_scale * w[k]
                    elif smooth:
                        smooth_scale = scale * eps_c
                        for k in range(c):
                            g[k] = coef * g[k] - smooth_scale
                    else:
                        for k in range(c):
                            g[k] = coef * g[k]
                    g[t] -= scale * one_minus_eps * w_t

    @jit
    def rows_soft(logits, q, w, has_weight, one_minus_eps, eps_c, scale, compute_grad, fast_exp, rows_per_task, loss,
                  grad):
        n, c = logits.shape
        for task in loop((n + rows_per_task - 1) // rows_per_task):
            scratch = np.empty(0 if compute_grad else c, logits.dtype)
            for i in range(task * rows_per_task, min(n, (task + 1) * rows_per_task)):
                z = logits[i]
                qi = q[i]
                g = grad[i] if compute_grad else scratch
                m = _nb_row_max(z)
                _nb_exp_shifted(z, m, g, fast_exp)
                s = _nb_row_sum(g)
                a, total_u = _nb_target_sums(z, m, qi, w, has_weight, one_minus_eps, eps_c)
                loss[i] = total_u * np.log(s) - a
                if compute_grad:
                    coef = z.dtype.type(scale * total_u / s)
                    if has_weight:
                        for k in range(c):
                            g[k] = coef * g[k] - scale * ((one_minus_eps * qi[k] + eps_c) * w[k])
                    else:
                        for k in range(c):
                            g[k] = coef * g[k] - scale * (one_minus_eps * qi[k] + eps_c)

    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return _numba_parallel(rows_hard), _numba_parallel(rows_soft)
    return rows_hard, rows_soft

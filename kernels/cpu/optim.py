"""Optimizer steps on the CPU: Adam/AdamW, SGD, Adagrad and RMSprop, in place, PyTorch semantics.

Every impl of these kernels (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy``
elsewhere) updates ``param`` and its state arrays in place. The arrays are same-shape,
C-contiguous, and in practice flat buffers holding a whole model, so one call updates the whole
model. Every kernel also takes, as keywords (PyTorch's fused optimizers with a GradScaler):

- ``found_inf``: a one-element float32 array on the arrays' device. When it holds a nonzero value
  the call writes nothing at all (a skipped step); the GPU impls read it on the device, so the
  caller never waits for it.
- ``inv_scale``: a one-element float32 array: the gradient is multiplied by it before use (the
  loss-scale unscale folded into the update), and the unscaled gradient is written back into
  ``grad``, as torch's fused Adam does. Without it ``grad`` is never written.
- ``param_out``: a float16 or bfloat16 array. ``param`` is then the float32 master copy (its
  states are float32 too) and ``grad`` has ``param_out``'s dtype: the update runs in float32 and
  writes the master rounded to nearest-even into ``param_out`` in the same pass. ``param_out`` is
  read first: where it no longer holds the master rounded (the parameter was written since the
  last step: a checkpoint load, an in-place change through ``.data``), the master restarts from its
  value. So the parameter stays the source of truth and the master only adds the low bits.

and the step count (``step``, SGD's ``first_step``) and the learning rate (``lr``; not RMSprop's)
either as a Python number or as a one-element array on the arrays' device, which the GPU impls read
there: a step count that depends on device flags, such as skipped steps, needs no host read, and a
launch captured in a CUDA graph reads the current step count and learning rate at every replay (the
optimizers' ``capturable=True``). A one-element array in host memory is read as the number it holds.

This module also holds the one validator per kernel that every impl calls first
(:func:`validate_adam`, :func:`validate_sgd`, :func:`validate_adagrad`, :func:`validate_rmsprop`),
and the host-side scalar preparation the fused impls share (bias corrections are computed here once
per step, never per element).

``import engine.kernels.cpu.optim`` does not import numba: the jitted functions are built on first use.
"""

from __future__ import annotations

import functools
import math
from itertools import combinations, starmap
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .. import threads as _threads
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import different_gpus as _different_gpus
from ..registry import module_of as _module_of
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..registry import numba_parallel as _numba_parallel

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Parameter dtypes updated through a float32 master copy (param_out); their grads have that dtype too.
LOW_PRECISION_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
MASTER_DTYPE = np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


def _address_range(a) -> tuple[int, int]:
    """[start, end) byte addresses of a C-contiguous array's data."""
    if _module_of(a) == "cupy":
        start = a.data.ptr
    else:
        start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def _check_arrays(kernel: str, arrays: dict, written: tuple[str, ...], low: tuple[str, ...] = ()):
    """Check the arrays of one call; return their common dtype (the master's with ``param_out``).

    ``arrays`` maps argument name -> array for the arrays this call uses (all required);
    ``written`` names those updated in place; ``low`` names those in the 16-bit dtype of
    ``param_out`` (grad and param_out) when the call has one, the others being float32.
    """
    dtype = _arrays_pass(arrays, written, low)
    if dtype is not None:
        return dtype
    return _check_arrays_fully(kernel, arrays, written, low)  # something may be wrong: find it and name it


def _check_arrays_fully(kernel: str, arrays: dict, written: tuple[str, ...], low: tuple[str, ...] = ()):
    """:func:`_check_arrays` one check at a time, raising KernelError at the first that fails."""
    def fail(problem: str):
        # The call is described only when it fails: validation runs on every step.
        listing = ", ".join(_describe(n, a) for n, a in arrays.items())
        raise KernelError(f"{kernel}({listing}): {problem}")

    problem = _misplaced_arrays_message(arrays)
    if problem:
        fail(problem)
    param = arrays["param"]
    if low:
        _check_master_dtypes(arrays, low, fail)
    else:
        _check_float_dtypes(arrays, fail)
    for name, a in arrays.items():
        if a.shape != param.shape:
            fail(f"{name} has shape {tuple(a.shape)} but param has shape {tuple(param.shape)}; "
                 "every state array must match param")
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            fail(f"{name} is not C-contiguous; pass a contiguous buffer (e.g. the flat parameter buffer, "
                 "or ascontiguousarray)")
    for name in written:
        if not getattr(arrays[name].flags, "writeable", True):
            fail(f"{name} is read-only but is updated in place")
    if param.size:
        ranges = {n: _address_range(a) for n, a in arrays.items()}
        names = list(arrays)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                if first not in written and second not in written:
                    continue
                (s1, e1), (s2, e2) = ranges[first], ranges[second]
                if s1 < e2 and s2 < e1:
                    fail(f"{first} and {second} overlap in memory; each state array needs its own buffer "
                         "(the step updates them in place)")
    return param.dtype


def _check_float_dtypes(arrays: dict, fail) -> None:
    """Without param_out: every array float32, or every one float64."""
    param = arrays["param"]
    for name, a in arrays.items():
        if a.dtype in LOW_PRECISION_DTYPES:
            fail(f"{name} has dtype {a.dtype}; a {a.dtype} parameter is updated through a float32 master copy: "
                 f"pass the master as param (with float32 states and a {a.dtype} grad) and the parameter "
                 "as param_out")
        if a.dtype not in FLOAT_DTYPES:
            fail(f"{name} has dtype {a.dtype}; only float32 and float64 are supported "
                 "(and float16 / bfloat16 grads with param_out)")
    if len({a.dtype for a in arrays.values()}) > 1:
        odd = [n for n, a in arrays.items() if a.dtype != param.dtype]
        fail(f"all arrays must share one dtype, but {', '.join(odd)} differ from param ({param.dtype}); "
             "cast them with .astype(param.dtype) (no silent promotion)")


def _check_master_dtypes(arrays: dict, low: tuple[str, ...], fail) -> None:
    """With param_out: param_out float16 or bfloat16, grad the same, param and states float32."""
    low_dtype = arrays["param_out"].dtype
    if low_dtype not in LOW_PRECISION_DTYPES:
        fail(f"param_out has dtype {low_dtype}; it must be float16 or bfloat16 (the parameter that the float32 "
             "master param is rounded into)")
    for name, a in arrays.items():
        expected = low_dtype if name in low else MASTER_DTYPE
        if a.dtype != expected:
            role = "the parameter's dtype, like param_out" if name in low else "float32, like the master param"
            fail(f"{name} has dtype {a.dtype}; with a {low_dtype} param_out it must be {expected} ({role})")


def _arrays_pass(arrays: dict, written: tuple[str, ...], low: tuple[str, ...] = ()):
    """The arrays' dtype when every check of :func:`_check_arrays` passes, else None.

    The same checks in one pass, with no error text prepared: this runs on every optimizer step,
    and the full checks were most of an adam_step call's host Python (docs/benchmarks.md, "Why the
    thresholds are where they are"). Arrays of exactly numpy.ndarray or one cupy type only; anything
    else returns None and gets the full checks.
    """
    param = arrays["param"]
    cls = type(param)
    on_cpu = cls is np.ndarray
    if not on_cpu and cls.__module__.split(".")[0] != "cupy":
        return None
    dtype, shape = param.dtype, param.shape
    if dtype not in FLOAT_DTYPES:
        return None
    values = list(arrays.values())
    if low:
        low_dtype = arrays["param_out"].dtype
        if dtype != MASTER_DTYPE or low_dtype not in LOW_PRECISION_DTYPES:
            return None
        for name, a in arrays.items():
            expected = low_dtype if name in low else dtype
            if type(a) is not cls or a.dtype != expected or a.shape != shape or not a.flags.c_contiguous:
                return None
    else:
        for a in values:
            if type(a) is not cls or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
                return None
    if on_cpu:
        for name in written:
            if not arrays[name].flags.writeable:
                return None
    elif _different_gpus(values):
        return None
    if param.size and _any_overlap(values, on_cpu):
        return None
    return dtype


def _any_overlap(values: list, on_cpu: bool) -> bool:
    """Whether any two of the arrays share memory (C-contiguous arrays of one shape).

    Any overlap at all sends the call to the full checks, which raise only when one of the two
    arrays is written.
    """
    if on_cpu:  # numpy compares the arrays' memory bounds in C, cheaper than reading two addresses
        return any(starmap(np.may_share_memory, combinations(values, 2)))
    # Sorted by start, two ranges overlap iff some range starts before its predecessor ends.
    spans = sorted((a.data.ptr, a.nbytes) for a in values)
    return any(start < prev + size for (prev, size), (start, _) in zip(spans, spans[1:]))


def _check_one_element(kernel: str, name: str, a, param, kind: str):
    """``a`` (found_inf, inv_scale, a step count) as a one-element array on param's device.

    ``kind`` is the dtype kinds it may have: ``"f"`` for the float32 flags, ``"fd"`` for a learning
    rate (float32 or float64), ``"iu"`` for step counts, ``"biuf"`` for SGD's first_step.
    """
    if isinstance(a, np.generic) and type(param) is np.ndarray:
        a = np.asarray(a)  # numpy's 0-d arithmetic returns scalars: the same host value
    same_place = type(a) is type(param) and (type(a) is np.ndarray or a.device.id == param.device.id)
    if same_place and a.size == 1 and _dtype_fits(a.dtype, kind):
        return a
    wanted = {"f": "float32", "fd": "float32 or float64", "iu": "integer", "biuf": "bool or numeric"}[kind]
    where = "a numpy array" if type(param) is np.ndarray else f"a cupy array on cuda:{param.device.id}"
    raise KernelError(f"{kernel}: {name} must be a one-element {wanted} array on the arrays' device ({where}, "
                      f"like {_describe('param', param)}), got {_describe(name, a)}")


def _dtype_fits(dtype, kind: str) -> bool:
    if kind == "f":
        return dtype == MASTER_DTYPE
    if kind == "fd":
        return dtype in FLOAT_DTYPES
    return dtype.kind in kind


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _amp_arrays(kernel: str, param, found_inf, inv_scale) -> None:
    """Check the optional found_inf / inv_scale arguments (see the module docstring); numpy
    scalars pass for numpy arrays (the impls read them with ``.reshape``)."""
    if found_inf is not None:
        _check_one_element(kernel, "found_inf", found_inf, param, "f")
    if inv_scale is not None:
        _check_one_element(kernel, "inv_scale", inv_scale, param, "f")


def _with_master(arrays: dict, written: tuple[str, ...], param_out, inv_scale) -> tuple[dict, tuple, tuple]:
    """(arrays, written, low) for :func:`_check_arrays`: param_out added when the call has one, and
    grad among the written arrays when inv_scale writes the unscaled gradient back."""
    if inv_scale is not None:
        written += ("grad",)
    if param_out is None:
        return arrays, written, ()
    return {**arrays, "param_out": param_out}, written + ("param_out",), ("grad", "param_out")


def _on_gpu(a) -> bool:
    return type(a) is not np.ndarray


def _xp_of(a):
    """The array module of a cupy array (imported here only once a cupy array was handed in)."""
    import cupy

    return cupy


def _check_scalar(kernel: str, name: str, value, low: float | None = 0.0, high: float | None = None,
                  high_open: bool = False) -> float:
    """``value`` as a Python float (a weak scalar: it never promotes float32 arrays), range-checked."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise KernelError(f"{kernel}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(x):
        raise KernelError(f"{kernel}: {name} must be finite, got {value!r}")
    if low is not None and x < low:
        raise KernelError(f"{kernel}: invalid {name}={value!r}; it must be >= {low}")
    if high is not None and (x >= high if high_open else x > high):
        raise KernelError(f"{kernel}: invalid {name}={value!r}; it must be {'<' if high_open else '<='} {high}")
    return x


def _check_step(kernel: str, step, param):
    """The 1-based step count as an int, or (on a GPU) the one-element device array holding it."""
    if _is_array(step):
        step = _check_one_element(kernel, "step", step, param, "iu")
        if _on_gpu(step):
            return step  # read on the device; a count below 1 there is the caller's contract
        step = step.reshape(-1)[0]  # host memory: read it and check it as a number
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise KernelError(f"{kernel}: step must be the 1-based step count after this update "
                          f"(an int >= 1, or a one-element integer array on the arrays' device), got {step!r}")
    return int(step)


def _check_lr(kernel: str, lr, param):
    """The learning rate as a range-checked float, or (on a GPU) the one-element float32 / float64
    device array holding it, read there by the kernel (its range is then the caller's contract:
    checking it would be a host read)."""
    if _is_array(lr):
        lr = _check_one_element(kernel, "lr", lr, param, "fd")
        if _on_gpu(lr):
            return lr
        lr = lr.reshape(-1)[0].item()  # host memory: read it and check it as a number
    return _check_scalar(kernel, "lr", lr)


def _check_first_step(kernel: str, first_step, param):
    """SGD's first_step as a bool, or (on a GPU) the one-element device array holding it."""
    if _is_array(first_step):
        first_step = _check_one_element(kernel, "first_step", first_step, param, "biuf")
        if _on_gpu(first_step):
            return first_step
        first_step = first_step.reshape(-1)[0]
    return bool(first_step)


def _device_scalars(dtype, *values):
    """Per-step scalars as one device array of ``dtype``: device arrays (computed on the GPU from a
    device step count or learning rate) and Python numbers, the numbers written by a fill kernel
    (never copied from the host: that would be a wait, and a CUDA graph cannot capture it)."""
    xp = _xp_of(next(v for v in values if _is_array(v)))
    parts = [xp.asarray(v, dtype=np.float64).reshape(1) if _is_array(v) else xp.full((1,), float(v), np.float64)
             for v in values]
    return xp.concatenate(parts).astype(dtype)


def _sqrt_for(value):
    """``math.sqrt`` for a host number, the array module's sqrt for a device array."""
    return _xp_of(value).sqrt if _is_array(value) else math.sqrt


def _need(kernel: str, name: str, a, why: str, param):
    if a is None:
        raise KernelError(f"{kernel}: {why} needs {name} (an array like {_describe('param', param)}; "
                          "start it at zeros), got None")


# The per-step scalars are NamedTuples: immutable like a frozen dataclass, and built in a third of
# the time (a frozen dataclass sets each field through object.__setattr__), once per step.
class AdamScalars(NamedTuple):
    """Per-step scalars of Adam, computed once on the host (no per-element pow)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    lr: float | None  # None when lr is a device array
    step_size: float | None  # lr / (1 - beta1**step); None when step or lr is a device array
    bias_correction2_sqrt: float | None  # sqrt(1 - beta2**step); None when step or lr is a device array
    decay_factor: float | None  # 1 - lr * weight_decay (AdamW); None when step or lr is a device array
    decoupled: bool
    amsgrad: bool
    maximize: bool
    # GPU step count or lr: [step_size, bias_correction2_sqrt, decay_factor] on the device
    device_scalars: object = None

    def kernel_scalars(self) -> tuple:
        """The scalars the update kernels take, in their order (optim.cu, numba_cuda, numba_cpu); 0.0
        stands for one the kernel reads from device_scalars instead."""
        return (self.beta1, self.beta2, 1.0 - self.beta1, 1.0 - self.beta2, _or_zero(self.step_size),
                _or_zero(self.bias_correction2_sqrt), self.eps, self.weight_decay, _or_zero(self.decay_factor))


def _or_zero(value):
    return 0.0 if value is None else value


def adam_bias_corrections(lr: float, beta1: float, beta2: float, step, sqrt=math.sqrt):
    """``(step_size, sqrt(1 - beta2**step))`` of the 1-based ``step``: Python floats for an int
    step, float64 device arrays (``sqrt=xp.sqrt``) for a device step count."""
    return lr / (1.0 - beta1 ** step), sqrt(1.0 - beta2 ** step)


def validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
                  decoupled_weight_decay, amsgrad, maximize, step, found_inf=None, inv_scale=None,
                  param_out=None) -> AdamScalars:
    """Check one adam_step call; return its host-side scalars. Raises KernelError."""
    k = "adam_step"
    if amsgrad:
        _need(k, "max_exp_avg_sq", max_exp_avg_sq, "amsgrad=True", param)
    arrays = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    written = ("param", "exp_avg", "exp_avg_sq")
    if amsgrad:
        arrays["max_exp_avg_sq"] = max_exp_avg_sq
        written += ("max_exp_avg_sq",)
    dtype = _check_arrays(k, *_with_master(arrays, written, param_out, inv_scale))
    _amp_arrays(k, param, found_inf, inv_scale)
    lr = _check_lr(k, lr, param)
    beta1 = _check_scalar(k, "beta1", beta1, 0.0, 1.0, high_open=True)
    beta2 = _check_scalar(k, "beta2", beta2, 0.0, 1.0, high_open=True)
    eps = _check_scalar(k, "eps", eps)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    step = _check_step(k, step, param)
    step_size, bc2_sqrt = adam_bias_corrections(lr, beta1, beta2, step, _sqrt_for(step))
    decay_factor, device = 1.0 - lr * weight_decay, None
    if _is_array(step) or _is_array(lr):
        device = _device_scalars(dtype, step_size, bc2_sqrt, decay_factor)
        lr = step_size = bc2_sqrt = decay_factor = None
    return AdamScalars(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, lr=lr,
                       step_size=step_size, bias_correction2_sqrt=bc2_sqrt,
                       decay_factor=decay_factor, decoupled=bool(decoupled_weight_decay),
                       amsgrad=bool(amsgrad), maximize=bool(maximize), device_scalars=device)


class SgdScalars(NamedTuple):
    lr: float | None  # None when lr or first_step is a device array
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    first_step: bool | None  # None when first_step is a device array
    device_scalars: object = None  # GPU first_step or lr: [1.0 or 0.0, lr] on the device

    def kernel_scalars(self) -> tuple:
        """The scalars the update kernels take, in their order (optim.cu, numba_cuda, numba_cpu); 0.0
        stands for one the kernel reads from device_scalars instead."""
        return (_or_zero(self.lr), self.momentum, 1.0 - self.dampening, self.weight_decay)


def validate_sgd(param, grad, momentum_buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                 first_step, found_inf=None, inv_scale=None, param_out=None) -> SgdScalars:
    """Check one sgd_step call; return its scalars. Raises KernelError."""
    k = "sgd_step"
    lr = _check_lr(k, lr, param)
    momentum = _check_scalar(k, "momentum", momentum)
    dampening = _check_scalar(k, "dampening", dampening, low=None)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise KernelError(f"{k}: nesterov=True requires momentum > 0 and dampening == 0 "
                          f"(got momentum={momentum}, dampening={dampening})")
    arrays = {"param": param, "grad": grad}
    written = ("param",)
    if momentum != 0:
        _need(k, "momentum_buf", momentum_buf, f"momentum={momentum}", param)
        arrays["momentum_buf"] = momentum_buf
        written += ("momentum_buf",)
    dtype = _check_arrays(k, *_with_master(arrays, written, param_out, inv_scale))
    _amp_arrays(k, param, found_inf, inv_scale)
    first_step = _check_first_step(k, first_step, param)
    device = None
    if _is_array(first_step) or _is_array(lr):
        flag = (first_step != 0) if _is_array(first_step) else float(first_step)
        device, first_step, lr = _device_scalars(dtype, flag, lr), None, None
    return SgdScalars(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=bool(nesterov), maximize=bool(maximize), first_step=first_step,
                      device_scalars=device)


class AdagradScalars(NamedTuple):
    clr: float | None  # lr / (1 + (step - 1) * lr_decay); None when step or lr is a device array
    weight_decay: float
    eps: float
    maximize: bool
    device_scalars: object = None  # GPU step count or lr: [clr] on the device

    def kernel_scalars(self) -> tuple:
        """The scalars the update kernels take, in their order (optim.cu, numba_cuda, numba_cpu); 0.0
        stands for one the kernel reads from device_scalars instead."""
        return (_or_zero(self.clr), self.weight_decay, self.eps)


def adagrad_decayed_lr(lr: float, lr_decay: float, step):
    """Adagrad's learning rate at the 1-based ``step`` (an int, or a device array)."""
    return lr / (1.0 + (step - 1) * lr_decay)


def validate_adagrad(param, grad, state_sum, *, lr, lr_decay, weight_decay, eps, step, maximize, found_inf=None,
                     inv_scale=None, param_out=None) -> AdagradScalars:
    """Check one adagrad_step call; return its scalars. Raises KernelError."""
    k = "adagrad_step"
    dtype = _check_arrays(k, *_with_master({"param": param, "grad": grad, "state_sum": state_sum},
                                           ("param", "state_sum"), param_out, inv_scale))
    _amp_arrays(k, param, found_inf, inv_scale)
    lr = _check_lr(k, lr, param)
    lr_decay = _check_scalar(k, "lr_decay", lr_decay)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    eps = _check_scalar(k, "eps", eps)
    step = _check_step(k, step, param)
    clr, device = adagrad_decayed_lr(lr, lr_decay, step), None
    if _is_array(clr):
        clr, device = None, _device_scalars(dtype, clr)
    return AdagradScalars(clr=clr, weight_decay=weight_decay, eps=eps, maximize=bool(maximize),
                          device_scalars=device)


class RmspropScalars(NamedTuple):
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool

    def kernel_scalars(self) -> tuple:
        """The scalars the update kernels take, in their order (optim.cu, numba_cuda, numba_cpu)."""
        return (self.lr, self.alpha, 1.0 - self.alpha, self.eps, self.weight_decay, self.momentum)


def validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, *, lr, alpha, eps, weight_decay, momentum,
                     centered, maximize, found_inf=None, inv_scale=None, param_out=None) -> RmspropScalars:
    """Check one rmsprop_step call; return its scalars. Raises KernelError."""
    k = "rmsprop_step"
    lr = _check_lr(k, lr, param)
    if _is_array(lr):
        raise KernelError(f"{k}: lr must be a number (the RMSprop kernels take no device scalars), got "
                          f"{_describe('lr', lr)}")
    alpha = _check_scalar(k, "alpha", alpha)
    eps = _check_scalar(k, "eps", eps)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    momentum = _check_scalar(k, "momentum", momentum)
    arrays = {"param": param, "grad": grad, "square_avg": square_avg}
    written = ("param", "square_avg")
    if momentum != 0:
        _need(k, "momentum_buf", momentum_buf, f"momentum={momentum}", param)
        arrays["momentum_buf"] = momentum_buf
        written += ("momentum_buf",)
    if centered:
        _need(k, "grad_avg", grad_avg, "centered=True", param)
        arrays["grad_avg"] = grad_avg
        written += ("grad_avg",)
    _check_arrays(k, *_with_master(arrays, written, param_out, inv_scale))
    _amp_arrays(k, param, found_inf, inv_scale)
    return RmspropScalars(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                          centered=bool(centered), maximize=bool(maximize))


# --------------------------------------------------------------------------------------------
# numpy: the reference. Follows torch.optim's single-tensor code line by line, in the arrays'
# dtype (the scalars are Python floats, so float32 stays float32); a float16 / bfloat16 gradient
# is read as float32 and the float32 master is rounded into param_out at the end.
# --------------------------------------------------------------------------------------------


def _numpy_grad(grad, found_inf, inv_scale, maximize):
    """The gradient the update uses (a new array, or grad itself, then only read), or None when
    found_inf says to skip the step. With inv_scale the unscaled gradient is written back to grad."""
    if found_inf is not None and found_inf.reshape(-1)[0] != 0:
        return None
    g = grad.astype(MASTER_DTYPE) if grad.dtype in LOW_PRECISION_DTYPES else grad
    if inv_scale is not None:
        g = g * inv_scale.reshape(())
        grad[...] = g
    return -g if maximize else g


def _resync_master(param, param_out) -> None:
    """Restart the master from param_out where param_out is not the master rounded (see the module docstring)."""
    if param_out is not None:
        np.copyto(param, param_out.astype(MASTER_DTYPE), where=param.astype(param_out.dtype) != param_out)


def _round_out(param, param_out) -> None:
    if param_out is not None:
        param_out[...] = param  # numpy / ml_dtypes casts round to nearest-even


def _numpy_step(update, param, grad, param_out, found_inf, inv_scale, maximize) -> None:
    """What every numpy step does around its update: the skip, the unscaled (and negated) gradient,
    the master copy. ``update(g)`` updates param and the states in place."""
    g = _numpy_grad(grad, found_inf, inv_scale, maximize)
    if g is None:
        return
    _resync_master(param, param_out)
    update(g)
    _round_out(param, param_out)


# The array updates: each optimizer's formula on whole arrays, in place, given the gradient ``g``
# already unscaled and negated for maximize, and its per-step scalars as the caller computed them
# (Python floats, or arrays computed on the device from a device step count or learning rate).
# ``xp`` is the arrays' module: the numpy steps here and the engine's unfused optimizer path
# (cupy arrays included) both run them.


def adam_update(xp, param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, *, beta1, beta2, eps, weight_decay, decoupled,
                amsgrad, step_size, bias_correction2_sqrt, decay_factor) -> None:
    """Adam / AdamW (``decoupled``) on arrays; ``decay_factor`` is ``1 - lr * weight_decay``."""
    if weight_decay != 0:
        if decoupled:
            param *= decay_factor
        else:
            g = g + weight_decay * param
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * g
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * (g * g)
    second = exp_avg_sq
    if amsgrad:
        xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = xp.sqrt(second) / bias_correction2_sqrt + eps
    param -= step_size * (exp_avg / denom)


def sgd_update(xp, param, g, momentum_buf, *, lr, momentum, dampening, weight_decay, nesterov, first_step) -> None:
    """SGD on arrays; ``first_step`` is a bool, or a device bool array (decided there: no host read)."""
    if weight_decay != 0:
        g = g + weight_decay * param
    if momentum != 0:
        if _is_array(first_step):
            momentum_buf[...] = xp.where(first_step, g, momentum * momentum_buf + (1.0 - dampening) * g)
        elif first_step:
            momentum_buf[...] = g
        else:
            momentum_buf *= momentum
            momentum_buf += (1.0 - dampening) * g
        g = g + momentum * momentum_buf if nesterov else momentum_buf
    param -= lr * g


def adagrad_update(xp, param, g, state_sum, *, clr, weight_decay, eps) -> None:
    """Adagrad on arrays; ``clr`` is the decayed learning rate (:func:`adagrad_decayed_lr`)."""
    if weight_decay != 0:
        g = g + weight_decay * param
    state_sum += g * g
    param -= clr * (g / (xp.sqrt(state_sum) + eps))


def rmsprop_update(xp, param, g, square_avg, momentum_buf, grad_avg, *, lr, alpha, eps, weight_decay, momentum,
                   centered) -> None:
    """RMSprop on arrays (grad_avg used when centered, momentum_buf when momentum > 0)."""
    if weight_decay != 0:
        g = g + weight_decay * param
    square_avg *= alpha
    square_avg += (1.0 - alpha) * (g * g)
    if centered:
        grad_avg *= alpha
        grad_avg += (1.0 - alpha) * g
        avg = xp.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = xp.sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buf *= momentum
        momentum_buf += g / avg
        param -= lr * momentum_buf
    else:
        param -= lr * (g / avg)


def adam_step_numpy(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                    step, found_inf=None, inv_scale=None, param_out=None):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step, found_inf=found_inf, inv_scale=inv_scale,
                      param_out=param_out)
    _numpy_step(lambda g: adam_update(np, param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1=s.beta1,
                                      beta2=s.beta2, eps=s.eps, weight_decay=s.weight_decay, decoupled=s.decoupled,
                                      amsgrad=s.amsgrad, step_size=s.step_size,
                                      bias_correction2_sqrt=s.bias_correction2_sqrt, decay_factor=s.decay_factor),
                param, grad, param_out, found_inf, inv_scale, s.maximize)


def sgd_step_numpy(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False, first_step=False, found_inf=None, inv_scale=None,
                   param_out=None):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                     found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    _numpy_step(lambda g: sgd_update(np, param, g, momentum_buf, lr=s.lr, momentum=s.momentum,
                                     dampening=s.dampening, weight_decay=s.weight_decay, nesterov=s.nesterov,
                                     first_step=s.first_step),
                param, grad, param_out, found_inf, inv_scale, s.maximize)


def adagrad_step_numpy(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step,
                       maximize=False, found_inf=None, inv_scale=None, param_out=None):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize, found_inf=found_inf, inv_scale=inv_scale,
                         param_out=param_out)
    _numpy_step(lambda g: adagrad_update(np, param, g, state_sum, clr=s.clr, weight_decay=s.weight_decay,
                                         eps=s.eps),
                param, grad, param_out, found_inf, inv_scale, s.maximize)


def rmsprop_step_numpy(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, maximize=False, found_inf=None,
                       inv_scale=None, param_out=None):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
                         found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    _numpy_step(lambda g: rmsprop_update(np, param, g, square_avg, momentum_buf, grad_avg, lr=s.lr, alpha=s.alpha,
                                         eps=s.eps, weight_decay=s.weight_decay, momentum=s.momentum,
                                         centered=s.centered),
                param, grad, param_out, found_inf, inv_scale, s.maximize)


# --------------------------------------------------------------------------------------------
# The per-element updates, written once as plain Python scalar code and compiled by numba for
# both jitted impls: numba_cpu below (``numba.extending.register_jitable``, called from its loop)
# and numba_cuda (``numba.cuda.jit(device=True)``). Each takes the element index ``i``, the
# parameter ``pi`` and the gradient ``gi`` as the loop prepared them (unscaled, negated for
# maximize, the master restarted), reads and writes the optimizer's state arrays at ``i``, and
# returns the new parameter. The scalars arrive in the arrays' dtype and the switches as booleans
# (see the loops), so float32 arithmetic stays float32. ``math.sqrt`` is the one square root both
# numba compilers type for float32 and float64 alike.
# --------------------------------------------------------------------------------------------


def adam_element(i, pi, gi, m, v, vmax, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps,
                 weight_decay, decay_factor, use_wd, decoupled, amsgrad):
    """Adam / AdamW (``decoupled``) at element ``i``: updates m, v (and vmax with amsgrad)."""
    if use_wd:
        if decoupled:
            pi = pi * decay_factor
        else:
            gi = gi + weight_decay * pi
    mi = beta1 * m[i] + one_minus_beta1 * gi
    vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
    m[i] = mi
    v[i] = vi
    if amsgrad:
        old = vmax[i]
        if old >= vi or old != old:  # a NaN in either propagates, as np.maximum does
            vi = old
        vmax[i] = vi
    denom = math.sqrt(vi) / bc2_sqrt + eps
    return pi - step_size * (mi / denom)


def sgd_element(i, pi, gi, buf, lr, momentum, one_minus_dampening, weight_decay, use_wd, use_momentum, nesterov,
                first_step):
    """SGD (momentum, nesterov) at element ``i``: updates the momentum buffer when ``use_momentum``."""
    if use_wd:
        gi = gi + weight_decay * pi
    if use_momentum:
        bi = gi if first_step else momentum * buf[i] + one_minus_dampening * gi
        buf[i] = bi
        gi = gi + momentum * bi if nesterov else bi
    return pi - lr * gi


def adagrad_element(i, pi, gi, state_sum, clr, weight_decay, eps, use_wd):
    """Adagrad at element ``i`` (``clr``: the decayed learning rate): updates state_sum."""
    if use_wd:
        gi = gi + weight_decay * pi
    si = state_sum[i] + gi * gi
    state_sum[i] = si
    return pi - clr * (gi / (math.sqrt(si) + eps))


def rmsprop_element(i, pi, gi, square_avg, buf, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                    use_wd, use_momentum, centered):
    """RMSprop at element ``i``: updates square_avg (grad_avg when centered, buf with momentum)."""
    if use_wd:
        gi = gi + weight_decay * pi
    sq = alpha * square_avg[i] + one_minus_alpha * (gi * gi)
    square_avg[i] = sq
    if centered:
        ga = alpha * grad_avg[i] + one_minus_alpha * gi
        grad_avg[i] = ga
        avg = math.sqrt(sq - ga * ga) + eps
    else:
        avg = math.sqrt(sq) + eps
    if use_momentum:
        bi = momentum * buf[i] + gi / avg
        buf[i] = bi
        return pi - lr * bi
    return pi - lr * (gi / avg)


ELEMENTS = (adam_element, sgd_element, adagrad_element, rmsprop_element)


# --------------------------------------------------------------------------------------------
# numba_cpu: one pass per step, each element read and written once (no temporaries). Scalars
# are cast to the arrays' dtype so float32 arithmetic stays float32; fastmath is off so the
# results agree with the numpy reference to rounding.
#
# Each kernel is built twice from one source: a parallel loop (prange) for buffers of
# PARALLEL_MIN elements or more, and a serial loop below that: set with a margin above where the
# parallel loop starts to win, because a region waits for its slowest thread and a busy machine
# deschedules one. Up to threads.REGION_ALWAYS_MIN the parallel loop runs only while other processes
# leave CPUs free (threads.parallel_region): the GPT's AdamW step (0.8M parameters) took 0.75 ms
# serial and 0.93-1.27 ms parallel beside busy processes (docs/benchmarks.md, issue 26). The update itself is the optimizer's element function above (see the note on
# _nrt in _build_numba_kernels). (Measurements: docs/benchmarks.md, "Why the thresholds are where
# they are".) The parallel builds are called through registry.numba_parallel (a process-wide
# lock): numba's workqueue layer aborts the process when two Python threads run parallel regions
# at once.
# --------------------------------------------------------------------------------------------

PARALLEL_MIN = 1 << 17


def _flat(a):
    return a.reshape(-1)


def bits_view(a):
    """``a`` as the numba loops take it: float16 as its bits in int16, bfloat16 in uint16 (numba has no
    16-bit float type on the CPU; kernels/cpu/half_bits.py reads and writes them)."""
    if a.dtype == np.float16:
        return a.view(np.int16)
    if a.dtype in LOW_PRECISION_DTYPES:
        return a.view(np.uint16)
    return a


def _typed(dtype, *values):
    return tuple(dtype.type(v) for v in values)


class _NumbaAmp(NamedTuple):
    """The numba loops' view of found_inf / inv_scale / param_out (found_inf is read here, on the host)."""

    grad: object  # flat, 16-bit grads as bits
    grad_out: object  # grad again when it receives the unscaled gradient, else an empty placeholder
    out: object  # flat param_out as bits, or an empty placeholder never written
    inv_scale: float
    unscale: bool
    has_out: bool


def _numba_amp(param, grad, found_inf, inv_scale, param_out) -> _NumbaAmp | None:
    """None when found_inf says to skip the step (host memory: reading it costs nothing)."""
    if found_inf is not None and found_inf.reshape(-1)[0] != 0:
        return None
    # Separate arrays for what is written: a read-only grad is fine unless it receives the unscaled
    # gradient, and numba refuses to compile a store into a read-only array even on a branch not taken.
    grad = _flat(bits_view(grad))
    out = _flat(bits_view(param_out)) if param_out is not None else _flat(param)[:0]
    inv = float(inv_scale.reshape(-1)[0]) if inv_scale is not None else 1.0
    grad_out = grad if inv_scale is not None else out[:0]
    return _NumbaAmp(grad, grad_out, out, inv, inv_scale is not None, param_out is not None)


def _numba_kernels(n: int, amp: _NumbaAmp) -> dict:
    """The jitted loops for a buffer of ``n`` elements (parallel ones for large buffers) and this
    call's gradient unscale and param_out switches."""
    return _build_numba_kernels(_threads.parallel_region(n, PARALLEL_MIN), amp.unscale, amp.has_out)


@functools.cache
def _jitable_elements() -> None:
    """Make the per-element updates callable from numba_cpu's loops (once per process)."""
    from numba.extending import register_jitable

    for element in ELEMENTS:
        register_jitable(error_model="numpy", _nrt=False)(element)


@functools.cache
def _build_numba_kernels(parallel: bool, unscale: bool, has_out: bool) -> dict:
    import numba

    from ..cpu.half_bits import load, rounded, store

    _jitable_elements()
    # `loop`, `unscale` and `has_out` are closure variables of every kernel: numba folds the two
    # switches as constants (passed as arguments, LLVM stopped vectorizing the float32 Adam loop;
    # docs/benchmarks.md, "Why the thresholds are where they are"), and each build gets its own key
    # in numba's on-disk cache (the key hashes closure contents).
    loop = numba.prange if parallel else range
    # error_model="numpy": x / 0 gives inf or nan as in the numpy reference. The default ("python")
    # raises ZeroDivisionError, and its per-division check also keeps LLVM from vectorizing the loop.
    jit = numba.njit(cache=True, parallel=parallel, fastmath=False, error_model="numpy", _nrt=False)

    # Every loop reads the gradient with load() (16-bit bits become float32), unscales it and writes
    # it back when `unscale`, and, when `has_out` (param is then the float32 master), restarts the
    # master from `out` where `out` was written since; the optimizer's element function updates the
    # states and gives the new parameter, which the loop stores (and rounds into `out`): see
    # _numba_amp and the module docstring. _nrt=False: the loops allocate nothing, and with numba's
    # reference counting on, handing the state arrays to an element function puts incref/decref
    # calls into the loop body, which keeps LLVM from vectorizing it (Adam and RMSprop ran several
    # times slower); without it LLVM inlines the element functions and the loops compile as when
    # their bodies were written out here. The few lines around the element call stay written out in
    # each loop: as a register_jitable helper returning (gi, pi), the float16-master Adam step with
    # unscaling ran twice as slow.
    @jit
    def adam(p, g, g_out, m, v, vmax, out, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt,
             eps, weight_decay, decay_factor, inv_scale, use_wd, decoupled, amsgrad, maximize):
        for i in loop(p.shape[0]):
            gi = load(g, i)
            if unscale:
                gi = gi * inv_scale
                store(g_out, i, gi)
            if maximize:
                gi = -gi
            pi = p[i]
            if has_out and rounded(out, pi) != load(out, i):  # the parameter was written: restart the master
                pi = load(out, i)
            pi = adam_element(i, pi, gi, m, v, vmax, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                              bc2_sqrt, eps, weight_decay, decay_factor, use_wd, decoupled, amsgrad)
            p[i] = pi
            if has_out:
                store(out, i, pi)

    @jit
    def sgd(p, g, g_out, buf, out, lr, momentum, one_minus_dampening, weight_decay, inv_scale, use_wd,
            use_momentum, nesterov, maximize, first_step):
        for i in loop(p.shape[0]):
            gi = load(g, i)
            if unscale:
                gi = gi * inv_scale
                store(g_out, i, gi)
            if maximize:
                gi = -gi
            pi = p[i]
            if has_out and rounded(out, pi) != load(out, i):  # the parameter was written: restart the master
                pi = load(out, i)
            pi = sgd_element(i, pi, gi, buf, lr, momentum, one_minus_dampening, weight_decay, use_wd, use_momentum,
                             nesterov, first_step)
            p[i] = pi
            if has_out:
                store(out, i, pi)

    @jit
    def adagrad(p, g, g_out, state_sum, out, clr, weight_decay, eps, inv_scale, use_wd, maximize):
        for i in loop(p.shape[0]):
            gi = load(g, i)
            if unscale:
                gi = gi * inv_scale
                store(g_out, i, gi)
            if maximize:
                gi = -gi
            pi = p[i]
            if has_out and rounded(out, pi) != load(out, i):  # the parameter was written: restart the master
                pi = load(out, i)
            pi = adagrad_element(i, pi, gi, state_sum, clr, weight_decay, eps, use_wd)
            p[i] = pi
            if has_out:
                store(out, i, pi)

    @jit
    def rmsprop(p, g, g_out, square_avg, buf, grad_avg, out, lr, alpha, one_minus_alpha, eps, weight_decay,
                momentum, inv_scale, use_wd, use_momentum, centered, maximize):
        for i in loop(p.shape[0]):
            gi = load(g, i)
            if unscale:
                gi = gi * inv_scale
                store(g_out, i, gi)
            if maximize:
                gi = -gi
            pi = p[i]
            if has_out and rounded(out, pi) != load(out, i):  # the parameter was written: restart the master
                pi = load(out, i)
            pi = rmsprop_element(i, pi, gi, square_avg, buf, grad_avg, lr, alpha, one_minus_alpha, eps,
                                 weight_decay, momentum, use_wd, use_momentum, centered)
            p[i] = pi
            if has_out:
                store(out, i, pi)

    kernels = {"adam": adam, "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop}
    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        kernels = {name: _numba_parallel(fn) for name, fn in kernels.items()}
    return kernels


def adam_step_numba(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                    step, found_inf=None, inv_scale=None, param_out=None):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step, found_inf=found_inf, inv_scale=inv_scale,
                      param_out=param_out)
    amp = _numba_amp(param, grad, found_inf, inv_scale, param_out)
    if amp is None:
        return
    vmax = max_exp_avg_sq if s.amsgrad else exp_avg_sq  # placeholder, never read or written without amsgrad
    scalars = _typed(param.dtype, *s.kernel_scalars(), amp.inv_scale)
    kernel = _numba_kernels(param.size, amp)["adam"]
    kernel(_flat(param), amp.grad, amp.grad_out, _flat(exp_avg), _flat(exp_avg_sq), _flat(vmax), amp.out,
           *scalars, s.weight_decay != 0, s.decoupled, s.amsgrad, s.maximize)


def sgd_step_numba(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False, first_step=False, found_inf=None, inv_scale=None,
                   param_out=None):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                     found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    amp = _numba_amp(param, grad, found_inf, inv_scale, param_out)
    if amp is None:
        return
    use_momentum = s.momentum != 0
    buf = momentum_buf if use_momentum else param  # placeholder, never touched without momentum
    scalars = _typed(param.dtype, *s.kernel_scalars(), amp.inv_scale)
    kernel = _numba_kernels(param.size, amp)["sgd"]
    kernel(_flat(param), amp.grad, amp.grad_out, _flat(buf), amp.out, *scalars, s.weight_decay != 0,
           use_momentum, s.nesterov, s.maximize, s.first_step)


def adagrad_step_numba(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step,
                       maximize=False, found_inf=None, inv_scale=None, param_out=None):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize, found_inf=found_inf, inv_scale=inv_scale,
                         param_out=param_out)
    amp = _numba_amp(param, grad, found_inf, inv_scale, param_out)
    if amp is None:
        return
    scalars = _typed(param.dtype, *s.kernel_scalars(), amp.inv_scale)
    kernel = _numba_kernels(param.size, amp)["adagrad"]
    kernel(_flat(param), amp.grad, amp.grad_out, _flat(state_sum), amp.out, *scalars, s.weight_decay != 0,
           s.maximize)


def rmsprop_step_numba(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, maximize=False, found_inf=None,
                       inv_scale=None, param_out=None):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
                         found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    amp = _numba_amp(param, grad, found_inf, inv_scale, param_out)
    if amp is None:
        return
    use_momentum = s.momentum > 0
    buf = momentum_buf if use_momentum else square_avg  # placeholders, never touched when unused
    gavg = grad_avg if s.centered else square_avg
    scalars = _typed(param.dtype, *s.kernel_scalars(), amp.inv_scale)
    kernel = _numba_kernels(param.size, amp)["rmsprop"]
    kernel(_flat(param), amp.grad, amp.grad_out, _flat(square_avg), _flat(buf), _flat(gavg), amp.out, *scalars,
           s.weight_decay != 0, use_momentum, s.centered, s.maximize)

"""Optimizer steps on the CPU: Adam/AdamW, SGD, Adagrad and RMSprop, in place, PyTorch semantics.

Every impl of these kernels (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy``
elsewhere) updates ``param`` and its state arrays in place and never writes ``grad``. The arrays
are same-shape, C-contiguous, and in practice flat buffers holding a whole model, so one call
updates the whole model.

This module also holds the one validator per kernel that every impl calls first
(:func:`validate_adam`, :func:`validate_sgd`, :func:`validate_adagrad`, :func:`validate_rmsprop`),
and the host-side scalar preparation the fused impls share (bias corrections are computed here once
per step, never per element).

``import kernels.cpu.optim`` does not import numba: the jitted functions are built on first use.
"""

from __future__ import annotations

import functools
import math
from itertools import combinations, starmap
from typing import NamedTuple

import numpy as np

from kernels.registry import KernelError
from kernels.registry import describe_array as _describe
from kernels.registry import different_gpus as _different_gpus
from kernels.registry import module_of as _module_of
from kernels.registry import placement_problem as _placement_problem
from kernels.registry import numba_parallel as _numba_parallel

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


def _check_arrays(kernel: str, arrays: dict, written: tuple[str, ...]):
    """Check the arrays of one call; return their common dtype.

    ``arrays`` maps argument name -> array for the arrays this call uses (all required);
    ``written`` names those updated in place.
    """
    dtype = _arrays_pass(arrays, written)
    if dtype is not None:
        return dtype
    return _check_arrays_fully(kernel, arrays, written)  # something may be wrong: find it and name it


def _check_arrays_fully(kernel: str, arrays: dict, written: tuple[str, ...]):
    """:func:`_check_arrays` one check at a time, raising KernelError at the first that fails."""
    def fail(problem: str):
        # The call is described only when it fails: validation runs on every step.
        listing = ", ".join(_describe(n, a) for n, a in arrays.items())
        raise KernelError(f"{kernel}({listing}): {problem}")

    problem = _placement_problem(arrays)
    if problem:
        fail(problem)
    param = arrays["param"]
    for name, a in arrays.items():
        if a.dtype not in FLOAT_DTYPES:
            fail(f"{name} has dtype {a.dtype}; only float32 and float64 are supported")
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        odd = [n for n, a in arrays.items() if a.dtype != param.dtype]
        fail(f"all arrays must share one dtype, but {', '.join(odd)} differ from param ({param.dtype}); "
             "cast them with .astype(param.dtype) (no silent promotion)")
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


def _arrays_pass(arrays: dict, written: tuple[str, ...]):
    """The arrays' dtype when every check of :func:`_check_arrays` passes, else None.

    The same checks in one pass, with no error text prepared: this runs on every optimizer step,
    and the full checks took 13 of the 20 us of host Python in an adam_step call (bench/overhead.py,
    2-core CPU). Arrays of exactly numpy.ndarray or one cupy type only; anything else returns None
    and gets the full checks.
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
    """Whether any two of the arrays share memory (same-size C-contiguous arrays).

    Any overlap at all sends the call to the full checks, which raise only when one of the two
    arrays is written.
    """
    if on_cpu:  # numpy compares the arrays' memory bounds in C, cheaper than reading two addresses
        return any(starmap(np.may_share_memory, combinations(values, 2)))
    # Same-size ranges overlap iff their starts are closer than that size: sort, compare neighbours.
    starts = sorted(a.data.ptr for a in values)
    size = values[0].nbytes
    return any(second - first < size for first, second in zip(starts, starts[1:]))


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


def _check_step(kernel: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise KernelError(f"{kernel}: step must be the 1-based step count after this update "
                          f"(an int >= 1), got {step!r}")
    return int(step)


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
    lr: float
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    decay_factor: float  # 1 - lr * weight_decay (AdamW)
    decoupled: bool
    amsgrad: bool
    maximize: bool


def validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
                  decoupled_weight_decay, amsgrad, maximize, step) -> AdamScalars:
    """Check one adam_step call; return its host-side scalars. Raises KernelError."""
    k = "adam_step"
    if amsgrad:
        _need(k, "max_exp_avg_sq", max_exp_avg_sq, "amsgrad=True", param)
    arrays = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    written = ("param", "exp_avg", "exp_avg_sq")
    if amsgrad:
        arrays["max_exp_avg_sq"] = max_exp_avg_sq
        written += ("max_exp_avg_sq",)
    _check_arrays(k, arrays, written)
    lr = _check_scalar(k, "lr", lr)
    beta1 = _check_scalar(k, "beta1", beta1, 0.0, 1.0, high_open=True)
    beta2 = _check_scalar(k, "beta2", beta2, 0.0, 1.0, high_open=True)
    eps = _check_scalar(k, "eps", eps)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    step = _check_step(k, step)
    return AdamScalars(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, lr=lr,
                       step_size=lr / (1.0 - beta1 ** step),
                       bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
                       decay_factor=1.0 - lr * weight_decay, decoupled=bool(decoupled_weight_decay),
                       amsgrad=bool(amsgrad), maximize=bool(maximize))


class SgdScalars(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    first_step: bool


def validate_sgd(param, grad, momentum_buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                 first_step) -> SgdScalars:
    """Check one sgd_step call; return its scalars. Raises KernelError."""
    k = "sgd_step"
    lr = _check_scalar(k, "lr", lr)
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
    _check_arrays(k, arrays, written)
    return SgdScalars(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=bool(nesterov), maximize=bool(maximize), first_step=bool(first_step))


class AdagradScalars(NamedTuple):
    clr: float  # lr / (1 + (step - 1) * lr_decay)
    weight_decay: float
    eps: float
    maximize: bool


def validate_adagrad(param, grad, state_sum, *, lr, lr_decay, weight_decay, eps, step, maximize) -> AdagradScalars:
    """Check one adagrad_step call; return its scalars. Raises KernelError."""
    k = "adagrad_step"
    _check_arrays(k, {"param": param, "grad": grad, "state_sum": state_sum}, ("param", "state_sum"))
    lr = _check_scalar(k, "lr", lr)
    lr_decay = _check_scalar(k, "lr_decay", lr_decay)
    weight_decay = _check_scalar(k, "weight_decay", weight_decay)
    eps = _check_scalar(k, "eps", eps)
    step = _check_step(k, step)
    return AdagradScalars(clr=lr / (1.0 + (step - 1) * lr_decay), weight_decay=weight_decay, eps=eps,
                          maximize=bool(maximize))


class RmspropScalars(NamedTuple):
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool


def validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, *, lr, alpha, eps, weight_decay, momentum,
                     centered, maximize) -> RmspropScalars:
    """Check one rmsprop_step call; return its scalars. Raises KernelError."""
    k = "rmsprop_step"
    lr = _check_scalar(k, "lr", lr)
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
    _check_arrays(k, arrays, written)
    return RmspropScalars(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                          centered=bool(centered), maximize=bool(maximize))


# --------------------------------------------------------------------------------------------
# numpy: the reference. Follows torch.optim's single-tensor code line by line, in the arrays'
# dtype (the scalars are Python floats, so float32 stays float32).
# --------------------------------------------------------------------------------------------


def adam_step_numpy(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                    step):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step)
    g = -grad if s.maximize else grad  # a new array (or grad itself, only read): grad is never written
    if s.weight_decay != 0:
        if s.decoupled:
            param *= s.decay_factor
        else:
            g = g + s.weight_decay * param
    exp_avg *= s.beta1
    exp_avg += (1.0 - s.beta1) * g
    exp_avg_sq *= s.beta2
    exp_avg_sq += (1.0 - s.beta2) * (g * g)
    if s.amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq) / s.bias_correction2_sqrt + s.eps
    else:
        denom = np.sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps
    param -= s.step_size * (exp_avg / denom)


def sgd_step_numpy(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False, first_step=False):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)
    g = -grad if s.maximize else grad
    if s.weight_decay != 0:
        g = g + s.weight_decay * param
    if s.momentum != 0:
        if s.first_step:
            momentum_buf[...] = g
        else:
            momentum_buf *= s.momentum
            momentum_buf += (1.0 - s.dampening) * g
        g = g + s.momentum * momentum_buf if s.nesterov else momentum_buf
    param -= s.lr * g


def adagrad_step_numpy(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step,
                       maximize=False):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize)
    g = -grad if s.maximize else grad
    if s.weight_decay != 0:
        g = g + s.weight_decay * param
    state_sum += g * g
    param -= s.clr * (g / (np.sqrt(state_sum) + s.eps))


def rmsprop_step_numpy(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize)
    g = -grad if s.maximize else grad
    if s.weight_decay != 0:
        g = g + s.weight_decay * param
    square_avg *= s.alpha
    square_avg += (1.0 - s.alpha) * (g * g)
    if s.centered:
        grad_avg *= s.alpha
        grad_avg += (1.0 - s.alpha) * g
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + s.eps
    else:
        avg = np.sqrt(square_avg) + s.eps
    if s.momentum > 0:
        momentum_buf *= s.momentum
        momentum_buf += g / avg
        param -= s.lr * momentum_buf
    else:
        param -= s.lr * (g / avg)


# --------------------------------------------------------------------------------------------
# numba_cpu: one pass per step, each element read and written once (no temporaries). Scalars
# are cast to the arrays' dtype so float32 arithmetic stays float32; fastmath is off so the
# results agree with the numpy reference to rounding.
#
# Each kernel is built twice from one source: a parallel loop (prange) for buffers of
# PARALLEL_MIN elements or more, and a serial loop below that. On 2 cores (Adam fp32) the
# parallel loop wins from about 2^16 elements (65k: 36 us against 42 us serial; 10M: 5.6 ms
# against 10 ms), but a parallel region waits for its slowest thread, and on a busy machine a
# descheduled OpenMP thread made 1k-element steps take 8 to 16 ms against 0.01 ms serial, hence
# the margin. The loop bodies are written inline on purpose: moving them into a shared njit
# helper measured several times slower. The parallel builds are called through
# registry.numba_parallel (a process-wide lock): numba's workqueue layer aborts the process when
# two Python threads run parallel regions at once.
# --------------------------------------------------------------------------------------------

PARALLEL_MIN = 1 << 17


def _flat(a):
    return a.reshape(-1)


def _typed(dtype, *values):
    return tuple(dtype.type(v) for v in values)


def _numba_kernels(n: int) -> dict:
    """The jitted loops for a buffer of ``n`` elements: parallel ones for large buffers."""
    return _build_numba_kernels(n >= PARALLEL_MIN)


@functools.cache
def _build_numba_kernels(parallel: bool) -> dict:
    import numba

    # `loop` is a closure variable of every kernel, so the serial and the parallel build of one
    # function get different keys in numba's on-disk cache (the key hashes closure contents).
    loop = numba.prange if parallel else range
    # error_model="numpy": x / 0 gives inf or nan as in the numpy reference. The default ("python")
    # raises ZeroDivisionError, and its per-division check also keeps LLVM from vectorizing the loop.
    jit = numba.njit(cache=True, parallel=parallel, fastmath=False, error_model="numpy")

    @jit
    def adam(p, g, m, v, vmax, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps,
             weight_decay, decay_factor, use_wd, decoupled, amsgrad, maximize):
        for i in loop(p.shape[0]):
            gi = -g[i] if maximize else g[i]
            pi = p[i]
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
            denom = np.sqrt(vi) / bc2_sqrt + eps
            p[i] = pi - step_size * (mi / denom)

    @jit
    def sgd(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, use_wd, use_momentum, nesterov, maximize,
            first_step):
        for i in loop(p.shape[0]):
            gi = -g[i] if maximize else g[i]
            pi = p[i]
            if use_wd:
                gi = gi + weight_decay * pi
            if use_momentum:
                bi = gi if first_step else momentum * buf[i] + one_minus_dampening * gi
                buf[i] = bi
                gi = gi + momentum * bi if nesterov else bi
            p[i] = pi - lr * gi

    @jit
    def adagrad(p, g, state_sum, clr, weight_decay, eps, use_wd, maximize):
        for i in loop(p.shape[0]):
            gi = -g[i] if maximize else g[i]
            pi = p[i]
            if use_wd:
                gi = gi + weight_decay * pi
            si = state_sum[i] + gi * gi
            state_sum[i] = si
            p[i] = pi - clr * (gi / (np.sqrt(si) + eps))

    @jit
    def rmsprop(p, g, square_avg, buf, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, use_wd,
                use_momentum, centered, maximize):
        for i in loop(p.shape[0]):
            gi = -g[i] if maximize else g[i]
            pi = p[i]
            if use_wd:
                gi = gi + weight_decay * pi
            sq = alpha * square_avg[i] + one_minus_alpha * (gi * gi)
            square_avg[i] = sq
            if centered:
                ga = alpha * grad_avg[i] + one_minus_alpha * gi
                grad_avg[i] = ga
                avg = np.sqrt(sq - ga * ga) + eps
            else:
                avg = np.sqrt(sq) + eps
            if use_momentum:
                bi = momentum * buf[i] + gi / avg
                buf[i] = bi
                p[i] = pi - lr * bi
            else:
                p[i] = pi - lr * (gi / avg)

    kernels = {"adam": adam, "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop}
    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        kernels = {name: _numba_parallel(fn) for name, fn in kernels.items()}
    return kernels


def adam_step_numba(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                    step):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step)
    vmax = max_exp_avg_sq if s.amsgrad else exp_avg_sq  # placeholder, never read or written without amsgrad
    scalars = _typed(param.dtype, s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2, s.step_size,
                     s.bias_correction2_sqrt, s.eps, s.weight_decay, s.decay_factor)
    kernel = _numba_kernels(param.size)["adam"]
    kernel(_flat(param), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), _flat(vmax), *scalars,
           s.weight_decay != 0, s.decoupled, s.amsgrad, s.maximize)


def sgd_step_numba(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False, first_step=False):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)
    use_momentum = s.momentum != 0
    buf = momentum_buf if use_momentum else param  # placeholder, never touched without momentum
    scalars = _typed(param.dtype, s.lr, s.momentum, 1.0 - s.dampening, s.weight_decay)
    kernel = _numba_kernels(param.size)["sgd"]
    kernel(_flat(param), _flat(grad), _flat(buf), *scalars, s.weight_decay != 0, use_momentum, s.nesterov,
           s.maximize, s.first_step)


def adagrad_step_numba(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step,
                       maximize=False):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize)
    scalars = _typed(param.dtype, s.clr, s.weight_decay, s.eps)
    kernel = _numba_kernels(param.size)["adagrad"]
    kernel(_flat(param), _flat(grad), _flat(state_sum), *scalars, s.weight_decay != 0, s.maximize)


def rmsprop_step_numba(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize)
    use_momentum = s.momentum > 0
    buf = momentum_buf if use_momentum else square_avg  # placeholders, never touched when unused
    gavg = grad_avg if s.centered else square_avg
    scalars = _typed(param.dtype, s.lr, s.alpha, 1.0 - s.alpha, s.eps, s.weight_decay, s.momentum)
    kernel = _numba_kernels(param.size)["rmsprop"]
    kernel(_flat(param), _flat(grad), _flat(square_avg), _flat(buf), _flat(gavg), *scalars, s.weight_decay != 0,
           use_momentum, s.centered, s.maximize)

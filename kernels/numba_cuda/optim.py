"""numba.cuda impls of the optimizer steps: one grid-stride kernel launch per call.

Same algorithm as kernels/cuda/optim.cu without the 16-byte packs (numba.cuda has no portable
vector load): each thread updates one element per stride. Scalars reach the kernel in the arrays'
dtype and the on/off switches as booleans computed on the host, so a float32 kernel has no
float64 arithmetic (tests/kernels/test_gpu_compile.py checks the PTX).

Loss scaling and master weights as in the other impls (kernels/cpu/optim.py): found_inf is read
by the kernel (a nonzero value returns before anything is written), inv_scale unscales the
gradient and is written back, a device step count or learning rate arrives as ``device_scalars``
computed on the device, and a float16 ``param_out`` receives the float32 master rounded (the master first restarts
from param_out where that no longer holds it rounded). bfloat16 is refused:
numba cannot type bfloat16 arrays (the cupy impl, the default on a GPU, takes them).

On a GPU the kernels take cupy arrays and launch on cupy's current stream, with a grid of one
wave of resident blocks (numba's occupancy query), so the grid-stride loop shares the work evenly.
Under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1) they take numpy arrays, and the grid is
capped at two blocks so that the grid-stride loop is exercised on small inputs. A state the step
does not use is passed as an empty array, never as an alias of a used one (see _placeholder).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, types

from ..cpu.optim import (LOW_PRECISION_DTYPES, validate_adagrad, validate_adam, validate_rmsprop,
                               validate_sgd)
from ..numba_cuda.launch import device_of, launch, on_device, simulator
from ..registry import KernelError

THREADS = 256
# Blocks per SM when the occupancy query fails: 4 x 256 threads fit with up to 64 registers per
# thread; ptxas reports 29 to 40 for these kernels (docs/kernels/optim.md).
FALLBACK_BLOCKS_PER_SM = 4
SIMULATOR_MAX_BLOCKS = 2


# The update bodies below repeat the element functions of kernels/cpu/optim.py (adam_element ...),
# which the numba_cpu loops call, instead of calling them: numba-cuda compiles a called function
# (cuda.jit(device=True), or numba.cuda.extending.register_jitable, inline or not) through a device
# dispatcher that asks the current device for its compute capability, so a kernel calling one could
# no longer be compiled to PTX on a machine without a GPU (tests/kernels/test_gpu_compile.py).
# tests/cudasim/test_optim.py checks these bodies against the numpy reference.
# Every kernel: (param, grad, states..., param_out, found_inf, inv_scale, device_scalars, scalars...,
# switches...). `one` is 1 in the arrays' dtype; the last four switches are check_found, unscale,
# has_out and use_dev (see the module docstring). The gradient is read as g[i] * inv: a float16
# gradient becomes float32, and inv is exactly 1 unless unscaling.


@cuda.jit
def adam_kernel(p, g, m, v, vmax, out, found_inf, inv_scale, dev, beta1, beta2, one_minus_beta1, one_minus_beta2,
                step_size, bc2_sqrt, eps, weight_decay, decay_factor, one, use_wd, decoupled, amsgrad, maximize,
                check_found, unscale, has_out, use_dev):
    if check_found and found_inf[0] != np.float32(0):
        return
    if use_dev:
        step_size = dev[0]
        bc2_sqrt = dev[1]
        decay_factor = dev[2]
    inv = inv_scale[0] * one if unscale else one
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = g[i] * inv
        if unscale:
            g[i] = gi
        if maximize:
            gi = -gi
        pi = p[i]
        if has_out and out[i] != np.float16(pi):  # the parameter was written since: restart the master
            pi = out[i] * one
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
            if old >= vi or old != old:  # a NaN in either propagates, as torch.maximum does
                vi = old
            vmax[i] = vi
        denom = math.sqrt(vi) / bc2_sqrt + eps
        pi = pi - step_size * (mi / denom)
        p[i] = pi
        if has_out:
            out[i] = pi


@cuda.jit
def sgd_kernel(p, g, buf, out, found_inf, inv_scale, dev, lr, momentum, one_minus_dampening, weight_decay, one,
               use_wd, use_momentum, nesterov, maximize, first_step, check_found, unscale, has_out, use_dev):
    if check_found and found_inf[0] != np.float32(0):
        return
    if use_dev:
        first_step = dev[0] != one - one
        lr = dev[1]
    inv = inv_scale[0] * one if unscale else one
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = g[i] * inv
        if unscale:
            g[i] = gi
        if maximize:
            gi = -gi
        pi = p[i]
        if has_out and out[i] != np.float16(pi):  # the parameter was written since: restart the master
            pi = out[i] * one
        if use_wd:
            gi = gi + weight_decay * pi
        if use_momentum:
            bi = gi if first_step else momentum * buf[i] + one_minus_dampening * gi
            buf[i] = bi
            gi = gi + momentum * bi if nesterov else bi
        pi = pi - lr * gi
        p[i] = pi
        if has_out:
            out[i] = pi


@cuda.jit
def adagrad_kernel(p, g, state_sum, out, found_inf, inv_scale, dev, clr, weight_decay, eps, one, use_wd, maximize,
                   check_found, unscale, has_out, use_dev):
    if check_found and found_inf[0] != np.float32(0):
        return
    if use_dev:
        clr = dev[0]
    inv = inv_scale[0] * one if unscale else one
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = g[i] * inv
        if unscale:
            g[i] = gi
        if maximize:
            gi = -gi
        pi = p[i]
        if has_out and out[i] != np.float16(pi):  # the parameter was written since: restart the master
            pi = out[i] * one
        if use_wd:
            gi = gi + weight_decay * pi
        si = state_sum[i] + gi * gi
        state_sum[i] = si
        pi = pi - clr * (gi / (math.sqrt(si) + eps))
        p[i] = pi
        if has_out:
            out[i] = pi


@cuda.jit
def rmsprop_kernel(p, g, square_avg, buf, grad_avg, out, found_inf, inv_scale, dev, lr, alpha, one_minus_alpha, eps,
                   weight_decay, momentum, one, use_wd, use_momentum, centered, maximize, check_found, unscale,
                   has_out, use_dev):
    if check_found and found_inf[0] != np.float32(0):
        return
    inv = inv_scale[0] * one if unscale else one
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = g[i] * inv
        if unscale:
            g[i] = gi
        if maximize:
            gi = -gi
        pi = p[i]
        if has_out and out[i] != np.float16(pi):  # the parameter was written since: restart the master
            pi = out[i] * one
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
            pi = pi - lr * bi
        else:
            pi = pi - lr * (gi / avg)
        p[i] = pi
        if has_out:
            out[i] = pi


def _signature(dtype, n_states: int, n_scalars: int, n_flags: int, grad=None) -> tuple:
    """(param, grad, states, param_out, found_inf, inv_scale, device_scalars, scalars + one, switches)."""
    array = lambda t: types.Array(t, 1, "C")  # noqa: E731
    return ((array(dtype), array(grad or dtype)) + (array(dtype),) * n_states
            + (array(types.float16), array(types.float32), array(types.float32), array(dtype))
            + (dtype,) * (n_scalars + 1) + (types.boolean,) * (n_flags + 4))


# Every kernel, for float32 and float64 and for a float32 master with float16 grads: compiled to sm_90
# PTX by tests/kernels/test_gpu_compile.py.
PTX_CHECKS = [
    (kernel, _signature(dtype, *counts, grad=grad), name)
    for kernel, counts in [(adam_kernel, (3, 9, 4)), (sgd_kernel, (1, 4, 5)), (adagrad_kernel, (1, 3, 2)),
                           (rmsprop_kernel, (3, 6, 4))]
    for dtype, grad, name in [(types.float32, None, "float32"), (types.float64, None, "float64"),
                              (types.float32, types.float16, "float32+float16")]
]


@functools.cache
def _resident_blocks(kernel, argtypes: tuple, device_id: int) -> int:
    """Blocks of THREADS threads of this compiled kernel resident on the whole device at once.

    The grid is capped there so that every block runs start to end in one wave and the
    grid-stride loop shares the work evenly (a second, partial wave would leave SMs idle).
    """
    device = cuda.get_current_device()
    try:
        return max(int(kernel.compile(argtypes).max_cooperative_grid_blocks(THREADS)), 1)
    except Exception:  # noqa: BLE001 - the occupancy query is unavailable: a safe figure
        return device.MULTIPROCESSOR_COUNT * FALLBACK_BLOCKS_PER_SM


def _placeholder(param, dtype=None):
    """An empty array standing for an array the step does not use (the kernel never indexes it).

    Not an alias of a used array: under the simulator each argument is copied in and back out, and
    a stale alias copied back last would undo the update.
    """
    empty = param.reshape(-1)[:0]
    return empty if dtype is None else empty.view(dtype)


def _launch(kernel, arrays: list, scalars: tuple, flags: tuple, found_inf=None, inv_scale=None, device_scalars=None,
            param_out=None, name: str = "") -> None:
    """Launch over ``arrays`` (param, grad, states); the optional arrays become empty placeholders."""
    param = arrays[0]
    if param_out is not None and param_out.dtype in LOW_PRECISION_DTYPES and param_out.dtype != np.float16:
        raise KernelError(f"{name} (numba_cuda): a {param_out.dtype} parameter is not supported: numba cannot "
                          "type bfloat16 arrays; use the cupy impl (the default on a GPU) or float16")
    n = int(param.size)
    if n == 0:
        return
    typed = tuple(param.dtype.type(s) for s in (*scalars, 1.0))
    extras = [param_out if param_out is not None else _placeholder(param, np.float16),
              found_inf.reshape(-1) if found_inf is not None else _placeholder(param, np.float32),
              inv_scale.reshape(-1) if inv_scale is not None else _placeholder(param, np.float32),
              device_scalars if device_scalars is not None else _placeholder(param)]
    switches = (found_inf is not None, inv_scale is not None, param_out is not None, device_scalars is not None)
    flat = [a.reshape(-1) for a in (*arrays, *extras)]
    args = (*flat, *typed, *flags, *switches)
    if simulator():
        launch(kernel, min(-(-n // THREADS), SIMULATOR_MAX_BLOCKS), THREADS, args)
        return
    device = device_of(arrays)
    with on_device(device):
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        blocks = min(-(-n // THREADS), _resident_blocks(kernel, argtypes, device))
    launch(kernel, blocks, THREADS, args)


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, step, found_inf=None,
              inv_scale=None, param_out=None):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step, found_inf=found_inf, inv_scale=inv_scale,
                      param_out=param_out)
    vmax = max_exp_avg_sq if s.amsgrad else _placeholder(param)
    _launch(adam_kernel, [param, grad, exp_avg, exp_avg_sq, vmax], s.kernel_scalars(),
            (s.weight_decay != 0, s.decoupled, s.amsgrad, s.maximize), found_inf, inv_scale, s.device_scalars,
            param_out, "adam_step")


def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False, found_inf=None, inv_scale=None, param_out=None):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                     found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    use_momentum = s.momentum != 0
    buf = momentum_buf if use_momentum else _placeholder(param)
    _launch(sgd_kernel, [param, grad, buf], s.kernel_scalars(),
            (s.weight_decay != 0, use_momentum, s.nesterov, s.maximize, bool(s.first_step)), found_inf, inv_scale,
            s.device_scalars, param_out, "sgd_step")


def adagrad_step(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step, maximize=False,
                 found_inf=None, inv_scale=None, param_out=None):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize, found_inf=found_inf, inv_scale=inv_scale,
                         param_out=param_out)
    _launch(adagrad_kernel, [param, grad, state_sum], s.kernel_scalars(),
            (s.weight_decay != 0, s.maximize), found_inf, inv_scale, s.device_scalars, param_out, "adagrad_step")


def rmsprop_step(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False, found_inf=None, inv_scale=None,
                 param_out=None):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
                         found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    use_momentum = s.momentum > 0
    buf = momentum_buf if use_momentum else _placeholder(param)
    gavg = grad_avg if s.centered else _placeholder(param)
    _launch(rmsprop_kernel, [param, grad, square_avg, buf, gavg], s.kernel_scalars(),
            (s.weight_decay != 0, use_momentum, s.centered, s.maximize), found_inf, inv_scale, None, param_out,
            "rmsprop_step")

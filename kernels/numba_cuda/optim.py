"""numba.cuda impls of the optimizer steps: one grid-stride kernel launch per call.

Same algorithm as kernels/cuda/optim.cu without the 16-byte packs (numba.cuda has no portable
vector load): each thread updates one element per stride. Scalars reach the kernel in the arrays'
dtype and the on/off switches as booleans computed on the host, so a float32 kernel has no
float64 arithmetic (tests/kernels/test_gpu_compile.py checks the PTX).

On a GPU the kernels take cupy arrays and launch on cupy's current stream, with a grid of one
wave of resident blocks (numba's occupancy query), so the grid-stride loop shares the work evenly.
Under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1) they take numpy arrays, and the grid is
capped at two blocks so that the grid-stride loop is exercised on small inputs. A state the step
does not use is passed as an empty array, never as an alias of a used one (see _placeholder).
"""

from __future__ import annotations

import functools
import math

from numba import cuda, types

from kernels.numba_cuda.launch import device_of, launch, on_device, simulator
from kernels.cpu.optim import validate_adagrad, validate_adam, validate_rmsprop, validate_sgd

THREADS = 256
# Blocks per SM when the occupancy query fails: 4 x 256 threads fit with up to 64 registers per
# thread; ptxas reports 29 to 40 for these kernels (docs/kernels/optim.md).
FALLBACK_BLOCKS_PER_SM = 4
SIMULATOR_MAX_BLOCKS = 2


@cuda.jit
def adam_kernel(p, g, m, v, vmax, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps,
                weight_decay, decay_factor, use_wd, decoupled, amsgrad, maximize):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
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
            if old >= vi or old != old:  # a NaN in either propagates, as torch.maximum does
                vi = old
            vmax[i] = vi
        denom = math.sqrt(vi) / bc2_sqrt + eps
        p[i] = pi - step_size * (mi / denom)


@cuda.jit
def sgd_kernel(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, use_wd, use_momentum, nesterov, maximize,
               first_step):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if use_wd:
            gi = gi + weight_decay * pi
        if use_momentum:
            bi = gi if first_step else momentum * buf[i] + one_minus_dampening * gi
            buf[i] = bi
            gi = gi + momentum * bi if nesterov else bi
        p[i] = pi - lr * gi


@cuda.jit
def adagrad_kernel(p, g, state_sum, clr, weight_decay, eps, use_wd, maximize):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
        if use_wd:
            gi = gi + weight_decay * pi
        si = state_sum[i] + gi * gi
        state_sum[i] = si
        p[i] = pi - clr * (gi / (math.sqrt(si) + eps))


@cuda.jit
def rmsprop_kernel(p, g, square_avg, buf, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, use_wd,
                   use_momentum, centered, maximize):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = -g[i] if maximize else g[i]
        pi = p[i]
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
            p[i] = pi - lr * bi
        else:
            p[i] = pi - lr * (gi / avg)


def _signature(dtype, n_arrays: int, n_scalars: int, n_flags: int) -> tuple:
    return (types.Array(dtype, 1, "C"),) * n_arrays + (dtype,) * n_scalars + (types.boolean,) * n_flags


# Every kernel, for float32 and float64: compiled to sm_90 PTX by tests/kernels/test_gpu_compile.py.
PTX_CHECKS = [
    (kernel, _signature(dtype, *counts), str(dtype))
    for kernel, counts in [(adam_kernel, (5, 9, 4)), (sgd_kernel, (3, 4, 5)), (adagrad_kernel, (3, 3, 2)),
                           (rmsprop_kernel, (5, 6, 4))]
    for dtype in (types.float32, types.float64)
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
    except Exception:  # the occupancy query is unavailable: a safe figure
        return device.MULTIPROCESSOR_COUNT * FALLBACK_BLOCKS_PER_SM


def _placeholder(param):
    """An empty array standing for a state the step does not use (the kernel never indexes it).

    Not an alias of a used array: under the simulator each argument is copied in and back out, and
    a stale alias copied back last would undo the update.
    """
    return param.reshape(-1)[:0]


def _launch(kernel, arrays: list, scalars: tuple, flags: tuple) -> None:
    param = arrays[0]
    n = int(param.size)
    if n == 0:
        return
    typed = tuple(param.dtype.type(s) for s in scalars)
    flat = [a.reshape(-1) for a in arrays]
    args = (*flat, *typed, *flags)
    if simulator():
        launch(kernel, min(-(-n // THREADS), SIMULATOR_MAX_BLOCKS), THREADS, args)
        return
    device = device_of(arrays)
    with on_device(device):
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        blocks = min(-(-n // THREADS), _resident_blocks(kernel, argtypes, device))
    launch(kernel, blocks, THREADS, args)


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, step):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step)
    vmax = max_exp_avg_sq if s.amsgrad else _placeholder(param)
    _launch(adam_kernel, [param, grad, exp_avg, exp_avg_sq, vmax],
            (s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2, s.step_size, s.bias_correction2_sqrt, s.eps,
             s.weight_decay, s.decay_factor),
            (s.weight_decay != 0, s.decoupled, s.amsgrad, s.maximize))


def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)
    use_momentum = s.momentum != 0
    buf = momentum_buf if use_momentum else _placeholder(param)
    _launch(sgd_kernel, [param, grad, buf], (s.lr, s.momentum, 1.0 - s.dampening, s.weight_decay),
            (s.weight_decay != 0, use_momentum, s.nesterov, s.maximize, s.first_step))


def adagrad_step(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step, maximize=False):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize)
    _launch(adagrad_kernel, [param, grad, state_sum], (s.clr, s.weight_decay, s.eps),
            (s.weight_decay != 0, s.maximize))


def rmsprop_step(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize)
    use_momentum = s.momentum > 0
    buf = momentum_buf if use_momentum else _placeholder(param)
    gavg = grad_avg if s.centered else _placeholder(param)
    _launch(rmsprop_kernel, [param, grad, square_avg, buf, gavg],
            (s.lr, s.alpha, 1.0 - s.alpha, s.eps, s.weight_decay, s.momentum),
            (s.weight_decay != 0, use_momentum, s.centered, s.maximize))

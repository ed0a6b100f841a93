"""cupy impls of the optimizer steps: one launch of a kernel in kernels/cuda/optim.cu per call.

Each call validates with the shared validator (kernels/cpu/optim.py), computes the per-step
scalars on the host (bias corrections, 1 - beta, the decayed learning rate), and launches one
grid-stride kernel over the whole buffer: 16-byte packs (float4 / double2) over the aligned
middle (a few elements are peeled off the front when all the arrays share one misalignment),
then a scalar loop over the peeled head and the tail. The grid is one wave of the blocks that
fit on the device at once (the occupancy query), so the grid-stride loop shares the work evenly.
The kernel runs on the GPU the arrays live on, whichever device is current.
Unused pointers (max_exp_avg_sq without amsgrad, found_inf without a GradScaler ...) are passed a
placeholder array that the kernel never touches; flag bits say which are used.

found_inf, inv_scale, a device step count and a device learning rate (see kernels/cpu/optim.py)
are read by the kernel on the device: a step skipped for an inf gradient costs no host read, and a
CUDA graph replay of the launch sees the current step count and learning rate. float16 / bfloat16 parameters
go through the ``_f32_f16`` / ``_f32_bf16`` kernels (float32 master and states, 16-bit grad and
param_out), whose 16-bit arrays are read and written in vectors of as many elements as the
master's (8 bytes).
"""

from __future__ import annotations

import functools

import numpy as np

from ..cpu.optim import validate_adagrad, validate_adam, validate_rmsprop, validate_sgd
from ..cuda.module import function, on_device

THREADS = 256
VECTOR_BYTES = 16
# Blocks per SM when the occupancy query is unavailable: 4 x 256 threads fit with up to 64
# registers per thread, the most any kernel in optim.cu uses (its __launch_bounds__ caps them there;
# see docs/kernels/optim.md).
FALLBACK_BLOCKS_PER_SM = 4

# Flag bits: the OPT_* defines in optim.cu.
MAXIMIZE = 1
WEIGHT_DECAY = 2
DECOUPLED = 4
AMSGRAD = 8
MOMENTUM = 16
NESTEROV = 32
FIRST_STEP = 64
CENTERED = 128
FOUND_INF = 256
UNSCALE = 512
DEVICE_SCALARS = 1024

# The kernel name's suffix for (master dtype, param_out dtype or None).
_SUFFIX = {("float32", None): "f32", ("float64", None): "f64", ("float32", "float16"): "f32_f16",
           ("float32", "bfloat16"): "f32_bf16"}


def vector_split(addresses, n: int, itemsize: int, itemsizes=None) -> tuple[int, int]:
    """``(head, n_vec)`` for arrays of ``n`` items starting at ``addresses`` (bytes).

    Elements [head, head + n_vec * width) go through vectors of width = 16 // itemsize elements
    (16 bytes of the master's ``itemsize``; ``itemsizes`` gives each array's own, default all
    ``itemsize``: a 16-bit gradient's vector of the same width is 8 bytes). When every array
    starts at the same element offset modulo width (flat buffers sliced at one element offset),
    ``head`` elements are peeled off so every vector is aligned; otherwise nothing is vectorized.
    """
    width = VECTOR_BYTES // itemsize
    itemsizes = itemsizes or [itemsize] * len(addresses)
    if any(address % size for address, size in zip(addresses, itemsizes)):
        return 0, 0
    offsets = {(address // size) % width for address, size in zip(addresses, itemsizes)}
    if len(offsets) != 1:
        return 0, 0
    head = min((width - offsets.pop()) % width, n)
    return head, (n - head) // width


def launch_shape(n: int, n_vec: int, width: int, resident_blocks: int) -> tuple[int, int]:
    """(blocks, threads): one thread per pack or scalar element, capped at one wave of resident blocks.

    ``resident_blocks`` is how many blocks of THREADS fit on the whole device at once; with the
    grid capped there, every block runs from start to end in one wave and the grid-stride loop
    shares the work evenly (a second, partial wave would leave SMs idle at the end).
    """
    n_scalar = n - n_vec * width
    items = max(n_vec, n_scalar)
    blocks = min(-(-items // THREADS), resident_blocks)
    return max(blocks, 1), THREADS


@functools.cache
def _resident_blocks(kernel_name: str, device_id: int) -> int:
    """Blocks of THREADS threads of ``kernel_name`` resident on the whole device at once."""
    import cupy

    device = cupy.cuda.Device(device_id)
    sm_count = int(device.attributes["MultiProcessorCount"])
    try:
        fn = function("optim", kernel_name)
        per_sm = int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, THREADS, 0))
    except Exception:  # noqa: BLE001 - an older cupy without the query: a safe figure (see FALLBACK_BLOCKS_PER_SM)
        per_sm = FALLBACK_BLOCKS_PER_SM
    return sm_count * max(per_sm, 1)


def _launch(kernel: str, arrays: list, scalars: tuple, flags: int, found_inf=None, inv_scale=None,
            device_scalars=None, param_out=None) -> None:
    """Launch ``<kernel>_<suffix>`` over ``arrays`` (param, grad, states) with float scalars and flags.

    The pointer arguments follow the .cu order: the arrays, param_out (16-bit kernels only),
    found_inf, inv_scale, device_scalars (not for RMSprop: ``device_scalars=False``).
    """
    param = arrays[0]
    n = int(param.size)
    if n == 0:
        return
    dtype = np.dtype(param.dtype)
    width = VECTOR_BYTES // dtype.itemsize
    vectorized = arrays + ([param_out] if param_out is not None else [])
    head, n_vec = vector_split([a.data.ptr for a in vectorized], n, dtype.itemsize,
                               [np.dtype(a.dtype).itemsize for a in vectorized])
    name = f"{kernel}_{_SUFFIX[dtype.name, None if param_out is None else np.dtype(param_out.dtype).name]}"
    # Placeholders for absent pointers: never dereferenced (their flag bit is off).
    flags |= (FOUND_INF if found_inf is not None else 0) | (UNSCALE if inv_scale is not None else 0)
    pointers = [found_inf if found_inf is not None else param, inv_scale if inv_scale is not None else param]
    if device_scalars is not False:
        flags |= DEVICE_SCALARS if device_scalars is not None else 0
        pointers.append(device_scalars if device_scalars is not None else param)
    with on_device(param):  # launch on the arrays' GPU, whichever is current
        blocks, threads = launch_shape(n, n_vec, width, _resident_blocks(name, param.device.id))
        fn = function("optim", name)
        # The scalars in the arrays' dtype through one numpy array: cheaper than one dtype.type(s)
        # call per scalar (docs/benchmarks.md, "Why the thresholds are where they are").
        fn((blocks,), (threads,), (*vectorized, *pointers, np.int64(n), np.int64(head), np.int64(n_vec),
                                   *np.array(scalars, dtype), np.int32(flags)))


def _common_flags(maximize: bool, weight_decay: float) -> int:
    return (MAXIMIZE if maximize else 0) | (WEIGHT_DECAY if weight_decay != 0 else 0)


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, step, found_inf=None,
              inv_scale=None, param_out=None):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step, found_inf=found_inf, inv_scale=inv_scale,
                      param_out=param_out)
    flags = (_common_flags(s.maximize, s.weight_decay) | (DECOUPLED if s.decoupled else 0)
             | (AMSGRAD if s.amsgrad else 0))
    vmax = max_exp_avg_sq if s.amsgrad else exp_avg_sq  # placeholder, never touched without amsgrad
    _launch("adam_step", [param, grad, exp_avg, exp_avg_sq, vmax], s.kernel_scalars(), flags, found_inf, inv_scale,
            s.device_scalars, param_out)


def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False, found_inf=None, inv_scale=None, param_out=None):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                     found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    use_momentum = s.momentum != 0
    flags = _common_flags(s.maximize, s.weight_decay)
    if use_momentum:
        flags |= MOMENTUM | (NESTEROV if s.nesterov else 0) | (FIRST_STEP if s.first_step else 0)
    buf = momentum_buf if use_momentum else param  # placeholder, never touched without momentum
    _launch("sgd_step", [param, grad, buf], s.kernel_scalars(), flags, found_inf, inv_scale, s.device_scalars,
            param_out)


def adagrad_step(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step, maximize=False,
                 found_inf=None, inv_scale=None, param_out=None):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize, found_inf=found_inf, inv_scale=inv_scale,
                         param_out=param_out)
    _launch("adagrad_step", [param, grad, state_sum], s.kernel_scalars(),
            _common_flags(s.maximize, s.weight_decay), found_inf, inv_scale, s.device_scalars, param_out)


def rmsprop_step(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False, found_inf=None, inv_scale=None,
                 param_out=None):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
                         found_inf=found_inf, inv_scale=inv_scale, param_out=param_out)
    use_momentum = s.momentum > 0
    flags = (_common_flags(s.maximize, s.weight_decay) | (MOMENTUM if use_momentum else 0)
             | (CENTERED if s.centered else 0))
    buf = momentum_buf if use_momentum else square_avg  # placeholders, never touched when unused
    gavg = grad_avg if s.centered else square_avg
    _launch("rmsprop_step", [param, grad, square_avg, buf, gavg], s.kernel_scalars(), flags, found_inf, inv_scale,
            False, param_out)

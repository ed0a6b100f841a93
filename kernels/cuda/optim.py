"""cupy impls of the optimizer steps: one launch of a kernel in kernels/cuda/optim.cu per call.

Each call validates with the shared validator (kernels/cpu/optim.py), computes the per-step
scalars on the host (bias corrections, 1 - beta, the decayed learning rate), and launches one
grid-stride kernel over the whole buffer: 16-byte packs (float4 / double2) over the aligned
middle (a few elements are peeled off the front when all the arrays share one misalignment),
then a scalar loop over the peeled head and the tail. The grid is one wave of the blocks that
fit on the device at once (the occupancy query), so the grid-stride loop shares the work evenly.
The kernel runs on the GPU the arrays live on, whichever device is current.
Unused state pointers (e.g. max_exp_avg_sq without amsgrad) are passed a placeholder array that
the kernel never touches.
"""

from __future__ import annotations

import functools

import numpy as np

from kernels.cpu.optim import validate_adagrad, validate_adam, validate_rmsprop, validate_sgd
from kernels.cuda.module import function, on_device

THREADS = 256
VECTOR_BYTES = 16
# Blocks per SM when the occupancy query is unavailable: 4 x 256 threads fit with up to 64
# registers per thread, the most any kernel in optim.cu uses (see docs/kernels/optim.md).
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


def vector_split(addresses, n: int, itemsize: int) -> tuple[int, int]:
    """``(head, n_vec)`` for arrays of ``n`` items starting at ``addresses`` (bytes).

    Elements [head, head + n_vec * width) go through 16-byte packs, width = 16 // itemsize. When
    every address has the same offset within 16 bytes (flat buffers sliced at one element offset),
    ``head`` elements are peeled off so the packs are aligned; otherwise nothing is vectorized.
    """
    width = VECTOR_BYTES // itemsize
    offsets = {address % VECTOR_BYTES for address in addresses}
    if len(offsets) != 1:
        return 0, 0
    offset = offsets.pop()
    if offset % itemsize:
        return 0, 0
    head = min(((VECTOR_BYTES - offset) % VECTOR_BYTES) // itemsize, n)
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
    except Exception:  # an older cupy without the query: a safe figure (see FALLBACK_BLOCKS_PER_SM)
        per_sm = FALLBACK_BLOCKS_PER_SM
    return sm_count * max(per_sm, 1)


def _launch(kernel: str, arrays: list, scalars: tuple, flags: int) -> None:
    """Launch ``<kernel>_f32`` / ``_f64`` over ``arrays`` (param first) with float scalars and flags."""
    param = arrays[0]
    n = int(param.size)
    if n == 0:
        return
    dtype = np.dtype(param.dtype)
    width = VECTOR_BYTES // dtype.itemsize
    head, n_vec = vector_split([a.data.ptr for a in arrays], n, dtype.itemsize)
    name = f"{kernel}_{'f32' if dtype == np.float32 else 'f64'}"
    with on_device(param):  # launch on the arrays' GPU, whichever is current
        blocks, threads = launch_shape(n, n_vec, width, _resident_blocks(name, param.device.id))
        fn = function("optim", name)
        # The scalars in the arrays' dtype through one numpy array: half the cost of one
        # dtype.type(s) call per scalar (measured: 1.1 us against 2.1 us for Adam's nine).
        fn((blocks,), (threads,), (*arrays, np.int64(n), np.int64(head), np.int64(n_vec),
                                   *np.array(scalars, dtype), np.int32(flags)))


def _common_flags(maximize: bool, weight_decay: float) -> int:
    return (MAXIMIZE if maximize else 0) | (WEIGHT_DECAY if weight_decay != 0 else 0)


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, step):
    s = validate_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, step=step)
    flags = (_common_flags(s.maximize, s.weight_decay) | (DECOUPLED if s.decoupled else 0)
             | (AMSGRAD if s.amsgrad else 0))
    vmax = max_exp_avg_sq if s.amsgrad else exp_avg_sq  # placeholder, never touched without amsgrad
    _launch("adam_step", [param, grad, exp_avg, exp_avg_sq, vmax],
            (s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2, s.step_size, s.bias_correction2_sqrt, s.eps,
             s.weight_decay, s.decay_factor), flags)


def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False):
    s = validate_sgd(param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)
    use_momentum = s.momentum != 0
    flags = _common_flags(s.maximize, s.weight_decay)
    if use_momentum:
        flags |= MOMENTUM | (NESTEROV if s.nesterov else 0) | (FIRST_STEP if s.first_step else 0)
    buf = momentum_buf if use_momentum else param  # placeholder, never touched without momentum
    _launch("sgd_step", [param, grad, buf], (s.lr, s.momentum, 1.0 - s.dampening, s.weight_decay), flags)


def adagrad_step(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step, maximize=False):
    s = validate_adagrad(param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         step=step, maximize=maximize)
    _launch("adagrad_step", [param, grad, state_sum], (s.clr, s.weight_decay, s.eps),
            _common_flags(s.maximize, s.weight_decay))


def rmsprop_step(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    s = validate_rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize)
    use_momentum = s.momentum > 0
    flags = (_common_flags(s.maximize, s.weight_decay) | (MOMENTUM if use_momentum else 0)
             | (CENTERED if s.centered else 0))
    buf = momentum_buf if use_momentum else square_avg  # placeholders, never touched when unused
    gavg = grad_avg if s.centered else square_avg
    _launch("rmsprop_step", [param, grad, square_avg, buf, gavg],
            (s.lr, s.alpha, 1.0 - s.alpha, s.eps, s.weight_decay, s.momentum), flags)

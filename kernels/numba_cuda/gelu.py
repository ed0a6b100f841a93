"""numba.cuda impl of GELU, forward and backward (the math in kernels/cpu/gelu.py).

One grid-stride loop over the flat buffer per kernel: ``y = x s`` / ``dx = dy (s + x s (1 - s) ...)``
with s = sigmoid(2z) for the tanh form, ``y = x erfc(-x / sqrt 2) / 2`` for the exact one. The
kernels are built per compute dtype with its constants frozen in, so the float32 kernels have no
float64 arithmetic (tests/kernels/test_gpu_compile.py reads their PTX); math.exp / math.erfc map
to libdevice's expf / erfcf there. float16 runs the float32 build: each element is converted to
float32 where it is read and rounded once to float16 where it is stored. numba.cuda has no
bfloat16 type: bfloat16 is refused with a KernelError (the cupy impl, the registry's default for
cupy arrays, takes it). Under the Numba CUDA simulator they take numpy arrays and run
with a few small blocks, so every thread strides several times on small inputs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from ..cpu.gelu import INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI, SQUARE_MAX, TANH_COEF, validate_gelu_backward, \
    validate_gelu_forward
from ..numba_cuda.launch import launch, simulator
from ..registry import check_dtype

THREADS = 256
MAX_BLOCKS = 4096  # a grid-stride loop: more blocks than this only add scheduling
SIMULATOR_THREADS = 8
SIMULATOR_BLOCKS = 3


def _build(np_float, nb_float):
    """(tanh forward, tanh backward, erf forward, erf backward) computing in one float dtype."""
    cv = nb_float  # an element read as the compute dtype (a no-op on float32 / float64 arrays)
    half, one, two = np_float(0.5), np_float(1), np_float(2)
    k, c = np_float(SQRT_2_OVER_PI), np_float(TANH_COEF)
    k2, c3 = np_float(2 * SQRT_2_OVER_PI), np_float(3 * TANH_COEF)
    inv_sqrt2, inv_sqrt2pi = np_float(INV_SQRT_2), np_float(INV_SQRT_2PI)
    square_max = np_float(SQUARE_MAX)

    # Device functions would need a driver to compile to PTX without a GPU (numba resolves the
    # current device), so the sigmoid pair is written out in both tanh kernels.

    @cuda.jit
    def tanh_forward(x, y):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            xv = cv(x[i])
            z = k * (xv + c * xv * xv * xv)
            e = math.exp(-two * abs(z))  # <= 1: no overflow
            hi = one / (one + e)
            y[i] = xv * (hi if z >= 0 else e * hi)

    @cuda.jit
    def tanh_backward(dy, x, dx):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            xv = cv(x[i])
            z = k * (xv + c * xv * xv * xv)
            e = math.exp(-two * abs(z))
            hi = one / (one + e)
            lo = e * hi
            s = hi if z >= 0 else lo
            dx[i] = cv(dy[i]) * (s + xv * hi * lo * k2 * (one + c3 * min(xv * xv, square_max)))  # see SQUARE_MAX

    @cuda.jit
    def erf_forward(x, y):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            xv = cv(x[i])
            y[i] = xv * (half * math.erfc(-xv * inv_sqrt2))

    @cuda.jit
    def erf_backward(dy, x, dx):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            xv = cv(x[i])
            cdf = half * math.erfc(-xv * inv_sqrt2)
            dx[i] = cv(dy[i]) * (cdf + xv * inv_sqrt2pi * math.exp(-half * xv * xv))

    return {"tanh": (tanh_forward, tanh_backward), "none": (erf_forward, erf_backward)}


_F32_KERNELS = _build(np.float32, types.float32)
# Storage dtype -> its kernels (float16 computes in the float32 build).
KERNELS = {np.dtype(np.float32): _F32_KERNELS, np.dtype(np.float16): _F32_KERNELS,
           np.dtype(np.float64): _build(np.float64, types.float64)}

# Every kernel: compiled to sm_90 PTX by tests/kernels/test_gpu_compile.py (float32 and float16:
# no f64 ops).
PTX_CHECKS = [
    (kernel, sig, name)
    for f, name in ((types.float32, "float32"), (types.float64, "float64"), (types.float16, "float16"))
    for pair in KERNELS[np.dtype(name)].values()
    for kernel, sig in zip(pair, ((types.Array(f, 1, "C"),) * 2, (types.Array(f, 1, "C"),) * 3))
]


def _grid(size: int) -> tuple[int, int]:
    if simulator():
        return min(SIMULATOR_BLOCKS, -(-size // SIMULATOR_THREADS)), SIMULATOR_THREADS
    return min(MAX_BLOCKS, -(-size // THREADS)), THREADS


def _xp(spec):
    if spec.array_module == "cupy":
        import cupy

        return cupy
    return np


def gelu_forward(x, *, approximate="none"):
    spec = validate_gelu_forward(x, approximate=approximate)
    check_dtype("gelu_forward", "numba_cuda", spec.dtype)  # bfloat16: no numba type
    y = _xp(spec).empty_like(x)
    if spec.size:
        blocks, threads = _grid(spec.size)
        launch(KERNELS[spec.dtype][spec.approximate][0], blocks, threads, (x.reshape(-1), y.reshape(-1)))
    return y


def gelu_backward(grad_y, x, *, approximate="none"):
    spec = validate_gelu_backward(grad_y, x, approximate=approximate)
    check_dtype("gelu_backward", "numba_cuda", spec.dtype)  # bfloat16: no numba type
    dx = _xp(spec).empty_like(x)
    if spec.size:
        blocks, threads = _grid(spec.size)
        launch(KERNELS[spec.dtype][spec.approximate][1], blocks, threads,
               (grad_y.reshape(-1), x.reshape(-1), dx.reshape(-1)))
    return dx

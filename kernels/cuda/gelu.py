"""GELU on cupy arrays: the elementwise kernels of gelu.cu (math in kernels/cpu/gelu.py).

One launch per call, ``gelu_{tanh,erf}_{fwd,bwd}_{f32,f64}`` over the flat buffer with a
grid-stride loop: 256 threads, at most a few waves of blocks. Nothing is read back to the host.
"""

from __future__ import annotations

import numpy as np

from kernels.cpu.gelu import validate_gelu_backward, validate_gelu_forward
from kernels.cuda.module import on_device

MODULE = "gelu"
THREADS = 256
MAX_BLOCKS = 65535  # grid-stride: blocks beyond a few waves add nothing
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
FORM = {"tanh": "tanh", "none": "erf"}


def kernel_name(approximate: str, direction: str, dtype) -> str:
    """``gelu_tanh_fwd_f32`` and the like (direction "fwd" or "bwd")."""
    return f"gelu_{FORM[approximate]}_{direction}_{SUFFIX[np.dtype(dtype)]}"


def _blocks(size: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-size // THREADS)))


def gelu_forward(x, *, approximate="none"):
    """y on the GPU x lives on, whichever device is current."""
    import cupy

    from kernels.cuda.module import function

    spec = validate_gelu_forward(x, approximate=approximate)
    with on_device(x):
        y = cupy.empty_like(x)
        if spec.size:
            function(MODULE, kernel_name(spec.approximate, "fwd", spec.dtype))(
                (_blocks(spec.size),), (THREADS,), (x, y, np.int64(spec.size)))
        return y


def gelu_backward(grad_y, x, *, approximate="none"):
    """dx on the GPU x lives on, whichever device is current."""
    import cupy

    from kernels.cuda.module import function

    spec = validate_gelu_backward(grad_y, x, approximate=approximate)
    with on_device(x):
        dx = cupy.empty_like(x)
        if spec.size:
            function(MODULE, kernel_name(spec.approximate, "bwd", spec.dtype))(
                (_blocks(spec.size),), (THREADS,), (grad_y, x, dx, np.int64(spec.size)))
        return dx

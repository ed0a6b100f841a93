"""GELU on cupy arrays: the elementwise kernels of gelu.cu (math in kernels/cpu/gelu.py).

One launch per call, ``gelu_{tanh,erf}_{fwd,bwd}_{f32,f64,f16,bf16}`` over the flat buffer: 16-byte
packs over the aligned middle (``vector_split``, shared with the optimizer kernels: a few elements
are peeled off the front when the arrays share one misalignment, nothing is vectorized when they
do not), then a scalar loop over the rest; 256 threads per block, one thread per pack, at most
65535 blocks (a grid-stride loop covers the rest). float16 and bfloat16 compute in float32 and
round once at the store. Nothing is read back to the host.
"""

from __future__ import annotations

import numpy as np

from ..cpu.gelu import validate_gelu_backward, validate_gelu_forward
from ..precision import float_name
from ..cuda.module import on_device
from ..cuda.optim import VECTOR_BYTES, vector_split

MODULE = "gelu"
THREADS = 256
MAX_BLOCKS = 65535  # grid-stride: blocks beyond a few waves add nothing
SUFFIX = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}  # by float_name
FORM = {"tanh": "tanh", "none": "erf"}


def kernel_name(approximate: str, direction: str, dtype) -> str:
    """``gelu_tanh_fwd_f32`` and the like (direction "fwd" or "bwd")."""
    return f"gelu_{FORM[approximate]}_{direction}_{SUFFIX[float_name(dtype)]}"


def launch_plan(addresses, size: int, itemsize: int) -> tuple[int, int, int, int]:
    """``(blocks, threads, head, n_vec)`` for arrays of ``size`` items at ``addresses`` (bytes):
    elements [head, head + n_vec * width) move as 16-byte packs, one per thread, the rest as scalars."""
    head, n_vec = vector_split(addresses, size, itemsize)
    items = max(n_vec, size - n_vec * (VECTOR_BYTES // itemsize))
    return max(1, min(MAX_BLOCKS, -(-items // THREADS))), THREADS, head, n_vec


def _launch(name: str, arrays, spec) -> None:
    from ..cuda.module import function

    blocks, threads, head, n_vec = launch_plan([a.data.ptr for a in arrays], spec.size, spec.dtype.itemsize)
    function(MODULE, name)((blocks,), (threads,), (*arrays, np.int64(spec.size), np.int64(head), np.int64(n_vec)))


def gelu_forward(x, *, approximate="none"):
    """y on the GPU x lives on, whichever device is current."""
    import cupy

    spec = validate_gelu_forward(x, approximate=approximate)
    with on_device(x):
        y = cupy.empty_like(x)
        if spec.size:
            _launch(kernel_name(spec.approximate, "fwd", spec.dtype), (x, y), spec)
        return y


def gelu_backward(grad_y, x, *, approximate="none"):
    """dx on the GPU x lives on, whichever device is current."""
    import cupy

    spec = validate_gelu_backward(grad_y, x, approximate=approximate)
    with on_device(x):
        dx = cupy.empty_like(x)
        if spec.size:
            _launch(kernel_name(spec.approximate, "bwd", spec.dtype), (grad_y, x, dx), spec)
        return dx

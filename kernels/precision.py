"""The float dtypes the kernels know, and how the CPU impls compute the 16-bit ones.

float16 and bfloat16 are storage dtypes: every kernel reads them, computes in float32 (the
accumulation dtype) and rounds once when it stores a 16-bit result, as PyTorch's kernels do.
bfloat16 arrays are ``ml_dtypes.bfloat16`` on the CPU and on the GPU (CuPy 14 takes them). Its
NumPy dtype has kind ``"V"``, so dtypes are recognised here by name, which also keeps ml_dtypes
out of ``import kernels``.

numba cannot compile for ``ml_dtypes.bfloat16`` nor for ``numpy.float16`` arrays on the CPU, and
BLAS has no 16-bit GEMM, so the CPU impls :func:`widen` 16-bit inputs to float32 at the boundary
and :func:`narrow` the results back: one conversion pass per input and per 16-bit output (their
cost is measured on each kernel's page in docs/kernels/).
"""

from __future__ import annotations

import functools

import numpy as np

FLOAT32, FLOAT64, FLOAT16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
FLOAT_NAMES = ("float32", "float64", "float16", "bfloat16")
LOW_PRECISION_NAMES = ("float16", "bfloat16")
ACCUMULATION = FLOAT32  # what 16-bit data is computed in


@functools.cache
def float_name(dtype) -> str | None:
    """``'float32'``, ``'float64'``, ``'float16'`` or ``'bfloat16'`` for those dtypes, else None.

    Cached per dtype object: validators ask on every call, and ``dtype.name`` builds a string.
    """
    dtype = np.dtype(dtype)
    name = dtype.name
    if name == "bfloat16" and dtype.itemsize == 2:
        return name
    return name if dtype.kind == "f" and name in FLOAT_NAMES else None


def is_low_precision(dtype) -> bool:
    """float16 or bfloat16."""
    return float_name(dtype) in LOW_PRECISION_NAMES


def accumulation_dtype(dtype) -> np.dtype:
    """The dtype a kernel computes ``dtype`` data in: float32 for the 16-bit dtypes, else itself."""
    return ACCUMULATION if is_low_precision(dtype) else np.dtype(dtype)


def widen(a):
    """``a`` in float32 if it is a 16-bit float array (a new array), else ``a`` itself (None stays None)."""
    if a is not None and is_low_precision(a.dtype):
        return a.astype(ACCUMULATION)
    return a


def narrow(a, dtype):
    """A float32 result ``a`` rounded once (to nearest even) to the storage ``dtype``; ``a`` itself
    when ``dtype`` is not 16-bit. None stays None."""
    if a is None or not is_low_precision(dtype):
        return a
    return a.astype(dtype)

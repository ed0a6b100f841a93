"""Dtypes beyond NumPy's own (bfloat16), and PyTorch's type-promotion and compute rules.

bfloat16 arrays are ``ml_dtypes.bfloat16`` (the library JAX uses). Its numpy dtype has kind
``"V"``, so ``np.issubdtype(dtype, np.floating)`` is False for it: ask :func:`is_floating`.

Low-precision floats (float16, bfloat16) are storage dtypes: every op computes in float32 and
rounds its result once to the storage dtype, as PyTorch's CPU kernels do (see
``engine.autograd.Function.apply``, the one place that applies the rule).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

bfloat16 = ml_dtypes.bfloat16
COMPUTE_DTYPE = np.dtype(np.float32)  # what low-precision tensors are computed in
LOW_PRECISION = frozenset({np.dtype(np.float16), np.dtype(bfloat16)})
_BF16 = np.dtype(bfloat16)


def is_floating(dtype) -> bool:
    """True for float16, bfloat16, float32, float64 (PyTorch's ``dtype.is_floating_point``)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == _BF16


def finfo(dtype):
    """``np.finfo`` that also knows bfloat16."""
    return ml_dtypes.finfo(dtype)


def largest_below(value: float, dtype) -> np.ndarray:
    """The largest value of the floating ``dtype`` strictly below ``value`` (a 0-d numpy array):
    the bound that keeps a sample of [low, value) from rounding up to ``value``."""
    rounded = np.asarray(value, dtype=np.float64).astype(dtype)
    if float(rounded) < value:
        return rounded
    return np.nextafter(rounded, np.asarray(-np.inf, dtype=dtype))


def overflows(value, dtype) -> bool:
    """Whether a finite number ``value`` becomes inf in the floating ``dtype`` (an int beyond even
    float64's range included)."""
    try:
        value = float(value)
    except OverflowError:
        return True
    with np.errstate(over="ignore"):
        return math.isfinite(value) and not np.isfinite(np.asarray(value).astype(dtype))


def is_low_precision(dtype) -> bool:
    """float16 or bfloat16: stored in 2 bytes, computed in float32."""
    return np.dtype(dtype) in LOW_PRECISION


def low_precision_of(arrays) -> np.dtype | None:
    """The low-precision dtype among ``arrays`` (the first found), or None if there is none."""
    for a in arrays:
        dtype = getattr(a, "dtype", None)
        if dtype is not None and dtype in LOW_PRECISION:
            return dtype
    return None


def upcast(array):
    """``array`` in float32 if it is low precision, else unchanged."""
    dtype = getattr(array, "dtype", None)
    return array.astype(COMPUTE_DTYPE) if dtype is not None and dtype in LOW_PRECISION else array


def round_to(array, dtype):
    """A float32 result rounded to the storage dtype ``dtype``; other results (indices, bools) unchanged."""
    if getattr(array, "dtype", None) == COMPUTE_DTYPE:
        return array.astype(dtype)
    return array


def can_cast(source, target) -> bool:
    """PyTorch's ``torch.can_cast``: what an in-place op may write back into ``target`` (a float
    result into float16 yes; a float result into an integer tensor, or a number into bool, no)."""
    source, target = np.dtype(source), np.dtype(target)
    if is_floating(source) and not is_floating(target):
        return False
    return not (source.kind != "b" and target.kind == "b")


# ---- type promotion: PyTorch's table ---------------------------------------------------------

def _category(dtype) -> int:
    """0 bool, 1 integer, 2 floating (PyTorch promotes across categories, never down)."""
    dtype = np.dtype(dtype)
    return 0 if dtype.kind == "b" else 2 if is_floating(dtype) else 1


def promote_types(a, b) -> np.dtype:
    """``torch.promote_types`` for two dtypes: bfloat16 with float16 is float32, a float with an
    integer is the float, integers as NumPy (uint8 with int8 is int16)."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    if _category(a) != _category(b):
        return a if _category(a) > _category(b) else b
    if {a, b} == LOW_PRECISION:
        return COMPUTE_DTYPE
    if a == _BF16 or b == _BF16:
        return b if a == _BF16 else a  # float32 / float64 win over bfloat16
    return np.promote_types(a, b)


def _promote_all(dtypes) -> np.dtype | None:
    result = None
    for d in dtypes:
        result = np.dtype(d) if result is None else promote_types(result, d)
    return result


def _combine(higher, lower):
    """PyTorch's combine_categories: a lower-priority group changes the result only when it is of
    a higher category (a float 0-d tensor or Python float with an integer tensor)."""
    if higher is None:
        return lower
    if lower is None:
        return higher
    if _category(higher) == 2:
        return higher
    if _category(higher) == 0 or _category(lower) == 2:
        return promote_types(higher, lower)
    return higher


def result_type(dim_dtypes=(), zero_dim_dtypes=(), scalar_dtypes=()) -> np.dtype:
    """``torch.result_type`` of operands in three priority groups: tensors with dimensions, 0-d
    tensors, and Python scalars (given as the dtype PyTorch wraps them in: bool, int64, float32).
    A 0-d tensor or a scalar only matters when it is of a higher category than the tensors above
    it, so ``bf16_tensor * 2.0`` and ``bf16_tensor + fp32_0d`` stay bfloat16."""
    dim, zero, scalar = (_promote_all(g) for g in (dim_dtypes, zero_dim_dtypes, scalar_dtypes))
    result = _combine(dim, _combine(zero, scalar))
    if result is None:
        raise ValueError("result_type: no operands")
    return result


def scalar_dtype(value) -> np.dtype:
    """The dtype PyTorch wraps a Python (or NumPy) scalar in for promotion."""
    if isinstance(value, (bool, np.bool_)):
        return np.dtype(np.bool_)
    if isinstance(value, (int, np.integer)):
        return np.dtype(np.int64)
    if isinstance(value, (complex, np.complexfloating)):
        return np.dtype(np.complex64)
    return COMPUTE_DTYPE

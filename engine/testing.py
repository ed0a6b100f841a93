"""``engine.testing.assert_close``: PyTorch's ``torch.testing.assert_close`` for engine tensors.

Same default tolerances per dtype, same rules (shape, then device and dtype unless told not to
check them, then values with ``|actual - expected| <= atol + rtol * |expected|``), and the same
failure messages: how many elements mismatch, and the greatest absolute and relative difference
with their index.
"""

from __future__ import annotations

import collections.abc
import math

import numpy as np

from engine import backend, dtypes
from engine.tensor import Tensor

# (rtol, atol) per dtype: torch.testing's table. Every other dtype (integers, bool) compares exactly.
_DTYPE_TOLERANCES = {
    np.dtype(np.float16): (1e-3, 1e-5),
    np.dtype(dtypes.bfloat16): (1.6e-2, 1e-5),
    np.dtype(np.float32): (1.3e-6, 1e-5),
    np.dtype(np.float64): (1e-7, 1e-7),
    np.dtype(np.complex64): (1.3e-6, 1e-5),
    np.dtype(np.complex128): (1e-7, 1e-7),
}
# The dtype a Python number counts as, for its default tolerances (as PyTorch's table says).
_NUMBER_DTYPES = {int: np.dtype(np.int64), float: np.dtype(np.float64), complex: np.dtype(np.complex128)}


class _Mismatch(Exception):
    """A failed comparison: the exception type to raise, its message, and where in nested inputs."""

    def __init__(self, kind: type, message: str, where: tuple = ()):
        super().__init__(message)
        self.kind, self.message, self.where = kind, message, where


def default_tolerances(*dtypes_) -> tuple[float, float]:
    """PyTorch's default ``(rtol, atol)`` for values of these dtypes: the largest of each.

    float16 (1e-3, 1e-5), bfloat16 (1.6e-2, 1e-5), float32 (1.3e-6, 1e-5), float64 (1e-7, 1e-7),
    complex64 and complex128 as their float parts; other dtypes (0, 0), i.e. equality.
    """
    pairs = [_DTYPE_TOLERANCES.get(np.dtype(d), (0.0, 0.0)) for d in dtypes_]
    return max(r for r, _ in pairs), max(a for _, a in pairs)


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None,
                 equal_nan: bool = False, check_device: bool = True, check_dtype: bool = True,
                 msg=None) -> None:
    """Assert that ``actual`` and ``expected`` are close, as ``torch.testing.assert_close``.

    Inputs are engine Tensors, NumPy arrays, Python or NumPy numbers, None, or (nested) sequences
    and mappings of them; both sides must be of the same kind (a Tensor is not compared with a
    NumPy array, as PyTorch does not compare a tensor with one either). Tensors and arrays must have
    the same shape and, unless turned off, the same device and dtype; values then match where
    ``|actual - expected| <= atol + rtol * |expected|`` (inf equal to inf of the same sign, NaN to
    NaN only with ``equal_nan``).

    Args:
        actual: the values to check.
        expected: the reference.
        rtol: relative tolerance; with ``atol`` (give both or neither). Default: by dtype, the
            table of :func:`default_tolerances` (the larger of the two inputs' dtypes).
        atol: absolute tolerance.
        equal_nan: count NaN as equal to NaN.
        check_device: require both tensors on one device (otherwise both are compared on the CPU).
        check_dtype: require one dtype (otherwise both are promoted to a common dtype first).
        msg: replaces the failure message if a string; if callable, it is called with the
            generated message and returns the one to raise.

    Raises:
        AssertionError: the inputs differ (values, shape, dtype, device, length, keys).
        TypeError: the inputs are of kinds that cannot be compared.
        ValueError: only one of ``rtol`` and ``atol`` was given.

    Example:
        >>> import engine
        >>> engine.testing.assert_close(engine.tensor([1.0, 2.0]), engine.tensor([1.0, 2.0000001]))
    """
    try:
        if (rtol is None) != (atol is None):
            raise _Mismatch(ValueError, "Both 'rtol' and 'atol' must be either specified or omitted, but got no "
                                        f"{'rtol' if rtol is None else 'atol'}.")
        options = dict(rtol=rtol, atol=atol, equal_nan=equal_nan, check_device=check_device, check_dtype=check_dtype)
        _compare(actual, expected, (), options)
    except _Mismatch as failure:
        raise failure.kind(_final_message(failure, msg)) from None


def _final_message(failure: _Mismatch, msg) -> str:
    if isinstance(msg, str):
        return msg
    generated = failure.message
    if failure.where:
        generated += f"\n\nThe failure occurred for item {''.join(str([key]) for key in failure.where)}"
    return msg(generated) if callable(msg) else generated


def _is_tensor_like(value) -> bool:
    return isinstance(value, (Tensor, np.ndarray))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, complex, np.number)) and not isinstance(value, (bool, np.bool_))


def _compare(actual, expected, where: tuple, options: dict) -> None:
    if actual is None or expected is None:
        if not (actual is None and expected is None):
            raise _Mismatch(AssertionError, f"None mismatch: {actual} is not {expected}", where)
    elif isinstance(actual, (bool, np.bool_)) and isinstance(expected, (bool, np.bool_)):
        if bool(actual) is not bool(expected):
            raise _Mismatch(AssertionError, f"Booleans mismatch: {bool(actual)} is not {bool(expected)}", where)
    elif _is_number(actual) and _is_number(expected):
        _compare_numbers(_python_number(actual), _python_number(expected), where, options)
    elif _is_tensor_like(actual) and _is_tensor_like(expected) and \
            isinstance(actual, Tensor) == isinstance(expected, Tensor):  # subclasses too, as PyTorch
        _compare_tensors(actual, expected, where, options)
    elif _is_sequence(actual) and _is_sequence(expected):
        if len(actual) != len(expected):
            raise _Mismatch(AssertionError,
                            f"The length of the sequences mismatch: {len(actual)} != {len(expected)}", where)
        for i, (a, e) in enumerate(zip(actual, expected)):
            _compare(a, e, (*where, i), options)
    elif isinstance(actual, collections.abc.Mapping) and isinstance(expected, collections.abc.Mapping):
        _compare_mappings(actual, expected, where, options)
    else:
        raise _Mismatch(TypeError, f"No comparison pair was able to handle inputs of type {type(actual)} and "
                                   f"{type(expected)}.", where)


def _is_sequence(value) -> bool:
    return isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes))


def _python_number(value):
    return value.item() if isinstance(value, np.number) else value


def _compare_mappings(actual, expected, where: tuple, options: dict) -> None:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing or extra:
        lines = ["The keys of the mappings do not match:"]
        if missing:
            lines.append(f"Missing keys in the actual mapping: {sorted(missing, key=str)}")
        if extra:
            lines.append(f"Additional keys in the actual mapping: {sorted(extra, key=str)}")
        raise _Mismatch(AssertionError, "\n".join(lines), where)
    for key in expected:
        _compare(actual[key], expected[key], (*where, key), options)


def _tolerances(options: dict, *dtypes_) -> tuple[float, float]:
    if options["rtol"] is not None:
        return options["rtol"], options["atol"]
    return default_tolerances(*dtypes_)


def _compare_numbers(actual, expected, where: tuple, options: dict) -> None:
    if options["check_dtype"] and type(actual) is not type(expected):
        raise _Mismatch(AssertionError, f"The (d)types do not match: {type(actual)} != {type(expected)}.", where)
    rtol, atol = _tolerances(options, _NUMBER_DTYPES[type(actual)], _NUMBER_DTYPES[type(expected)])
    if actual == expected:
        return
    if options["equal_nan"] and _isnan(actual) and _isnan(expected):
        return
    difference = abs(actual - expected)
    if math.isfinite(difference) and difference <= atol + rtol * abs(expected):
        return
    raise _Mismatch(AssertionError, _scalar_message(actual, expected, rtol, atol), where)


def _isnan(value) -> bool:
    return value != value


def _scalar_message(actual, expected, rtol: float, atol: float) -> str:
    difference = abs(actual - expected)
    relative = float("inf") if expected == 0 else difference / abs(expected)
    return _mismatch_message("Scalars", rtol, atol, f"Expected {expected} but got {actual}.",
                             (difference, None), (relative, None))


def _mismatch_message(what: str, rtol: float, atol: float, extra: str, absolute: tuple, relative: tuple) -> str:
    """PyTorch's message layout: header, the extra line, then the two differences (with their
    index for tensors, and the tolerance unless it is an equality check)."""
    equality = rtol == 0 and atol == 0
    lines = [f"{what} are not {'equal' if equality else 'close'}!", "", extra]
    for kind, (difference, index), tolerance in (("absolute", absolute, atol), ("relative", relative, rtol)):
        line = f"{kind.title()} difference: {difference}" if index is None else \
            f"Greatest {kind} difference: {difference} at index {index}"
        lines.append(line if equality else f"{line} (up to {tolerance} allowed)")
    return "\n".join(lines)


def _host_array(value) -> np.ndarray:
    return backend.to_host(value._data) if isinstance(value, Tensor) else value


def _device_name(value) -> str:
    return str(value.device) if isinstance(value, Tensor) else "cpu"


def _compare_tensors(actual, expected, where: tuple, options: dict) -> None:
    if tuple(actual.shape) != tuple(expected.shape):
        raise _Mismatch(AssertionError, "The values for attribute 'shape' do not match: "
                                        f"{tuple(actual.shape)} != {tuple(expected.shape)}.", where)
    if options["check_device"] and _device_name(actual) != _device_name(expected):
        raise _Mismatch(AssertionError, "The values for attribute 'device' do not match: "
                                        f"{_device_name(actual)} != {_device_name(expected)}.", where)
    if options["check_dtype"] and np.dtype(actual.dtype) != np.dtype(expected.dtype):
        raise _Mismatch(AssertionError, "The values for attribute 'dtype' do not match: "
                                        f"{np.dtype(actual.dtype)} != {np.dtype(expected.dtype)}.", where)
    a, e = _host_array(actual), _host_array(expected)
    rtol, atol = _tolerances(options, a.dtype, e.dtype)  # of both dtypes, before promotion (as PyTorch)
    common = dtypes.promote_types(a.dtype, e.dtype)
    a, e = a.astype(common, copy=False), e.astype(common, copy=False)
    # A 16-bit float's values are exact in float32: the test runs there; the message's differences
    # are computed in the common dtype, as PyTorch computes them.
    matches = _isclose(dtypes.upcast(a), dtypes.upcast(e), rtol, atol, options["equal_nan"])
    if np.all(matches):  # host arrays here (_host_array)
        return
    if a.ndim == 0:
        message = _scalar_message(a.item(), e.item(), rtol, atol)
    else:
        message = _tensor_message(a, e, matches, rtol, atol)
    raise _Mismatch(AssertionError, message, where)


def _isclose(a: np.ndarray, e: np.ndarray, rtol: float, atol: float, equal_nan: bool) -> np.ndarray:
    if a.dtype.kind in "biu":
        return a == e
    return np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan)


def _tensor_message(a: np.ndarray, e: np.ndarray, matches: np.ndarray, rtol: float, atol: float) -> str:
    count, mismatched = matches.size, int(matches.size - np.count_nonzero(matches))
    extra = f"Mismatched elements: {mismatched} / {count} ({mismatched / count:.1%})"
    shape = matches.shape
    a, e, matches = a.ravel(), e.ravel(), matches.ravel()
    integers = a.dtype.kind in "biu"
    if integers:  # integer differences in int64, as PyTorch (no unsigned wrap-around)
        a, e = a.astype(np.int64), e.astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        absolute = np.abs(a - e)
        absolute[matches] = 0  # only mismatches count
        # PyTorch divides integers in its default float dtype, float32
        relative = absolute.astype(np.float32) / np.abs(e).astype(np.float32) if integers else absolute / np.abs(e)
    relative[matches] = 0
    return _mismatch_message("Tensor-likes", rtol, atol, extra, _greatest(absolute, shape), _greatest(relative, shape))


def _greatest(differences: np.ndarray, shape: tuple) -> tuple:
    """The largest difference (NaN counts as largest, as for torch.max) and its index in ``shape``."""
    flat = int(np.argmax(differences))
    return differences[flat].item(), tuple(int(i) for i in np.unravel_index(flat, shape))

"""Row scatter-add on the CPU: ``np.add.at(target, rows, values)`` for an integer index into axis 0.

This is the backward of a row gather (``weight[ids]``: an embedding lookup, ``index_select``
along dim 0): every looked-up row's gradient is added into its row of the table, repeated rows
accumulating. ``np.add.at`` is the reference, and slow for it (it handles any index with a
generic per-element loop: ~2 ms for the 1,024 x 128 token rows of a GPT batch of 16). The numba
loop here adds the rows in the same order, one element at a time in the same dtype, so its
results are bit for bit those of ``np.add.at``.

``import engine.kernels.cpu.scatter`` does not import numba: the loop is compiled on first use.
"""

from __future__ import annotations

import functools

import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def takes(target, rows, values) -> bool:
    """Does :func:`add_rows` take these arrays (float32/float64 ``target`` and ``values`` of one dtype,
    an integer ``rows`` array indexing axis 0, ``values`` shaped ``rows.shape + target.shape[1:]``)?"""
    return (type(target) is np.ndarray and type(rows) is np.ndarray and type(values) is np.ndarray
            and rows.dtype.kind in "iu" and target.dtype in _FLOATS and values.dtype == target.dtype
            and target.ndim >= 1 and target.flags.c_contiguous and target.flags.writeable
            and values.shape == rows.shape + target.shape[1:])


def add_rows(target, rows, values) -> None:
    """``target[rows[i]] += values[i]`` for every ``i`` in order, repeats accumulating, in place:
    ``np.add.at(target, rows, values)`` bit for bit, for arrays :func:`takes` accepts.

    Raises:
        IndexError: a row index outside ``[-len(target), len(target))``, as ``np.add.at`` raises.
    """
    n = target.shape[0]
    flat_rows = rows.reshape(-1)
    if flat_rows.size == 0:
        return
    low, high = int(flat_rows.min()), int(flat_rows.max())
    if low < -n or high >= n:
        bad = low if low < -n else high
        raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
    width = target.size // n if n else 0
    _loop()(target.reshape(n, width), flat_rows, np.ascontiguousarray(values).reshape(flat_rows.size, width))


@functools.cache
def _loop():
    import numba

    @numba.njit(cache=True)
    def add_rows_loop(target, rows, values):
        n = target.shape[0]
        for i in range(rows.shape[0]):
            r = rows[i]
            if r < 0:
                r += n
            for j in range(target.shape[1]):
                target[r, j] += values[i, j]

    return add_rows_loop

"""Sequence helpers with PyTorch's import path ``torch.nn.utils.rnn``: :func:`pad_sequence`."""

from __future__ import annotations

import math
import numbers

import numpy as np

from engine.autograd import Function
from engine.backend import array_module
from engine import dtypes
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, ShapeError, describe
from engine.tensor import Tensor


class PadSequence(Function):
    """Write each (L_i, *) sequence into one padded array; backward slices each gradient back out."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    name = "pad_sequence"

    def forward(self, *sequences, batch_first=False, padding_value=0.0, left=False):
        first = sequences[0]
        xp = array_module(first)
        longest = max(s.shape[0] for s in sequences)
        out = xp.full((len(sequences), longest) + first.shape[1:], padding_value, dtype=first.dtype)
        self.spans = []
        for i, s in enumerate(sequences):
            start = longest - s.shape[0] if left else 0
            out[i, start:start + s.shape[0]] = s
            self.spans.append((start, start + s.shape[0]))
        self.batch_first = batch_first
        return out if batch_first else xp.ascontiguousarray(xp.swapaxes(out, 0, 1))

    def backward(self, g):
        rows = g if self.batch_first else g.swapaxes(0, 1)
        return tuple(rows[i, start:stop] if need else None
                     for i, ((start, stop), need) in enumerate(zip(self.spans, self.needs_input_grad)))


def pad_sequence(sequences, batch_first: bool = False, padding_value: float = 0.0,
                 padding_side: str = "right") -> Tensor:
    """Stack sequences of different lengths into one Tensor, padding the short ones.

    As ``torch.nn.utils.rnn.pad_sequence``: each sequence is (L_i, *) with the same trailing dims,
    dtype and device; the result is (max L, B, *), or (B, max L, *) with ``batch_first``.
    Differentiable: each sequence gets the gradient of its own (unpadded) positions.

    Args:
        sequences: a list (or tuple) of Tensors, or a Tensor whose dim 0 indexes the sequences.
        batch_first: put the batch dim first.
        padding_value: the value of the padded positions (cast to the sequences' dtype).
        padding_side: "right" (pad after each sequence, PyTorch's default) or "left".

    Example:
        >>> pad_sequence([engine.tensor([1, 2, 3]), engine.tensor([4])], batch_first=True).tolist()  # doctest: +SKIP
        [[1, 2, 3], [4, 0, 0]]
    """
    op = "pad_sequence"
    if padding_side not in ("right", "left"):
        raise ValueError(f"{op}: padding_side must be 'right' or 'left', got {padding_side!r}")
    seqs = list(sequences)
    if not seqs:
        raise ValueError(f"{op}: received an empty list of sequences")
    for i, s in enumerate(seqs):
        if not isinstance(s, Tensor):
            raise TypeError(f"{op}: sequence {i} is a {type(s).__name__}; pass Tensors (engine.tensor(...))")
        if s.ndim < 1:
            raise ShapeError(f"{op}: sequence {i} {describe(s)} is 0-d; each sequence needs a length dim (L, *)")
    first = seqs[0]
    for i, s in enumerate(seqs):
        if s.shape[1:] != first.shape[1:]:
            raise ShapeError(f"{op}: sequence {i} {describe(s)} has trailing dims {s.shape[1:]} but sequence 0 "
                             f"{describe(first)} has {first.shape[1:]}; only the length (dim 0) may differ")
        if s.dtype != first.dtype:
            raise DTypeError(f"{op}: sequence {i} {describe(s)} and sequence 0 {describe(first)} have different dtypes")
        if s.device != first.device:
            raise DeviceError(f"{op}: sequence {i} {describe(s)} and sequence 0 {describe(first)} are on different "
                              "devices")
    padding_value = check_padding_value(op, padding_value, first.dtype)
    return PadSequence.apply(*seqs, batch_first=bool(batch_first), padding_value=padding_value,
                             left=padding_side == "left")


def check_padding_value(op: str, value, dtype):
    """``value`` as a padding value for arrays of ``dtype``, refused where the dtype cannot hold it.

    Written into integer ids, nan would become INT64_MIN and 1.5 the id 1: another token, silently.
    Integer dtypes take whole numbers in their range, bool takes 0 and 1; a float dtype takes
    any number (nan and inf too, rounded as a cast rounds) except a finite one it overflows to inf,
    which PyTorch refuses too.
    """
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: padding_value must be a real number, got {value!r} ({type(value).__name__})")
    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        whole = isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())
        if not whole or not low <= int(value) <= high:
            raise DTypeError(f"{op}: padding_value={value!r} cannot be stored exactly in the sequences' dtype "
                             f"{dtype} (whole numbers in [{low}, {high}]); pass a value the dtype holds, such as "
                             "the pad token's id")
        return bool(value) if dtype.kind == "b" else int(value)
    if is_floating(dtype) and dtypes.overflows(value, dtype):
        raise DTypeError(f"{op}: padding_value={value!r} overflows the sequences' dtype {dtype} (its largest "
                         f"value is {np.finfo(dtype).max})")
    return value



"""Sequence helpers with PyTorch's import path ``torch.nn.utils.rnn``: :func:`pad_sequence`,
:class:`PackedSequence`, :func:`pack_padded_sequence`, :func:`pad_packed_sequence`,
:func:`pack_sequence`, :func:`unpad_sequence`, :func:`unpack_sequence`."""

from __future__ import annotations

import math
import numbers
from collections import namedtuple

import numpy as np

from engine.autograd import Function
from engine.backend import array_module
from engine import backend, dtypes
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




# ---- packed sequences ------------------------------------------------------------------------------

class PackedSequence(namedtuple("PackedSequence", ["data", "batch_sizes", "sorted_indices", "unsorted_indices"])):
    """A batch of variable-length sequences packed time step by time step, as PyTorch's.

    ``data`` holds, for t = 0, 1, ..., the rows of the sequences still running at step t (the
    batch sorted by decreasing length): ``batch_sizes[t]`` of them. ``sorted_indices`` /
    ``unsorted_indices`` map between the caller's batch order and the sorted one (None when the
    batch came sorted). Build one with :func:`pack_padded_sequence` or :func:`pack_sequence`; the
    recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) take and return it, and
    :func:`pad_packed_sequence` turns it back into a padded tensor.
    """

    __slots__ = ()

    def __new__(cls, data, batch_sizes=None, sorted_indices=None, unsorted_indices=None):
        if unsorted_indices is None and sorted_indices is not None:
            unsorted_indices = _inverse_permutation(sorted_indices)
        return super().__new__(cls, data, batch_sizes, sorted_indices, unsorted_indices)

    def to(self, *args, **kwargs) -> "PackedSequence":
        """``data`` (and the index tensors, to its device) moved or cast as ``Tensor.to``; ``batch_sizes``
        stays on the CPU, as in PyTorch."""
        data = self.data.to(*args, **kwargs)
        if data is self.data:
            return self
        move = (lambda t: None if t is None else t.to(data.device))
        return type(self)(data, self.batch_sizes, move(self.sorted_indices), move(self.unsorted_indices))

    def cpu(self) -> "PackedSequence":
        return self.to("cpu")

    def cuda(self, index: int = 0) -> "PackedSequence":
        return self.to(f"cuda:{index}")

    def float(self) -> "PackedSequence":
        return self.to(np.float32)

    def double(self) -> "PackedSequence":
        return self.to(np.float64)

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda


def _inverse_permutation(permutation: Tensor) -> Tensor:
    xp = permutation.xp
    inverse = xp.empty_like(permutation._data)
    inverse[permutation._data] = xp.arange(permutation.shape[0], dtype=permutation.dtype)
    return Tensor._from_op(inverse, None)


def _host_lengths(op: str, lengths) -> np.ndarray:
    if isinstance(lengths, Tensor):
        if lengths.device.type != "cpu":
            raise DeviceError(f"{op}: 'lengths' must be a 1-d CPU int64 tensor or a list of ints (as in PyTorch), got "
                              f"{describe(lengths)}; pass lengths.cpu()")
        lengths = lengths.numpy()
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise DTypeError(f"{op}: 'lengths' must be a 1-d sequence of ints, got {lengths!r}")
    return lengths.astype(np.int64)


def _index_on(array: np.ndarray, like: Tensor):
    """A host index array moved to ``like``'s device."""
    return backend.to_device(array, like.device)


def _packed_positions(batch_sizes: np.ndarray, batch: int) -> np.ndarray:
    """For each row of the packed data, its row in the (T * B, ...) flattening of the time-major padding."""
    return np.concatenate([t * batch + np.arange(n) for t, n in enumerate(batch_sizes)]) if len(batch_sizes) \
        else np.zeros(0, np.int64)


def pack_padded_sequence(input: Tensor, lengths, batch_first: bool = False,
                         enforce_sorted: bool = True) -> PackedSequence:
    """Pack a padded batch of sequences of the given ``lengths`` (``torch.nn.utils.rnn.pack_padded_sequence``).

    Args:
        input: (T, B, *) padded sequences, or (B, T, *) with ``batch_first``.
        lengths: each sequence's length (a list of ints or a 1-d CPU int64 tensor), all > 0.
        batch_first: the batch dim comes first.
        enforce_sorted: the lengths must be sorted in decreasing order; False sorts the batch
            (and records how to restore its order in the result).

    Differentiable: the gradient of each packed row goes back to its padded position.
    """
    from engine import ops
    from engine.indexing import index_select

    op = "pack_padded_sequence"
    lengths = _host_lengths(op, lengths)
    batch_dim = 0 if batch_first else 1
    if input.ndim < 2 or input.shape[batch_dim] != len(lengths):
        raise ShapeError(f"{op}: {describe(input)} has no batch of {len(lengths)} sequences along dim {batch_dim}; "
                         f"expected ({'B, T' if batch_first else 'T, B'}, *) with B = len(lengths)")
    if len(lengths) == 0 or lengths.min() <= 0:
        raise ValueError(f"{op}: the length of every sequence must be greater than 0, got {lengths.tolist()}")
    sorted_indices = None
    if enforce_sorted:
        if np.any(np.diff(lengths) > 0):
            raise ValueError(f"{op}: 'lengths' array must be sorted in decreasing order when enforce_sorted is True, "
                             f"got {lengths.tolist()}; pass enforce_sorted=False to have the batch sorted for you")
    else:
        order = np.argsort(-lengths, kind="stable")
        lengths = lengths[order]
        sorted_indices = Tensor(_index_on(order, input))
        input = index_select(input, batch_dim, sorted_indices)
    if lengths[0] > input.shape[1 - batch_dim]:
        raise ShapeError(f"{op}: a length of {lengths[0]} exceeds the {input.shape[1 - batch_dim]} time steps of "
                         f"{describe(input)}")
    if batch_first:
        input = ops.transpose(input, 0, 1)
    batch_sizes = np.count_nonzero(lengths[None, :] > np.arange(lengths[0])[:, None], axis=1).astype(np.int64)
    flat = ops.reshape(input[: lengths[0]], (-1,) + input.shape[2:])
    positions = _index_on(_packed_positions(batch_sizes, len(lengths)), input)
    return PackedSequence(ops.getitem(flat, positions), Tensor(batch_sizes), sorted_indices)


def pad_packed_sequence(sequence: PackedSequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: int | None = None) -> tuple[Tensor, Tensor]:
    """The padded batch and the lengths of a :class:`PackedSequence` (``pad_packed_sequence``).

    Returns ``(padded, lengths)``: padded is (T, B, *) (or (B, T, *) with ``batch_first``) in the
    caller's original batch order, T = ``total_length`` if given (at least the longest length);
    lengths is a CPU int64 tensor. Differentiable in the packed data.
    """
    from engine import ops
    from engine.indexing import index_put, index_select

    op = "pad_packed_sequence"
    data, batch_sizes = sequence.data, sequence.batch_sizes.numpy().astype(np.int64)
    steps, batch = len(batch_sizes), int(batch_sizes[0])
    if total_length is not None:
        if total_length < steps:
            raise ValueError(f"{op}: expected total_length to be at least the length of the longest sequence "
                             f"({steps}), got {total_length}")
        steps = int(total_length)
    padding_value = check_padding_value(op, padding_value, data.dtype)
    xp = data.xp
    base = Tensor(xp.full((steps * batch,) + data.shape[1:], padding_value, dtype=data.dtype))
    positions = _index_on(_packed_positions(batch_sizes, batch), data)
    padded = ops.reshape(index_put(base, positions, data), (steps, batch) + data.shape[1:])
    lengths = np.count_nonzero(batch_sizes[None, :] > np.arange(batch)[:, None], axis=1).astype(np.int64)
    if sequence.unsorted_indices is not None:
        padded = index_select(padded, 1, sequence.unsorted_indices)
        lengths = lengths[sequence.unsorted_indices.numpy()]
    if batch_first:
        padded = ops.transpose(padded, 0, 1)
    return padded, Tensor(lengths)


def pack_sequence(sequences, enforce_sorted: bool = True) -> PackedSequence:
    """Pack a list of (L_i, *) tensors (``torch.nn.utils.rnn.pack_sequence``)."""
    padded = pad_sequence(sequences)  # checks the sequences
    return pack_padded_sequence(padded, [s.shape[0] for s in sequences], enforce_sorted=enforce_sorted)


def unpad_sequence(padded_sequences: Tensor, lengths, batch_first: bool = False) -> list[Tensor]:
    """The list of unpadded sequences of a padded batch (``torch.nn.utils.rnn.unpad_sequence``)."""
    from engine import ops

    lengths = _host_lengths("unpad_sequence", lengths)
    if not batch_first:
        padded_sequences = ops.transpose(padded_sequences, 0, 1)
    return [padded_sequences[i, : int(n)] for i, n in enumerate(lengths)]


def unpack_sequence(packed_sequences: PackedSequence) -> list[Tensor]:
    """The list of sequences a :class:`PackedSequence` holds, in the original batch order."""
    padded, lengths = pad_packed_sequence(packed_sequences, batch_first=True)
    return unpad_sequence(padded, lengths, batch_first=True)

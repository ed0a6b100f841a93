"""Batching variable-length sequences: padding, the key-padding mask, a DataLoader collate_fn.

The mask follows PyTorch's ``key_padding_mask`` convention: boolean, shape ``(batch, length)``,
``True`` where a position is padding (to be ignored), so it goes straight into
``nn.MultiheadAttention(key_padding_mask=...)`` and ``nn.TransformerEncoder(src_key_padding_mask=...)``.

Example:
    >>> padded, mask = pad_batch([[5, 6, 7], [8]], padding_value=0)
    >>> padded.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[False, False, False], [False, True, True]])
"""

from __future__ import annotations

import numpy as np

from engine import backend
from engine.tensor import Tensor


def _as_sequence(where: str, position: int, sequence):
    """A 1-D or N-D array for one sequence (a list of ids, a numpy/cupy array or a Tensor)."""
    if isinstance(sequence, Tensor):
        array = sequence._data
    elif backend.is_array(sequence):
        array = sequence
    else:
        array = np.asarray(sequence)
        if array.dtype == np.float64:  # a Python float list: the engine's default float is float32
            array = array.astype(np.float32 if array.size else np.int64)  # numpy makes [] float64
    if array.ndim < 1:
        raise ValueError(f"{where}: sequence {position} is a scalar; each sequence needs a length axis first")
    return array


def _is_empty_list(sequence) -> bool:
    """An empty Python sequence (``tok.encode("")``): it has no dtype of its own."""
    return not isinstance(sequence, Tensor) and not backend.is_array(sequence) and len(sequence) == 0


def _fill_empty(sequences, arrays: list) -> list:
    """Empty lists take the dtype, trailing dims and device of the first other sequence (int64 ids
    when every sequence is empty), so ``[[], [1, 2]]`` pads as ids, not as float32."""
    empty = [_is_empty_list(s) for s in sequences]
    model = next((a for a, e in zip(arrays, empty) if not e), None)
    if model is None:
        return [np.zeros(0, np.int64) for _ in arrays]
    blank = backend.to_device(np.zeros((0,) + model.shape[1:], model.dtype), backend.device_of(model))
    return [blank if e else a for a, e in zip(arrays, empty)]


def pad_batch(sequences, padding_value=0, batch_first: bool = True, return_lengths: bool = False):
    """Pad sequences of different lengths into one Tensor, with the matching key-padding mask.

    Args:
        sequences: a non-empty list of sequences, each a list of ids, an array or a Tensor of shape
            ``(length, *)`` (the trailing dims equal across sequences). An empty list (the ids of
            ``""``) takes the dtype of the others; a batch of only empty lists pads as int64 ids.
        padding_value: the value written after each sequence's end (the pad token's id); one the
            sequences' dtype cannot hold exactly (nan, inf, 1.5 or -1 in int ids ...) is refused.
        batch_first: output ``(batch, max_len, *)`` if True, else ``(max_len, batch, *)``.
        return_lengths: also return the lengths as an int64 Tensor ``(batch,)``.

    Returns:
        ``(padded, key_padding_mask)`` (and ``lengths``): ``key_padding_mask`` is boolean
        ``(batch, max_len)`` whatever ``batch_first``, True at padding, as PyTorch's attention
        layers take it.
    """
    from engine.nn.utils.rnn import check_padding_value, pad_sequence

    if isinstance(sequences, (Tensor, np.ndarray, str)) or not len(sequences):
        raise ValueError("pad_batch: expected a non-empty list of sequences")
    arrays = _fill_empty(sequences, [_as_sequence("pad_batch", k, s) for k, s in enumerate(sequences)])
    padding_value = check_padding_value("pad_batch", padding_value, arrays[0].dtype)
    padded = pad_sequence([Tensor(a) for a in arrays], batch_first=batch_first, padding_value=padding_value)
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    host_mask = np.arange(int(lengths.max()))[None, :] >= lengths[:, None]
    mask = Tensor(backend.to_device(host_mask, backend.device_of(arrays[0])))
    if return_lengths:
        return padded, mask, Tensor(lengths)
    return padded, mask


class PadCollate:
    """A ``collate_fn`` for variable-length ``(sequence, label)`` items: ``(tokens, key_padding_mask, labels)``.

    ``tokens`` is ``(batch, max_len)`` padded with ``pad_id``; ``key_padding_mask`` True at padding.
    Labels that are sequences (a tag or next token per position) are padded with
    ``label_pad_id`` (default -100, the ``ignore_index`` of ``F.cross_entropy``, so padding adds no
    loss); scalar labels (one class per sequence) are stacked.

    Args:
        pad_id: the padding token's id (e.g. ``tokenizer.pad_id``).
        label_pad_id: the value padded labels get.

    Example:
        >>> collate = PadCollate(tok.pad_id)                                                # doctest: +SKIP
        >>> loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate)  # doctest: +SKIP
        >>> for tokens, mask, labels in loader: ...                                                     # doctest: +SKIP
    """

    def __init__(self, pad_id: int, label_pad_id: int = -100):
        for name, value in (("pad_id", pad_id), ("label_pad_id", label_pad_id)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"PadCollate: {name} must be an int (an id), got {value!r}")
        self.pad_id, self.label_pad_id = int(pad_id), int(label_pad_id)

    def __call__(self, items: list):
        if not items:
            raise ValueError("PadCollate: got an empty list of items")
        bad = [k for k, item in enumerate(items) if not isinstance(item, (tuple, list)) or len(item) != 2]
        if bad:
            raise ValueError(f"PadCollate: items must be (sequence, label) pairs; item {bad[0]} is "
                             f"{type(items[bad[0]]).__name__}")
        tokens, mask = pad_batch([sequence for sequence, _ in items], padding_value=self.pad_id)
        labels = [label for _, label in items]
        first = labels[0]._data if isinstance(labels[0], Tensor) else np.asarray(labels[0])
        if first.ndim == 0:
            from engine.data import default_collate

            return tokens, mask, default_collate(labels)
        padded_labels, _ = pad_batch(labels, padding_value=self.label_pad_id)
        return tokens, mask, padded_labels

    def __repr__(self) -> str:
        return f"PadCollate(pad_id={self.pad_id}, label_pad_id={self.label_pad_id})"

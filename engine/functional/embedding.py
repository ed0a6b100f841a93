"""Embedding lookups and ``one_hot``."""

from __future__ import annotations


import numpy as np

from engine import backend, ops
from engine.autograd import notify_watcher
from engine.errors import DeviceError, DTypeError, EngineError, ShapeError, describe
from engine.tensor import Tensor
from engine.functional.losses import _as_tensor_like, _checked_rows


def embedding(input, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of ``weight`` at the integer ``input`` indices: output shape ``input.shape + (dim,)``.

    Args:
        input: integer indices of any shape, each in [0, num_embeddings).
        weight: (num_embeddings, embedding_dim) table.
        padding_idx: rows looked up at this index get no gradient (they stay at their value,
            usually zeros, during training).
    """
    indices = _as_tensor_like(input, weight)
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be (num_embeddings, embedding_dim), got {describe(weight)}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise DTypeError(f"embedding: indices must be integers, got {describe(indices)}; convert with .long()")
    if indices.device != weight.device:
        raise DeviceError(f"embedding: indices {describe(indices)} and weight {describe(weight)} are on different "
                          "devices; move the indices with .to(weight.device)")
    count = weight.shape[0]
    notify_watcher((indices,), "embedding")  # read as raw indices below: a capture must still note the tensor
    idx = _checked_rows(indices, count, weight)
    rows = ops.getitem(weight, idx)
    if padding_idx is None:
        return rows
    if not -count <= padding_idx < count:
        raise ShapeError(f"embedding: padding_idx={padding_idx} is outside the table of {count} rows")
    # Same values either way; only the first branch carries gradient back to the table.
    keep = (idx != padding_idx % count)[..., None]
    return ops.where(keep, rows, rows.detach())


def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """int64 one-hot encoding of integer class indices: shape ``tensor.shape + (num_classes,)``, as
    ``torch.nn.functional.one_hot``. ``num_classes=-1`` takes the largest index + 1 (one host read).

    Example:
        >>> F.one_hot(engine.tensor([0, 2]), 3).tolist()    # doctest: +SKIP
        [[1, 0, 0], [0, 0, 1]]
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"one_hot: expected an integer Tensor, got {type(tensor).__name__}")
    if not np.issubdtype(tensor.dtype, np.integer):
        raise DTypeError(f"one_hot: class indices must be an integer tensor, got {describe(tensor)}; use .long()")
    xp, idx = tensor.xp, tensor._data
    if num_classes == -1:
        num_classes = int(backend.to_host(idx.max())) + 1 if idx.size else 0
    if idx.size and bool(backend.to_host(((idx < 0) | (idx >= num_classes)).any())):
        raise EngineError(f"one_hot: class values must be in [0, {num_classes}), got values in "
                          f"[{int(backend.to_host(idx.min()))}, {int(backend.to_host(idx.max()))}]")
    out = (idx[..., None] == xp.arange(num_classes)).astype(np.int64)
    return Tensor(out)

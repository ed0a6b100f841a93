"""Datasets: the indexable collections a DataLoader batches, and the seeding helper data code shares.

A dataset is anything with ``__getitem__(index)`` and ``__len__()``; :class:`Dataset` is the
optional base class. :class:`TensorDataset` holds aligned arrays (features, labels ...) and lets
the DataLoader slice whole batches at once instead of collating item by item.
"""

from __future__ import annotations

import numpy as np

from engine import backend
from engine.errors import EngineError, ShapeError, describe
from engine.tensor import Tensor, unwrap  # noqa: F401  (unwrap: used across engine.data)


class Dataset:
    """Base class for map-style datasets: override ``__getitem__`` and ``__len__``.

    Example:
        >>> class Squares(Dataset):
        ...     def __len__(self): return 10
        ...     def __getitem__(self, i): return np.float32(i), np.float32(i * i)
    """

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")

    def __add__(self, other) -> "ConcatDataset":
        return ConcatDataset([self, other])


class IterableDataset(Dataset):
    """Base class for stream-style datasets: override ``__iter__`` (yielding items); no ``__len__`` needed.

    A DataLoader reads it in order, ``batch_size`` items per batch (a sampler makes no sense for
    it and is refused). With ``num_workers > 0`` the items are still read by the loop's thread, in
    order, and only the collation runs in the workers, so no item is read twice (PyTorch gives
    each worker process a copy of the dataset and leaves the sharding to ``get_worker_info``).
    """

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} must implement __iter__")

    def __getitem__(self, index):
        raise TypeError(f"{type(self).__name__} is an IterableDataset: iterate over it instead of indexing")

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} is an IterableDataset and has no length")


class ConcatDataset(Dataset):
    """Several datasets one after the other (``dataset_a + dataset_b`` makes one)."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        if not self.datasets:
            raise EngineError("ConcatDataset: needs at least one dataset")
        for d in self.datasets:
            if isinstance(d, IterableDataset):
                raise EngineError("ConcatDataset: cannot concatenate an IterableDataset (it has no length)")
        self.cumulative_sizes = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    def __getitem__(self, index):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"ConcatDataset: index {index} out of range for {n} items")
        which = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        start = self.cumulative_sizes[which - 1] if which else 0
        return self.datasets[which][index - start]


class TensorDataset(Dataset):
    """Aligned tensors indexed together along their first dimension: item ``i`` is ``(t[i] for t in tensors)``.

    Args:
        *tensors: Tensors or numpy/cupy arrays with the same first dimension (samples). Arrays are
            wrapped as Tensors without a copy; tensors are used detached from any graph.

    Raises:
        ShapeError: no tensors, a 0-d tensor, or first dimensions that differ.

    Example:
        >>> ds = TensorDataset(engine.randn(100, 4), engine.arange(100))   # doctest: +SKIP
        >>> x, y = ds[3]                                                    # doctest: +SKIP
    """

    def __init__(self, *tensors):
        if not tensors:
            raise ShapeError("TensorDataset: needs at least one tensor, got none")
        self.tensors = tuple(_as_tensor(t, "TensorDataset") for t in tensors)
        for t in self.tensors:
            if t.ndim == 0:
                raise ShapeError(f"TensorDataset: every tensor needs a first (sample) dimension, got {describe(t)}")
        lengths = {t.shape[0] for t in self.tensors}
        if len(lengths) > 1:
            shapes = ", ".join(describe(t) for t in self.tensors)
            raise ShapeError(f"TensorDataset: tensors must have the same first dimension (number of samples), got "
                             f"{shapes}; slice or fix them so every tensor has one row per sample")

    def __getitem__(self, index):
        # An int index into a 1-D numpy array gives a numpy scalar: keep it a 0-d array, so that
        # Tensor() reads it as data (Tensor(n) with an int n is PyTorch's uninitialised size-n tensor).
        return tuple(Tensor(_as_0d(t._data[index])) for t in self.tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def batch(self, indices) -> tuple:
        """The rows ``indices`` (a slice or an integer array) of every tensor, as Tensors: one gather per tensor."""
        out = []
        for t in self.tensors:
            index = indices
            if isinstance(indices, np.ndarray) and t.device.type != "cpu":
                index = backend.to_device(indices, t.device)
            out.append(Tensor(t._data[index]))
        return tuple(out)


class Subset(Dataset):
    """The items of ``dataset`` at ``indices``, in that order.

    Args:
        dataset: any dataset (``__getitem__`` and ``__len__``).
        indices: integer sequence; each must lie in ``[0, len(dataset))``.
    """

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(dataset)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise EngineError(f"Subset: indices must lie in [0, {n}) for a dataset of {n} items, got range "
                              f"[{self.indices.min()}, {self.indices.max()}]")

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]

    def __len__(self) -> int:
        return int(self.indices.size)


def _as_0d(value):
    return np.asarray(value) if isinstance(value, np.generic) else value


def _as_tensor(value, where: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if backend.is_array(value):
        return Tensor(value)
    raise EngineError(f"{where}: expected Tensors or numpy/cupy arrays, got {type(value).__name__}; "
                      "wrap lists with engine.tensor(...) or np.asarray(...)")


# ---- seeding ------------------------------------------------------------------------------------

def make_generator(seed=None, generator=None, where: str = "data") -> np.random.Generator:
    """A numpy Generator for shuffling and augmentation.

    ``generator`` (a ``np.random.Generator``, or a CPU ``engine.Generator``'s stream) is used as is;
    ``seed`` (an int) seeds a fresh one;
    with neither, the seed is drawn from the engine's CPU generator, so results repeat after
    ``engine.manual_seed(s)``.
    """
    if seed is not None and generator is not None:
        raise EngineError(f"{where}: pass seed or generator, not both")
    if generator is not None:
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            return make_generator(seed=generator, where=where)
        if isinstance(generator, backend.Generator):  # engine.Generator, PyTorch's torch.Generator
            return backend.rng_for(generator, backend.CPU)
        if not isinstance(generator, np.random.Generator):
            raise EngineError(f"{where}: generator must be a numpy.random.Generator or an int seed, "
                              f"got {type(generator).__name__}")
        return generator
    if seed is None:
        seed = int(backend.generator(backend.CPU).integers(0, 2**63 - 1))
    elif not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise EngineError(f"{where}: seed must be a non-negative int, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


# ---- numpy / cupy / Tensor in, the same kind out --------------------------------------------------

def rewrap(data, like):
    """``data`` as a Tensor when ``like`` was a Tensor, else the raw array."""
    return Tensor(data) if isinstance(like, Tensor) else data

"""``torch.utils.data.dataset``'s import path: the datasets of :mod:`engine.data`."""

from engine.data.dataset import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset  # noqa: F401
from engine.data.splits import random_split  # noqa: F401

__all__ = ["Dataset", "IterableDataset", "TensorDataset", "Subset", "ConcatDataset", "random_split"]

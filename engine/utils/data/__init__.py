"""``torch.utils.data``'s names, re-exported from :mod:`engine.data` (no second implementation).

Example:
    >>> from engine.utils.data import DataLoader, TensorDataset, random_split
"""

from engine.data.distributed import DistributedSampler
from engine.data.dataset import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset
from engine.data.loader import DataLoader, default_collate, get_worker_info
from engine.data.samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler,
                                  SubsetRandomSampler)
from engine.data.preprocessing import WeightedRandomSampler
from engine.data.splits import random_split

__all__ = ["Dataset", "IterableDataset", "TensorDataset", "Subset", "ConcatDataset", "DataLoader",
           "default_collate", "get_worker_info", "random_split", "Sampler", "SequentialSampler",
           "RandomSampler", "SubsetRandomSampler", "BatchSampler", "WeightedRandomSampler",
           "DistributedSampler"]

from engine.utils.data import dataloader, dataset, distributed, sampler  # noqa: E402,F401  (PyTorch's submodule paths)

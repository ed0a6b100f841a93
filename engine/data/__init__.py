"""Data: datasets and loaders, splits, preprocessing, augmentation, and real data without network.

Example:
    >>> from engine.data import DataLoader, TensorDataset, load_digits, train_val_test_split
    >>> x, y = load_digits()
    >>> (x_train, y_train), (x_val, y_val), (x_test, y_test) = train_val_test_split(x, y, stratify=True, seed=0)
    >>> loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True, generator=0)
    >>> xb, yb = next(iter(loader))
    >>> xb.shape, yb.shape
    ((64, 64), (64,))
"""

from engine.data.augment import (Compose, GaussianNoise, RandomCrop, RandomHorizontalFlip, RandomRotation,
                                 RandomScale, RandomShift, RandomVerticalFlip, Transform, affine_sample)
from engine.data.dataset import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset
from engine.data.digits import load_digits
from engine.data.distributed import DistributedSampler
from engine.data.idx import IDXFormatError, load_idx, load_mnist
from engine.data.loader import DataLoader, default_collate, move_to
from engine.data.preprocessing import (CleanReport, MinMaxScaler, StandardScaler, WeightedRandomSampler,
                                       class_weights, clean, one_hot)
from engine.data.samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler,
                                  SubsetRandomSampler)
from engine.data.splits import kfold_splits, random_split, train_val_test_split

__all__ = [
    "Dataset", "IterableDataset", "TensorDataset", "Subset", "ConcatDataset", "DataLoader", "default_collate",
    "move_to", "Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "BatchSampler",
    "DistributedSampler",
    "random_split", "train_val_test_split", "kfold_splits",
    "StandardScaler", "MinMaxScaler", "one_hot", "clean", "CleanReport", "class_weights", "WeightedRandomSampler",
    "Transform", "Compose", "RandomShift", "RandomCrop", "RandomRotation", "RandomScale", "RandomHorizontalFlip",
    "RandomVerticalFlip", "GaussianNoise", "affine_sample",
    "load_idx", "load_mnist", "IDXFormatError", "load_digits",
]

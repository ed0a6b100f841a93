"""Splitting data: random_split for datasets, train/val/test and k-fold splits for arrays.

Every split is seeded: ``seed=`` (an int) or ``generator=`` (a ``np.random.Generator``), else a
seed drawn from the engine's RNG (``engine.manual_seed``). Stratified splits keep each class's
share in every part, with exact part sizes (largest-remainder rounding across classes).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from engine import backend
from engine.data.dataset import Subset, make_generator
from engine.dtypes import is_floating
from engine.errors import EngineError, ShapeError, describe
from engine.tensor import Tensor


def random_split(dataset, lengths, generator=None, seed=None) -> list[Subset]:
    """Split ``dataset`` into non-overlapping random :class:`Subset` s.

    Args:
        dataset: any dataset (``__getitem__`` and ``__len__``).
        lengths: sizes summing to ``len(dataset)``, or fractions summing to 1 (the floor of each
            share is taken, and the leftover items go one each to the first parts, as PyTorch does).
        generator, seed: randomness (see module docstring).

    Example:
        >>> train, val = random_split(dataset, [0.8, 0.2], seed=0)   # doctest: +SKIP
    """
    n = len(dataset)
    sizes = _split_sizes(list(lengths), n)
    order = make_generator(seed, generator, "random_split").permutation(n)
    bounds = np.cumsum([0] + sizes)
    return [Subset(dataset, order[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]


def _split_sizes(lengths: list, n: int) -> list[int]:
    if not lengths:
        raise EngineError("random_split: lengths is empty; give sizes like [800, 200] or fractions like [0.8, 0.2]")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lengths):
        if any(v < 0 for v in lengths) or sum(lengths) != n:
            raise EngineError(f"random_split: lengths {lengths} must be non-negative and sum to the dataset's "
                              f"length {n} (sum is {sum(lengths)})")
        return [int(v) for v in lengths]
    fractions = [float(v) for v in lengths]
    if any(f < 0 or f > 1 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise EngineError(f"random_split: fractions {lengths} must lie in [0, 1] and sum to 1 "
                          f"(sum is {sum(fractions)})")
    sizes = [math.floor(n * f) for f in fractions]
    for i in range(n - sum(sizes)):
        sizes[i % len(sizes)] += 1
    return sizes


def train_val_test_split(x, y=None, val: float = 0.1, test: float = 0.1, stratify=False, seed=None,
                         generator=None):
    """Shuffle and split arrays into train, validation and test parts.

    Args:
        x: features (numpy/cupy array or Tensor), one row per sample.
        y: labels or targets with the same first dimension, or None.
        val, test: fractions in [0, 1) of all samples (rounded up, as scikit-learn does), or ints
            (counts). At least one sample must remain for training.
        stratify: True to keep each class's share of ``y`` in every part, or an array of class
            labels to stratify by; False for a plain random split.
        seed, generator: randomness (see module docstring).

    Returns:
        ``((x_train, y_train), (x_val, y_val), (x_test, y_test))``, or ``(x_train, x_val, x_test)``
        when ``y`` is None; each part has the type (and device) of its input.

    Example:
        >>> train, val, test = train_val_test_split(x, y, 0.15, 0.15, stratify=True, seed=0)  # doctest: +SKIP
        >>> x_train, y_train = train                                                        # doctest: +SKIP
    """
    n = _length(x, "x")
    if y is not None and _length(y, "y") != n:
        raise ShapeError(f"train_val_test_split: x and y must have one row per sample, got {describe(x)} and "
                         f"{describe(y)}")
    n_val, n_test = _part_size(val, n, "val"), _part_size(test, n, "test")
    if n - n_val - n_test < 1:
        raise EngineError(f"train_val_test_split: val={val} and test={test} leave no training samples out of {n}; "
                          "make them smaller")
    rng = make_generator(seed, generator, "train_val_test_split")
    labels = _stratify_labels(stratify, y, n)
    if labels is None:
        order = rng.permutation(n)
        parts = [order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]]
    else:
        parts = _stratified_parts(labels, [n_val, n_test], rng)
    if y is None:
        return tuple(_take(x, idx) for idx in parts)
    return tuple((_take(x, idx), _take(y, idx)) for idx in parts)


def _part_size(value, n: int, name: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise EngineError(f"train_val_test_split: {name}={value} must be a count in [0, {n}) or a fraction")
        return int(value)
    if not 0.0 <= float(value) < 1.0:
        raise EngineError(f"train_val_test_split: {name}={value} must be a fraction in [0, 1) or an int count")
    return math.ceil(float(value) * n)


def _stratify_labels(stratify, y, n: int):
    if stratify is False or stratify is None:
        return None
    if stratify is True:
        if y is None:
            raise EngineError("train_val_test_split: stratify=True needs y (class labels); pass y or stratify=labels")
        labels = y
    else:
        labels = stratify
    labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else _host(labels))
    if labels.ndim != 1 or len(labels) != n:
        raise ShapeError(f"train_val_test_split: stratify labels must be 1-D with {n} entries, "
                         f"got shape {labels.shape}")
    if is_floating(labels.dtype) and not np.all(np.mod(labels, 1) == 0):
        raise EngineError("train_val_test_split: stratify needs class labels, but y holds non-integer floats "
                          "(a regression target?); use stratify=False")
    return labels


def _stratified_parts(labels: np.ndarray, part_sizes: list[int], rng) -> list[np.ndarray]:
    """[train, part_0, part_1, ...] index arrays with each class spread proportionally."""
    classes, inverse = np.unique(labels, return_inverse=True)
    available = np.bincount(inverse, minlength=len(classes))
    per_class_parts = []
    for size in part_sizes:
        share = _allocate(size, available, rng)
        per_class_parts.append(share)
        available = available - share
    members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    parts: list[list] = [[] for _ in range(len(part_sizes) + 1)]
    for c, idx in enumerate(members):
        start = 0
        for p, share in enumerate(per_class_parts, start=1):
            parts[p].append(idx[start:start + share[c]])
            start += share[c]
        parts[0].append(idx[start:])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _allocate(total: int, counts: np.ndarray, rng) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``counts``, each <= its count (largest remainder)."""
    if total == 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    exact = counts * (total / counts.sum())
    share = np.floor(exact).astype(np.int64)
    leftover = total - int(share.sum())
    # Largest fractional parts first; random tie-breaking so no class is always favoured.
    order = np.lexsort((rng.permutation(len(counts)), -(exact - share)))
    share[order[:leftover]] += 1
    return share


def kfold_splits(n: int, k: int = 5, shuffle: bool = False, seed=None, stratify_labels=None,
                 generator=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Indices for k-fold cross-validation: ``k`` pairs ``(train_idx, val_idx)``, each sorted.

    Every sample is in exactly one validation fold; fold sizes differ by at most one. Without
    stratification and shuffle the folds are contiguous, as scikit-learn's ``KFold``. With
    ``stratify_labels`` each class's samples are dealt round-robin over the folds, so every fold
    holds each class within one sample of its share.

    Args:
        n: number of samples.
        k: number of folds, 2 <= k <= n.
        shuffle: shuffle before dealing (seeded by ``seed``/``generator``).
        stratify_labels: optional length-``n`` class labels.

    Example:
        >>> for train_idx, val_idx in kfold_splits(len(x), k=5, shuffle=True, seed=0): ...   # doctest: +SKIP
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EngineError(f"kfold_splits: n must be a positive int (number of samples), got {n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise EngineError(f"kfold_splits: k must be an int with 2 <= k <= n={n}, got {k!r}")
    rng = make_generator(seed, generator, "kfold_splits") if shuffle else None
    if stratify_labels is None:
        order = rng.permutation(n) if shuffle else np.arange(n)
        sizes = np.full(k, n // k)
        sizes[: n % k] += 1
        fold_of = np.empty(n, np.int64)
        fold_of[order] = np.repeat(np.arange(k), sizes)
    else:
        fold_of = _stratified_folds(stratify_labels, n, k, rng)
    everything = np.arange(n)
    return [(everything[fold_of != f], everything[fold_of == f]) for f in range(k)]


def _stratified_folds(labels, n: int, k: int, rng) -> np.ndarray:
    labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else _host(labels))
    if labels.ndim != 1 or len(labels) != n:
        raise ShapeError(f"kfold_splits: stratify_labels must be 1-D with n={n} entries, got shape {labels.shape}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < k:
        warnings.warn(f"kfold_splits: the smallest class ({classes[counts.argmin()]!r}) has {counts.min()} samples, "
                      f"fewer than k={k}: some folds will not contain it", stacklevel=3)
    # Deal class by class, continuing the round-robin across classes: fold sizes stay balanced too.
    dealt = np.concatenate([_members(inverse, c, rng) for c in range(len(classes))])
    fold_of = np.empty(n, np.int64)
    fold_of[dealt] = np.arange(n) % k
    return fold_of


def _members(inverse: np.ndarray, c: int, rng) -> np.ndarray:
    idx = np.flatnonzero(inverse == c)
    return rng.permutation(idx) if rng is not None else idx


# ---- helpers --------------------------------------------------------------------------------------

def _length(a, name: str) -> int:
    shape = getattr(a, "shape", None)
    if shape is None:
        raise EngineError(f"train_val_test_split: {name} must be an array or Tensor, got {type(a).__name__}; "
                          "wrap it with np.asarray")
    if len(shape) == 0:
        raise ShapeError(f"train_val_test_split: {name} must have a sample dimension, got {describe(a)}")
    return int(shape[0])


def _host(a):
    return backend.to_device(a, backend.CPU) if backend.is_array(a) else a


def _take(a, idx: np.ndarray):
    """Rows ``idx`` of ``a``, keeping its type and device."""
    data = a._data if isinstance(a, Tensor) else a
    if backend.is_array(data) and backend.device_of(data).type != "cpu":
        idx = backend.to_device(idx, backend.device_of(data))
    rows = data[idx]
    return Tensor(rows) if isinstance(a, Tensor) else rows

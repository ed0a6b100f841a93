"""Preprocessing fitted on the training split and applied to the others.

Scalers (:class:`StandardScaler`, :class:`MinMaxScaler`) follow scikit-learn's formulas and
method names; they accept numpy/cupy arrays or Tensors (any device) and return the kind they
were given. Statistics are computed in float64 and applied in the input's float dtype, so a
float32 batch stays float32. Also: :func:`one_hot`, :func:`clean` (drop or impute NaN/inf rows),
:func:`class_weights` and :class:`WeightedRandomSampler` for class imbalance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine import backend
from engine.data.dataset import make_generator, rewrap, unwrap
from engine.dtypes import is_floating
from engine.errors import DTypeError, EngineError, ShapeError, describe
from engine.tensor import Tensor


class _Scaler:
    """Shared plumbing of the scalers: input checks, fitted state, state_dict."""

    _name = "Scaler"
    _state_keys: tuple = ()

    def _fit_data(self, x):
        data = unwrap(x, f"{self._name}.fit")
        if data.ndim == 0 or data.shape[0] == 0:
            raise ShapeError(f"{self._name}.fit: needs at least one sample (rows along the first axis), "
                             f"got {describe(x)}")
        data = data.astype(np.float64)
        if not bool(backend.to_host(backend.array_module(data).isfinite(data).all())):
            raise EngineError(f"{self._name}.fit: the data holds NaN or inf; remove or impute them first "
                              "(engine.data.clean)")
        return data

    def fit_transform(self, x):
        """``fit(x)`` then ``transform(x)``."""
        return self.fit(x).transform(x)

    def _check_fitted(self, op: str) -> None:
        if not self.fitted:
            raise EngineError(f"{self._name}.{op}: call fit(train_data) first")

    def _operand(self, x, op: str):
        """``x``'s raw array in a float dtype (integers become float32), checked against the fit."""
        self._check_fitted(op)
        data = unwrap(x, f"{self._name}.{op}")
        if tuple(data.shape[1:]) != self.feature_shape:
            raise ShapeError(f"{self._name}.{op}: fitted on samples of shape {self.feature_shape}, got {describe(x)} "
                             f"(samples of shape {tuple(data.shape[1:])})")
        dtype = data.dtype if is_floating(data.dtype) else np.float32
        return data.astype(dtype, copy=False)

    @staticmethod
    def _stat(data, stat: np.ndarray):
        """A fitted statistic on ``data``'s device in its dtype (no float64 promotion of float32 data)."""
        return backend.to_device(stat.astype(data.dtype), backend.device_of(data))

    @property
    def fitted(self) -> bool:
        return getattr(self, self._state_keys[0]) is not None

    @property
    def feature_shape(self) -> tuple:
        return tuple(np.shape(getattr(self, self._state_keys[0])))

    def state_dict(self) -> dict:
        """Fitted statistics as float64 numpy arrays (storable with engine.save)."""
        self._check_fitted("state_dict")
        return {key: np.array(getattr(self, key)) for key in self._state_keys}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in self._state_keys if key not in state]
        if missing:
            raise EngineError(f"{self._name}.load_state_dict: missing {missing}; "
                              f"expected keys {list(self._state_keys)}")
        for key in self._state_keys:
            setattr(self, key, np.asarray(state[key], dtype=np.float64))


class StandardScaler(_Scaler):
    """Standardise features: ``(x - mean) / std`` with mean and population std of the training data.

    Features with zero variance keep scale 1 (they become 0), as in scikit-learn.

    Args:
        with_mean: subtract the mean.
        with_std: divide by the standard deviation.

    Example:
        >>> scaler = StandardScaler().fit(x_train)                          # doctest: +SKIP
        >>> x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)   # doctest: +SKIP
    """

    _name = "StandardScaler"
    _state_keys = ("mean_", "scale_")

    def __init__(self, with_mean: bool = True, with_std: bool = True):
        self.with_mean, self.with_std = with_mean, with_std
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, x) -> "StandardScaler":
        """Compute per-feature mean and std over the first axis. Returns self."""
        data = self._fit_data(x)
        features = data.shape[1:]
        self.mean_ = _host64(data.mean(axis=0)) if self.with_mean else np.zeros(features)
        self.scale_ = _nonzero(_host64(data.std(axis=0))) if self.with_std else np.ones(features)
        return self

    def transform(self, x):
        """``(x - mean_) / scale_``; returns the input's kind (array/Tensor) in a float dtype."""
        data = self._operand(x, "transform")
        return rewrap((data - self._stat(data, self.mean_)) / self._stat(data, self.scale_), x)

    def inverse_transform(self, x):
        """``x * scale_ + mean_``: back to the original units."""
        data = self._operand(x, "inverse_transform")
        return rewrap(data * self._stat(data, self.scale_) + self._stat(data, self.mean_), x)


class MinMaxScaler(_Scaler):
    """Scale each feature to ``feature_range`` using the training data's min and max.

    ``x * scale_ + min_`` with ``scale_ = (hi - lo) / (data_max - data_min)`` and
    ``min_ = lo - data_min * scale_`` (scikit-learn's formulas); constant features get scale 1.

    Args:
        feature_range: (lo, hi) with lo < hi.
        clip: clip transformed values to ``feature_range`` (for data outside the training range).
    """

    _name = "MinMaxScaler"
    _state_keys = ("data_min_", "data_max_", "scale_", "min_")

    def __init__(self, feature_range=(0.0, 1.0), clip: bool = False):
        lo, hi = feature_range
        if not lo < hi:
            raise EngineError(f"MinMaxScaler: feature_range must be (lo, hi) with lo < hi, got {feature_range}")
        self.feature_range, self.clip = (float(lo), float(hi)), clip
        self.data_min_ = self.data_max_ = self.scale_ = self.min_ = None

    def fit(self, x) -> "MinMaxScaler":
        """Record per-feature min and max over the first axis. Returns self."""
        data = self._fit_data(x)
        self.data_min_, self.data_max_ = _host64(data.min(axis=0)), _host64(data.max(axis=0))
        lo, hi = self.feature_range
        self.scale_ = (hi - lo) / _nonzero(self.data_max_ - self.data_min_)
        self.min_ = lo - self.data_min_ * self.scale_
        return self

    def transform(self, x):
        """``x * scale_ + min_`` (clipped to ``feature_range`` with ``clip=True``)."""
        data = self._operand(x, "transform")
        out = data * self._stat(data, self.scale_) + self._stat(data, self.min_)
        if self.clip:
            out = backend.array_module(out).clip(out, *self.feature_range).astype(data.dtype, copy=False)
        return rewrap(out, x)

    def inverse_transform(self, x):
        """``(x - min_) / scale_``: back to the original units."""
        data = self._operand(x, "inverse_transform")
        return rewrap((data - self._stat(data, self.min_)) / self._stat(data, self.scale_), x)


def _host64(a) -> np.ndarray:
    return np.asarray(backend.to_device(a, backend.CPU), dtype=np.float64)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """Scale 1 where the spread is (numerically) zero, so constant features do not divide by zero."""
    scale = np.array(scale, dtype=np.float64)
    scale[np.abs(scale) < 10 * np.finfo(np.float64).eps] = 1.0
    return scale


# ---- labels ---------------------------------------------------------------------------------------

def one_hot(labels, num_classes: int | None = None, dtype=np.float32):
    """One-hot encode integer labels: shape ``labels.shape + (num_classes,)``.

    Args:
        labels: integer array/Tensor of any shape with values in ``[0, num_classes)``.
        num_classes: number of classes; default ``labels.max() + 1``.
        dtype: output dtype (float32 by default, ready for losses; PyTorch's returns int64).

    Example:
        >>> one_hot(np.array([0, 2]), 3)
        array([[1., 0., 0.],
               [0., 0., 1.]], dtype=float32)
    """
    data = _integer_labels(labels, "one_hot")
    num_classes = _num_classes(data, num_classes, "one_hot")
    xp = backend.array_module(data)
    with backend.on_device(backend.device_of(data)):
        out = (data[..., None] == xp.arange(num_classes)).astype(dtype)
    return rewrap(out, labels)


def class_weights(labels, num_classes: int | None = None):
    """Per-class weights inversely proportional to class frequency (scikit-learn's "balanced").

    ``weight[c] = n_samples / (num_classes * count[c])``; a class with no samples gets weight 0
    (it contributes no loss anyway). Feed the result to ``F.cross_entropy(..., weight=w)``.

    Returns:
        float32 (num_classes,): a Tensor on the labels' device for Tensor labels, else numpy.
    """
    data = _integer_labels(labels, "class_weights")
    if data.ndim != 1 or data.shape[0] == 0:
        raise ShapeError(f"class_weights: labels must be a non-empty 1-D array, got {describe(labels)}")
    num_classes = _num_classes(data, num_classes, "class_weights")
    counts = np.bincount(backend.to_device(data, backend.CPU), minlength=num_classes).astype(np.float64)
    weights = np.divide(len(data), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    if isinstance(labels, Tensor):
        return Tensor(backend.to_device(weights.astype(np.float32), labels.device))
    return weights.astype(np.float32)


def _integer_labels(labels, where: str):
    data = unwrap(labels, where)
    if data.dtype.kind not in "iub":
        raise DTypeError(f"{where}: labels must be integers, got {describe(labels)}; convert with .astype(np.int64)")
    lowest = int(backend.to_host(data.min())) if data.size else 0
    if lowest < 0:
        raise EngineError(f"{where}: labels must be non-negative class indices, got min {lowest}")
    return data.astype(np.int64, copy=False)


def _num_classes(data, num_classes, where: str) -> int:
    top = int(backend.to_host(data.max())) + 1 if data.size else 0
    if num_classes is None:
        return top
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise EngineError(f"{where}: num_classes must be a positive int, got {num_classes!r}")
    if top > num_classes:
        raise EngineError(f"{where}: label {top - 1} is out of range for num_classes={num_classes}")
    return int(num_classes)


# ---- cleaning -------------------------------------------------------------------------------------

@dataclass
class CleanReport:
    """What :func:`clean` did.

    Attributes:
        strategy: "drop", "mean" or "median".
        rows_in, rows_out: samples before and after.
        rows_dropped: rows removed (bad features under "drop", or a NaN/inf target under any strategy).
        rows_imputed: rows in which at least one value was replaced.
        values_imputed: feature values replaced.
        fill_values: per-feature replacement values (None for "drop"); pass them as
            ``clean(x_val, strategy=..., fill_values=report.fill_values)`` to impute other splits
            with the training statistics.
    """

    strategy: str
    rows_in: int
    rows_out: int
    rows_dropped: int
    rows_imputed: int = 0
    values_imputed: int = 0
    fill_values: np.ndarray | None = field(default=None, repr=False)


_STRATEGIES = ("drop", "mean", "median")


def clean(x, y=None, strategy: str = "drop", fill_values=None):
    """Drop or impute samples whose features are NaN or infinite.

    Rows whose target ``y`` is NaN/inf are always dropped (a target cannot be imputed).

    Args:
        x: features, one row per sample (numpy/cupy array or Tensor; cleaned on the host).
        y: optional targets with the same first dimension.
        strategy: "drop" removes bad rows; "mean"/"median" replace each bad value with its
            feature's mean/median over the finite values.
        fill_values: per-feature values to impute with instead of computing them (use the
            training split's ``report.fill_values`` for validation and test data).

    Returns:
        ``(x_clean, y_clean, report)``: arrays of the input kinds (y_clean is None without y)
        and a :class:`CleanReport`.

    Example:
        >>> x_train, y_train, report = clean(x_train, y_train, strategy="median")        # doctest: +SKIP
        >>> x_val, y_val, _ = clean(x_val, y_val, "median", fill_values=report.fill_values)  # doctest: +SKIP
    """
    if strategy not in _STRATEGIES:
        raise EngineError(f"clean: strategy must be one of {_STRATEGIES}, got {strategy!r}")
    data, targets = _clean_operands(x, y)
    rows_in = data.shape[0]
    keep = _finite_rows(targets) if targets is not None else np.ones(rows_in, bool)
    data, targets = data[keep], None if targets is None else targets[keep]
    bad = ~np.isfinite(data) if data.dtype.kind == "c" or is_floating(data.dtype) else np.zeros(data.shape, bool)
    bad_rows = bad.reshape(len(data), -1).any(axis=1)
    if strategy == "drop":
        data, targets = data[~bad_rows], None if targets is None else targets[~bad_rows]
        report = CleanReport(strategy, rows_in, len(data), rows_in - len(data))
    else:
        fill = _fill_values(data, bad, strategy, fill_values)
        data = np.where(bad, fill.astype(data.dtype), data)
        report = CleanReport(strategy, rows_in, len(data), rows_in - len(data),
                             int(backend.to_host(bad_rows.sum())), int(backend.to_host(bad.sum())), fill)
    return _back(data, x), None if y is None else _back(targets, y), report


def _clean_operands(x, y):
    data = np.asarray(backend.to_device(unwrap(x, "clean"), backend.CPU))
    if data.ndim == 0:
        raise ShapeError(f"clean: x needs a sample dimension, got {describe(x)}")
    if y is None:
        return data, None
    targets = np.asarray(backend.to_device(unwrap(y, "clean"), backend.CPU))
    if targets.ndim == 0 or targets.shape[0] != data.shape[0]:
        raise ShapeError(f"clean: x and y must have one row per sample, got {describe(x)} and {describe(y)}")
    return data, targets


def _finite_rows(a: np.ndarray) -> np.ndarray:
    if not (a.dtype.kind == "c" or is_floating(a.dtype)):
        return np.ones(a.shape[0], bool)
    return np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)


def _fill_values(data: np.ndarray, bad: np.ndarray, strategy: str, fill_values) -> np.ndarray:
    if fill_values is not None:
        fill = np.asarray(fill_values, dtype=np.float64)
        if fill.shape != data.shape[1:]:
            raise ShapeError(f"clean: fill_values has shape {fill.shape}, the samples have shape {data.shape[1:]}")
        return fill
    masked = np.where(bad, np.nan, data.astype(np.float64))
    empty = np.isnan(masked).all(axis=0) if len(masked) else np.ones(data.shape[1:], bool)
    if np.any(empty):
        columns = np.argwhere(np.atleast_1d(empty)).ravel().tolist()
        raise EngineError(f"clean: feature(s) {columns} have no finite values to compute a {strategy} from; "
                          "drop those features or use strategy='drop'")
    return np.nanmean(masked, axis=0) if strategy == "mean" else np.nanmedian(masked, axis=0)


def _back(data: np.ndarray, like):
    """``data`` (host) moved back to ``like``'s device and kind."""
    raw = unwrap(like, "clean")
    return rewrap(backend.to_device(data, backend.device_of(raw)), like)


# ---- sampling -------------------------------------------------------------------------------------

class WeightedRandomSampler:
    """Sample indices ``i`` with probability proportional to ``weights[i]``; a DataLoader ``sampler``.

    Args:
        weights: non-negative per-sample weights (not necessarily summing to 1), at least one > 0.
        num_samples: indices per epoch.
        replacement: draw with replacement; without it ``num_samples`` must not exceed the
            number of non-zero weights.
        generator, seed: randomness (default: seeded from the engine's RNG); ``generator`` comes
            fourth, as in PyTorch.

    Example:
        >>> w = class_weights(y)[y]                                   # doctest: +SKIP
        >>> loader = DataLoader(ds, 64, sampler=WeightedRandomSampler(w, len(y), seed=0))   # doctest: +SKIP
    """

    def __init__(self, weights, num_samples: int, replacement: bool = True, generator=None, seed=None):
        w = np.asarray(backend.to_device(unwrap(weights, "WeightedRandomSampler"), backend.CPU), dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise EngineError(f"WeightedRandomSampler: weights must be a non-empty 1-D array of finite, non-negative "
                              f"numbers with a positive sum, got shape {w.shape}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise EngineError(f"WeightedRandomSampler: num_samples must be a positive int, got {num_samples!r}")
        if not replacement and num_samples > int(np.count_nonzero(w)):
            raise EngineError(f"WeightedRandomSampler: num_samples={num_samples} without replacement exceeds the "
                              f"{int(np.count_nonzero(w))} samples with non-zero weight; use replacement=True")
        self.probabilities = w / w.sum()
        self.num_samples, self.replacement = int(num_samples), replacement
        self.generator = make_generator(seed, generator, "WeightedRandomSampler")

    def __iter__(self):
        drawn = self.generator.choice(len(self.probabilities), size=self.num_samples, replace=self.replacement,
                                      p=self.probabilities)
        return iter(drawn.tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict:
        return {"generator": self.generator.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.bit_generator.state = state["generator"]

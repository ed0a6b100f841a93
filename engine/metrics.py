"""Classification and regression metrics, as functions and as streaming accumulators.

Argument order is ``(pred, target)`` everywhere, as in PyTorch (torchmetrics) and in
``Metric.update(pred, target)``; note that scikit-learn's order is ``(y_true, y_pred)``.
Inputs are numpy/cupy arrays or Tensors on any device.

Predictions for the classification metrics may be:

- labels: integers (or integral floats) with the target's shape;
- scores: one more dimension than the target, classes on axis 1 (``(N, C)`` logits or
  probabilities); the predicted label is the argmax (the first one on ties);
- binary scores: non-integral floats with the target's shape (or ``(N, 1)``), thresholded at
  ``threshold`` (0.5 for probabilities; use 0.0 for logits).

Labels are non-negative integers ``0 .. C-1``. Functions return Python floats (or numpy arrays
for per-class results and curves). Streaming metrics reduce each batch on its device and
accumulate the small results on the host in float64 / int64.

Example:
    >>> pred, target = np.array([0, 2, 1, 1]), np.array([0, 1, 1, 1])
    >>> accuracy(pred, target), f1_score(pred, target, average="macro")
    (0.75, 0.6)
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from engine import backend
from engine.dtypes import is_floating
from engine.errors import DTypeError, EngineError, ShapeError, describe
from engine.tensor import unwrap

__all__ = [
    "accuracy", "top_k_accuracy", "precision", "recall", "f1_score", "precision_recall_f1", "confusion_matrix",
    "roc_curve", "roc_auc_score", "mean_squared_error", "mean_absolute_error", "r2_score",
    "Metric", "Accuracy", "TopKAccuracy", "ConfusionMatrix", "Precision", "Recall", "F1Score", "Mean",
    "MeanSquaredError", "MeanAbsoluteError", "R2Score", "UndefinedMetricWarning",
]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (no negatives for a ROC curve, one sample for R2 ...)."""


# ---- inputs -------------------------------------------------------------------------------------

def _pair(pred, target, where: str):
    """Raw arrays of ``pred`` and ``target`` on one device (both moved to the host if they differ)."""
    p, t = unwrap(pred, where), unwrap(target, where)
    if backend.device_of(p) != backend.device_of(t):
        p, t = backend.to_device(p, backend.CPU), backend.to_device(t, backend.CPU)
    return p, t


def _labels(a, name: str, where: str):
    """Integer class labels as int64; integral floats and bools are accepted."""
    xp = backend.array_module(a)
    if is_floating(a.dtype):
        if a.size and not bool(backend.to_host(xp.all(a == xp.floor(a)))):
            raise DTypeError(f"{where}: {name} must hold class labels (integers), got non-integer floats in "
                             f"{describe(a)}")
    elif a.dtype.kind not in "iub":
        raise DTypeError(f"{where}: {name} must hold integer class labels, got {describe(a)}")
    a = a.astype(np.int64)
    lowest = int(backend.to_host(a.min())) if a.size else 0
    if lowest < 0:
        raise EngineError(f"{where}: {name} must be labels 0..C-1, got the negative label {lowest}; map labels "
                          "with np.unique(y, return_inverse=True)")
    return a


def _predicted_labels(pred, target, threshold: float, where: str):
    """``(pred_labels, target_labels)`` from labels, class scores or binary scores (see module docstring)."""
    t = _labels(target, "target", where)
    xp = backend.array_module(pred)
    if pred.ndim == t.ndim + 1 and pred.shape[1:2] == (1,) and pred.shape[:1] + pred.shape[2:] == t.shape:
        pred = pred.reshape(t.shape)  # (N, 1) binary scores
    elif pred.ndim == t.ndim + 1:
        if pred.shape[:1] + pred.shape[2:] != t.shape:
            raise ShapeError(f"{where}: scores {describe(pred)} do not fit targets {describe(target)}; expected "
                             f"{(t.shape[0] if t.ndim else '?', 'C') + t.shape[1:]}")
        return pred.argmax(axis=1), t
    if pred.shape != t.shape:
        raise ShapeError(f"{where}: pred {describe(pred)} and target {describe(target)} must have the same shape "
                         "(labels) or pred one more class dimension on axis 1 (scores)")
    if is_floating(pred.dtype) and pred.size and not bool(backend.to_host(xp.all(pred == xp.floor(pred)))):
        top = int(backend.to_host(t.max())) if t.size else 0
        if top > 1:
            raise EngineError(f"{where}: pred holds non-integer floats (binary scores) but the targets are "
                              f"multi-class (labels up to {top}); pass scores (N, C) or labels")
        return (pred >= threshold).astype(np.int64), t
    return _labels(pred, "pred", where), t


def _host_float64(a) -> np.ndarray:
    return np.asarray(backend.to_device(a, backend.CPU), dtype=np.float64)


# ---- accuracy -----------------------------------------------------------------------------------

def _correct_and_total(pred, target, threshold: float, where: str) -> tuple[int, int]:
    p, t = _pair(pred, target, where)
    labels, truth = _predicted_labels(p, t, threshold, where)
    return int(backend.to_host(backend.array_module(labels).count_nonzero(labels == truth))), int(truth.size)


def accuracy(pred, target, threshold: float = 0.5) -> float:
    """Fraction of correct predictions.

    Args:
        pred: labels, class scores (N, C) or binary scores (see module docstring).
        target: integer labels.
        threshold: cut-off for binary scores.

    Example:
        >>> accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
        0.5
    """
    correct, total = _correct_and_total(pred, target, threshold, "accuracy")
    return _ratio(correct, total, "accuracy")


def _top_k_correct(scores, target, k: int, where: str) -> tuple[int, int]:
    s, t = _pair(scores, target, where)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise EngineError(f"{where}: k must be a positive int, got {k!r}")
    t = _labels(t, "target", where)
    if s.ndim != 2 or t.ndim != 1 or s.shape[0] != t.shape[0]:
        raise ShapeError(f"{where}: expected scores (N, C) and targets (N,), got {describe(scores)} and "
                         f"{describe(target)}")
    top = int(backend.to_host(t.max())) if t.size else -1
    if top >= s.shape[1]:
        raise EngineError(f"{where}: target label {top} is out of range for {s.shape[1]} score columns")
    xp = backend.array_module(s)
    true_score = s[xp.arange(len(t)), t][:, None]
    # Rank of the true class: classes scoring higher, plus equal-scoring classes with a lower index
    # (the tie order of argmax, so top-1 accuracy equals accuracy).
    ahead = (s > true_score) | ((s == true_score) & (xp.arange(s.shape[1])[None, :] < t[:, None]))
    return int(backend.to_host(xp.count_nonzero(ahead.sum(axis=1) < k))), int(t.size)


def top_k_accuracy(pred, target, k: int = 5) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Args:
        pred: scores (N, C).
        target: labels (N,).
        k: how many top classes count as a hit; ties are ordered by class index.
    """
    correct, total = _top_k_correct(pred, target, k, "top_k_accuracy")
    return _ratio(correct, total, "top_k_accuracy")


def _ratio(numerator, denominator, where: str) -> float:
    if denominator == 0:
        warnings.warn(f"{where}: no samples; the result is nan", UndefinedMetricWarning, stacklevel=3)
        return math.nan
    return float(numerator / denominator)


# ---- confusion matrix and the per-class scores derived from it ------------------------------------

def _confusion_counts(pred, target, num_classes, threshold: float, where: str) -> np.ndarray:
    p, t = _pair(pred, target, where)
    labels, truth = _predicted_labels(p, t, threshold, where)
    labels, truth = labels.reshape(-1), truth.reshape(-1)
    top = max(int(backend.to_host(labels.max())), int(backend.to_host(truth.max()))) + 1 if truth.size else 0
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise EngineError(f"{where}: label {top - 1} is out of range for num_classes={num_classes}")
    xp = backend.array_module(labels)
    counts = xp.bincount(truth * num_classes + labels, minlength=num_classes * num_classes)
    return np.asarray(backend.to_device(counts, backend.CPU), dtype=np.int64).reshape(num_classes, num_classes)


def confusion_matrix(pred, target, num_classes: int | None = None, normalize: str | None = None,
                     threshold: float = 0.5) -> np.ndarray:
    """Counts ``C[i, j]`` of samples with true class ``i`` predicted as ``j`` (scikit-learn's layout).

    Args:
        pred: labels or scores (see module docstring).
        target: labels.
        num_classes: size C; default ``max label + 1``.
        normalize: None for counts; "true" (rows sum to 1), "pred" (columns) or "all".

    Example:
        >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]))
        array([[1, 1],
               [0, 1]])
    """
    return _normalized(_confusion_counts(pred, target, num_classes, threshold, "confusion_matrix"), normalize)


def _normalized(counts: np.ndarray, normalize) -> np.ndarray:
    if normalize is None:
        return counts
    axes = {"true": 1, "pred": 0, "all": None}
    if normalize not in axes:
        raise EngineError(f"confusion_matrix: normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    totals = counts.sum(axis=axes[normalize], keepdims=axes[normalize] is not None)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals != 0)


_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _zero_division_value(zero_division, where: str) -> float:
    if zero_division == "warn":
        return 0.0
    value = float(zero_division)
    if not (value in (0.0, 1.0) or math.isnan(value)):
        raise EngineError(f"{where}: zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")
    return value


def _divide(numerator, denominator, zero_division, where: str, what: str):
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    undefined = denominator == 0
    if np.any(undefined) and zero_division == "warn":
        warnings.warn(f"{where}: {what} is ill-defined (0/0) for some classes and set to 0; pass zero_division "
                      "to choose the value and silence this warning", UndefinedMetricWarning, stacklevel=4)
    result = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=~undefined)
    result[undefined] = _zero_division_value(zero_division, where)
    return result


def _class_scores(counts: np.ndarray, present: np.ndarray, average, pos_label: int, zero_division, where: str):
    """Precision, recall and F1 from a confusion matrix, averaged as asked."""
    if average not in _AVERAGES:
        raise EngineError(f"{where}: average must be one of {_AVERAGES}, got {average!r}")
    _zero_division_value(zero_division, where)
    tp, predicted, actual = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    if average == "binary":
        classes = _binary_class(present, pos_label, where)
    else:
        classes = np.flatnonzero(present)
    tp, predicted, actual = (_pick(v, classes) for v in (tp, predicted, actual))
    if average == "micro":
        tp, predicted, actual = tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
    scores = (_divide(tp, predicted, zero_division, where, "precision"),
              _divide(tp, actual, zero_division, where, "recall"),
              _divide(2 * tp, predicted + actual, zero_division, where, "F1"))
    if average is None:
        return scores
    weights = actual if average == "weighted" else None
    return tuple(_nan_average(s, weights) for s in scores)


def _pick(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``values[classes]``, with 0 for classes beyond the matrix (a positive label nobody used)."""
    top = int(backend.to_host(classes.max())) + 1 if classes.size else 0
    padded = np.zeros(max(len(values), top), dtype=values.dtype)
    padded[:len(values)] = values
    return padded[classes]


def _binary_class(present: np.ndarray, pos_label: int, where: str) -> np.ndarray:
    labels = np.flatnonzero(present)
    if len(labels) > 2:
        raise EngineError(f"{where}: average='binary' needs at most two classes, found labels {labels.tolist()}; "
                          "choose average='macro', 'micro', 'weighted' or None")
    if len(labels) == 2 and pos_label not in labels:
        raise EngineError(f"{where}: pos_label={pos_label} is not one of the labels {labels.tolist()}")
    return np.array([pos_label])


def _nan_average(values: np.ndarray, weights) -> float:
    """Average ignoring nan (zero_division=nan excludes undefined classes), as scikit-learn does."""
    keep = ~np.isnan(values)
    if not backend.to_host(keep.any()):
        return math.nan
    if weights is None or weights[keep].sum() == 0:
        return float(backend.to_host(values[keep].mean()))
    return float(np.average(values[keep], weights=weights[keep]))


def _present(counts: np.ndarray, num_classes) -> np.ndarray:
    """Classes that take part in averaging: all of 0..num_classes-1 if given, else those seen."""
    if num_classes is not None:
        return np.ones(len(counts), bool)
    return (counts.sum(axis=0) + counts.sum(axis=1)) > 0


def precision_recall_f1(pred, target, average="binary", pos_label: int = 1, num_classes: int | None = None,
                        zero_division=0.0, threshold: float = 0.5):
    """``(precision, recall, f1)`` in one pass; arguments as :func:`precision`."""
    where = "precision_recall_f1"
    counts = _confusion_counts(pred, target, num_classes, threshold, where)
    return _class_scores(counts, _present(counts, num_classes), average, pos_label, zero_division, where)


def _one_score(index: int, where: str, pred, target, average, pos_label, num_classes, zero_division, threshold):
    counts = _confusion_counts(pred, target, num_classes, threshold, where)
    return _class_scores(counts, _present(counts, num_classes), average, pos_label, zero_division, where)[index]


def precision(pred, target, average="binary", pos_label: int = 1, num_classes: int | None = None, zero_division=0.0,
              threshold: float = 0.5):
    """Precision ``TP / (TP + FP)``.

    Args:
        pred: labels or scores (see module docstring).
        target: labels.
        average: "binary" (the ``pos_label`` class; at most two labels), "micro" (global counts),
            "macro" (unweighted mean over classes), "weighted" (mean weighted by support), or None
            (per-class numpy array).
        pos_label: the positive class for average="binary".
        num_classes: average over classes 0..num_classes-1; default: the labels that occur in
            ``pred`` or ``target`` (scikit-learn's default).
        zero_division: value for 0/0 (a class never predicted): 0, 1, nan (left out of averages)
            or "warn" (0 with a warning).
        threshold: cut-off for binary scores.

    Example:
        >>> precision(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
        0.6666666666666666
    """
    return _one_score(0, "precision", pred, target, average, pos_label, num_classes, zero_division, threshold)


def recall(pred, target, average="binary", pos_label: int = 1, num_classes: int | None = None, zero_division=0.0,
           threshold: float = 0.5):
    """Recall ``TP / (TP + FN)``; arguments as :func:`precision`."""
    return _one_score(1, "recall", pred, target, average, pos_label, num_classes, zero_division, threshold)


def f1_score(pred, target, average="binary", pos_label: int = 1, num_classes: int | None = None, zero_division=0.0,
             threshold: float = 0.5):
    """F1 ``2 TP / (2 TP + FP + FN)``, the harmonic mean of precision and recall; arguments as :func:`precision`."""
    return _one_score(2, "f1_score", pred, target, average, pos_label, num_classes, zero_division, threshold)


# ---- ROC ------------------------------------------------------------------------------------------

def _binary_scores(pred, target, pos_label, where: str) -> tuple[np.ndarray, np.ndarray]:
    scores = _host_float64(unwrap(pred, where))
    truth = np.asarray(backend.to_device(unwrap(target, where), backend.CPU))
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1 or truth.shape != scores.shape:
        raise ShapeError(f"{where}: expected scores (N,) and binary targets (N,), got {describe(pred)} and "
                         f"{describe(target)}")
    if not np.all(np.isfinite(scores)):
        raise EngineError(f"{where}: scores hold NaN or inf")
    if len(np.unique(truth)) > 2:
        raise EngineError(f"{where}: binary scores (N,) need binary targets, found labels {np.unique(truth).tolist()}; "
                          "for multi-class pass scores (N, C)")
    return scores, truth == pos_label


def _cumulative_counts(scores: np.ndarray, positive: np.ndarray):
    """True and false positives at each distinct score, taken as a threshold (descending)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(positive, dtype=np.float64)[last_of_each]
    return tps, 1.0 + last_of_each - tps, scores[last_of_each]


def roc_curve(pred, target, pos_label: int = 1, drop_intermediate: bool = True):
    """Receiver operating characteristic of binary scores (as scikit-learn's ``roc_curve``).

    Args:
        pred: scores (N,), higher meaning more likely positive (probabilities or logits).
        target: binary labels (N,); ``pos_label`` marks the positives.
        drop_intermediate: drop points on straight segments (the area is unchanged).

    Returns:
        ``(fpr, tpr, thresholds)``: float64 arrays; ``thresholds`` decrease from ``inf``, and
        point ``i`` predicts positive for scores ``>= thresholds[i]``. Tied scores form one point.
        Without negatives (or positives) fpr (tpr) is nan and an UndefinedMetricWarning is raised.
    """
    scores, positive = _binary_scores(pred, target, pos_label, "roc_curve")
    tps, fps, thresholds = _cumulative_counts(scores, positive)
    if drop_intermediate and len(fps) > 2:
        corners = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[corners], fps[corners], thresholds[corners]
    tps, fps, thresholds = np.r_[0.0, tps], np.r_[0.0, fps], np.r_[np.inf, thresholds]
    return _rate(fps, "negative"), _rate(tps, "positive"), thresholds


def _rate(counts: np.ndarray, kind: str) -> np.ndarray:
    if counts[-1] <= 0:
        warnings.warn(f"roc_curve: no {kind} samples in target; the {'false' if kind == 'negative' else 'true'} "
                      "positive rate is undefined (nan)", UndefinedMetricWarning, stacklevel=3)
        return np.full(counts.shape, np.nan)
    return counts / counts[-1]


def _binary_auc(scores: np.ndarray, positive: np.ndarray, where: str) -> float:
    n_pos = int(backend.to_host(positive.sum()))
    if n_pos == 0 or n_pos == len(positive):
        raise EngineError(f"{where}: ROC AUC is undefined when the target holds only one class "
                          f"({'no' if n_pos == 0 else 'only'} positives among {len(positive)} samples); "
                          "evaluate on data with both classes")
    tps, fps, _ = _cumulative_counts(scores, positive)
    tpr, fpr = np.r_[0.0, tps] / n_pos, np.r_[0.0, fps] / (len(positive) - n_pos)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count one half


def roc_auc_score(pred, target, average: str = "macro", pos_label: int = 1) -> float:
    """Area under the ROC curve: binary, or multi-class one-vs-rest.

    Args:
        pred: binary scores (N,) (or (N, 2), column 1 used), or class scores (N, C) for
            multi-class one-vs-rest.
        target: labels (N,); for multi-class 0..C-1, with every class present.
        average: multi-class only: "macro" (mean of per-class AUCs) or "weighted" (by class
            prevalence); None returns the per-class array.
        pos_label: the positive label for binary scores.

    Raises:
        EngineError: a class with no positive (or no negative) samples, where AUC is undefined.

    Example:
        >>> roc_auc_score(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    where = "roc_auc_score"
    scores = unwrap(pred, where)
    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1]
    if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
        return _binary_auc(*_binary_scores(scores, target, pos_label, where), where)
    return _one_vs_rest_auc(_host_float64(scores), target, average, where)


def _one_vs_rest_auc(scores: np.ndarray, target, average, where: str):
    truth = _labels(np.asarray(backend.to_device(unwrap(target, where), backend.CPU)), "target", where)
    if scores.ndim != 2 or truth.shape != (scores.shape[0],):
        raise ShapeError(f"{where}: expected class scores (N, C) and labels (N,), got {scores.shape} and {truth.shape}")
    if average not in ("macro", "weighted", None):
        raise EngineError(f"{where}: average must be 'macro', 'weighted' or None, got {average!r}")
    num_classes = scores.shape[1]
    top = int(backend.to_host(truth.max())) if truth.size else -1
    if top >= num_classes:
        raise EngineError(f"{where}: label {top} is out of range for {num_classes} score columns")
    aucs = np.array([_binary_auc(scores[:, c], truth == c, f"{where} (class {c} vs rest)")
                     for c in range(num_classes)])
    if average is None:
        return aucs
    weights = np.bincount(truth, minlength=num_classes) if average == "weighted" else None
    return float(np.average(aucs, weights=weights))


# ---- regression -----------------------------------------------------------------------------------

def _regression_pair(pred, target, where: str):
    p, t = _pair(pred, target, where)
    # (N,) and (N, 1) are the same single-output target; anything else must match exactly, so a
    # (N, 1) prediction never broadcasts against (N,) targets into an (N, N) error.
    p, t = (a.reshape(-1, 1) if a.ndim == 1 else a for a in (p, t))
    if p.shape != t.shape or p.ndim != 2:
        raise ShapeError(f"{where}: pred {describe(pred)} and target {describe(target)} must have the same shape, "
                         "(N,) or (N, outputs)")
    return p, t


def mean_squared_error(pred, target) -> float:
    """Mean of ``(pred - target)**2`` over all elements (float64)."""
    p, t = _regression_pair(pred, target, "mean_squared_error")
    return _ratio(_host_float64(((p.astype(np.float64) - t) ** 2).sum()), p.size, "mean_squared_error")


def mean_absolute_error(pred, target) -> float:
    """Mean of ``|pred - target|`` over all elements (float64)."""
    p, t = _regression_pair(pred, target, "mean_absolute_error")
    xp = backend.array_module(p)
    return _ratio(_host_float64(xp.abs(p.astype(np.float64) - t).sum()), p.size, "mean_absolute_error")


def r2_score(pred, target, multioutput: str = "uniform_average"):
    """Coefficient of determination ``1 - SS_res / SS_tot`` (as scikit-learn, with ``force_finite``).

    A constant target gives 1.0 for a perfect prediction and 0.0 otherwise; fewer than two
    samples give nan with an UndefinedMetricWarning.

    Args:
        pred, target: (N,) or (N, outputs).
        multioutput: "uniform_average" (mean over outputs) or "raw_values" (per-output array).
    """
    p, t = _regression_pair(pred, target, "r2_score")
    p, t = _host_float64(p), _host_float64(t)
    residual = ((t - p) ** 2).sum(axis=0)
    total = ((t - t.mean(axis=0)) ** 2).sum(axis=0) if len(t) else np.zeros(t.shape[1])
    return _r2_from_sums(residual, total, len(t), multioutput)


def _r2_from_sums(residual: np.ndarray, total: np.ndarray, n: int, multioutput: str):
    if multioutput not in ("uniform_average", "raw_values"):
        raise EngineError(f"r2_score: multioutput must be 'uniform_average' or 'raw_values', got {multioutput!r}")
    if n < 2:
        warnings.warn("r2_score: R2 is not well-defined with fewer than two samples", UndefinedMetricWarning,
                      stacklevel=3)
        return math.nan
    defined = total != 0
    scores = np.where(residual == 0, 1.0, 0.0)  # constant target: perfect or not
    scores[defined] = 1.0 - residual[defined] / total[defined]
    return scores if multioutput == "raw_values" else float(backend.to_host(scores.mean()))


# ---- streaming metrics ----------------------------------------------------------------------------

class Metric:
    """A metric accumulated over batches: ``update(pred, target)`` per batch, ``compute()`` at the end.

    State lives on the host (Python ints / float64 numpy), so ``state_dict()`` is small and
    device-free and a metric can be checkpointed with ``engine.save``.
    """

    def update(self, pred, target) -> None:
        raise NotImplementedError

    def compute(self):
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in vars(self).items()
                if key.startswith("_")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value.copy() if isinstance(value, np.ndarray) else value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Accuracy(Metric):
    """Running accuracy; ``pred`` as for :func:`accuracy` (logits (N, C) from a model are fine)."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._correct, self._total = 0, 0

    def update(self, pred, target) -> None:
        correct, total = _correct_and_total(pred, target, self.threshold, "Accuracy.update")
        self._correct, self._total = self._correct + correct, self._total + total

    def compute(self) -> float:
        """Correct / total over every update; nan (with a warning) before any sample."""
        return _ratio(self._correct, self._total, "Accuracy.compute")


class TopKAccuracy(Metric):
    """Running top-k accuracy over scores (N, C)."""

    def __init__(self, k: int = 5):
        self.k = k
        self.reset()

    def reset(self) -> None:
        self._correct, self._total = 0, 0

    def update(self, pred, target) -> None:
        correct, total = _top_k_correct(pred, target, self.k, "TopKAccuracy.update")
        self._correct, self._total = self._correct + correct, self._total + total

    def compute(self) -> float:
        return _ratio(self._correct, self._total, "TopKAccuracy.compute")


class ConfusionMatrix(Metric):
    """Running confusion matrix (true class on rows); precision, recall and F1 derive from it.

    Args:
        num_classes: fixed size C; default: grows to the largest label seen, and averages run
            over the labels seen (as the functional metrics do).
        threshold: cut-off for binary scores.
    """

    def __init__(self, num_classes: int | None = None, threshold: float = 0.5):
        self.num_classes, self.threshold = num_classes, threshold
        self.reset()

    def reset(self) -> None:
        self._counts = np.zeros((self.num_classes or 0,) * 2, np.int64)

    def update(self, pred, target) -> None:
        batch = _confusion_counts(pred, target, self.num_classes, self.threshold, "ConfusionMatrix.update")
        size = max(len(batch), len(self._counts))
        self._counts = _grown(self._counts, size) + _grown(batch, size)

    def compute(self, normalize: str | None = None) -> np.ndarray:
        """The (C, C) counts (int64), or normalised as :func:`confusion_matrix`'s ``normalize``."""
        return _normalized(self._counts.copy(), normalize)

    def _scores(self, average, pos_label, zero_division):
        present = _present(self._counts, self.num_classes)
        return _class_scores(self._counts, present, average, pos_label, zero_division, "ConfusionMatrix")

    def precision(self, average="macro", pos_label: int = 1, zero_division=0.0):
        return self._scores(average, pos_label, zero_division)[0]

    def recall(self, average="macro", pos_label: int = 1, zero_division=0.0):
        return self._scores(average, pos_label, zero_division)[1]

    def f1_score(self, average="macro", pos_label: int = 1, zero_division=0.0):
        return self._scores(average, pos_label, zero_division)[2]


def _grown(counts: np.ndarray, size: int) -> np.ndarray:
    if len(counts) == size:
        return counts
    out = np.zeros((size, size), np.int64)
    out[:len(counts), :len(counts)] = counts
    return out


class _FromConfusion(ConfusionMatrix):
    _index = 0

    def __init__(self, average="macro", num_classes: int | None = None, pos_label: int = 1, zero_division=0.0,
                 threshold: float = 0.5):
        if average not in _AVERAGES:
            raise EngineError(f"{type(self).__name__}: average must be one of {_AVERAGES}, got {average!r}")
        self.average, self.pos_label, self.zero_division = average, pos_label, zero_division
        super().__init__(num_classes, threshold)

    def compute(self):
        return self._scores(self.average, self.pos_label, self.zero_division)[self._index]


class Precision(_FromConfusion):
    """Running precision; arguments as :func:`precision` (default average="macro")."""

    _index = 0


class Recall(_FromConfusion):
    """Running recall; arguments as :func:`recall` (default average="macro")."""

    _index = 1


class F1Score(_FromConfusion):
    """Running F1; arguments as :func:`f1_score` (default average="macro")."""

    _index = 2


class Mean(Metric):
    """Running (weighted) mean of values, e.g. a loss: ``update(loss, weight=batch_size)``.

    An array value adds each element (times ``weight``).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sum, self._weight = 0.0, 0.0

    def update(self, value, weight: float = 1.0) -> None:
        data = unwrap(value, "Mean.update")
        self._sum += float(_host_float64(data.astype(np.float64).sum())) * float(weight)
        self._weight += data.size * float(weight)

    def compute(self) -> float:
        return _ratio(self._sum, self._weight, "Mean.compute")


class MeanSquaredError(Metric):
    """Running mean squared error over all elements."""

    _where = "MeanSquaredError.update"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def _errors(self, p, t):
        return (p.astype(np.float64) - t) ** 2

    def update(self, pred, target) -> None:
        p, t = _regression_pair(pred, target, self._where)
        self._sum += float(_host_float64(self._errors(p, t).sum()))
        self._count += int(p.size)

    def compute(self) -> float:
        return _ratio(self._sum, self._count, type(self).__name__ + ".compute")


class MeanAbsoluteError(MeanSquaredError):
    """Running mean absolute error over all elements."""

    _where = "MeanAbsoluteError.update"

    def _errors(self, p, t):
        return backend.array_module(p).abs(p.astype(np.float64) - t)


class R2Score(Metric):
    """Running R2 (uniform average over outputs), exact over any batching.

    Keeps per-output count, mean and sum of squared deviations of the target (merged batch by
    batch with Chan's parallel formula, stable for large means) and the residual sum of squares.
    """

    def __init__(self, multioutput: str = "uniform_average"):
        self.multioutput = multioutput
        self.reset()

    def reset(self) -> None:
        self._n, self._mean, self._m2, self._residual = 0, None, None, None

    def update(self, pred, target) -> None:
        p, t = _regression_pair(pred, target, "R2Score.update")
        if not len(t):
            return
        p, t = p.astype(np.float64), t.astype(np.float64)
        n_b = len(t)
        mean_b = t.mean(axis=0)
        m2_b = _host_float64(((t - mean_b) ** 2).sum(axis=0))
        residual_b = _host_float64(((t - p) ** 2).sum(axis=0))
        mean_b = _host_float64(mean_b)
        if self._n == 0:
            self._n, self._mean, self._m2, self._residual = n_b, mean_b, m2_b, residual_b
            return
        if mean_b.shape != self._mean.shape:
            raise ShapeError(f"R2Score.update: {mean_b.shape[0]} outputs, earlier batches had {self._mean.shape[0]}")
        n = self._n + n_b
        delta = mean_b - self._mean
        self._m2 = self._m2 + m2_b + delta ** 2 * self._n * n_b / n
        self._mean = self._mean + delta * n_b / n
        self._residual, self._n = self._residual + residual_b, n

    def compute(self):
        if self._n == 0:
            return _r2_from_sums(np.zeros(1), np.zeros(1), 0, self.multioutput)
        return _r2_from_sums(self._residual, self._m2, self._n, self.multioutput)

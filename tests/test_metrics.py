"""engine.metrics: hand-computed cases, scikit-learn where installed, edge cases, streaming = functional.

Our argument order is (pred, target); scikit-learn's is (y_true, y_pred), so calls to it swap them.
"""

import math
import warnings

import numpy as np
import pytest

import engine
from engine import io
from engine import metrics as M
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES


def _multiclass(n=300, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, n)
    scores = rng.standard_normal((n, classes)) + 1.5 * np.eye(classes)[target]
    return scores.astype(np.float32), target


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- accuracy --------------------------------------------------------------------------------------

def test_accuracy_from_labels_scores_and_binary_probabilities():
    assert M.accuracy(np.array([0, 2, 1, 1]), np.array([0, 1, 1, 1])) == 0.75
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 1.0, 0.0]])  # row 3 ties: argmax takes class 0
    assert M.accuracy(logits, np.array([0, 2, 0])) == 1.0
    probabilities = np.array([0.9, 0.4, 0.5, 0.2])
    assert M.accuracy(probabilities, np.array([1, 0, 1, 1])) == 0.75  # 0.5 >= threshold counts as positive
    assert M.accuracy(probabilities[:, None], np.array([1, 0, 1, 1])) == 0.75
    assert M.accuracy(np.array([0.3, -0.2]), np.array([1, 0]), threshold=0.0) == 1.0  # logits
    assert M.accuracy(np.array([2.0, 1.0]), np.array([2, 0])) == 0.5  # integral floats are labels


def test_accuracy_errors():
    with pytest.raises(ShapeError, match="same shape"):
        M.accuracy(np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(ShapeError, match="do not fit targets"):
        M.accuracy(np.zeros((4, 3)), np.zeros(5, np.int64))
    with pytest.raises(EngineError, match="non-integer floats .* multi-class"):
        M.accuracy(np.array([0.2, 0.7, 0.1]), np.array([0, 2, 1]))
    with pytest.raises(DTypeError, match="non-integer floats"):
        M.accuracy(np.array([0, 1]), np.array([0.5, 1.0]))
    with pytest.raises(EngineError, match="negative label -1"):
        M.accuracy(np.array([0, 1]), np.array([-1, 1]))


def test_top_k_accuracy_hand_cases_and_ties():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    target = np.array([2, 1, 2])
    # row 0: class 2 is second; row 1: tied with class 0 (lower index ranks first), so third; row 2: third
    assert M.top_k_accuracy(scores, target, k=1) == 0.0
    assert M.top_k_accuracy(scores, target, k=2) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(scores, target, k=3) == 1.0
    logits, labels = _multiclass()
    assert M.top_k_accuracy(logits, labels, k=1) == M.accuracy(logits, labels)
    tied = np.zeros((4, 3))
    assert M.top_k_accuracy(tied, np.array([0, 1, 2, 0]), k=1) == M.accuracy(tied, np.array([0, 1, 2, 0])) == 0.5


@pytest.mark.slow
def test_top_k_accuracy_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    scores, target = _multiclass(classes=6)
    for k in (1, 2, 3, 5):
        assert M.top_k_accuracy(scores, target, k=k) == pytest.approx(
            metrics.top_k_accuracy_score(target, scores, k=k, labels=np.arange(6)))


# ---- precision / recall / F1 -----------------------------------------------------------------------

def test_binary_scores_by_hand():
    pred = np.array([1, 1, 0, 1, 0, 0, 1])
    target = np.array([1, 0, 0, 1, 1, 0, 1])
    # TP = 3, FP = 1, FN = 1
    assert M.precision(pred, target) == pytest.approx(3 / 4)
    assert M.recall(pred, target) == pytest.approx(3 / 4)
    assert M.f1_score(pred, target) == pytest.approx(3 / 4)
    # pos_label=0: TP = 2 (rows 2, 5), FP = 1 (row 4), FN = 1 (row 1)
    assert M.precision(pred, target, pos_label=0) == pytest.approx(2 / 3)
    assert M.recall(pred, target, pos_label=0) == pytest.approx(2 / 3)


def test_macro_with_a_class_never_predicted_by_hand():
    pred = np.array([0, 0, 1, 1, 0])
    target = np.array([0, 2, 1, 1, 2])  # class 2 is never predicted
    # class 0: P = 1/3, R = 1; class 1: P = 1, R = 1; class 2: P = 0/0, R = 0
    assert M.precision(pred, target, average="macro") == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert M.precision(pred, target, average="macro", zero_division=1) == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert M.precision(pred, target, average="macro", zero_division=np.nan) == pytest.approx((1 / 3 + 1) / 2)
    assert M.recall(pred, target, average="macro") == pytest.approx((1 + 1 + 0) / 3)
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+2) = 0.5; class 1: 1; class 2: 0/(0+0+2) = 0
    assert M.f1_score(pred, target, average="macro") == pytest.approx(0.5)
    np.testing.assert_allclose(M.f1_score(pred, target, average=None), [0.5, 1.0, 0.0])
    assert M.f1_score(pred, target, average="micro") == pytest.approx(M.accuracy(pred, target))
    with pytest.warns(M.UndefinedMetricWarning, match="precision is ill-defined"):
        assert M.precision(pred, target, average="macro", zero_division="warn") == pytest.approx(4 / 9)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
@pytest.mark.parametrize("zero_division", [0.0, 1.0, np.nan])
def test_precision_recall_f1_match_scikit_learn(average, zero_division):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, 120)
    pred = rng.integers(0, 4, 120)  # class 4 is never predicted
    pred[:3] = 5  # class 5 is predicted but never true
    for ours, theirs in ((M.precision, metrics.precision_score), (M.recall, metrics.recall_score),
                         (M.f1_score, metrics.f1_score)):
        np.testing.assert_allclose(ours(pred, target, average=average, zero_division=zero_division),
                                   theirs(target, pred, average=average, zero_division=zero_division))


def test_num_classes_includes_absent_classes_like_scikit_learn_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    pred, target = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    for average in ("macro", "weighted", "micro"):
        assert M.f1_score(pred, target, average=average, num_classes=4) == pytest.approx(
            metrics.f1_score(target, pred, average=average, labels=[0, 1, 2, 3], zero_division=0))


def test_binary_average_errors():
    with pytest.raises(EngineError, match="average='binary' needs at most two classes, found labels \\[0, 1, 2\\]"):
        M.precision(np.array([0, 1, 2]), np.array([0, 1, 1]))
    with pytest.raises(EngineError, match="pos_label=1 is not one of the labels \\[0, 2\\]"):
        M.recall(np.array([0, 2]), np.array([2, 0]))
    with pytest.raises(EngineError, match="average must be one of"):
        M.f1_score(np.array([0, 1]), np.array([0, 1]), average="samples")
    # one class only, pos_label absent: 0/0 -> zero_division
    assert M.precision(np.array([0, 0]), np.array([0, 0])) == 0.0
    assert M.precision(np.array([0, 0]), np.array([0, 0]), zero_division=1) == 1.0


# ---- confusion matrix -------------------------------------------------------------------------------

def test_confusion_matrix_by_hand_and_from_scores():
    pred, target = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 0, 1, 2, 1, 2])
    expected = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 2]])
    np.testing.assert_array_equal(M.confusion_matrix(pred, target), expected)
    np.testing.assert_array_equal(M.confusion_matrix(np.eye(3)[pred] * 5.0, target), expected)
    padded = M.confusion_matrix(pred, target, num_classes=4)
    assert padded.shape == (4, 4) and padded[3].sum() == padded[:, 3].sum() == 0
    with pytest.raises(EngineError, match="label 2 is out of range for num_classes=2"):
        M.confusion_matrix(pred, target, num_classes=2)


@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
def test_confusion_matrix_matches_scikit_learn(normalize):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    target, pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    np.testing.assert_allclose(M.confusion_matrix(pred, target, num_classes=5, normalize=normalize),
                               metrics.confusion_matrix(target, pred, labels=range(5), normalize=normalize))


# ---- ROC --------------------------------------------------------------------------------------------

def _binary_scores(n=200, seed=3, decimals=1):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) * 0.6 + 0.3 * target, decimals)  # rounding makes many ties
    return scores, target


@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve_matches_scikit_learn_with_ties(drop_intermediate):
    metrics = pytest.importorskip("sklearn.metrics")
    scores, target = _binary_scores()
    ours = M.roc_curve(scores, target, drop_intermediate=drop_intermediate)
    theirs = metrics.roc_curve(target, scores, drop_intermediate=drop_intermediate)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b)


def test_roc_curve_by_hand():
    fpr, tpr, thresholds = M.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def _mann_whitney_auc(scores, positive):
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def test_binary_auc_equals_the_pairwise_probability_with_ties():
    scores, target = _binary_scores(decimals=1)
    assert M.roc_auc_score(scores, target) == pytest.approx(_mann_whitney_auc(scores, target == 1), rel=1e-12)
    assert M.roc_auc_score(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    two_columns = np.column_stack([1 - scores, scores])
    assert M.roc_auc_score(two_columns, target) == M.roc_auc_score(scores, target)
    assert M.roc_auc_score(np.full(6, 0.3), np.array([0, 1, 0, 1, 1, 0])) == 0.5  # all tied


def test_auc_matches_scikit_learn_binary_and_one_vs_rest():
    metrics = pytest.importorskip("sklearn.metrics")
    scores, target = _binary_scores(decimals=2)
    assert M.roc_auc_score(scores, target) == pytest.approx(metrics.roc_auc_score(target, scores))
    logits, labels = _multiclass(classes=5)
    probabilities = _softmax(logits.astype(np.float64))
    for average in ("macro", "weighted"):
        assert M.roc_auc_score(probabilities, labels, average=average) == pytest.approx(
            metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average=average))
    per_class = M.roc_auc_score(probabilities, labels, average=None)
    for c in range(5):
        assert per_class[c] == pytest.approx(metrics.roc_auc_score(labels == c, probabilities[:, c]))


def test_single_class_roc_and_auc():
    with pytest.warns(M.UndefinedMetricWarning, match="no negative samples"):
        fpr, tpr, _ = M.roc_curve(np.array([0.2, 0.7]), np.array([1, 1]))
    assert np.all(np.isnan(fpr)) and tpr[-1] == 1.0
    with pytest.raises(EngineError, match="only one class .*no positives among 3 samples"):
        M.roc_auc_score(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]))
    logits, labels = _multiclass(classes=3)
    labels[labels == 2] = 0
    with pytest.raises(EngineError, match="class 2 vs rest.*no positives"):
        M.roc_auc_score(logits, labels)
    with pytest.raises(EngineError, match="binary scores \\(N,\\) need binary targets"):
        M.roc_auc_score(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]))


# ---- regression -------------------------------------------------------------------------------------

def test_regression_metrics_against_formulas():
    rng = np.random.default_rng(4)
    target = rng.normal(10, 2, size=(50, 3))
    pred = target + rng.normal(0, 0.5, size=(50, 3))
    err = pred - target
    assert M.mean_squared_error(pred, target) == pytest.approx((err ** 2).mean())
    assert M.mean_absolute_error(pred, target) == pytest.approx(np.abs(err).mean())
    r2 = 1 - (err ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(M.r2_score(pred, target, multioutput="raw_values"), r2)
    assert M.r2_score(pred, target) == pytest.approx(r2.mean())


def test_regression_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    target = rng.normal(size=(40, 2)).astype(np.float32)
    pred = (target * 0.8 + rng.normal(0, 0.3, size=(40, 2))).astype(np.float32)
    assert M.mean_squared_error(pred, target) == pytest.approx(metrics.mean_squared_error(target, pred), rel=1e-6)
    assert M.mean_absolute_error(pred, target) == pytest.approx(metrics.mean_absolute_error(target, pred), rel=1e-6)
    assert M.r2_score(pred, target) == pytest.approx(metrics.r2_score(target, pred), rel=1e-6)
    np.testing.assert_allclose(M.r2_score(pred, target, "raw_values"),
                               metrics.r2_score(target, pred, multioutput="raw_values"), rtol=1e-6)
    # R2 is not symmetric: the argument order matters
    assert M.r2_score(target, pred) != pytest.approx(M.r2_score(pred, target))


def test_regression_shapes_and_r2_edge_cases():
    target = np.array([1.0, 2.0, 4.0])
    pred_column = np.array([[1.5], [2.0], [3.0]])
    assert M.mean_squared_error(pred_column, target) == pytest.approx((0.25 + 0 + 1) / 3)  # no (3, 3) broadcast
    with pytest.raises(ShapeError, match="same shape"):
        M.mean_squared_error(np.zeros((3, 2)), target)
    assert M.r2_score(np.array([5.0, 5.0]), np.array([5.0, 5.0])) == 1.0  # constant target, perfect
    assert M.r2_score(np.array([4.0, 6.0]), np.array([5.0, 5.0])) == 0.0  # constant target, imperfect
    with pytest.warns(M.UndefinedMetricWarning, match="fewer than two samples"):
        assert math.isnan(M.r2_score(np.array([1.0]), np.array([2.0])))


# ---- streaming metrics ------------------------------------------------------------------------------

def _batches(*arrays, size=37):
    n = len(arrays[0])
    for start in range(0, n, size):
        yield tuple(a[start:start + size] for a in arrays)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_classification_equals_functional(device):
    scores, target = _multiclass(n=250, classes=5)
    scores[:, 4] -= 10  # class 4 is (almost) never predicted
    streaming = {"acc": M.Accuracy(), "top3": M.TopKAccuracy(k=3), "cm": M.ConfusionMatrix(),
                 "p": M.Precision(average="macro"), "r": M.Recall(average="weighted"), "f1": M.F1Score(average=None)}
    for s, t in _batches(scores, target):
        for metric in streaming.values():
            metric.update(engine.tensor(s, device=device), engine.tensor(t, device=device))
    assert streaming["acc"].compute() == M.accuracy(scores, target)
    assert streaming["top3"].compute() == M.top_k_accuracy(scores, target, k=3)
    np.testing.assert_array_equal(streaming["cm"].compute(), M.confusion_matrix(scores, target))
    assert streaming["p"].compute() == pytest.approx(M.precision(scores, target, average="macro"))
    assert streaming["r"].compute() == pytest.approx(M.recall(scores, target, average="weighted"))
    np.testing.assert_allclose(streaming["f1"].compute(), M.f1_score(scores, target, average=None))
    assert streaming["cm"].f1_score("micro") == pytest.approx(M.accuracy(scores, target))


def test_confusion_matrix_grows_with_new_labels_and_can_be_fixed():
    cm = M.ConfusionMatrix()
    cm.update(np.array([0, 1]), np.array([0, 0]))
    assert cm.compute().shape == (2, 2)
    cm.update(np.array([3]), np.array([2]))
    np.testing.assert_array_equal(cm.compute(), [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    fixed = M.ConfusionMatrix(num_classes=3)
    with pytest.raises(EngineError, match="out of range for num_classes=3"):
        fixed.update(np.array([3]), np.array([0]))
    assert fixed.compute().sum() == 0  # the failed update changed nothing


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_regression_equals_functional(device):
    rng = np.random.default_rng(6)
    target = (rng.normal(size=(230, 2)) + 1e4).astype(np.float32)  # a large mean: R2 must stay accurate
    pred = target + rng.normal(0, 0.5, size=(230, 2)).astype(np.float32)
    mse, mae, r2 = M.MeanSquaredError(), M.MeanAbsoluteError(), M.R2Score()
    for p, t in _batches(pred, target, size=41):
        for metric in (mse, mae, r2):
            metric.update(engine.tensor(p, device=device), engine.tensor(t, device=device))
    assert mse.compute() == pytest.approx(M.mean_squared_error(pred, target), rel=1e-12)
    assert mae.compute() == pytest.approx(M.mean_absolute_error(pred, target), rel=1e-12)
    assert r2.compute() == pytest.approx(M.r2_score(pred, target), rel=1e-9)


def test_mean_is_weighted_and_accepts_tensors_and_arrays():
    mean = M.Mean()
    mean.update(engine.tensor(2.0), weight=3)
    mean.update(np.array([4.0, 6.0]))
    assert mean.compute() == pytest.approx((2 * 3 + 4 + 6) / 5)


def test_reset_state_dict_and_empty_compute(tmp_path):
    acc = M.Accuracy()
    acc.update(np.array([1, 0, 1]), np.array([1, 1, 1]))
    io.save(acc.state_dict(), tmp_path / "metric.ckpt")
    restored = M.Accuracy()
    restored.load_state_dict(io.load(tmp_path / "metric.ckpt"))
    assert restored.compute() == pytest.approx(2 / 3)
    acc.reset()
    with pytest.warns(M.UndefinedMetricWarning, match="no samples"):
        assert math.isnan(acc.compute())
    r2 = M.R2Score()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        assert math.isnan(r2.compute())


def test_metrics_accept_mixed_devices_and_tensors():
    scores, target = _multiclass(n=40)
    assert M.accuracy(engine.tensor(scores), target) == M.accuracy(scores, engine.tensor(target))

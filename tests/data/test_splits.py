"""random_split, train_val_test_split (plain and stratified) and kfold_splits."""

import numpy as np
import pytest

import engine
from engine.data import TensorDataset, kfold_splits, random_split, train_val_test_split
from engine.errors import EngineError, ShapeError
from tests.conftest import DEVICES


def _imbalanced(n_per_class=(60, 30, 9, 1), features=2, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)]).astype(np.int64)
    x = np.column_stack([np.arange(len(y)), rng.standard_normal((len(y), features - 1))]).astype(np.float32)
    return x, y  # x[:, 0] is the sample's original index


# ---- random_split -----------------------------------------------------------------------------------

def test_random_split_counts_and_fraction_rounding():
    ds = TensorDataset(np.arange(10))
    parts = random_split(ds, [3, 7], seed=0)
    assert [len(p) for p in parts] == [3, 7]
    assert sorted(np.concatenate([p.indices for p in parts]).tolist()) == list(range(10))
    # floor(10 * 0.33) = 3 each, the leftover item goes to the first part (PyTorch's rule)
    assert [len(p) for p in random_split(ds, [0.34, 0.33, 0.33], seed=0)] == [4, 3, 3]


def test_random_split_is_seeded():
    ds = TensorDataset(np.arange(50))
    a = random_split(ds, [0.5, 0.5], seed=4)[0].indices
    assert np.array_equal(a, random_split(ds, [0.5, 0.5], seed=4)[0].indices)
    assert not np.array_equal(a, random_split(ds, [0.5, 0.5], seed=5)[0].indices)
    engine.manual_seed(1)
    b = random_split(ds, [25, 25])[0].indices
    engine.manual_seed(1)
    assert np.array_equal(b, random_split(ds, [25, 25])[0].indices)


@pytest.mark.parametrize("lengths, message", [([3, 3], "sum to the dataset's length 10"),
                                              ([0.5, 0.6], "sum to 1"), ([], "empty")])
def test_random_split_errors(lengths, message):
    with pytest.raises(EngineError, match=message):
        random_split(TensorDataset(np.arange(10)), lengths, seed=0)


# ---- train_val_test_split ---------------------------------------------------------------------------

def test_plain_split_sizes_disjoint_and_aligned():
    x, y = _imbalanced()
    (xtr, ytr), (xva, yva), (xte, yte) = train_val_test_split(x, y, val=0.15, test=0.2, seed=0)
    assert (len(xtr), len(xva), len(xte)) == (65, 15, 20)  # ceil(0.15 * 100), ceil(0.2 * 100), the rest
    ids = np.concatenate([xtr[:, 0], xva[:, 0], xte[:, 0]]).astype(int)
    assert sorted(ids.tolist()) == list(range(100))
    for xs, ys in ((xtr, ytr), (xva, yva), (xte, yte)):
        np.testing.assert_array_equal(y[xs[:, 0].astype(int)], ys)


def test_stratified_split_keeps_class_shares_with_exact_sizes():
    x, y = _imbalanced((300, 150, 45, 5))
    (_, ytr), (_, yva), (_, yte) = train_val_test_split(x, y, val=0.1, test=0.2, stratify=True, seed=3)
    assert (len(ytr), len(yva), len(yte)) == (350, 50, 100)
    expected = np.array([300, 150, 45, 5]) / 500
    for part in (ytr, yva, yte):
        share = np.bincount(part, minlength=4) / len(part)
        # largest-remainder rounding: each class within one sample of its exact share
        assert np.all(np.abs(share - expected) * len(part) <= 1.0)
    np.testing.assert_array_equal(np.bincount(yte, minlength=4), [60, 30, 9, 1])


def test_stratified_split_places_a_rare_class_exactly_every_time():
    x, y = _imbalanced((95, 5))
    worst = 0
    for seed in range(20):
        (_, _), (_, _), (_, yte) = train_val_test_split(x, y, val=0.0, test=0.2, stratify=True, seed=seed)
        worst = max(worst, abs(int(yte.sum()) - 1))
    assert worst == 0  # always exactly one of the five rare samples in the 20-sample test set


def test_split_without_y_and_with_stratify_labels():
    x, y = _imbalanced((40, 20))
    train, val, test = train_val_test_split(x, val=0.25, test=0.25, stratify=y, seed=0)
    assert (len(train), len(val), len(test)) == (30, 15, 15)
    assert np.bincount(y[test[:, 0].astype(int)]).tolist() == [10, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_split_keeps_tensor_type_and_device(device):
    x, y = _imbalanced()
    tx, ty = engine.tensor(x, device=device), engine.tensor(y, device=device)
    (xtr, ytr), _, (xte, yte) = train_val_test_split(tx, ty, stratify=True, seed=1)
    assert isinstance(xtr, engine.Tensor) and xtr.device == engine.device(device)
    np.testing.assert_array_equal(y[xte.numpy()[:, 0].astype(int)], yte.numpy())


def test_split_errors():
    x, y = _imbalanced()
    with pytest.raises(EngineError, match="leave no training samples"):
        train_val_test_split(x, y, val=0.5, test=0.5, seed=0)
    with pytest.raises(EngineError, match="fraction in"):
        train_val_test_split(x, y, val=-0.1, seed=0)
    with pytest.raises(ShapeError, match="one row per sample"):
        train_val_test_split(x, y[:-1], seed=0)
    with pytest.raises(EngineError, match="regression target"):
        train_val_test_split(x, x[:, 1], stratify=True, seed=0)
    with pytest.raises(EngineError, match="stratify=True needs y"):
        train_val_test_split(x, stratify=True, seed=0)


# ---- k-fold -----------------------------------------------------------------------------------------

def test_kfold_matches_scikit_learn_without_shuffle():
    model_selection = pytest.importorskip("sklearn.model_selection")
    ours = kfold_splits(23, k=5)
    theirs = list(model_selection.KFold(5).split(np.zeros(23)))
    for (tr, va), (tr2, va2) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(tr, tr2)
        np.testing.assert_array_equal(va, va2)


def test_kfold_partitions_and_shuffles_reproducibly():
    folds = kfold_splits(23, k=4, shuffle=True, seed=0)
    vals = [va for _, va in folds]
    assert sorted(np.concatenate(vals).tolist()) == list(range(23))
    assert sorted(len(v) for v in vals) == [5, 6, 6, 6]
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 23
        assert np.all(np.diff(va) > 0)
    assert not np.array_equal(vals[0], np.arange(6))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(folds, kfold_splits(23, 4, shuffle=True, seed=0)))


def test_stratified_kfold_balances_every_class():
    y = np.repeat([0, 1, 2], [50, 23, 7])
    folds = kfold_splits(len(y), k=5, shuffle=True, seed=2, stratify_labels=y)
    per_fold = np.array([np.bincount(y[va], minlength=3) for _, va in folds])
    assert np.all(per_fold.max(axis=0) - per_fold.min(axis=0) <= 1)
    np.testing.assert_array_equal(per_fold.sum(axis=0), [50, 23, 7])
    sizes = per_fold.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1


def test_kfold_errors_and_small_class_warning():
    with pytest.raises(EngineError, match="2 <= k <= n=3"):
        kfold_splits(3, k=4)
    with pytest.raises(EngineError, match="positive int"):
        kfold_splits(0, k=2)
    with pytest.raises(ShapeError, match="n=5 entries"):
        kfold_splits(5, k=2, stratify_labels=[0, 1])
    with pytest.warns(UserWarning, match="fewer than k=3"):
        kfold_splits(6, k=3, stratify_labels=[0, 0, 0, 0, 1, 1])

"""Scalers, one_hot, clean, class_weights and WeightedRandomSampler against NumPy formulas and scikit-learn."""

import numpy as np
import pytest

import engine
from engine import io
from engine.data import (MinMaxScaler, StandardScaler, WeightedRandomSampler, class_weights, clean, one_hot)
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES


def _data(n=50, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 3.0, size=(n, features)) * np.array([1.0, 10.0, 0.1, 2.0])
    x[:, 3] = 7.0  # a constant feature
    return x.astype(np.float32)


# ---- StandardScaler ---------------------------------------------------------------------------------

def test_standard_scaler_against_numpy_formula():
    train, val = _data(), _data(seed=1)
    scaler = StandardScaler().fit(train)
    t64 = train.astype(np.float64)
    mean, std = t64.mean(0), t64.std(0)
    std[3] = 1.0  # zero variance: scale 1
    out = scaler.transform(val)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (val - mean) / std, rtol=1e-5, atol=1e-5)
    fitted = scaler.transform(train)
    np.testing.assert_allclose(fitted[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(fitted[:, :3].std(0), 1, atol=1e-5)
    np.testing.assert_allclose(fitted[:, 3], 0)
    np.testing.assert_allclose(scaler.inverse_transform(out), val, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_standard_scaler_matches_scikit_learn():
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    train, val = _data().astype(np.float64), _data(seed=2).astype(np.float64)
    ours, theirs = StandardScaler().fit(train), preprocessing.StandardScaler().fit(train)
    np.testing.assert_allclose(ours.mean_, theirs.mean_)
    np.testing.assert_allclose(ours.scale_, theirs.scale_)
    np.testing.assert_allclose(ours.transform(val), theirs.transform(val), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(StandardScaler(with_mean=False).fit_transform(train),
                               preprocessing.StandardScaler(with_mean=False).fit_transform(train))


def test_min_max_scaler_matches_scikit_learn_and_clips():
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    train, val = _data().astype(np.float64), _data(seed=3).astype(np.float64)
    ours = MinMaxScaler(feature_range=(-1, 2)).fit(train)
    theirs = preprocessing.MinMaxScaler(feature_range=(-1, 2)).fit(train)
    np.testing.assert_allclose(ours.transform(val), theirs.transform(val), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(val)), val, rtol=1e-12)
    clipped = MinMaxScaler(clip=True).fit(train).transform(val)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_min_max_scaler_formula_and_integer_input():
    train = np.array([[0, 10], [5, 10], [10, 10]], np.uint8)
    out = MinMaxScaler().fit_transform(train)
    assert out.dtype == np.float32  # integers become float32, never float64
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])


@pytest.mark.parametrize("device", DEVICES)
def test_scalers_keep_tensor_kind_device_and_dtype(device):
    train = _data()
    t = engine.tensor(train, device=device)
    for scaler in (StandardScaler(), MinMaxScaler()):
        out = scaler.fit(t).transform(t)
        assert isinstance(out, engine.Tensor) and out.device == engine.device(device) and out.dtype == np.float32
        np.testing.assert_allclose(out.numpy(), type(scaler)().fit(train).transform(train), rtol=1e-5, atol=1e-6)


def test_scaler_state_dict_round_trip_through_a_checkpoint(tmp_path):
    train = _data()
    scaler = StandardScaler().fit(train)
    io.save(scaler.state_dict(), tmp_path / "scaler.ckpt")
    restored = StandardScaler()
    restored.load_state_dict(io.load(tmp_path / "scaler.ckpt"))
    np.testing.assert_array_equal(restored.transform(train), scaler.transform(train))


def test_scaler_errors():
    with pytest.raises(EngineError, match="call fit"):
        StandardScaler().transform(_data())
    scaler = StandardScaler().fit(_data())
    with pytest.raises(ShapeError, match=r"fitted on samples of shape \(4,\).*shape \(3,\)"):
        scaler.transform(_data()[:, :3])
    bad = _data()
    bad[3, 1] = np.nan
    with pytest.raises(EngineError, match="NaN or inf.*clean"):
        MinMaxScaler().fit(bad)
    with pytest.raises(EngineError, match="lo < hi"):
        MinMaxScaler(feature_range=(1, 0))
    with pytest.raises(EngineError, match="missing"):
        StandardScaler().load_state_dict({"mean_": np.zeros(4)})


# ---- one_hot and class_weights ------------------------------------------------------------------------

def test_one_hot_values_shape_and_errors():
    out = one_hot(np.array([[2, 0], [1, 2]]), 4)
    assert out.shape == (2, 2, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out.argmax(-1), [[2, 0], [1, 2]])
    np.testing.assert_array_equal(out.sum(-1), 1)
    assert one_hot(np.array([0, 3])).shape == (2, 4)
    t = one_hot(engine.tensor([1, 0]), 2, dtype=np.int64)
    assert isinstance(t, engine.Tensor) and t.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(EngineError, match="label 5 is out of range for num_classes=3"):
        one_hot(np.array([5]), 3)
    with pytest.raises(DTypeError, match="must be integers"):
        one_hot(np.array([0.5]), 2)
    with pytest.raises(EngineError, match="non-negative"):
        one_hot(np.array([-1, 0]), 2)


def test_class_weights_balanced_formula_and_scikit_learn():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    np.testing.assert_allclose(class_weights(y), [10 / 18, 10 / 9, 10 / 3], rtol=1e-6)
    utils = pytest.importorskip("sklearn.utils")
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    expected = utils.class_weight.compute_class_weight("balanced", classes=np.arange(5), y=y)
    np.testing.assert_allclose(class_weights(y, 5), expected, rtol=1e-6)


def test_class_weights_absent_class_and_tensor_input():
    w = class_weights(engine.tensor([0, 0, 2]), num_classes=4)
    assert isinstance(w, engine.Tensor) and w.dtype == np.float32
    np.testing.assert_allclose(w.numpy(), [3 / 8, 0, 3 / 4, 0])


# ---- clean ------------------------------------------------------------------------------------------

def _dirty():
    x = np.array([[1.0, 10.0], [np.nan, 20.0], [3.0, np.inf], [5.0, 40.0], [7.0, 30.0]], np.float32)
    y = np.array([0.0, 1.0, 0.0, np.nan, 1.0], np.float32)
    return x, y


def test_clean_drop_removes_bad_feature_and_target_rows():
    x, y = _dirty()
    xc, yc, report = clean(x, y)
    np.testing.assert_array_equal(xc, [[1, 10], [7, 30]])
    np.testing.assert_array_equal(yc, [0, 1])
    assert (report.rows_in, report.rows_out, report.rows_dropped, report.values_imputed) == (5, 2, 3, 0)


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_clean_imputes_with_train_statistics(strategy):
    x, y = _dirty()
    xc, yc, report = clean(x, y, strategy=strategy)
    kept = x[[0, 1, 2, 4]]  # row 3 has a NaN target: dropped
    stat = np.nanmean if strategy == "mean" else np.nanmedian
    fill = [stat(np.where(np.isfinite(kept[:, j]), kept[:, j], np.nan).astype(np.float64)) for j in range(2)]
    np.testing.assert_allclose(report.fill_values, fill)
    expected = kept.copy()
    expected[1, 0], expected[2, 1] = fill
    np.testing.assert_allclose(xc, expected, rtol=1e-6)
    assert xc.dtype == np.float32 and len(yc) == 4
    assert (report.rows_dropped, report.rows_imputed, report.values_imputed) == (1, 2, 2)
    # the validation split is imputed with the training values
    val = np.array([[np.nan, np.nan]], np.float32)
    xv, _, _ = clean(val, strategy=strategy, fill_values=report.fill_values)
    np.testing.assert_allclose(xv, [fill], rtol=1e-6)


def test_clean_tensor_and_errors():
    x, y = _dirty()
    xc, yc, _ = clean(engine.tensor(x), None)
    assert isinstance(xc, engine.Tensor) and xc.shape == (3, 2) and yc is None
    with pytest.raises(EngineError, match="strategy must be one of"):
        clean(x, strategy="zero")
    with pytest.raises(EngineError, match=r"feature\(s\) \[0\] have no finite values"):
        clean(np.array([[np.nan, 1.0], [np.inf, 2.0]]), strategy="mean")
    with pytest.raises(ShapeError, match="one row per sample"):
        clean(x, y[:2])
    with pytest.raises(ShapeError, match="fill_values has shape"):
        clean(x, strategy="mean", fill_values=[1.0, 2.0, 3.0])


# ---- WeightedRandomSampler ----------------------------------------------------------------------------

def test_weighted_sampler_frequencies_and_seeding():
    weights = np.array([1.0, 2.0, 0.0, 7.0])
    draws = np.fromiter(WeightedRandomSampler(weights, 20000, seed=0), dtype=np.int64)
    freq = np.bincount(draws, minlength=4) / 20000
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.012)  # ~4 binomial sd
    assert list(WeightedRandomSampler(weights, 50, seed=3)) == list(WeightedRandomSampler(weights, 50, seed=3))
    assert list(WeightedRandomSampler(weights, 50, seed=3)) != list(WeightedRandomSampler(weights, 50, seed=4))


def test_weighted_sampler_without_replacement_and_errors():
    drawn = list(WeightedRandomSampler([1, 1, 0, 1], 3, replacement=False, seed=0))
    assert sorted(drawn) == [0, 1, 3]
    with pytest.raises(EngineError, match="exceeds the 3 samples with non-zero weight"):
        WeightedRandomSampler([1, 1, 0, 1], 4, replacement=False)
    with pytest.raises(EngineError, match="non-negative"):
        WeightedRandomSampler([1, -1], 2)
    with pytest.raises(EngineError, match="num_samples must be a positive int"):
        WeightedRandomSampler([1, 1], 0)

"""Distillation loss, hyperparameter search, ensembles and plots."""

import numpy as np
import pytest

import engine
from engine import nn
from engine.train.distill import distillation_loss
from engine.train.ensemble import Ensemble
from engine.train.search import grid_search, random_search


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_distillation_loss_matches_numpy_formula_and_gradcheck():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    temperature, alpha = 3.0, 0.6
    log_q = _log_softmax(s / temperature)
    p = np.exp(_log_softmax(t / temperature))
    kl = (p * (np.log(p) - log_q)).sum() / len(s)
    ce = -_log_softmax(s)[np.arange(5), labels].mean()
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    student = engine.tensor(s, dtype=engine.float64, requires_grad=True)
    teacher = engine.tensor(t, dtype=engine.float64)
    y = engine.tensor(labels)
    loss = distillation_loss(student, teacher, y, temperature, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert engine.gradcheck(lambda z: distillation_loss(z, teacher, y, temperature, alpha), [student])


def test_distillation_loss_rejects_bad_arguments():
    z = engine.randn(2, 3)
    y = engine.tensor([0, 1])
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, z, y, alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(z, engine.randn(2, 4), y)


def test_grid_search_tries_every_combination_and_finds_the_best():
    calls = []

    def score(config):
        calls.append(config)
        return -(config["a"] - 2) ** 2 - (config["b"] - 10) ** 2

    result = grid_search(score, {"a": [1, 2, 3], "b": [5, 10]})
    assert len(calls) == 6 and len(result.trials) == 6
    assert result.best_config == {"a": 2, "b": 10} and result.best_score == 0
    assert result.table().splitlines()[1].split()[:2] == ["2", "10"]


def test_random_search_samples_inside_the_ranges_reproducibly():
    space = {"lr": ("log", 1e-4, 1e-1), "units": (8, 64), "act": ["relu", "tanh"], "p": (0.0, 0.5)}
    a = random_search(lambda c: -abs(np.log10(c["lr"]) + 2), space, n_trials=20, seed=3)
    b = random_search(lambda c: -abs(np.log10(c["lr"]) + 2), space, n_trials=20, seed=3)
    assert a.trials == [dict(t, seconds=u["seconds"]) for t, u in zip(b.trials, a.trials)]
    for trial in a.trials:
        assert 1e-4 <= trial["lr"] <= 1e-1 and 8 <= trial["units"] <= 64 and isinstance(trial["units"], int)
        assert trial["act"] in ("relu", "tanh") and 0.0 <= trial["p"] <= 0.5
    assert abs(np.log10(a.best_config["lr"]) + 2) == min(abs(np.log10(t["lr"]) + 2) for t in a.trials)
    with pytest.raises(ValueError, match="must be a list"):
        random_search(lambda c: 0, {"x": "oops"}, n_trials=1)


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return engine.tensor(self.logits)


def test_ensemble_mean_and_vote():
    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    b = np.log(np.array([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1]]))
    c = np.log(np.array([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]))
    x = engine.zeros(2, 1)
    mean = Ensemble([_Fixed(a), _Fixed(b), _Fixed(c)], mode="mean")(x)
    expected = np.log((np.exp(a) + np.exp(b) + np.exp(c)) / 3)
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-6)
    votes = Ensemble([_Fixed(a), _Fixed(b), _Fixed(c)], mode="vote")(x)
    np.testing.assert_array_equal(votes.numpy(), [[1, 2, 0], [0, 1, 2]])
    with pytest.raises(ValueError, match="mode"):
        Ensemble([_Fixed(a)], mode="median")


@pytest.mark.slow
def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from engine.train.plots import plot_confusion_matrix, plot_history

    history = {"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.5, 0.8, 0.9]}
    for path in (plot_history(history, tmp_path / "h.png"),
                 plot_confusion_matrix([[5, 1], [2, 7]], tmp_path / "cm.png", class_names=["a", "b"])):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The training loop: learning, history, callbacks, the NaN guard, exact resume, Keras-style fit."""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import io, nn, optim
from engine.data import DataLoader, TensorDataset
from engine.train import EarlyStopping, LRSchedulerCallback, ModelCheckpoint, Trainer, TrainingDiverged, fit
from tests.conftest import DEVICES


def _blobs(n=240, seed=0):
    """Three well-separated Gaussian blobs in 4-D: any working loop reaches high accuracy."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(3, 4))
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.normal(0, 1, size=(n, 4))).astype(np.float32)
    return x, y.astype(np.int64)


def _model(device="cpu", dropout=0.0):
    return nn.Sequential(nn.Linear(4, 32, device=device), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_fit_learns_and_records_history(device):
    engine.manual_seed(0)
    x, y = _blobs()
    model = _model(device)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), metrics=["accuracy", "f1"], verbose=0)
    history = trainer.fit((x[:200], y[:200]), epochs=8, val_data=(x[200:], y[200:]), batch_size=32)
    assert len(history) == 8
    assert history["val_f1"][-1] >= 0.95
    for key in ("loss", "accuracy", "f1", "val_loss", "val_accuracy", "epoch_time"):
        assert len(history[key]) == 8
    assert history["loss"][-1] < history["loss"][0] / 3
    assert history["val_accuracy"][-1] >= 0.95
    assert trainer.predict(x[200:]).shape == (40, 3)


def test_per_epoch_log_line_and_silence():
    x, y = _blobs(60)
    lines = []
    model = _model()
    Trainer(model, optim.SGD(model.parameters(), lr=0.1), log=lines.append).fit((x, y), epochs=2)
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and "loss" in lines[0] and "samples/s" in lines[0]
    quiet = []
    Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0, log=quiet.append).fit((x, y), epochs=1)
    assert quiet == []


def test_early_stopping_stops_and_restores_best_weights():
    engine.manual_seed(0)
    x, y = _blobs()
    model = _model()
    # lr 0 after the first epoch: val_loss cannot improve, so patience runs out
    opt = optim.SGD(model.parameters(), lr=0.05)
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    scheduler = optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 1 else 0.0)
    trainer = Trainer(model, opt, callbacks=[stopper, LRSchedulerCallback(scheduler)], verbose=0)
    history = trainer.fit((x[:200], y[:200]), epochs=50, val_data=(x[200:], y[200:]))
    assert len(history) < 10
    assert stopper.stopped_epoch is not None
    best = min(history["val_loss"])
    assert trainer.evaluate((x[200:], y[200:]))["loss"] == pytest.approx(best, rel=1e-5)


def test_model_checkpoint_writes_best_and_last(tmp_path):
    x, y = _blobs()
    model = _model()
    ckpt = ModelCheckpoint(tmp_path / "ckpt", monitor="val_accuracy")
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), callbacks=[ckpt], verbose=0)
    trainer.fit((x[:200], y[:200]), epochs=3, val_data=(x[200:], y[200:]))
    assert ckpt.best_path.exists() and ckpt.last_path.exists()
    state = io.load(ckpt.last_path)
    assert state["epoch"] == 3
    assert set(state["model"]) == set(model.state_dict())


def test_nan_guard_stops_with_clear_message_and_keeps_parameters(tmp_path):
    x, y = _blobs(64)
    x[40] = np.nan  # poison one sample of the second batch
    model = _model()
    ckpt = ModelCheckpoint(tmp_path, monitor="loss")
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), callbacks=[ckpt], verbose=0)
    trainer.fit((x[:32], y[:32]), epochs=1, shuffle=False)  # a good epoch: writes a checkpoint
    good = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    saved = ckpt.last_path.read_bytes()
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2, batch 2"):
        trainer.fit((x, y), epochs=2, batch_size=32, shuffle=False)
    after_first_batch = model.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in after_first_batch.values())
    assert ckpt.last_path.read_bytes() == saved
    assert set(good) == set(after_first_batch)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.slow
def test_resume_from_checkpoint_continues_exactly(tmp_path, precision):
    x, y = _blobs()

    def run(epochs, resume=None, save=None):
        engine.manual_seed(5)
        model = _model(dropout=0.2)  # dropout: the RNG state must be restored too
        opt = optim.Adam(model.parameters(), lr=1e-2)
        trainer = Trainer(model, opt, scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7), verbose=0,
                          precision=precision)
        loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=16, shuffle=True)
        if resume:
            trainer.load_checkpoint(resume)
        trainer.fit(loader, epochs=epochs)
        if save:
            trainer.save_checkpoint(save)
        return model, opt

    straight, _ = run(4)
    run(2, save=tmp_path / "half.ckpt")
    resumed, opt = run(4, resume=tmp_path / "half.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7 ** 4)


def test_keras_style_fit_with_validation_split():
    engine.manual_seed(0)
    x, y = _blobs()
    history = fit(_model(), x, y, epochs=5, batch_size=32, validation_split=0.2, lr=1e-2, verbose=0)
    assert history["val_accuracy"][-1] > 0.9


def test_bad_metric_and_split_errors():
    model = _model()
    with pytest.raises(ValueError, match="unknown metric"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.1), metrics=["acuracy"])
    x, y = _blobs(20)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0)
    with pytest.raises(ValueError, match="validation_split"):
        trainer.fit((x, y), validation_split=1.5)


def test_regression_with_mse_metric():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    model = nn.Linear(3, 1)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=0.05), loss_fn=F.mse_loss, metrics=["mse"], verbose=0)
    history = trainer.fit((x, y), epochs=30, batch_size=64)
    assert history["mse"][-1] < 1e-2


# ---- what the read-back window holds -----------------------------------------------------------------

class _WindowBytes(engine.train.Callback):
    """The bytes the Trainer's read-back window holds after each batch (before a read empties it)."""

    def __init__(self):
        self.held = []

    def on_batch_end(self, trainer, batch, logs):
        self.held.append(trainer._epoch_state.window.held_bytes())


@pytest.mark.parametrize("metrics", [(), ("accuracy", "f1"), ("top5_accuracy",)], ids=["none", "labels", "scores"])
def test_the_read_back_window_keeps_only_what_the_metrics_need(metrics):
    """With sync_every=4 the window holds 3 batches after batch 3. Without metrics it keeps the losses
    alone (not the (16, 1000) outputs); accuracy/F1 keep each sample's argmax and target; only a
    metric that needs the scores (top-5) keeps them."""
    rng = np.random.default_rng(0)
    classes, batch = 1000, 16
    x = rng.standard_normal((8 * batch, 8)).astype(np.float32)
    y = rng.integers(0, classes, 8 * batch)
    engine.manual_seed(0)
    model = nn.Linear(8, classes)
    probe = _WindowBytes()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), metrics=list(metrics), verbose=0,
                      sync_every=4, callbacks=[probe])
    trainer.fit((x, y), epochs=1, batch_size=batch, shuffle=False)
    losses = 3 * 4  # three float32 loss scalars
    flags = probe.held[2] - losses - {(): 0, ("accuracy", "f1"): 3 * 2 * batch * 8,
                                      ("top5_accuracy",): 3 * (batch * classes * 4 + batch * 8)}[metrics]
    assert 0 <= flags <= 3 * 8, probe.held  # the gradients' finite flags: one small array a batch
    assert probe.held[3] == 0  # read after batch 4: nothing kept


class _OnScores:
    """A metric the Trainer does not know: it gets the full scores, and delegates to ``inner``."""

    def __init__(self, inner):
        self.inner = inner

    def update(self, pred, target):
        assert pred.ndim == 2  # the scores themselves
        self.inner.update(pred, target)

    def compute(self):
        return self.inner.compute()

    def reset(self):
        self.inner.reset()


def test_metrics_on_the_kept_argmax_equal_those_on_the_scores():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 8)).astype(np.float32)
    y = rng.integers(0, 5, 96)
    engine.manual_seed(0)
    model = nn.Linear(8, 5)
    metrics = {"accuracy": engine.metrics.Accuracy(), "f1": engine.metrics.F1Score(average="macro"),
               "accuracy_on_scores": _OnScores(engine.metrics.Accuracy()),
               "f1_on_scores": _OnScores(engine.metrics.F1Score(average="macro"))}
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), metrics=metrics, verbose=0, sync_every=3)
    history = trainer.fit((x, y), epochs=2, batch_size=16, shuffle=False)
    assert history["accuracy"] == history["accuracy_on_scores"] and history["f1"] == history["f1_on_scores"]

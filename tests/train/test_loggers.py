"""Logging: CSVLogger and TensorBoard's SummaryWriter (checked against torch's, event by event)."""

import csv

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import errors, nn, optim
from engine.data import DataLoader, TensorDataset
from engine.train import CSVLogger, TensorBoardLogger, Trainer


def _trainer(callbacks, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 1))).astype(np.float32)
    engine.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.05), loss_fn=F.mse_loss, metrics=["mse"],
                      verbose=0, callbacks=callbacks)
    loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=8, shuffle=False)
    return trainer, loader


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_writes_every_epoch_and_resumes_without_duplicates(tmp_path):
    path = tmp_path / "log.csv"
    trainer, loader = _trainer([CSVLogger(path)])
    history = trainer.fit(loader, epochs=3, val_data=loader)
    rows = _rows(path)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert list(rows[0])[:4] == ["epoch", "loss", "mse", "val_loss"]
    np.testing.assert_allclose([float(r["val_loss"]) for r in rows], history["val_loss"], rtol=1e-6)
    trainer.save_checkpoint(tmp_path / "ckpt")

    resumed, loader = _trainer([CSVLogger(path)])
    resumed.load_checkpoint(tmp_path / "ckpt")
    resumed.fit(loader, epochs=5, val_data=loader)
    assert [row["epoch"] for row in _rows(path)] == ["0", "1", "2", "3", "4"]


def test_csv_logger_append_and_new_columns(tmp_path):
    path = tmp_path / "log.csv"
    trainer, loader = _trainer([CSVLogger(path)])
    trainer.fit(loader, epochs=1)  # no validation: no val_ columns yet
    trainer, loader = _trainer([CSVLogger(path, append=True)])
    trainer.fit(loader, epochs=1, val_data=loader)
    rows = _rows(path)
    assert len(rows) == 2 and rows[0]["val_loss"] == "" and float(rows[1]["val_loss"]) > 0


def _events(directory):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                content = getattr(value, kind) if kind else None
                if kind == "histo":
                    content = (content.min, content.max, content.num, content.sum, content.sum_squares,
                               list(content.bucket_limit), list(content.bucket))
                elif kind == "tensor":  # newer readers turn simple_value into a tensor
                    from tensorboard.util import tensor_util

                    content = float(tensor_util.make_ndarray(content).reshape(-1)[0])
                events.append((path.parent.name if path.parent != directory else "", value.tag, event.step, content))
    return sorted(events, key=repr)


def _log_the_same(writer, values):
    writer.add_scalar("loss", 0.5, 0)
    writer.add_scalar("loss", np.float32(0.25), 1)
    writer.add_scalars("run", {"train": 1.0, "val": 2.0}, 3)
    writer.add_histogram("weights", values, 2)
    writer.add_histogram("coarse", values, 2, bins=5, max_bins=3)
    writer.flush()
    writer.close()


@pytest.mark.slow
def test_summary_writer_writes_what_torchs_writes(tmp_path):
    pytest.importorskip("tensorboard")
    torch_tensorboard = pytest.importorskip("torch.utils.tensorboard")
    from engine.utils.tensorboard import SummaryWriter

    values = np.random.default_rng(0).normal(size=(50, 4))
    _log_the_same(SummaryWriter(tmp_path / "ours"), engine.tensor(values, dtype=engine.float64))
    _log_the_same(torch_tensorboard.SummaryWriter(str(tmp_path / "theirs")), values)
    ours, theirs = _events(tmp_path / "ours"), _events(tmp_path / "theirs")
    assert len(ours) == 6 and ours == theirs


def test_tensorboard_logger_feeds_epoch_logs_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    trainer, loader = _trainer([TensorBoardLogger(tmp_path, log_batches=True, histograms=True)])
    history = trainer.fit(loader, epochs=2, val_data=loader)
    events = _events(tmp_path)
    val_losses = [content for _, tag, step, content in sorted(events, key=lambda e: e[2]) if tag == "val_loss"]
    np.testing.assert_allclose(val_losses, history["val_loss"], rtol=1e-6)
    assert {tag for _, tag, _, _ in events} >= {"loss", "mse", "val_loss", "batch/loss", "0.weight", "2.bias"}
    assert max(step for _, tag, step, _ in events if tag == "batch/loss") == 8  # 4 batches x 2 epochs


def test_summary_writer_refuses_what_it_cannot_chart(tmp_path):
    pytest.importorskip("tensorboard")
    from engine.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="add_scalar\\('x'\\): expected one number, got shape \\(2,\\)"):
            writer.add_scalar("x", engine.ones(2))
        with pytest.raises(ValueError, match="nan or inf"):
            writer.add_histogram("h", np.array([1.0, np.nan]))
        with pytest.raises(ValueError, match="empty"):
            writer.add_histogram("h", np.zeros(0))


def test_summary_writer_without_tensorboard_names_the_extra(monkeypatch):
    import builtins

    from engine.train import loggers

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tensorboard\]".*pip install tensorboard'):
        loggers.SummaryWriter("unused")


def test_install_hint_names_the_checkout_and_the_installed_distribution(monkeypatch):
    monkeypatch.setattr(errors, "_distribution", lambda: None)
    assert errors.install_hint("text", "tokenizers") == ('pip install -e ".[text]" from a source checkout, '
                                                        "or pip install tokenizers")
    monkeypatch.setattr(errors, "_distribution", lambda: "gpu-engine")
    assert 'pip install "gpu-engine[text]" for the installed gpu-engine' in errors.install_hint("text", "tokenizers")

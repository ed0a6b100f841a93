"""Callbacks: small objects the Trainer calls at the start and end of training, epochs and batches.

Each hook gets the trainer (read ``trainer.model``, ``trainer.optimizer``, ``trainer.history``; set
``trainer.stop_training = True`` to stop after the current epoch) and a ``logs`` dict of the
figures known at that point (``loss``, ``val_loss``, ``val_accuracy`` ...).

A callback's ``state_dict()`` is part of every checkpoint (``Trainer.save_checkpoint``) and comes
back with ``load_state_dict()`` on resume: it must hold everything the callback would otherwise
forget, so that a resumed run behaves as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.tensor import Tensor


class Callback:
    # Callbacks that write checkpoints run after the others at each epoch end, once the epoch is
    # in the history, so that what they save holds every other callback's state for that epoch.
    saves_checkpoints = False

    def on_train_begin(self, trainer) -> None: ...
    def on_epoch_begin(self, trainer, epoch: int) -> None: ...
    def on_batch_end(self, trainer, batch: int, logs: dict) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Monitor:
    """Tracks the best value of one logged figure; ``mode="auto"`` maximises accuracy-like names."""

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{type(self).__name__}: monitor must be the name of a logged figure "
                             f"('val_loss', 'accuracy' ...), got {monitor!r}")
        if mode == "auto":
            mode = "max" if any(k in monitor for k in ("acc", "f1", "auc", "precision", "recall", "r2")) else "min"
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.best = math.inf if mode == "min" else -math.inf

    def value(self, logs: dict, remedy: str = "") -> float:
        if self.monitor not in logs:
            raise KeyError(f"{type(self).__name__}: monitored metric {self.monitor!r} is not in the logs "
                           f"{sorted(logs)}; pass validation data or monitor a training metric{remedy}")
        return float(logs[self.monitor])

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback, _Monitor):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the model gets back the weights of its best epoch at the end.
    Its whole state (best value and epoch, wait counter, stopped epoch, best weights) is part of
    a checkpoint: a resumed run that had stopped stays stopped (``fit`` trains no further epoch
    and restores the best weights), as does a second ``fit`` in the same process. To train on,
    use a new EarlyStopping.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = True):
        _Monitor.__init__(self, monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.wait, self.best_epoch, self.best_state, self.stopped_epoch = 0, None, None, None

    def on_epoch_end(self, trainer, epoch, logs):
        value = self.value(logs)
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_state = {k: v._data.copy() for k, v in trainer.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_train_begin(self, trainer):
        if self.stopped_epoch is not None:  # this run already stopped (maybe before a resume): stay stopped
            trainer.stop_training = True

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_state is not None and self.stopped_epoch is not None:
            trainer.model.load_state_dict(self.best_state)
            trainer.log(f"early stopping at epoch {self.stopped_epoch + 1}; restored the weights of epoch "
                        f"{self.best_epoch + 1} ({self.monitor} {self.best:.4f})")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch, "best_state": self.best_state}

    def load_state_dict(self, state):
        self.best, self.wait, self.best_epoch = float(state["best"]), int(state["wait"]), state["best_epoch"]
        self.stopped_epoch = state.get("stopped_epoch")
        best_state = state.get("best_state")
        self.best_state = None if best_state is None else {k: _raw(v) for k, v in best_state.items()}


class ModelCheckpoint(Callback, _Monitor):
    """Save a checkpoint after each epoch: always to ``<dir>/last.ckpt``, and to ``<dir>/best.ckpt``
    when ``monitor`` improved. Writes are atomic (engine.save), so a crash never loses the last one.

    It runs after the other callbacks at each epoch end, so a checkpoint holds their state after
    the epoch (a stepped scheduler, EarlyStopping's decision). A monitored figure missing from the
    logs is a KeyError (after ``last.ckpt`` is written), as with EarlyStopping; ``monitor=None``
    writes only ``last.ckpt``. A checkpoint never holds non-finite weights: the save raises
    ``TrainingDiverged`` instead, and the file keeps what it held.
    """

    saves_checkpoints = True

    def __init__(self, directory: str | Path, monitor: str | None = "val_loss", mode: str = "auto",
                 save_last: bool = True):
        _Monitor.__init__(self, monitor or "none", mode)
        self.monitor = monitor
        self.directory, self.save_last = Path(directory), save_last
        if monitor is None and not save_last:
            raise ValueError("ModelCheckpoint: with monitor=None and save_last=False it would write nothing")

    @property
    def best_path(self) -> Path:
        return self.directory / "best.ckpt"

    @property
    def last_path(self) -> Path:
        return self.directory / "last.ckpt"

    def on_epoch_end(self, trainer, epoch, logs):
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.save_last:
            trainer.save_checkpoint(self.last_path)
        if self.monitor is None:
            return
        value = self.value(logs, ", or pass monitor=None to write only last.ckpt")
        if self.improved(value):
            self.best = value
            trainer.save_checkpoint(self.best_path)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = float(state["best"])


class LRSchedulerCallback(Callback):
    """Step an ``engine.optim.lr_scheduler`` scheduler once per epoch (or per batch).

    A ReduceLROnPlateau scheduler is stepped with the monitored figure of the epoch.
    """

    def __init__(self, scheduler, interval: str = "epoch", monitor: str = "val_loss"):
        if interval not in ("epoch", "batch"):
            raise ValueError(f"interval must be 'epoch' or 'batch', got {interval!r}")
        self.scheduler, self.interval, self.monitor = scheduler, interval, monitor

    def _plateau(self) -> bool:
        return type(self.scheduler).__name__ == "ReduceLROnPlateau"

    def on_batch_end(self, trainer, batch, logs):
        if self.interval == "batch" and not self._plateau():
            self.scheduler.step()

    def on_epoch_end(self, trainer, epoch, logs):
        if self._plateau():
            self.scheduler.step(float(logs.get(self.monitor, logs["loss"])))
        elif self.interval == "epoch":
            self.scheduler.step()
        logs["lr"] = self.scheduler.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


def _raw(value):
    """The array inside a Tensor (a loaded checkpoint may hold either)."""
    return value._data if isinstance(value, Tensor) else value

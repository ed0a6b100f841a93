"""Logging a run: a CSV file, and TensorBoard event files.

- :class:`CSVLogger`: a Trainer callback writing one row per epoch (every figure in the logs:
  ``loss``, ``val_loss``, metrics, ``lr`` ...) to a CSV file; needs nothing but the standard library.
- :class:`SummaryWriter`: PyTorch's ``torch.utils.tensorboard.SummaryWriter`` (``add_scalar``,
  ``add_scalars``, ``add_histogram``, ``flush``, ``close``) writing TensorBoard event files
  through the ``tensorboard`` package (the ``tensorboard`` extra). Also importable as
  ``engine.utils.tensorboard.SummaryWriter``, PyTorch's import path.
- :class:`TensorBoardLogger`: a Trainer callback feeding a SummaryWriter the epoch logs (and,
  optionally, the batch loss and the parameters' histograms).

Example:
    >>> trainer = Trainer(model, opt, callbacks=[CSVLogger("runs/log.csv"),        # doctest: +SKIP
    ...                                          TensorBoardLogger("runs/tb")])
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from datetime import datetime

import numpy as np

from engine import backend
from engine.io import write_atomically
from engine.tensor import Tensor
from engine.train.callbacks import Callback

__all__ = ["CSVLogger", "SummaryWriter", "TensorBoardLogger"]


# ---- CSV ------------------------------------------------------------------------------------------

class CSVLogger(Callback):
    """Write the logs of every epoch as a row of a CSV file (Keras' ``CSVLogger``).

    The columns are ``epoch`` then every figure logged so far, in the order first seen; a figure
    an epoch did not log is left empty. The file is rewritten atomically after each epoch, so it
    is always complete and readable (by ``csv``, pandas, a spreadsheet). The rows are part of the
    callback's ``state_dict``, so a resumed run goes on with the same file, without duplicates.

    Args:
        filename: the CSV file (its directory must exist).
        append: keep the rows of an existing file (read back on the first epoch) instead of
            starting a new one.
    """

    def __init__(self, filename, append: bool = False):
        self.filename, self.append = os.fspath(filename), append
        self.rows: list[dict] = []
        self._loaded = False

    def on_train_begin(self, trainer) -> None:
        if self.append and not self._loaded and os.path.exists(self.filename):
            with open(self.filename, newline="", encoding="utf-8") as f:
                self.rows = [dict(row) for row in csv.DictReader(f)]
        self._loaded = True

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        self.rows.append({"epoch": epoch, **{key: _number(value) for key, value in logs.items()}})
        self._write()

    def _write(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        data = text.getvalue().encode("utf-8")
        write_atomically(self.filename, lambda f: f.write(data), op="CSVLogger")

    def state_dict(self) -> dict:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self._loaded = [dict(row) for row in state.get("rows", [])], True


def _number(value):
    """A logged value as a plain Python number (a 0-d Tensor or numpy scalar included)."""
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- TensorBoard ----------------------------------------------------------------------------------

def _tensorboard():
    """The parts of the ``tensorboard`` package the writer uses; ImportError naming the extra."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as exc:
        from engine.errors import install_hint

        hint = install_hint("tensorboard", "tensorboard")
        raise ImportError(f"SummaryWriter needs the tensorboard package: {hint}") from exc
    return Event, Summary, HistogramProto, EventFileWriter


def _default_bins() -> list[float]:
    """TensorFlow's histogram buckets (as PyTorch's ``bins="tensorflow"``): +-1e-12 * 1.1^k up to 1e20, and 0."""
    limits, value = [], 1e-12
    while value < 1e20:
        limits.append(value)
        value *= 1.1
    return [-v for v in reversed(limits)] + [0.0] + limits


class SummaryWriter:
    """TensorBoard event files, with PyTorch's ``SummaryWriter`` API.

    Args:
        log_dir: the directory of the event files; default ``runs/<date>_<host><comment>`` as in PyTorch.
        comment: appended to the default ``log_dir``.
        purge_step: accepted for PyTorch's signature; events are never purged.
        max_queue: events kept in memory before a write.
        flush_secs: seconds between automatic flushes.
        filename_suffix: appended to the event file's name.

    Values may be Python numbers, numpy arrays or scalars, or Tensors (a GPU tensor is read once,
    when the value is logged). ``tensorboard --logdir runs`` shows them.
    """

    def __init__(self, log_dir=None, comment: str = "", purge_step=None, max_queue: int = 10, flush_secs: int = 120,
                 filename_suffix: str = ""):
        self._event, self._summary, self._histogram, self._file_writer = _tensorboard()
        if log_dir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            log_dir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        self.log_dir = os.fspath(log_dir)
        self._options = {"max_queue_size": max_queue, "flush_secs": flush_secs, "filename_suffix": filename_suffix}
        self._writer = self._file_writer(self.log_dir, **self._options)
        self._children: dict[str, object] = {}  # add_scalars' per-tag writers

    def get_logdir(self) -> str:
        return self.log_dir

    def _add(self, value, global_step, walltime, writer=None) -> None:
        summary = self._summary(value=[value])
        event = self._event(summary=summary, wall_time=time.time() if walltime is None else walltime)
        if global_step is not None:
            event.step = int(global_step)
        (writer or self._writer).add_event(event)

    def add_scalar(self, tag: str, scalar_value, global_step=None, walltime=None, new_style: bool = False,
                   double_precision: bool = False) -> None:
        """Log one number under ``tag`` at ``global_step``."""
        value = self._summary.Value(tag=tag, simple_value=_scalar("add_scalar", tag, scalar_value))
        self._add(value, global_step, walltime)

    def add_scalars(self, main_tag: str, tag_scalar_dict: dict, global_step=None, walltime=None) -> None:
        """Several numbers in one chart: as PyTorch, each goes to its own run ``<log_dir>/<main_tag>_<tag>``."""
        for tag, scalar in tag_scalar_dict.items():
            directory = os.path.join(self.log_dir, f"{main_tag.replace('/', '_')}_{tag}")
            if directory not in self._children:
                self._children[directory] = self._file_writer(directory, **self._options)
            value = self._summary.Value(tag=main_tag, simple_value=_scalar("add_scalars", f"{main_tag}/{tag}", scalar))
            self._add(value, global_step, walltime, self._children[directory])

    def add_histogram(self, tag: str, values, global_step=None, bins="tensorflow", walltime=None,
                      max_bins=None) -> None:
        """The distribution of ``values`` (any shape) under ``tag``; ``bins`` as ``numpy.histogram``'s,
        or "tensorflow" (TensorFlow's exponential buckets, PyTorch's default)."""
        array = np.asarray(_host(values), dtype=np.float64).reshape(-1)
        if array.size == 0:
            raise ValueError(f"add_histogram({tag!r}): the values are empty")
        if not np.isfinite(array).all():
            raise ValueError(f"add_histogram({tag!r}): the values hold nan or inf")
        histogram = self._make_histogram(array, _default_bins() if bins == "tensorflow" else bins, max_bins)
        self._add(self._summary.Value(tag=tag, histo=histogram), global_step, walltime)

    def _make_histogram(self, values: np.ndarray, bins, max_bins):
        counts, limits = np.histogram(values, bins=bins)
        if max_bins is not None and len(counts) > max_bins:  # merge neighbouring buckets, as PyTorch does
            group = len(counts) // max_bins
            counts = np.pad(counts, (0, -len(counts) % group)).reshape(-1, group).sum(axis=1)
            limits = np.append(limits[:-1:group], limits[-1])
        nonzero = np.flatnonzero(counts)
        start, end = int(nonzero[0]), int(nonzero[-1]) + 1
        # TensorBoard keeps right bucket limits only: an empty bucket on the left keeps the lowest limit
        counts = counts[start - 1:end] if start > 0 else np.concatenate([[0], counts[:end]])
        limits = limits[start:end + 1]
        return self._histogram(min=values.min(), max=values.max(), num=values.size, sum=values.sum(),
                               sum_squares=values.dot(values), bucket_limit=limits.tolist(), bucket=counts.tolist())

    def flush(self) -> None:
        """Write every queued event to disk."""
        for writer in (self._writer, *self._children.values()):
            writer.flush()

    def close(self) -> None:
        """Flush and close the event files (the writer cannot be used afterwards)."""
        for writer in (self._writer, *self._children.values()):
            writer.flush()
            writer.close()

    def __enter__(self) -> "SummaryWriter":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _host(values):
    if isinstance(values, Tensor):
        return values.detach().numpy()
    return backend.to_host(values) if backend.is_array(values) else values


def _scalar(op: str, tag: str, value) -> float:
    value = _host(value)
    if getattr(value, "size", 1) != 1:
        raise ValueError(f"{op}({tag!r}): expected one number, got shape {tuple(np.shape(value))}")
    return float(np.asarray(value).reshape(()))


class TensorBoardLogger(Callback):
    """A Trainer callback writing the logs to TensorBoard through a :class:`SummaryWriter`.

    Every figure of an epoch's logs (``loss``, ``val_loss``, metrics ...) is an ``add_scalar`` at
    step = the epoch number; with ``log_batches`` the batch logs (``on_batch_end``'s, every
    ``log_every`` batches) go under ``batch/<name>`` at the global batch count; with
    ``histograms`` each parameter's values are an ``add_histogram`` at each epoch end.

    Args:
        log_dir: passed to SummaryWriter (ignored when ``writer`` is given).
        writer: an existing SummaryWriter to feed.
        log_batches, histograms: see above.
    """

    def __init__(self, log_dir=None, writer: SummaryWriter | None = None, log_batches: bool = False,
                 histograms: bool = False):
        self.writer = writer if writer is not None else SummaryWriter(log_dir)
        self.log_batches, self.histograms = log_batches, histograms
        self.batches = 0

    def on_batch_end(self, trainer, batch: int, logs: dict) -> None:
        self.batches += 1
        if self.log_batches:
            for name, value in logs.items():
                if _is_number(value):
                    self.writer.add_scalar(f"batch/{name}", value, self.batches)

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        for name, value in logs.items():
            if _is_number(value):
                self.writer.add_scalar(name, value, epoch)
        if self.histograms:
            for name, parameter in trainer.model.named_parameters():
                self.writer.add_histogram(name, parameter, epoch)
        self.writer.flush()

    def on_train_end(self, trainer) -> None:
        self.writer.flush()

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))


def _is_number(value) -> bool:
    """A figure TensorBoard can chart (a non-finite loss included: the chart shows it)."""
    value = _number(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)

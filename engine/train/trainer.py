"""The training loop: epochs of train and validation phases, metrics, callbacks, exact resume.

Two ways in, for two habits:

    # PyTorch-style: you build the pieces, the Trainer runs the loop
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-3), loss_fn=F.cross_entropy,
                      metrics=["accuracy"], callbacks=[EarlyStopping(patience=3)])
    history = trainer.fit(train_loader, epochs=20, val_data=val_loader)

    # Keras-style: arrays in, one call
    history = fit(model, x, y, epochs=20, batch_size=64, validation_split=0.1)
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
import warnings
from pathlib import Path

import numpy as np

import engine.functional as F
from engine import amp, backend, dtypes, io, metrics as metrics_module
from engine.autograd import no_grad
from engine.errors import EngineError
from engine.data import DataLoader, TensorDataset
from engine.ops import concatenate
from engine.tensor import Tensor
from engine.train import distributed as _distributed
from engine.train import graphed
from engine.train.callbacks import Callback, LRSchedulerCallback
from engine.train.progress import ProgressBar


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite, or a save met non-finite weights; the
    message says which batches, what was stepped and what state was kept."""


class History:
    """Every logged figure per epoch: ``history["val_loss"]`` is a list, one value per epoch."""

    def __init__(self, history: dict | None = None):
        self.history: dict[str, list[float]] = {k: list(v) for k, v in (history or {}).items()}

    def append(self, logs: dict) -> None:
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __len__(self) -> int:
        return len(self.history.get("loss", []))

    def __repr__(self) -> str:
        return f"History({', '.join(f'{k}[{len(v)}]' for k, v in self.history.items())})"


# Names accepted in ``metrics=``, each with the streaming metric it makes.
METRICS = {
    "accuracy": lambda: metrics_module.Accuracy(),
    "top5_accuracy": lambda: metrics_module.TopKAccuracy(k=5),
    "precision": lambda: metrics_module.Precision(average="macro"),
    "recall": lambda: metrics_module.Recall(average="macro"),
    "f1": lambda: metrics_module.F1Score(average="macro"),
    "mse": lambda: metrics_module.MeanSquaredError(),
    "mae": lambda: metrics_module.MeanAbsoluteError(),
}


class Trainer:
    """Runs training for a model, an optimizer and a loss on the model's device.

    Args:
        model: an ``engine.nn.Module``.
        optimizer: an ``engine.optim`` optimizer over the model's parameters.
        loss_fn: ``loss_fn(output, target) -> scalar Tensor`` (default ``F.cross_entropy``).
        metrics: names from ``METRICS`` or a dict name -> streaming metric (update/compute/reset).
        callbacks: ``Callback`` objects (EarlyStopping, ModelCheckpoint, LRSchedulerCallback ...).
        scheduler: an lr scheduler stepped once per epoch (shorthand for an LRSchedulerCallback).
        grad_clip_norm: clip the gradients' global norm to this before each step.
        verbose: 0 silent, 1 one line per epoch (+ a progress bar on a terminal).
        log: where the per-epoch lines go (default ``print``).
        sync_every: read the loss on the host (for the NaN guard, the progress bar, the metrics
            and ``on_batch_end``'s logs) every this many batches, and at the end of each epoch.
            Default: every batch on the CPU, where a read costs nothing, so a non-finite loss
            or gradient stops training before its step; every ``GPU_SYNC_EVERY`` batches on a
            GPU, where each read waits for the device and would stall every step. In between,
            the losses, the gradients' finite flags and the batches' outputs stay on the device.
        accumulate_steps: gradient accumulation: sum the gradients of this many consecutive
            batches (each loss scaled by 1 / the group's size) and take one optimizer step per
            group; the last group of an epoch may be shorter. With a mean-reduced loss, k batches
            of B samples step as one batch of k·B (to float32 rounding; a short last batch weighs
            as much as a full one, as in the usual ``loss / k`` loop). A model with
            ``no_sync()`` (DistributedDataParallel) skips the gradient all-reduce on all but the
            last batch of each group. A checkpoint taken mid-group resumes from the group's start.
        distributed: data parallelism over the ranks of ``mpiexec`` (True; None: when a process
            group is initialized): wraps the model in DistributedDataParallel, shards the training
            loader with a DistributedSampler, combines the epoch's figures over the ranks, and lets
            only rank 0 print and write checkpoints (engine/train/distributed.py).
        precision: Lightning's names. ``"32-true"`` (the default; also ``"32"`` or ``32``): float32.
            ``"bf16-mixed"`` (also ``"bf16"``): the forward pass and the loss run inside
            ``engine.autocast(device type, dtype=bfloat16)``, in training, :meth:`evaluate` and
            :meth:`predict`; parameters, gradients and the optimizer stay float32.
            ``"16-mixed"`` (also ``"16"``, ``16``): the same in float16, with an
            ``engine.amp.GradScaler`` (``trainer.scaler``) scaling the loss: gradients are unscaled
            before clipping, a step whose gradients hold inf or NaN is skipped and the scale
            lowered (the scaler is the NaN guard for gradients; the loss is still checked). The
            aliases warn, as Lightning's do. Unlike Lightning, "16-mixed" runs in float16 on the
            CPU too, instead of switching to bfloat16. Checkpoints hold the precision and the
            scaler's state.
        cuda_graph: capture the whole training step (forward, loss, backward, clipping, the NaN
            guard's flag, the optimizer step, the GradScaler's skip and update) in one CUDA graph
            after ``cuda_graph_warmup`` eager batches, and replay it for every later batch, its
            inputs copied into static tensors (engine/train/graphed.py). Needs the model on a
            CUDA device (on the CPU it raises a DeviceError naming the device), an optimizer built
            with ``capturable=True``, ``accumulate_steps=1``, no data parallelism, and a model
            without random draws (dropout) in training. Every batch must have the captured shape,
            except an epoch's shorter last batch, which runs eagerly. The NaN guard's flag is
            read after the replay, so with ``sync_every=1`` a non-finite batch has been stepped on
            (the GradScaler of "16-mixed" still skips steps with inf/NaN gradients, on the device).
        cuda_graph_warmup: eager batches before the capture (they create the optimizer's state).

    The NaN guard checks every batch's loss and, on the device, whether all its gradients (after
    clipping) are finite; both are read together, before the step with ``sync_every=1``, else
    at the next read. A checkpoint never holds non-finite weights: :meth:`save_checkpoint` (and
    so ``ModelCheckpoint``) refuses them. A checkpoint taken mid-epoch (say in an ``except
    KeyboardInterrupt`` handler) counts only the batches whose optimizer step is done, with the
    epoch's running loss and metrics and the RNG state the next batch starts from, so a resumed
    run sees exactly the batches, and computes exactly the parameters, of an uninterrupted one.
    """

    def __init__(self, model, optimizer, loss_fn=F.cross_entropy, metrics=("accuracy",), callbacks=(),
                 scheduler=None, grad_clip_norm: float | None = None, verbose: int = 1, log=print,
                 sync_every: int | None = None, accumulate_steps: int = 1, distributed: bool | None = None,
                 precision: str | int = "32-true", cuda_graph: bool = False, cuda_graph_warmup: int = 3):
        if isinstance(accumulate_steps, bool) or not isinstance(accumulate_steps, int) or accumulate_steps < 1:
            raise ValueError(f"Trainer: accumulate_steps must be a positive int, got {accumulate_steps!r}")
        self.accumulate_steps = accumulate_steps
        if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int)
                                       or sync_every < 1):
            raise ValueError(f"Trainer: sync_every must be a positive int or None, got {sync_every!r}")
        self.sync_every = sync_every
        self.precision = precision_flag(precision)
        self.distributed = _distributed.enabled(distributed)  # see engine/train/distributed.py
        if self.distributed:
            model = _distributed.wrap(model)
            verbose = verbose if _distributed.is_main() else 0
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.metrics = _metric_table(metrics)
        self.callbacks: list[Callback] = list(callbacks)
        if scheduler is not None:
            self.callbacks.append(LRSchedulerCallback(scheduler))
        self.grad_clip_norm, self.verbose, self._log = grad_clip_norm, verbose, log
        self.scaler = _grad_scaler(self.precision, self.device.type)
        self.history = History()
        self.epoch = 0  # epochs completed
        self.stop_training = False
        self.train_loader = None
        self._pending_loader_state = None
        self._pending_rng = None  # restored RNG state, set again once fit has built its loaders
        self._resume_progress = None  # a restored mid-epoch position, for the next epoch to continue
        self._epoch_state: _EpochState | None = None  # the epoch in progress (or cut short by an exception)
        self._graphed = None
        if cuda_graph:
            graphed.check_setup(self)
            self._graphed = graphed.GraphedStep(self, cuda_graph_warmup)

    @property
    def device(self):
        params = list(self.model.parameters())
        return params[0].device if params else backend.default_device()

    def log(self, message: str) -> None:
        if self.verbose:
            self._log(message)

    def autocast(self):
        """The region the forward pass and the loss run in: ``engine.autocast`` on the model's
        device type in the precision's dtype; a region that changes nothing for "32-true"."""
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else amp.autocast(self.device.type, dtype=dtype)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, train_data, epochs: int = 1, val_data=None, batch_size: int = 32, shuffle: bool = True,
            validation_split: float = 0.0) -> History:
        """Train until ``epochs`` epochs are complete (counting epochs restored from a checkpoint).

        ``train_data``/``val_data``: DataLoaders, or ``(x, y)`` pairs of tensors/arrays that are
        batched with ``batch_size``. ``validation_split`` holds out the last fraction of ``(x, y)``.
        """
        if validation_split and isinstance(train_data, DataLoader):
            raise ValueError("fit: validation_split needs (x, y) arrays, not a DataLoader; pass val_data instead")
        if validation_split:
            train_data, val_data = _split_tail(train_data, validation_split)
        if self._epoch_state is not None:  # the last fit stopped mid-epoch (an exception): continue it
            self._resume_from(self._epoch_state)
        self.train_loader = _loader(train_data, batch_size, shuffle)
        if self.distributed:
            self.train_loader = _distributed.shard(self.train_loader)
        val_loader = None if val_data is None else _loader(val_data, batch_size, False)
        if self._pending_loader_state is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(self._pending_loader_state)
        self._pending_loader_state = None
        if self._pending_rng is not None:  # building a shuffling loader drew from the RNG: restore it again
            backend.set_rng_state(self._pending_rng)
            self._pending_rng = None
        self.stop_training = False
        self._call("on_train_begin")
        while self.epoch < epochs and not self.stop_training:
            logs = self._run_epoch(self.train_loader, val_loader, epochs)
            self.epoch += 1
            self._epoch_state = None
            self._end_epoch(logs)
            self.log(_epoch_line(self.epoch, epochs, logs))
        self._call("on_train_end")
        return self.history

    def _end_epoch(self, logs: dict) -> None:
        """``on_epoch_end``: the callbacks that write checkpoints run last, once the epoch is in the
        history, so that a checkpoint holds every other callback's state after this epoch."""
        savers = [cb for cb in self.callbacks if getattr(cb, "saves_checkpoints", False)]
        for callback in self.callbacks:
            if callback not in savers:
                callback.on_epoch_end(self, self.epoch - 1, logs)
        self.history.append(logs)
        for callback in savers:
            callback.on_epoch_end(self, self.epoch - 1, logs)

    def _run_epoch(self, loader, val_loader, epochs: int) -> dict:
        self._call("on_epoch_begin", self.epoch)
        self.model.train()
        _distributed.set_epoch(loader, self.epoch)
        resume = self._resume_progress
        window = _UnreadBatches(self, self._new_metrics(), ProgressBar(len(loader), f"epoch {self.epoch + 1}/{epochs}",
                                                                 enabled=self.verbose > 0))
        batches, loader_state, first = self._epoch_batches(loader, resume)
        if resume is not None:
            window.restore(resume)
        state = self._epoch_state = _EpochState(self.epoch, loader_state, first, window)
        self._resume_progress = None
        sync_every = self.sync_every or (1 if self.device.type == "cpu" else GPU_SYNC_EVERY)
        start, samples_before = time.perf_counter(), window.samples
        for batch_index, (x, y) in enumerate(batches, start=first):
            group_start, group_size, steps = self._accumulation_group(batch_index, first, len(loader))
            if batch_index == group_start:
                state.begin_batch()  # a resume mid-group reruns the group from here, with this RNG state
            x, y = self._to_device(x), self._to_device(y)
            if self._graphed is not None and self._graphed.runs(x, y, batch_index, len(loader)):
                loss, output, flag = self._graphed.step(x, y)
                window.add(batch_index, loss, output, y, flag)
            else:
                warmup = self._graphed is not None and self._graphed.warming_up()
                with self._graphed.warmup_stream() if warmup else contextlib.nullcontext():
                    if not self._eager_batch(x, y, batch_index, group_start, group_size, steps, window, sync_every):
                        continue  # accumulating: no step
                if warmup:
                    self._graphed.end_warmup_batch()
            state.end_batch(batch_index)
            if len(window) >= sync_every:
                window.read()
            self._call("on_batch_end", batch_index, window.batch_logs(batch_index))
        window.read()
        window.bar.close()
        seconds = time.perf_counter() - start
        logs = {"loss": window.loss_sum / max(window.samples, 1), **_compute(window.meters)}
        if val_loader is not None:
            logs.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
        logs["epoch_time"] = seconds
        logs["samples_per_s"] = (window.samples - samples_before) / max(seconds, 1e-9)
        if self.distributed:
            logs = _distributed.reduce_epoch_logs(logs, window.samples)
        return logs

    def _eager_batch(self, x, y, batch_index, group_start, group_size, steps, window, sync_every) -> bool:
        """One batch without a graph: forward, loss, backward, and on a group's last batch the clip,
        the NaN guard and the step (False: a batch that only accumulated gradients)."""
        with self._sync_context(steps):
            if batch_index == group_start:
                self.optimizer.zero_grad()
            output, loss = self._forward_backward(x, y, group_size)
        if not steps:  # accumulating: no clip, no step; read with the group's step, when it counts
            window.add(batch_index, loss, output, y)
            self._call("on_batch_end", batch_index, window.batch_logs(batch_index))
            return False
        self._clip_grads()
        # With a scaler, non-finite gradients are the scaler's business: it skips that step.
        window.add(batch_index, loss, output, y, self._grads_finite() if self.scaler is None else None)
        if sync_every == 1:  # read before the step: a non-finite loss or gradient is never stepped on
            window.read(before_step=True)
        self._step()
        return True

    def _train_step(self, x, y):
        """The whole step on one batch, as ``Trainer(cuda_graph=True)`` captures it: (loss, output,
        the gradients' finite flag or None with a scaler). Gradients are set to None first, so that
        a replay writes them afresh instead of adding to the captured ones."""
        self.optimizer.zero_grad(set_to_none=True)
        output, loss = self._forward_backward(x, y, 1)
        self._clip_grads()
        flag = self._grads_finite() if self.scaler is None else None
        self._step()
        return loss, output, flag

    def _forward_backward(self, x, y, group_size: int):
        """Forward and loss under the precision's autocast, then backward of the loss (divided by
        the accumulation group's size, scaled by the GradScaler): (output, loss)."""
        with self.autocast():
            output = self.model(x)
            loss = self.compute_loss(x, output, y)
        part = loss if group_size == 1 else loss * (1.0 / group_size)
        (part if self.scaler is None else self.scaler.scale(part)).backward()
        return output, loss

    def _clip_grads(self) -> None:
        if self.grad_clip_norm is None:
            return
        from engine.nn.utils import clip_grad_norm_

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)

    def _step(self) -> None:
        """The optimizer step; with a scaler, its step (skipped on inf/NaN gradients) and update."""
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _accumulation_group(self, batch_index: int, first: int, batches: int) -> tuple[int, int, bool]:
        """(first batch, size, whether ``batch_index`` is its last) of the accumulation group holding
        ``batch_index``: groups of ``accumulate_steps`` from the epoch start, cut at the epoch's
        end and, on a resume, at the first batch run."""
        k = self.accumulate_steps
        start = max(batch_index - batch_index % k, first)
        end = min(batch_index - batch_index % k + k, batches)
        return start, end - start, batch_index == end - 1

    def _sync_context(self, steps: bool):
        """DDP's ``no_sync()`` on the batches of a group that do not step (their gradients only
        accumulate locally); a plain context otherwise."""
        if steps or self.accumulate_steps == 1 or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _epoch_batches(self, loader, resume: dict | None):
        """(the epoch's batch iterator, the loader's state at the epoch start, the first batch index).

        A stateful loader (DataLoader) skips the batches a restored state says are done; any other
        iterable of batches is advanced past them here.
        """
        iterator = iter(loader)
        loader_state, first = None, 0
        if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
            loader_state = loader.state_dict()  # taken at the start of this epoch's iteration
            first = int(loader_state.get("batches_done", 0))
        if resume is not None and first != resume["batches_done"]:
            if first:
                raise ValueError(f"Trainer.fit: the checkpoint's epoch {self.epoch + 1} has "
                                 f"{resume['batches_done']} batches done but the loader skips {first}; "
                                 "resume with the loader as it was saved (load_checkpoint, then fit)")
            first = resume["batches_done"]
            iterator = itertools.islice(iterator, first, None)
        return iterator, loader_state, first

    def _grads_finite(self):
        """A device flag: are the gradients the coming step applies finite? (no host read)"""
        check = getattr(self.optimizer, "grads_finite", None)
        if check is not None:
            return check()
        flag = None
        for p in self.model.parameters():
            if p.grad is not None:
                ok = p.grad.xp.all(p.grad.xp.isfinite(p.grad._data), keepdims=True)
                flag = ok if flag is None else flag & backend.to_device(ok, backend.device_of(flag))
        return flag

    def non_finite_grads(self) -> list[str]:
        """Names of the parameters whose gradient holds NaN or inf (reads on the host)."""
        named = [(name, p.grad._data) for name, p in self.model.named_parameters() if p.grad is not None]
        return [name for name, ok in zip((n for n, _ in named), _all_finite([g for _, g in named])) if not ok]

    def check_finite_weights(self, where: str = "Trainer") -> None:
        """Raise :class:`TrainingDiverged` naming the parameters that hold NaN or inf (one host read)."""
        named = list(self.model.named_parameters())
        bad = [(name, p) for (name, p), ok in zip(named, _all_finite([p._data for _, p in named])) if not ok]
        if bad:
            name, p = bad[0]
            values = backend.to_host(p._data)
            counts = f"{int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} inf of {values.size}"
            more = ", ".join(n for n, _ in bad[1:4]) + (" ..." if len(bad) > 4 else "")
            others = f" (and {len(bad) - 1} more: {more})" if len(bad) > 1 else ""
            raise TrainingDiverged(f"{where}: parameter {name!r} holds non-finite values ({counts}){others}; "
                                   "a checkpoint never holds non-finite weights, so nothing was written. The training "
                                   "diverged: reload the last checkpoint, then lower the learning rate, clip gradients "
                                   "(grad_clip_norm) or check the inputs for NaN.")

    def evaluate(self, data, batch_size: int = 256) -> dict:
        """Loss and metrics over ``data`` in eval mode, without recording a graph."""
        loader = _loader(data, batch_size, False)
        self.model.eval()
        meters = self._new_metrics()
        losses, samples = [], 0  # weighted batch losses, kept on the device: one read at the end
        with no_grad():
            for x, y in loader:
                x, y = self._to_device(x), self._to_device(y)
                with self.autocast():
                    output = self.model(x)
                    loss = self.compute_loss(x, output, y)
                losses.append(_float32(loss).reshape(1) * len(x))
                samples += len(x)
                _update_metrics(meters, output, y)
        loss_sum = float(backend.to_host(concatenate(losses)._data).sum(dtype=np.float64)) if losses else 0.0
        return {"loss": loss_sum / max(samples, 1), **_compute(meters)}

    def predict(self, data, batch_size: int = 256) -> Tensor:
        """The model's outputs for ``data`` (a DataLoader, (x, y) pair, or inputs alone), concatenated."""
        if isinstance(data, (Tensor, np.ndarray)):
            data = (data, np.zeros(len(data), np.int64))
        loader = _loader(data, batch_size, False)
        self.model.eval()
        with no_grad(), self.autocast():
            outputs = [self.model(self._to_device(x)) for x, _ in loader]
        return concatenate(outputs, axis=0)

    def compute_loss(self, x: Tensor, output: Tensor, y) -> Tensor:
        """The batch loss; subclasses override it when the loss needs more than (output, y)."""
        return self.loss_fn(output, y)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs: model, optimizer, epoch, RNG, loader position, history, the
        callbacks' states, the precision (and the GradScaler's state with "16-mixed") and,
        mid-epoch, the epoch's progress (batches done, running loss and metrics). Mid-epoch it
        first reads the batches not yet read (a host sync): a checkpoint of an epoch whose unread
        batches turn out non-finite raises :class:`TrainingDiverged`."""
        progress, loader_state, rng = self._position()
        state = {
            "model": _distributed.unwrap(self.model).state_dict(),
            "optimizer": self._optimizer_state(),
            "epoch": self.epoch,
            "rng": rng,
            "history": self.history.history,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "callback_types": [type(cb).__name__ for cb in self.callbacks],
            "precision": self.precision,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if loader_state is not None:
            state["loader"] = loader_state
        if progress is not None:
            state["progress"] = progress
        return state

    def _optimizer_state(self):
        """The optimizer's state dict; a sharded one (ZeroRedundancyOptimizer) is first gathered onto
        rank 0 (a collective: every rank calls it), so the checkpoint holds the whole state and
        loads into a plain optimizer in one process. Other ranks write nothing, so get None."""
        consolidate = getattr(self.optimizer, "consolidate_state_dict", None)
        if consolidate is None:
            return self.optimizer.state_dict()
        consolidate(to=0)
        return self.optimizer.state_dict() if _distributed.is_main() else None

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: every entry is checked first, then all are applied, so a bad
        state raises a :class:`~engine.io.CheckpointError` naming the entry and leaves the model,
        optimizer, scheduler, callbacks, RNG, counters and history exactly as they were.

        Checked before anything changes: the entries are there with their types (``epoch`` and
        the progress counters non-negative ints, ``history`` lists of numbers, the loader state
        and metric states dicts, the precision one of Lightning's names), the RNG state can be set,
        the model state fits the model (``Module.load_state_dict``'s checks). Then the callbacks
        (with the scheduler) load, undone if one refuses, then the GradScaler, undone with them,
        then the optimizer, which checks all of its state before changing any; and only then the
        model's weights, the RNG and the counters.

        A checkpoint of another precision loads with a warning: the run continues in this
        Trainer's precision (a "16-mixed" Trainer's scaler then starts afresh; a "16-mixed"
        checkpoint's scaler state is not used by another precision). A checkpoint from before
        precisions were recorded counts as "32-true".
        """
        model = _distributed.unwrap(self.model)
        try:
            _check_trainer_state(state)
            saved_precision = _check_precision_entries(state)
            own, values, _ = model._checked_state(state["model"], strict=True)
        except EngineError as exc:
            raise _bad_entry(getattr(exc, "entry", "model"), exc) from exc
        if saved_precision != self.precision:
            warnings.warn(f"Trainer.load_state_dict: the checkpoint was trained with precision={saved_precision!r}; "
                          f"this Trainer continues with precision={self.precision!r}"
                          + (" and a fresh GradScaler" if self.scaler is not None else ""), stacklevel=2)
        self._load_callbacks_or_undo(state.get("callbacks", []), state.get("callback_types"))
        scaler_backup = None
        if self.scaler is not None and "scaler" in state:
            scaler_backup = self.scaler.state_dict()
            try:
                self.scaler.load_state_dict(state["scaler"])
            except Exception as exc:
                self._undo_callbacks()
                raise _bad_entry("scaler", exc) from exc
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            self._undo_callbacks()
            if scaler_backup is not None:
                self.scaler.load_state_dict(scaler_backup)
            raise _bad_entry("optimizer", exc) from exc
        with no_grad():  # checked above: copies of arrays that fit
            for key, value in values.items():
                own[key].copy_(backend.to_device(value, own[key].device))
        progress = state.get("progress")
        self.epoch = int(state["epoch"])
        backend.set_rng_state(state["rng"])
        self._pending_rng = state["rng"]
        self.history = History(state["history"])
        self._pending_loader_state = state.get("loader")
        if self._graphed is not None:  # the optimizer's buffers were rebuilt: warm up and capture again
            self._graphed.reset()
        self._resume_progress = None if progress is None else \
            {**progress, "batches_done": int(progress["batches_done"])}
        self._epoch_state = None

    def _load_callbacks_or_undo(self, states, types) -> None:
        """Load the callbacks' states; if one refuses, put every callback back as it was and raise."""
        self._callback_backups = [(cb, cb.state_dict()) for cb in self.callbacks]
        try:
            self._load_callbacks(states, types)
        except Exception as exc:
            self._undo_callbacks()
            raise _bad_entry("callbacks", exc) from exc

    def _undo_callbacks(self) -> None:
        for callback, backup in self._callback_backups:
            callback.load_state_dict(backup)

    def save_checkpoint(self, path: str | Path) -> None:
        """Everything needed to continue exactly (see :meth:`state_dict`), written atomically.

        Raises:
            TrainingDiverged: a parameter holds NaN or inf; nothing is written, so ``path`` keeps
                what it held. A checkpoint never holds non-finite weights.
        """
        state = self.state_dict()
        self.check_finite_weights(f"Trainer.save_checkpoint({str(path)!r})")
        if _distributed.is_main():
            io.save(state, path)
        if self.distributed:
            _distributed.barrier()  # the other ranks go on once rank 0's file is written

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`; the next ``fit`` continues from it.

        Raises:
            CheckpointError: the file is not a readable checkpoint, or an entry of it does not fit
                this Trainer (named with the file); nothing was changed (see :meth:`load_state_dict`).
        """
        state = io.load(path, map_location=self.device)
        try:
            self.load_state_dict(state)
        except io.CheckpointError as exc:
            raise io.CheckpointError(f"Trainer.load_checkpoint({str(path)!r}): {exc}") from exc

    def _position(self):
        """(epoch progress or None, loader state or None, RNG state) for a checkpoint taken now."""
        if self._epoch_state is not None:
            return self._epoch_state.position()
        loader_state = self._pending_loader_state
        if loader_state is None and self.train_loader is not None and hasattr(self.train_loader, "state_dict"):
            loader_state = self.train_loader.state_dict()
        rng = self._pending_rng if self._pending_rng is not None else backend.get_rng_state()
        return self._resume_progress, loader_state, rng

    def _resume_from(self, epoch_state: "_EpochState") -> None:
        """Continue an epoch that an exception cut short as a checkpoint taken then would."""
        self._resume_progress, self._pending_loader_state, self._pending_rng = epoch_state.position()
        self._epoch_state = None

    def _load_callbacks(self, states, types) -> None:
        if types is None:  # a checkpoint from before callback_types: by position
            for callback, cb_state in zip(self.callbacks, states):
                callback.load_state_dict(cb_state)
            return
        saved: dict[str, list] = {}
        for name, cb_state in zip(types, states):
            saved.setdefault(name, []).append(cb_state)
        for callback in self.callbacks:  # the n-th callback of a type gets the n-th saved state of that type
            queue = saved.get(type(callback).__name__)
            if queue:
                callback.load_state_dict(queue.pop(0))
        unused = [f"{name} x{len(queue)}" for name, queue in saved.items() if queue]
        if unused:
            warnings.warn(f"Trainer.load_state_dict: the checkpoint holds the state of callbacks this Trainer does "
                          f"not have ({', '.join(unused)}); it is not restored", stacklevel=3)

    # ---- helpers -----------------------------------------------------------------------------
    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _new_metrics(self) -> dict:
        """Fresh copies of the metric templates, so train and validation figures never mix."""
        fresh = {name: copy.deepcopy(metric) for name, metric in self.metrics.items()}
        for metric in fresh.values():
            metric.reset()
        return fresh

    def _to_device(self, value):
        if isinstance(value, Tensor):
            return value if value.device == self.device else value.to(self.device)
        return Tensor(np.asarray(value), device=self.device)


def fit(model, x, y, epochs: int = 10, batch_size: int = 32, validation_split: float = 0.0, validation_data=None,
        optimizer: str = "adam", lr: float = 1e-3, loss=F.cross_entropy, metrics=("accuracy",), callbacks=(),
        verbose: int = 1) -> History:
    """Keras-style one call: ``fit(model, x, y, epochs, batch_size, validation_split)``.

    ``optimizer`` is "adam", "adamw", "sgd" or an optimizer instance.
    """
    from engine import optim

    if isinstance(optimizer, str):
        choices = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "rmsprop": optim.RMSprop}
        if optimizer.lower() not in choices:
            raise ValueError(f"fit: unknown optimizer {optimizer!r}; choose one of {sorted(choices)}")
        optimizer = choices[optimizer.lower()](model.parameters(), lr=lr)
    trainer = Trainer(model, optimizer, loss_fn=loss, metrics=metrics, callbacks=callbacks, verbose=verbose)
    return trainer.fit((x, y), epochs=epochs, val_data=validation_data, batch_size=batch_size,
                       validation_split=validation_split)


class _BadEntry(EngineError):
    """A checkpoint entry that does not fit; ``entry`` names it."""

    def __init__(self, entry: str, problem: str):
        super().__init__(problem)
        self.entry = entry


def _bad_entry(entry: str, exc: Exception) -> io.CheckpointError:
    problem = str(exc) if isinstance(exc, _BadEntry) else f"{type(exc).__name__}: {exc}"
    return io.CheckpointError(f"the entry {entry!r} does not fit this Trainer ({problem}); "
                              "nothing was restored: the model, optimizer, scheduler, callbacks and RNG are as they "
                              "were")


_REQUIRED_ENTRIES = ("model", "optimizer", "epoch", "rng", "history")


def _check_trainer_state(state) -> None:
    """Raise _BadEntry for the first entry of a Trainer state that could not be applied (no change)."""
    if not isinstance(state, dict):
        raise _BadEntry("state", f"expected a dict from Trainer.state_dict(), got {type(state).__name__}")
    missing = [key for key in _REQUIRED_ENTRIES if key not in state or state[key] is None]
    if missing:
        raise _BadEntry(missing[0], f"missing: a Trainer checkpoint holds {', '.join(_REQUIRED_ENTRIES)}; "
                                    f"this one lacks {', '.join(missing)}")
    epoch = _count(state["epoch"], "epoch")
    _check_rng(state["rng"])
    history = state["history"]
    if not isinstance(history, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(_is_real(x) for x in v)
            for k, v in history.items()):
        raise _BadEntry("history", "expected a dict of figure name -> list of numbers")
    progress = state.get("progress")
    if progress is not None:
        if not isinstance(progress, dict) or not {"epoch", "batches_done", "loss_sum", "samples"} <= set(progress):
            raise _BadEntry("progress", "expected a dict with epoch, batches_done, loss_sum, samples and metrics")
        if _count(progress["epoch"], "progress") != epoch:
            raise _BadEntry("progress", f"the progress is for epoch {int(progress['epoch']) + 1} but the checkpoint "
                                        f"has {epoch} epochs done; the checkpoint is inconsistent")
        _count(progress["batches_done"], "progress")
        _count(progress["samples"], "progress")
        if not _is_real(progress["loss_sum"]):
            raise _BadEntry("progress", f"loss_sum must be a number, got {progress['loss_sum']!r}")
        metrics = progress.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(
                m is None or isinstance(m, dict) and ("state_dict" in m or isinstance(m.get("attributes"), dict))
                for m in metrics.values()):
            raise _BadEntry("progress", "the metrics' states must be a dict of name -> {'state_dict': ...} or "
                                        "{'attributes': {...}}")
    if state.get("loader") is not None and not isinstance(state["loader"], dict):
        raise _BadEntry("loader", f"expected the data loader's state dict, got {type(state['loader']).__name__}")
    callbacks, types = state.get("callbacks", []), state.get("callback_types")
    if not isinstance(callbacks, (list, tuple)) or types is not None and (
            not isinstance(types, (list, tuple)) or len(types) != len(callbacks)
            or not all(isinstance(t, str) for t in types)):
        raise _BadEntry("callbacks", "expected a list of callback states and a list of as many type names")


def _check_precision_entries(state: dict) -> str:
    """The checkpoint's precision ("32-true" when it has none) once its precision and scaler
    entries are known to fit; else _BadEntry."""
    saved = state.get("precision", "32-true")
    if not isinstance(saved, str) or saved not in PRECISIONS:
        raise _BadEntry("precision", f"expected one of {', '.join(repr(p) for p in PRECISIONS)}, got {saved!r}")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise _BadEntry("scaler", f"expected the GradScaler's state dict, got {type(scaler).__name__}")
    if saved == "16-mixed" and scaler is None:
        raise _BadEntry("scaler", "missing: a '16-mixed' checkpoint holds its GradScaler's state")
    return saved


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _count(value, entry: str) -> int:
    """``value`` as a non-negative int (a Python or numpy int, or a 0-d integer array), else _BadEntry."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise _BadEntry(entry, f"expected a non-negative int, got {value!r}")
    return int(value)


def _check_rng(rng) -> None:
    """Would ``backend.set_rng_state(rng)`` succeed? Tried on a fresh generator, not the engine's."""
    if not isinstance(rng, dict) or "seed" not in rng or "cpu" not in rng:
        raise _BadEntry("rng", f"expected engine.get_rng_state()'s dict with 'seed' and 'cpu', got {str(rng)[:80]}")
    _count(rng["seed"], "rng")
    try:
        np.random.PCG64().state = rng["cpu"]
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, KeyError ... from a made-up state
        raise _BadEntry("rng", f"the CPU generator's state cannot be restored ({type(exc).__name__}: {exc})") \
            from None


# Lightning's precision names this Trainer runs, each with its autocast dtype (None: no autocast),
# and the aliases Lightning accepts for them (those other than 32 warn there, and here).
PRECISIONS = {"32-true": None, "bf16-mixed": np.dtype(dtypes.bfloat16), "16-mixed": np.dtype(np.float16)}
_PRECISION_ALIASES = {"32": "32-true", 32: "32-true", "16": "16-mixed", 16: "16-mixed", "bf16": "bf16-mixed"}
# Lightning's other names: parameters in float64 or 16 bits, or NVIDIA's Transformer Engine.
_NOT_SUPPORTED = {"64-true": "float64 training", "64": "float64 training", 64: "float64 training",
                  "16-true": "float16 parameters", "bf16-true": "bfloat16 parameters",
                  "transformer-engine": "Transformer Engine", "transformer-engine-float16": "Transformer Engine"}


def precision_flag(precision) -> str:
    """Lightning's canonical name for ``precision`` ("32-true", "bf16-mixed" or "16-mixed").

    Raises:
        ValueError: a name that is not Lightning's, or one of Lightning's that this Trainer does
            not run (float64 or 16-bit parameters: cast the model yourself with ``model.to(dtype)``).
    """
    known = type(precision) in (str, int)  # not True (== 1), 32.0 or an unhashable value
    if known and precision in PRECISIONS:
        return precision
    if known and precision in _PRECISION_ALIASES:
        flag = _PRECISION_ALIASES[precision]
        if flag != "32-true":
            warnings.warn(f"`precision={precision}` is supported for historical reasons but its usage is "
                          f"discouraged. Please set your precision to {flag} instead!", stacklevel=3)
        return flag
    accepted = ", ".join(repr(p) for p in (*PRECISIONS, *_PRECISION_ALIASES))
    if known and precision in _NOT_SUPPORTED:
        raise ValueError(f"Trainer: precision={precision!r} ({_NOT_SUPPORTED[precision]}) is one of Lightning's "
                         f"precisions that this Trainer does not run; it takes {accepted}")
    raise ValueError(f"Trainer: precision={precision!r} is not a precision; use one of {accepted} (Lightning's names)")


def _grad_scaler(precision: str, device_type: str):
    """An ``engine.amp.GradScaler`` for "16-mixed" on ``device_type``; None for the others."""
    if precision != "16-mixed":
        return None
    return amp.GradScaler(device=device_type)


def _float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16 or bfloat16 (an autocast output), else ``t`` itself."""
    return t.float() if dtypes.is_low_precision(t.dtype) else t


def _metric_table(metrics) -> dict:
    """name -> streaming metric used as a template; names resolve through ``METRICS``."""
    if isinstance(metrics, dict):
        return dict(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Trainer: unknown metric names {unknown}; known: {sorted(METRICS)}, "
                         "or pass a dict name -> streaming metric")
    return {name: METRICS[name]() for name in metrics}


# Batches between host reads of the loss on a GPU (Trainer(sync_every=None)): each read waits for
# the device; one per 20 batches costs under a few percent even for millisecond steps.
GPU_SYNC_EVERY = 20


class _EpochState:
    """Where the epoch in progress stands: what a checkpoint taken mid-epoch needs to resume it."""

    def __init__(self, epoch: int, loader_state: dict | None, first: int, window: "_UnreadBatches"):
        self.epoch, self.loader_state, self.window = epoch, loader_state, window
        self.batches_done = first  # batches of this epoch whose optimizer step is done
        self.rng = None  # the RNG state the batch in progress started from
        self.in_batch = False

    def begin_batch(self) -> None:
        self.rng, self.in_batch = backend.get_rng_state(), True

    def end_batch(self, batch_index: int) -> None:
        """The batch's optimizer step is done: from now on it counts."""
        self.batches_done, self.in_batch = batch_index + 1, False

    def position(self):
        """(progress, loader state, RNG state): the batches done and the state the next one starts from.

        A batch cut short (an exception in its forward, loss or backward) does not count: a resume
        runs it again, from the RNG state it started from.
        """
        self.window.read(committed=self.batches_done)
        progress = {"epoch": self.epoch, "batches_done": self.batches_done, **self.window.totals()}
        loader = None if self.loader_state is None else {**self.loader_state, "batches_done": self.batches_done}
        return progress, loader, self.rng if self.in_batch else backend.get_rng_state()


class _UnreadBatches:
    """The batches of an epoch since the last host read: their losses and their gradients' finite
    flags stay on the device, with what the metrics need of each batch (see :func:`_kept_for_metrics`),
    until ``read()`` brings the losses and flags over in one sync and updates the metrics."""

    def __init__(self, trainer: Trainer, meters: dict, bar: ProgressBar):
        self.trainer, self.meters, self.bar = trainer, meters, bar
        self.loss_sum, self.samples = 0.0, 0  # read so far (host)
        self._pending = []  # (batch index, loss, samples, grads-finite flag or None) not read yet
        self._outputs = []
        self._read_at: dict[int, float] = {}  # batch index -> its loss, for on_batch_end
        self.diverged: str | None = None  # set when a read found stepped non-finite batches

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, batch_index: int, loss: Tensor, output: Tensor, target, grads_finite=None) -> None:
        self._pending.append((batch_index, _float32(loss.detach()), len(output), grads_finite))
        if self.meters:  # with no metrics nothing of the output is kept: only the loss scalar
            self._outputs.append(_kept_for_metrics(self.meters, output, target))

    def held_bytes(self) -> int:
        """Bytes of device (or host) memory the window holds now: losses, flags, kept outputs."""
        arrays = [loss._data for _, loss, _, _ in self._pending]
        arrays += [flag for *_, flag in self._pending if flag is not None]
        for kept in self._outputs:
            arrays += [v._data if isinstance(v, Tensor) else v for v in kept.values() if v is not None]
        return sum(int(getattr(a, "nbytes", 0)) for a in arrays)

    def read(self, before_step: bool = False, committed: int | None = None) -> None:
        """One host read for the whole window: losses and gradient flags (the NaN guard), then the
        metrics.

        ``before_step``: the last batch's optimizer step has not been taken yet.
        ``committed``: only batches before this index count (a checkpoint mid-batch); later ones
        are dropped, to be run again on resume.
        """
        if self.diverged is not None:
            raise TrainingDiverged(f"this epoch diverged, so it cannot be checkpointed or continued (load a checkpoint "
                                   f"with Trainer.load_checkpoint to go on): {self.diverged}")
        if committed is not None:
            keep = [i for i, entry in enumerate(self._pending) if entry[0] < committed]
            self._pending = [self._pending[i] for i in keep]
            self._outputs = [self._outputs[i] for i in keep] if self._outputs else []  # none kept without metrics
        if not self._pending:
            return
        values, grads_ok = self._transfer()
        last = self._pending[-1][0]
        for (index, _, n, _), value, finite_grads in zip(self._pending, values, grads_ok):
            if not (math.isfinite(value) and finite_grads):
                self.bar.close()
                message = self._diverged_message(index, value, before_step)
                self._pending, self._outputs = [], []
                if not (before_step and index == last):  # stepped on: nothing after it can be trusted
                    self.diverged = message
                raise TrainingDiverged(message)
            self.loss_sum, self.samples = self.loss_sum + value * n, self.samples + n
            self._read_at[index] = value
        for kept in self._outputs:
            for meter in self.meters.values():
                labels = kept["labels"] if _takes_labels(meter) else None
                meter.update(kept["output"] if labels is None else labels, kept["target"])
        self.bar.update(last + 1, self.samples, self.loss_sum / max(self.samples, 1))
        self._pending, self._outputs = [], []

    def _transfer(self) -> tuple[list[float], list[bool]]:
        """The pending losses and gradient flags, brought to the host in one transfer."""
        first = self._pending[0][1]._data
        xp, device = backend.array_module(first), backend.device_of(first)
        parts = [loss._data.reshape(1) for _, loss, _, _ in self._pending]
        flagged = [i for i, entry in enumerate(self._pending) if entry[3] is not None]
        parts += [backend.to_device(self._pending[i][3], device).reshape(1).astype(parts[i].dtype) for i in flagged]
        host = backend.to_host(xp.concatenate(parts))
        count = len(self._pending)
        grads_ok = [True] * count
        for i, flag in zip(flagged, host[count:]):
            grads_ok[i] = bool(flag)
        return [float(v) for v in host[:count]], grads_ok

    def totals(self) -> dict:
        """The epoch so far, for a checkpoint: loss sum, samples and the metrics' states."""
        return {"loss_sum": self.loss_sum, "samples": self.samples,
                "metrics": {name: _metric_state(meter) for name, meter in self.meters.items()}}

    def restore(self, progress: dict) -> None:
        """Continue from :meth:`totals` saved in a checkpoint."""
        self.loss_sum, self.samples = float(progress["loss_sum"]), int(progress["samples"])
        for name, meter_state in (progress.get("metrics") or {}).items():
            if name in self.meters and meter_state is not None:
                _load_metric_state(self.meters[name], meter_state)

    def batch_logs(self, batch_index: int) -> dict:
        """``on_batch_end``'s logs: the batch's loss once it has been read, else nothing yet."""
        value = self._read_at.pop(batch_index, None)
        self._read_at.clear()
        return {} if value is None else {"loss": value}

    def _diverged_message(self, index: int, value: float, before_step: bool) -> str:
        epoch = self.trainer.epoch + 1
        last = self._pending[-1][0]
        if not math.isfinite(value):
            where = f"loss became {value} at epoch {epoch}, batch {index + 1}"
        else:
            where = (f"the gradients became non-finite at epoch {epoch}, batch {index + 1} "
                     f"(its loss, {value:.6g}, is finite")
            if before_step and index == last:  # the batch's gradients are still there to name
                names = self.trainer.non_finite_grads()
                where += f"; NaN or inf in the gradients of {', '.join(repr(n) for n in names[:5])}" \
                         f"{' ...' if len(names) > 5 else ''}" if names else ""
            where += ")"
        if before_step and index == last:
            return (f"{where}; the step was not taken, so the model keeps its last finite parameters and saved "
                    "checkpoints are intact. Lower the learning rate, clip gradients (grad_clip_norm) or check "
                    "the inputs and the loss for NaN.")
        return (f"{where} (read after batch {last + 1}: the Trainer reads the loss and its gradients' finite flag "
                f"every sync_every batches); the optimizer stepped on batches {index + 1}..{last + 1}, so the "
                "parameters may no longer be finite. No checkpoint holds them: checkpoints are written only after "
                "this check, and a save refuses non-finite weights. Reload the last checkpoint, then lower the "
                "learning rate, clip gradients (grad_clip_norm), check the inputs and the loss for NaN, or pass "
                "Trainer(sync_every=1) to stop before the bad step.")


def _takes_labels(meter) -> bool:
    """Does ``meter`` score predicted classes only, so the argmax of the scores gives it the same
    figure as the scores themselves (accuracy, and precision/recall/F1 from the confusion matrix)?"""
    return isinstance(meter, (metrics_module.Accuracy, metrics_module.ConfusionMatrix))


def _kept_for_metrics(meters: dict, output: Tensor, target) -> dict:
    """What the window keeps of one batch for its metrics until the next read: for metrics that
    need only the predicted classes, each sample's argmax, taken on the device now (N int64 instead
    of N x C scores: at a GPT's 50257 classes, 6,000 times less); the scores themselves only for
    metrics that need them (top-k accuracy, regression metrics, custom ones)."""
    output = _float32(output.detach())  # an autocast output: the metrics compute in float32
    target = target.detach() if isinstance(target, Tensor) else target
    scores = isinstance(target, Tensor) and output.ndim == target.ndim + 1 and output.ndim >= 2 \
        and output.shape[1] > 1 and output.shape[:1] + output.shape[2:] == target.shape
    by_labels = [_takes_labels(m) and scores for m in meters.values()]
    labels = output.argmax(dim=1) if any(by_labels) else None
    return {"output": None if all(by_labels) else output, "labels": labels, "target": target}


def _update_metrics(meters: dict, output: Tensor, target) -> None:
    if not meters:
        return
    output = _float32(output.detach())
    for meter in meters.values():
        meter.update(output, target.detach() if isinstance(target, Tensor) else target)


def _compute(meters: dict) -> dict:
    return {name: float(meter.compute()) for name, meter in meters.items()}


def _all_finite(arrays: list) -> list[bool]:
    """Does each array hold only finite values? Reduced on each array's device, one read per device."""
    flags, by_device = [None] * len(arrays), {}
    for i, array in enumerate(arrays):
        by_device.setdefault(backend.device_of(array), []).append(i)
    for device, indices in by_device.items():
        xp = backend.array_module(arrays[indices[0]])
        with backend.on_device(device):
            stacked = xp.concatenate([xp.all(xp.isfinite(arrays[i]), keepdims=True).reshape(1) for i in indices])
        for i, ok in zip(indices, backend.to_host(stacked)):
            flags[i] = bool(ok)
    return flags


def _storable(value) -> bool:
    """Can ``engine.save`` hold ``value`` (numbers, strings, arrays and containers of them)?"""
    if value is None or isinstance(value, (bool, int, float, str, np.generic, np.ndarray)) or backend.is_array(value):
        return True
    if isinstance(value, (list, tuple)):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _storable(v) for k, v in value.items())
    return False


def _metric_state(meter) -> dict | None:
    """A streaming metric's state: its ``state_dict()``, else its attributes when they are storable."""
    if hasattr(meter, "state_dict") and hasattr(meter, "load_state_dict"):
        return {"state_dict": meter.state_dict()}
    attributes = vars(meter) if hasattr(meter, "__dict__") else {}
    if not _storable(attributes):
        return None  # a resumed epoch's figure for this metric covers the batches after the resume only
    return {"attributes": copy.deepcopy(attributes)}


def _load_metric_state(meter, state: dict) -> None:
    if "state_dict" in state:
        meter.load_state_dict(state["state_dict"])
        return
    for name, value in state["attributes"].items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]  # engine.load gives 0-d arrays for numpy scalars
        setattr(meter, name, value)


def _loader(data, batch_size: int, shuffle: bool):
    if not isinstance(data, (tuple, list)):
        return data  # a DataLoader or any iterable of (x, y) batches
    x, y = data
    return DataLoader(TensorDataset(_as_tensor(x), _as_tensor(y)), batch_size=batch_size, shuffle=shuffle)


def _as_tensor(value) -> Tensor:
    return value if isinstance(value, Tensor) else Tensor(np.asarray(value))


def _split_tail(data, fraction: float):
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fit: validation_split must be in (0, 1), got {fraction}")
    x, y = (_as_tensor(v) for v in data)
    n_val = max(1, int(round(len(x) * fraction)))
    cut = len(x) - n_val
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _epoch_line(epoch: int, epochs: int, logs: dict) -> str:
    figures = "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in ("epoch_time", "samples_per_s"))
    return f"epoch {epoch}/{epochs}  {figures}  {logs['epoch_time']:.2f}s ({logs['samples_per_s']:.0f} samples/s)"

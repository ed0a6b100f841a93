"""Checks whose answer is computed on the GPU and read at the next natural sync point.

Some input checks need the data: a cross-entropy target outside [0, C) can only be seen by
reading the targets. On the CPU that read is free, so the CPU impls check eagerly. On a GPU,
reading even 16 bytes back waits for every queued kernel (a host sync); one per call would stall
each training step. So the GPU impls reduce the check to a few device values (the targets' min
and max), queue them here, and return. The queued checks are read, all in one transfer, when:

- the engine reads anything from the device anyway (``engine.backend.to_host``: ``.item()``,
  ``.numpy()``, printing a tensor; ``engine.backend.synchronize()``), or
- ``raise_deferred_errors()`` is called (the Trainer calls it when it reads the loss), or
- ``MAX_PENDING`` checks are queued (bounded memory when nothing ever reads: one sync per
  ``MAX_PENDING`` calls at most).

The first failing check then raises its KernelError, naming the op, the bad value and the call.
Meanwhile the kernels stay safe: a row with a bad target never reads out of bounds; it gets a NaN
loss and a zero gradient, so an optimizer step taken before the error is raised leaves every
parameter finite.

``eager_checks(True)`` (or ENGINE_EAGER_CHECKS=1) reads every check at once instead, at the cost
of a sync per call: for debugging, to have the error raised at the call that caused it.

The queue is one per process (behind a lock): with several threads using the GPU, a failed check
queued by one thread surfaces at the next sync point of whichever thread reaches one first.

Inside a CUDA graph capture nothing runs: the check's device values are only computed when the
graph is replayed, so reading them at the next sync would read garbage (a spurious error, or a
real one missed), and a check read once would never see a later replay's data. So a capture
``collect``s its checks instead of queueing them, and every replay queues them again
(:func:`requeue`): one snapshot copy of their values per replay, queued like any check, so an
out-of-range target fed to the 100th replay raises at the next sync as it would eagerly.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import numpy as np

MAX_PENDING = 256

_lock = threading.Lock()
_pending: list[tuple[object, Callable]] = []  # (device array, check(host values) -> raises)
_collecting = threading.local()  # .checks: the list a CUDA graph capture on this thread collects into
_eager = os.environ.get("ENGINE_EAGER_CHECKS", "") not in ("", "0")


def eager_checks(enabled: bool | None = None) -> bool:
    """Read device-side checks at the call that queues them (True) or at the next sync (False).

    With no argument, returns the current setting. Returns the setting in force after the call.
    """
    global _eager
    if enabled is not None:
        _eager = bool(enabled)
    return _eager


def defer(values, check: Callable) -> None:
    """Queue ``check(host_values)`` for the device array ``values`` (read at the next sync).

    A numpy ``values`` (the numba CUDA simulator's arrays) is checked at once: reading it is free.
    """
    if isinstance(values, np.ndarray):
        check(values)
        return
    collected = getattr(_collecting, "checks", None)
    if collected is not None:  # a capture: the values exist only once a replay computes them
        collected.append((values, check))
        return
    if _eager:
        check(values.get())
        return
    with _lock:
        _pending.append((values, check))
        full = len(_pending) >= MAX_PENDING
    if full:
        raise_deferred_errors()


@contextlib.contextmanager
def collect(checks: list):
    """Append the checks queued on this thread to ``checks`` instead of the queue (a graph capture).

    Captures do not nest, and neither does this: the checks of the inner region would be lost.
    """
    if getattr(_collecting, "checks", None) is not None:
        raise RuntimeError("deferred.collect: this thread is already collecting checks (captures do not nest)")
    _collecting.checks = checks
    try:
        yield checks
    finally:
        _collecting.checks = None


def requeue(checks: list) -> None:
    """Queue ``checks`` (collected at a capture) again after a replay has computed their values.

    One device copy of all their values, made on the current stream (after the replay, before the
    next one overwrites them), is what the queue reads, so each replay is checked on its own data.
    """
    if not checks:
        return
    import cupy

    arrays = [values for values, _ in checks]
    snapshot = cupy.concatenate([a.ravel() for a in arrays])
    shapes = [a.shape for a in arrays]

    def check_all(host):
        offset = 0
        for shape, (_, check) in zip(shapes, checks):
            size = int(np.prod(shape, dtype=np.int64))
            check(host[offset:offset + size].reshape(shape))
            offset += size

    defer(snapshot, check_all)


def pending() -> int:
    """How many checks are queued and not yet read."""
    return len(_pending)


def raise_deferred_errors() -> None:
    """Read every queued check (one transfer per device) and raise the first that fails."""
    if not _pending:  # the common case: nothing queued, nothing read
        return
    with _lock:
        queued = list(_pending)
        _pending.clear()
    for values, check in zip(_read_all([v for v, _ in queued]), (c for _, c in queued)):
        check(values)


def _read_all(arrays: list) -> list:
    """Host copies of small int64 device arrays, with one transfer per device (cupy arrays)."""
    import cupy

    by_device: dict[int, list[int]] = {}
    for i, a in enumerate(arrays):
        by_device.setdefault(int(a.device.id), []).append(i)
    host: list = [None] * len(arrays)
    for dev, indices in by_device.items():
        with cupy.cuda.Device(dev):
            flat = cupy.concatenate([arrays[i].ravel() for i in indices]).get()
        offset = 0
        for i in indices:
            size = arrays[i].size
            host[i] = flat[offset:offset + size].reshape(arrays[i].shape)
            offset += size
    return host

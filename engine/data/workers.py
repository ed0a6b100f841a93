"""The DataLoader's worker threads: a small pool that can be walked away from.

``concurrent.futures.ThreadPoolExecutor`` does not fit: its threads are joined when the interpreter
exits (so one ``__getitem__`` that hangs keeps the process alive forever), and shutting it down
waits for every running item. These threads are daemons: leaving a loop (``break``, an error, a
timeout) cancels the batches not yet started and gives the running ones a short grace to end;
a thread still inside ``__getitem__`` after that finishes its item in the background, its result
is dropped, and it never blocks the interpreter's exit.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass

# How long leaving a loop waits for the items the workers are running before abandoning them:
# long enough that ordinary items (milliseconds) end and their threads are joined, short enough
# that a hung item does not hold up the loop.
EXIT_GRACE_S = 0.25


@dataclass
class WorkerInfo:
    """What :func:`get_worker_info` returns inside a worker thread (PyTorch's fields)."""
    id: int
    num_workers: int
    seed: int
    dataset: object


_worker = threading.local()


def get_worker_info() -> WorkerInfo | None:
    """In a DataLoader worker thread: its :class:`WorkerInfo` (``id``, ``num_workers``, ``seed``,
    ``dataset``); in any other thread: None. As in PyTorch."""
    return getattr(_worker, "info", None)


class Task(concurrent.futures.Future):
    """One batch given to the pool; ``worker_id`` is the worker that took it (None until one does)."""

    worker_id: int | None = None


class WorkerThreads:
    """``count`` daemon threads taking tasks from one queue, in submission order.

    Each thread sets its :class:`WorkerInfo` and runs ``worker_init_fn(worker_id)`` once, when it
    starts (as PyTorch's worker processes do); if that raises, every task the thread takes fails
    with that error.
    """

    def __init__(self, count: int, seed: int, dataset, worker_init_fn=None):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = []
        for worker_id in range(count):
            info = WorkerInfo(worker_id, count, seed + worker_id, dataset)
            thread = threading.Thread(target=_work, args=(self._tasks, info, worker_init_fn), daemon=True,
                                      name=f"DataLoader-worker-{worker_id}")
            thread.start()
            self._threads.append(thread)
        self.closed = False

    def submit(self, fn, *args) -> Task:
        task = Task()
        self._tasks.put((task, fn, args))
        return task

    def close(self, grace: float = EXIT_GRACE_S) -> None:
        """Stop the threads once their current task ends; wait at most ``grace`` seconds for that.

        Tasks still queued must have been cancelled by the caller (a thread skips cancelled tasks).
        """
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._tasks.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            if thread is not threading.current_thread():  # a worker may drop the last reference to the loader
                thread.join(max(0.0, deadline - time.monotonic()))


def _work(tasks: queue.SimpleQueue, info: WorkerInfo, worker_init_fn) -> None:
    """A worker thread's loop: run tasks until the pool's stop marker (None)."""
    _worker.info = info
    init_error = None
    if worker_init_fn is not None:
        try:
            worker_init_fn(info.id)
        except BaseException as exc:  # noqa: BLE001  (handed to the loop with each batch this worker takes)
            init_error = exc
    while (item := tasks.get()) is not None:
        task, fn, args = item
        del item  # a finished batch must not stay alive while this thread waits for the next task
        if not task.set_running_or_notify_cancel():
            continue  # the loop left before this batch started
        task.worker_id = info.id
        try:
            if init_error is not None:
                raise init_error
            task.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the loop's thread)
            task.set_exception(exc)
        task = fn = args = None

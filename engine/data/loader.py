"""DataLoader: batches of a dataset, shuffled reproducibly, optionally moved to a device.

Reproducibility: a shuffling loader owns a numpy Generator. Its seed comes from the engine's CPU
generator when the loader is built (so ``engine.manual_seed(s)`` fixes every epoch's order), or
from ``generator=`` (an int seed or a ``np.random.Generator``). ``state_dict()`` captures the
generator as it was at the start of the current epoch plus the number of batches already handed
out, so ``load_state_dict()`` resumes mid-epoch or at an epoch boundary with the exact same batches.

Workers: ``num_workers=N`` loads batches in a pool of N daemon threads (engine/data/workers.py),
ahead of the loop (at most ``prefetch_factor * N`` batches in flight), and hands them out strictly
in sampler order, so a run gives the same batches, bit for bit, with any number of workers. A
failed batch raises as soon as it fails, ``timeout`` bounds the wait for each batch, and leaving
the loop never waits for a hung item (see docs/data.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import math
import numbers
import time
import weakref
from dataclasses import dataclass

import numpy as np

from engine import backend
from engine.autograd import enable_grad, is_grad_enabled, no_grad
from engine.data.dataset import IterableDataset, Subset, TensorDataset, make_generator
from engine.data.samplers import chunks
from engine.data.workers import Task, WorkerInfo, WorkerThreads, get_worker_info  # noqa: F401  (re-exported)
from engine.errors import EngineError, ShapeError
from engine.tensor import Tensor


class DataLoader:
    """Iterate over ``dataset`` in batches; PyTorch's ``torch.utils.data.DataLoader`` signature.

    Args:
        dataset: anything with ``__getitem__`` and ``__len__`` (map style), or an
            :class:`IterableDataset` (read in order, ``batch_size`` items per batch). A
            :class:`TensorDataset` (or a :class:`Subset` of one) with the default collate is
            batched by slicing its arrays once per batch instead of collating item by item.
        batch_size: samples per batch.
        shuffle: a new random order every epoch (from the loader's own seeded generator).
        sampler: iterable of int dataset indices (e.g. RandomSampler, WeightedRandomSampler, a
            list, a generator); excludes ``shuffle``. It is drawn from lazily, ``batch_size``
            indices per batch, so an infinite sampler gives batches forever; ``len(loader)`` needs
            ``len(sampler)``. If it has ``state_dict``/``load_state_dict`` they are saved too.
        batch_sampler: iterable of lists of indices, one list per batch (e.g. :class:`BatchSampler`);
            excludes ``batch_size``, ``shuffle``, ``sampler`` and ``drop_last``, as in PyTorch.
        num_workers: 0 loads each batch in the loop's thread when it is asked for. N > 0 loads
            batches in a pool of N **threads** ahead of the loop and yields them strictly in
            sampler order. Threads rather than processes: the work of a batch (numpy indexing,
            stacking in the collate) releases the GIL for its copies, the dataset is shared
            without pickling it or its arrays, and nothing is forked (forking a process that
            holds a CUDA context is unsafe). A pure-Python ``__getitem__`` that never releases
            the GIL gains little; one that waits on files or sleeps overlaps fully. An error in
            a worker is raised in the loop's thread as soon as it happens, naming the batch and
            the worker; ``next()`` then goes on with the batch after it, as in PyTorch.
        collate_fn: ``collate_fn(list_of_items) -> batch``; default :func:`default_collate`.
        pin_memory: accepted for PyTorch scripts; a no-op (batches are not page-locked; see
            docs/data.md for device transfers).
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        timeout: with workers, seconds to wait for one batch before raising PyTorch's
            ``RuntimeError("DataLoader timed out after N seconds")`` (0: forever; needs workers).
        worker_init_fn: called as ``worker_init_fn(worker_id)`` in each worker thread before it
            loads its first batch (:func:`get_worker_info` works there and in the dataset).
        multiprocessing_context: accepted and ignored (workers are threads).
        generator: int seed or ``np.random.Generator`` for shuffling; default: seeded from the
            engine's RNG (``engine.manual_seed``).
        prefetch_factor: with workers, batches in flight per worker (default 2).
        persistent_workers: keep the worker threads between epochs (needs ``num_workers > 0``);
            else they are started for each epoch and stopped when it ends or the loop is left
            (a thread still inside a hung item is abandoned; it never blocks the exit).
        pin_memory_device, in_order: accepted for PyTorch scripts; batches are always in order.
        device: (engine) move every batch's Tensors to this device ("cuda", "cuda:1" ...).
        prefetch: (engine) with ``device`` set, prepare and transfer batch ``i + 1`` before handing
            out batch ``i`` (a one-batch look-ahead; see docs/data.md for what it buys).

    Example:
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, num_workers=2)  # doctest: +SKIP
        >>> for xb, yb in loader: ...                                                            # doctest: +SKIP
    """

    def __init__(self, dataset, batch_size: int = 1, shuffle: bool | None = False, sampler=None, batch_sampler=None,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False, drop_last: bool = False,
                 timeout: float = 0, worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, pin_memory_device: str = "",
                 in_order: bool = True, device=None, prefetch: bool = True):
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable:
            _check_dataset(dataset)
        shuffle = bool(shuffle)
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise EngineError("DataLoader: batch_sampler is exclusive with batch_size, shuffle, sampler and "
                                  "drop_last; the batch sampler decides the batches")
            if not hasattr(batch_sampler, "__iter__"):
                raise EngineError(f"DataLoader: batch_sampler must be an iterable of lists of indices, got "
                                  f"{type(batch_sampler).__name__}")
        if batch_size is None:
            raise EngineError("DataLoader: batch_size=None (PyTorch's unbatched mode) is not supported; use "
                              "batch_size=1, or index the dataset directly")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise EngineError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if sampler is not None and shuffle:
            raise EngineError("DataLoader: sampler and shuffle=True are exclusive; the sampler decides the order, "
                              "so drop shuffle=True")
        if sampler is not None and not hasattr(sampler, "__iter__"):
            raise EngineError(f"DataLoader: sampler must be an iterable of indices, got {type(sampler).__name__}")
        if self.iterable and (shuffle or sampler is not None or batch_sampler is not None):
            raise EngineError("DataLoader: an IterableDataset decides its own order; shuffle, sampler and "
                              "batch_sampler do not apply to it")
        self._check_workers(num_workers, timeout, prefetch_factor, persistent_workers, worker_init_fn)
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, int(batch_size), shuffle, drop_last
        self.collate_fn, self.sampler, self.batch_sampler, self.prefetch = collate_fn, sampler, batch_sampler, prefetch
        self.num_workers, self.timeout, self.worker_init_fn = int(num_workers), timeout, worker_init_fn
        self.prefetch_factor = (2 if prefetch_factor is None else int(prefetch_factor)) if num_workers else None
        self.persistent_workers, self.pin_memory = bool(persistent_workers), bool(pin_memory)
        self.multiprocessing_context, self.pin_memory_device, self.in_order = \
            multiprocessing_context, pin_memory_device, in_order
        self._pool = None
        self.device = None if device is None else backend.check_available(backend.device(device))
        # Only a shuffling loader draws from the engine RNG, so adding a validation loader
        # does not change the model's initialisation or dropout masks.
        self.generator = make_generator(generator=generator, where="DataLoader") if shuffle or generator is not None \
            else None
        self._epoch_start = self._snapshot()
        self._batches_done = 0
        self._in_epoch = False
        self._resume_batches = 0

    @staticmethod
    def _check_workers(num_workers, timeout, prefetch_factor, persistent_workers, worker_init_fn) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise EngineError(f"DataLoader: num_workers must be a non-negative int, got {num_workers!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout >= 0:
            raise EngineError(f"DataLoader: timeout must be a non-negative number of seconds, got {timeout!r}")
        if timeout and num_workers == 0:
            raise EngineError(f"DataLoader: timeout={timeout} needs num_workers > 0 (PyTorch refuses it too): "
                              "without workers each batch loads in the loop's thread, which cannot time itself "
                              "out; leave timeout=0 or use workers")
        if prefetch_factor is not None:
            if num_workers == 0:
                raise EngineError("DataLoader: prefetch_factor needs num_workers > 0 (as in PyTorch); leave it "
                                  "None for num_workers=0")
            if isinstance(prefetch_factor, bool) or not isinstance(prefetch_factor, (int, np.integer)) \
                    or prefetch_factor < 1:
                raise EngineError(f"DataLoader: prefetch_factor must be a positive int, got {prefetch_factor!r}")
        if persistent_workers and num_workers == 0:
            raise EngineError("DataLoader: persistent_workers=True needs num_workers > 0 (as in PyTorch)")
        if worker_init_fn is not None and not callable(worker_init_fn):
            raise EngineError(f"DataLoader: worker_init_fn must be callable, got {type(worker_init_fn).__name__}")

    # ---- sizes ---------------------------------------------------------------------------------
    def _num_samples(self) -> int:
        if self.iterable and type(self.dataset).__len__ is IterableDataset.__len__:
            raise TypeError(f"DataLoader: len() of a loader over an IterableDataset needs the dataset's __len__, "
                            f"and {type(self.dataset).__name__} has none; iterate instead")
        if self.sampler is None:
            return len(self.dataset)
        if not hasattr(self.sampler, "__len__"):
            raise TypeError(f"DataLoader: len() needs the sampler's length, and this sampler "
                            f"({type(self.sampler).__name__}) has no __len__ (it may be infinite); iterate instead")
        return len(self.sampler)

    def __len__(self) -> int:
        """Batches per epoch (needs ``len(sampler)`` when there is a sampler, as in PyTorch)."""
        if self.batch_sampler is not None:
            if not hasattr(self.batch_sampler, "__len__"):
                raise TypeError(f"DataLoader: len() needs the batch sampler's length, and this batch sampler "
                                f"({type(self.batch_sampler).__name__}) has no __len__; iterate instead")
            return len(self.batch_sampler)
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        skip, self._resume_batches = self._resume_batches, 0
        self._epoch_start = self._snapshot()
        if self.iterable:
            batches = self._iterable_batches()
        elif self.batch_sampler is not None:
            batches = self._batch_sampler_batches()
        elif self.sampler is not None:
            batches = self._sampler_batches()  # lazy: the sampler may be infinite
        else:
            batches = self._batch_indices(self._epoch_order())
            if skip > len(batches):
                raise self._skip_error(skip, len(batches))
        self._in_epoch, self._batches_done = True, skip
        return _Epoch(self, iter(batches), skip)

    def _skip_error(self, skip: int, batches: int) -> EngineError:
        return EngineError(f"DataLoader: the restored state skips {skip} batches but an epoch has {batches}; "
                           "was the state saved from a loader over another dataset or batch size?")

    def _sampler_batches(self):
        """The sampler's indices, ``batch_size`` at a time, drawn one batch at a time."""
        for number, chunk in enumerate(chunks(self.sampler, self.batch_size, self.drop_last)):
            yield _Chunk(chunk, number, number * self.batch_size)

    def _batch_sampler_batches(self):
        """Each list the batch sampler yields, drawn one batch at a time."""
        for number, chunk in enumerate(self.batch_sampler):
            yield _Chunk(chunk, number, None)

    def _iterable_batches(self):
        """Lists of ``batch_size`` items read from an IterableDataset, in its order."""
        for chunk in chunks(self.dataset, self.batch_size, self.drop_last):
            yield _Items(chunk)

    def _epoch_order(self):
        n = len(self.dataset)
        return self.generator.permutation(n) if self.shuffle else None

    def _batch_indices(self, order) -> list:
        """One entry per batch: a slice when the order is sequential, else an int64 index array."""
        n, size = self._num_samples(), self.batch_size
        stops = range(size, n + size, size)
        batches = []
        for start, stop in zip(range(0, n, size), stops):
            stop = min(stop, n)
            if self.drop_last and stop - start < size:
                break
            batches.append(slice(start, stop) if order is None else order[start:stop])
        return batches

    def _fetch(self, index):
        """The batch ``index`` (a slice, an index array or the items themselves), collated, on the host side."""
        if isinstance(index, _Items):
            return (self.collate_fn or default_collate)(list(index))
        source = _fast_source(self.dataset) if self.collate_fn is None else None
        if source is not None:
            dataset, mapping = source
            if mapping is not None:
                index = mapping[index]
            batch = list(dataset.batch(index))  # what default_collate makes of tuple items (PyTorch's list)
        else:
            positions = range(index.start, index.stop) if isinstance(index, slice) else index
            items = [self.dataset[int(i)] for i in positions]
            batch = (self.collate_fn or default_collate)(items)
        return batch

    # ---- workers -------------------------------------------------------------------------------
    def _start_pool(self) -> WorkerThreads:
        pool = WorkerThreads(self.num_workers, _base_seed(self.generator), self.dataset, self.worker_init_fn)
        if self.persistent_workers:
            self._pool = pool
            weakref.finalize(self, pool.close, 0.0)  # the threads hold no reference to the loader
        return pool

    def _worker_task(self, index, context):
        """Load batch ``index`` in a worker thread, with the loop thread's default device and grad mode."""
        device, grad = context
        if backend.default_device() != device:
            backend.set_default_device(device)
        with enable_grad() if grad else no_grad():
            return self._fetch(index)

    # ---- exact resume --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        state = {}
        if self.generator is not None:
            state["generator"] = copy.deepcopy(self.generator.bit_generator.state)
        if self.sampler is not None and hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state

    def state_dict(self) -> dict:
        """Plain ints/strings (JSON-safe): the RNG at the current epoch's start and batches handed out."""
        if self._in_epoch:
            return {**copy.deepcopy(self._epoch_start), "batches_done": self._batches_done}
        # Between epochs, or loaded and not yet iterated: the generator already sits at the epoch start.
        return {**self._snapshot(), "batches_done": self._resume_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next ``iter(loader)`` yields the batches that came next."""
        where = "DataLoader.load_state_dict"
        batches = state.get("batches_done", 0)
        if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 0:
            raise EngineError(f"{where}: batches_done must be a non-negative int, got {batches!r}")
        if ("generator" in state) != (self.generator is not None):
            saved = "with" if "generator" in state else "without"
            here = "has one" if self.generator is not None else "has none"
            raise EngineError(f"{where}: the state was saved from a loader {saved} a shuffling generator and this "
                              f"loader {here}; build the loader as it was when saved (shuffle=, generator=)")
        if "sampler" in state and not hasattr(self.sampler, "load_state_dict"):
            raise EngineError(f"{where}: the state holds a sampler state but this loader's sampler "
                              f"({type(self.sampler).__name__}) cannot load one")
        if "generator" in state:
            self.generator.bit_generator.state = copy.deepcopy(state["generator"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self._resume_batches, self._in_epoch = int(batches), False

    def __repr__(self) -> str:
        try:
            batches, items = len(self), len(self.dataset)
        except TypeError:  # a sampler, batch sampler or IterableDataset without a length
            batches = items = "unknown"
        return (f"DataLoader({type(self.dataset).__name__} of {items}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, num_workers={self.num_workers}, batches={batches})")


class _Epoch:
    """What ``iter(loader)`` returns: one pass over the loader's batches, in the sampler's order.

    A batch that fails to load raises its error, and ``next()`` goes on with the batch after it, as
    in PyTorch. With workers a failed batch raises as soon as it has failed, even while batches
    before it are still loading (those come next, in order). Dropping the iterator (``break``, an
    exception out of the loop) cancels what is loading ahead without waiting for it.
    """

    def __init__(self, loader: DataLoader, batches, skip: int):
        self._loader, self._batches, self._skip = loader, batches, skip
        self._source = None  # started at the first next(), as a generator would
        self._lookahead = loader.prefetch and loader.device is not None
        self._ahead: list = []  # with the look-ahead: the next batch's outcome, loaded before this one is handed out
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._source is None:
            self._source = self._start()
        outcome = self._ahead.pop() if self._ahead else self._produce()
        if self._lookahead and outcome.error is None:
            self._ahead.append(self._produce())
        if isinstance(outcome.error, StopIteration):
            self._finish()
            raise StopIteration
        self._loader._batches_done = self._skip + outcome.handed_out
        if outcome.error is not None:
            # Taken out of the outcome, not kept in a local: this frame, which the traceback keeps,
            # must not reference the error (a cycle would keep the epoch and its workers alive
            # until the garbage collector runs, instead of until the caller drops the error).
            raise outcome.take_error()
        return outcome.batch

    def _start(self):
        for done in range(self._skip):  # a resumed epoch: draw the batches already seen, load none of them
            if next(self._batches, None) is None:
                raise self._loader._skip_error(self._skip, done)
        stream = _IndexStream(self._batches)
        if self._loader.num_workers:
            return _WorkerBatches(self._loader, stream, self._skip)
        return _SerialBatches(self._loader, stream)

    def _produce(self) -> "_Outcome":
        """The next batch (on the loader's device), or the error loading it, or StopIteration."""
        try:
            batch = self._source.next()
            if self._loader.device is not None:
                batch = move_to(batch, self._loader.device)
        except Exception as exc:  # noqa: BLE001  (raised by __next__ when this batch's turn comes)
            _clear_loader_frames(exc)
            return _Outcome(None, exc, self._source.handed_out)  # returned from here: no local keeps exc
        return _Outcome(batch, None, self._source.handed_out)

    def _finish(self) -> None:
        self._finished = True
        self.close()
        self._loader._in_epoch, self._loader._batches_done = False, 0

    def close(self) -> None:
        """Stop loading ahead: batches not started are cancelled; running ones are not waited for."""
        if self._source is not None:
            self._source.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001,S110  (interpreter shutdown: nothing left to release)
            pass


@dataclass
class _Outcome:
    """One position of an epoch: its batch or its error, and how many positions were consumed with it."""
    batch: object
    error: BaseException | None
    handed_out: int

    def take_error(self) -> BaseException:
        error, self.error = self.error, None
        return error


class _IndexStream:
    """The epoch's batch indices, drawn in the loop's thread (samplers need not be thread-safe).

    Once the sampler (or an IterableDataset) has raised, it cannot go on: a generator is finished
    once it raises. Every later draw raises an error that says so, instead of the StopIteration that
    would end the epoch short without a word.
    """

    def __init__(self, batches):
        self._batches = batches
        self.error: str | None = None  # the error's text only: the error itself would keep a cycle

    def draw(self):
        if self.error is not None:
            raise EngineError(f"DataLoader: drawing this epoch's indices raised {self.error}; the epoch cannot "
                              "go on past it. Start the next epoch with iter(loader)")
        try:
            return next(self._batches)
        except StopIteration:
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise


class _SerialBatches:
    """``num_workers=0``: each batch is loaded in the loop's thread when it is asked for."""

    def __init__(self, loader: DataLoader, stream: _IndexStream):
        self._loader, self._stream = loader, stream
        self.handed_out = 0  # positions of this epoch handed out (as a batch or as its error)

    def next(self):
        index = self._stream.draw()
        self.handed_out += 1
        return self._loader._fetch(_resolve(index))

    def close(self) -> None:
        pass


class _WorkerBatches:
    """Batches loaded by the worker threads, at most ``prefetch_factor * num_workers`` ahead, handed
    out in the sampler's order. A failed batch is raised as soon as it fails, not when its turn comes
    (the loop would otherwise wait for every slow batch before it to learn of an error); its
    position is then skipped when its turn comes."""

    def __init__(self, loader: DataLoader, stream: _IndexStream, first: int):
        self._loader, self._stream = loader, stream
        self._pool = loader._pool if loader._pool is not None else loader._start_pool()
        self._owns_pool = self._pool is not loader._pool
        # The loop thread's settings (default device, grad mode are per thread) go with each batch.
        self._context = (backend.default_device(), is_grad_enabled())
        self._window = loader.prefetch_factor * loader.num_workers
        # (position, Task or _Failed), in order; None for a task whose error was raised ahead of its turn
        self._pending: collections.deque = collections.deque()
        self._next_position, self._drawing = first, True
        self.handed_out = 0  # positions of this epoch handed out (as a batch or as its error), in order

    def next(self):
        while True:
            self._fill()
            if not self._pending:
                if self._stream.error is not None:
                    self._stream.draw()  # raises: the epoch ended at the sampler's error
                raise StopIteration
            position, task = self._pending[0]
            if isinstance(task, Task):
                self._wait_for(position, task)
            self._pending.popleft()
            self.handed_out += 1
            if task is not None:
                return self._collect(position, task)

    def _fill(self) -> None:
        while self._drawing and len(self._pending) < self._window:
            position = self._next_position
            try:
                index = self._stream.draw()
            except StopIteration:
                self._drawing = False
                return
            except Exception as exc:  # noqa: BLE001  (raised in order, when its turn comes)
                self._drawing = False
                self._pending.append((position, _Failed(exc)))
                return
            self._next_position += 1
            try:
                index = _resolve(index)
            except Exception as exc:  # noqa: BLE001  (a bad index fails its own batch, in order)
                self._pending.append((position, _Failed(exc)))
                continue
            self._pending.append((position, self._pool.submit(self._loader._worker_task, index, self._context)))

    def _wait_for(self, position: int, task: Task) -> None:
        """Return once ``task`` is done; raise at once if a later batch failed, or on the timeout."""
        timeout = self._loader.timeout
        deadline = time.monotonic() + timeout if timeout else None
        while not task.done():
            self._raise_failed_ahead()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _timed_out(timeout, position, task)
            running = [t for _, t in self._pending if isinstance(t, Task) and not t.done()]
            concurrent.futures.wait(running, remaining, return_when=concurrent.futures.FIRST_COMPLETED)

    def _raise_failed_ahead(self) -> None:
        for k, (position, task) in enumerate(self._pending):
            if isinstance(task, Task) and task.done() and task.exception() is not None:
                self._pending[k] = (position, None)
                self._collect(position, task)

    @staticmethod
    def _collect(position: int, task):
        """The batch of a finished task, or its error named with the batch and the worker."""
        if isinstance(task, _Failed):
            raise task.error
        exc = task.exception()  # not task.result(): that would put the task into exc's traceback
        if exc is None:
            return task.result()
        error = _worker_error(exc, position, task.worker_id)
        if error is exc:
            raise error
        raise error from exc

    def close(self) -> None:
        for _, task in self._pending:
            if isinstance(task, Task):
                task.cancel()  # not started yet: no worker will run it
        self._pending.clear()
        if self._owns_pool:
            self._pool.close()


class _Items(list):
    """The items of one batch of an IterableDataset (already read, to be collated)."""


@dataclass
class _Chunk:
    """The indices a sampler or batch sampler gave for batch ``number``, checked when the batch is
    loaded: a bad index fails that batch only, and the epoch goes on (as in PyTorch)."""
    indices: object
    number: int
    first: int | None  # the sampler's position of indices[0]; None: from a batch sampler

    def array(self) -> np.ndarray:
        if self.first is None and (isinstance(self.indices, (str, bytes)) or not hasattr(self.indices, "__iter__")):
            raise EngineError(f"DataLoader: the batch sampler yielded {self.indices!r} "
                              f"({type(self.indices).__name__}) for batch {self.number}; a batch sampler yields "
                              "lists of int indices")
        start = self.first or 0
        return np.array([_sampler_index(i, start + k) for k, i in enumerate(self.indices)], dtype=np.int64)


def _resolve(index):
    """What ``DataLoader._fetch`` takes: a checked index array for a sampler's chunk; anything else as is."""
    return index.array() if isinstance(index, _Chunk) else index


@dataclass
class _Failed:
    """Drawing or checking a batch's indices raised: re-raised when that batch's turn comes."""
    error: BaseException


def _clear_loader_frames(error: BaseException) -> None:
    """Drop the locals of this module's finished frames in ``error``'s traceback (the lines stay).

    Those frames reference the epoch or its workers (``self``, the task), and an epoch may hold the
    error until its turn: a reference cycle, which would keep the worker threads alive until the
    garbage collector happens to run rather than until the caller drops the error. The user's
    frames (``__getitem__``, the sampler) keep their locals.
    """
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # the frame still running (the one handling the error)
                pass
        tb = tb.tb_next


def _base_seed(generator) -> int:
    """A seed for the workers' WorkerInfo, from a copy of the loader's generator (the original does not move)."""
    if generator is None:
        return 0
    return int(copy.deepcopy(generator).integers(0, 2**62))


def _timed_out(timeout, position: int, task: Task) -> RuntimeError:
    """PyTorch's timeout error (a RuntimeError, same words), with the batch and its worker."""
    where = (f"worker {task.worker_id} is still loading it" if task.worker_id is not None
             else "no worker has started it yet (all are busy with earlier batches)")
    return RuntimeError(f"DataLoader timed out after {timeout} seconds waiting for batch {position}: {where}. "
                        "Raise timeout= if the batch is just slow, else look for a __getitem__ or collate_fn "
                        "that hangs")


def _worker_error(exc: BaseException, position: int, worker_id) -> BaseException:
    """``exc`` with the batch and worker it failed in in its message (its own type, so ``except``
    clauses still match; PyTorch's words: "Caught X in DataLoader worker process N")."""
    message = (f"Caught {type(exc).__name__} in DataLoader worker {worker_id} (a thread) while loading batch "
               f"{position}: {exc}")
    try:
        wrapped = type(exc)(message)
        if type(wrapped) is type(exc) and str(wrapped) in (message, repr(message)):
            return wrapped
    except Exception:  # noqa: BLE001,S110  (an exception type with another constructor: add a note instead)
        pass
    exc.add_note(message)
    return exc


def _sampler_index(index, position: int) -> int:
    """A sampler's index as an int; anything else is refused, never truncated (1.7 is not 1)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, numbers.Integral):
        raise EngineError(f"DataLoader: the sampler yielded {index!r} ({type(index).__name__}) at position {position}; "
                          "sampler indices must be ints (floats, bools, strings and arrays are refused rather "
                          "than converted)")
    if not -2**63 <= index < 2**63:
        raise EngineError(f"DataLoader: the sampler yielded index {index} at position {position}, outside the "
                          "int64 range of any dataset")
    return int(index)


# ---- collation and transfer ---------------------------------------------------------------------

def default_collate(items: list):
    """Stack a list of items into a batch.

    As PyTorch's ``default_collate``: Tensors and numpy/cupy arrays are stacked along a new first
    axis into a Tensor; Python ints become int64, bools bool_, numpy scalars keep their dtype;
    tuples and lists are collated field by field into a **list** (a namedtuple into its own type),
    dicts key by key; strings are returned as they come (the batch's sequence of them).
    One difference, on purpose: Python floats become float32 (PyTorch: float64), the engine's
    default dtype, so a float target meets a float32 model output without a float64 promotion.

    Raises:
        ShapeError: items whose arrays differ in shape (pass a ``collate_fn`` that pads them).
        TypeError: an item type it cannot stack.
    """
    if not items:
        raise EngineError("default_collate: got an empty list of items")
    first = items[0]
    if isinstance(first, Tensor) or backend.is_array(first):
        return _stack_arrays(items)
    if isinstance(first, (bool, np.bool_)):
        return Tensor(np.asarray(items, dtype=np.bool_))
    if isinstance(first, (int, np.integer, float, np.floating)):
        return Tensor(_scalars_to_array(items))
    if isinstance(first, (str, bytes)):
        return items
    if isinstance(first, dict):
        return _same_type(first, {key: default_collate([item[key] for item in items]) for key in first})
    if isinstance(first, (tuple, list)):
        if len({len(item) for item in items}) > 1:
            lengths = sorted({len(item) for item in items})
            raise ShapeError(f"default_collate: items have different numbers of fields: {lengths}")
        fields = [default_collate(column) for column in zip(*items)]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple keeps its type
            return type(first)(*fields)
        return fields if isinstance(first, tuple) else _same_type(first, fields)
    raise TypeError(f"default_collate: cannot batch items of type {type(first).__name__}; "
                    "return Tensors, arrays, numbers, or tuples/dicts of them, or pass collate_fn")


def _same_type(first, fields):
    """``fields`` (a list or dict) as ``first``'s own container type where it can be built from it
    (an OrderedDict, a list subclass), else as it is: PyTorch's rule."""
    if type(first) in (list, dict):
        return fields
    try:
        return type(first)(fields)
    except TypeError:
        return fields


def _stack_arrays(items: list) -> Tensor:
    arrays = [item._data if isinstance(item, Tensor) else item for item in items]
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        raise ShapeError(f"default_collate: cannot stack items of different shapes {sorted(shapes)}; "
                         "resize them in the dataset or pass a collate_fn that pads")
    devices = {backend.device_of(a) for a in arrays}
    if len(devices) > 1:
        raise EngineError(f"default_collate: items live on different devices {sorted(map(str, devices))}; "
                          "keep the dataset on one device")
    return Tensor(backend.array_module(arrays[0]).stack(arrays))


def _scalars_to_array(items: list) -> np.ndarray:
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
        return np.asarray(items, dtype=_shared_numpy_dtype(items, np.integer, np.int64))
    return np.asarray(items, dtype=_shared_numpy_dtype(items, np.floating, np.float32))


def _shared_numpy_dtype(items: list, numpy_type, default):
    """The items' dtype when all are numpy scalars of one dtype; else ``default`` (Python numbers)."""
    dtypes = {v.dtype if isinstance(v, numpy_type) else None for v in items}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else default


def move_to(batch, device):
    """``batch`` (a Tensor, array, or tuple/list/dict of them) with every Tensor/array on ``device``."""
    dev = backend.device(device)
    if isinstance(batch, Tensor):
        return batch if batch.device == dev else Tensor(backend.to_device(batch._data, dev))
    if backend.is_array(batch):
        return Tensor(backend.to_device(batch, dev))
    if isinstance(batch, dict):
        return {key: move_to(value, dev) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [move_to(value, dev) for value in batch]
        return moved if isinstance(batch, list) else tuple(moved)
    return batch


def _fast_source(dataset):
    """(TensorDataset, index map or None) when ``dataset`` is a TensorDataset or nested Subsets of one."""
    mapping = None
    while isinstance(dataset, Subset):
        mapping = dataset.indices if mapping is None else dataset.indices[mapping]
        dataset = dataset.dataset
    return (dataset, mapping) if isinstance(dataset, TensorDataset) else None


def _check_dataset(dataset) -> None:
    missing = [name for name in ("__getitem__", "__len__") if not hasattr(dataset, name)]
    if missing:
        raise EngineError(f"DataLoader: dataset {type(dataset).__name__} lacks {' and '.join(missing)}; "
                          "wrap arrays in TensorDataset(x, y)")


__all__ = ["DataLoader", "default_collate", "move_to"]

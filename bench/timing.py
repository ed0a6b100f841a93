"""Timers: wall clock on the CPU, CUDA events on the GPU; warm-up, repeats, median and spread.

A :class:`Clock` runs a callable a few times to warm it up (JIT compiles, allocator pools,
cuBLAS handles), then repeats it until a time budget is spent (between ``min_repeats`` and
``max_repeats`` times) and returns a :class:`Measurement`: the median and the spread of the
per-call times.

On the GPU, memory-bound kernels are timed cold: before each repeat, outside the timed region,
the clock writes a buffer twice the size of the L2 and then reads it back. The write evicts
whatever the previous repeat left (its dirty lines are written back now, untimed); the read
evicts the buffer's own dirty lines, so the timed call starts with an L2 holding only clean
lines of unrelated data and pays for no write-back it did not cause. A kernel whose working set
fits in L2 is thus not credited with cache bandwidth it would not see inside a training step.

:class:`CpuClock` can flush the CPU's L3 the same way, but the benchmarks do not ask it to: on a
CPU the flush also evicts the Python interpreter's own code and data, which a training loop
keeps warm, and that alone added ~150 us to a 16-element optimizer call on the 2-core machine
the CPU figures come from (docs/benchmarks.md).

On the GPU each repeat is bracketed by two CUDA events recorded on the stream the work runs on
(cupy's events for engine and kernel calls, torch's for torch calls) and the events are read
after one synchronize at the end: the host never waits between repeats, so the device time is
what the GPU spent, and the host time (``perf_counter`` around the call, without a sync) is what
Python spent issuing it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# Used when the cache size cannot be read: larger than any current CPU L3 slice or GPU L2.
DEFAULT_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Measurement:
    """Per-call times in seconds of one timed callable.

    Attributes:
        median_s: the median time per call (the figure reported).
        min_s, max_s: the fastest and slowest call.
        q25_s, q75_s: the quartiles; ``spread`` is their distance relative to the median.
        repeats: how many timed calls.
        host_median_s: median host time to issue one call (GPU clocks; equals median_s on CPU).
    """

    median_s: float
    min_s: float
    max_s: float
    q25_s: float
    q75_s: float
    repeats: int
    host_median_s: float

    @property
    def spread(self) -> float:
        """Interquartile range / median: 0.02 means the middle half of the calls lie within 2 %."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["spread"] = self.spread
        return out


def summarize(times: list[float], host_times: list[float] | None = None) -> Measurement:
    """A :class:`Measurement` of per-call ``times`` (seconds); ``host_times`` default to them."""
    if not times:
        raise ValueError("summarize: no times to summarize")
    ordered = sorted(times)
    q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    host = statistics.median(host_times) if host_times else statistics.median(ordered)
    return Measurement(median_s=statistics.median(ordered), min_s=ordered[0], max_s=ordered[-1], q25_s=q25,
                       q75_s=q75, repeats=len(ordered), host_median_s=host)


def repeat_count(estimate_s: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many timed calls fit ``budget_s`` at ``estimate_s`` each, clamped to [min, max]."""
    if estimate_s <= 0:
        return max_repeats
    fits = int(budget_s / estimate_s * (1 + 1e-9))  # 1.0 / 0.1 is 9.999...: count it as 10
    return min(max_repeats, max(min_repeats, fits))


class Clock:
    """Times callables on one device; subclasses supply the flush and the per-repeat timing.

    Args:
        budget_s: time to spend on the timed repeats of one callable (warm-up not included).
        warmup: untimed calls first (the first one also compiles JIT kernels).
        min_repeats, max_repeats: bounds on the number of timed calls.
    """

    name = "clock"

    def __init__(self, budget_s: float = 0.3, warmup: int = 2, min_repeats: int = 5, max_repeats: int = 200):
        self.budget_s = budget_s
        self.warmup = warmup
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats

    def measure(self, fn: Callable[[], object], *, flush: bool = False) -> Measurement:
        """Warm ``fn`` up, then time it; ``flush`` evicts the cache before every timed call."""
        return summarize(*self.sample(fn, flush=flush))

    def sample(self, fn: Callable[[], object], *, flush: bool = False, share: float = 1.0):
        """Warm up, then time calls for ``share`` of the budget: (device times, host times).

        :func:`measure_interleaved` takes several samples of each callable, in rounds.
        """
        estimate = self._warm_up(fn)
        repeats = repeat_count(estimate + (self._flush_estimate() if flush else 0.0), self.budget_s * share,
                               max(1, round(self.min_repeats * share)), max(1, round(self.max_repeats * share)))
        return self._timed_calls(fn, repeats, flush)

    def _warm_up(self, fn) -> float:
        """Run the warm-up calls; return the last one's synchronized wall time."""
        elapsed = 0.0
        for _ in range(max(1, self.warmup)):
            start = time.perf_counter()
            fn()
            self.synchronize()
            elapsed = time.perf_counter() - start
        return elapsed

    def _flush_estimate(self) -> float:
        start = time.perf_counter()
        self.flush()
        self.synchronize()
        return time.perf_counter() - start

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def flush(self) -> None:
        """Evict the last-level cache."""
        raise NotImplementedError

    def _timed_calls(self, fn, repeats: int, flush: bool) -> tuple[list[float], list[float]]:
        raise NotImplementedError


class CpuClock(Clock):
    """``time.perf_counter`` around each call; the flush writes a buffer twice the L3 size."""

    name = "perf_counter"

    def __init__(self, *args, flush_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flush_bytes = flush_bytes or 2 * (cpu_last_level_cache_bytes() or DEFAULT_FLUSH_BYTES // 2)
        self._flush_buffer = None
        self._flush_value = 0

    def flush(self) -> None:
        if self._flush_buffer is None:
            self._flush_buffer = np.empty(self.flush_bytes // 4, dtype=np.float32)
        # A new value each time, so no layer can skip a store of what is already there; then
        # read it, so the cache holds clean lines (see the module docstring).
        self._flush_value += 1
        self._flush_buffer.fill(self._flush_value)
        self._flush_buffer.sum()

    def _timed_calls(self, fn, repeats: int, flush: bool) -> tuple[list[float], list[float]]:
        times = []
        for _ in range(repeats):
            if flush:
                self.flush()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times, times


class CudaEventClock(Clock):
    """CUDA events around each call, read after one final synchronize.

    Args:
        events: an event API: ``new_event()`` returning an object with ``record()``,
            ``elapsed_s(start, end)``, ``synchronize()`` and ``flush_buffer(nbytes)`` returning an
            array whose ``fill(value)`` and ``sum()`` write and read it on the same stream. See :class:`CupyEvents`
            and :class:`TorchEvents`.
        flush_bytes: size of the flush buffer (default: twice the device's L2).
    """

    name = "cuda_events"

    def __init__(self, events, *args, flush_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = events
        self.flush_bytes = flush_bytes or 2 * (events.l2_bytes() or DEFAULT_FLUSH_BYTES // 2)
        self._flush_buffer = None
        self._flush_value = 0

    def synchronize(self) -> None:
        self.events.synchronize()

    def flush(self) -> None:
        if self._flush_buffer is None:
            self._flush_buffer = self.events.flush_buffer(self.flush_bytes)
        self._flush_value += 1
        self._flush_buffer.fill(self._flush_value)
        self._flush_buffer.sum()  # leave clean lines: see the module docstring

    def _timed_calls(self, fn, repeats: int, flush: bool) -> tuple[list[float], list[float]]:
        pairs, host = [], []
        for _ in range(repeats):
            if flush:
                self.flush()
            start, end = self.events.new_event(), self.events.new_event()
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            end.record()
            pairs.append((start, end))
        self.synchronize()
        times = [self.events.elapsed_s(start, end) for start, end in pairs]
        return times, host


def measure_interleaved(timed: list[tuple[Clock, Callable[[], object]]], rounds: int = 3, *, flush: bool = False,
                        before: Callable[[], object] | None = None) -> list[Measurement | Exception]:
    """Time several callables side by side: ``rounds`` rounds, each timing every one in turn.

    Whatever drifts during a run (clock frequency, the allocator's state, a neighbour's load)
    then falls on every callable alike, and the first one is not the only one to run on a
    freshly settled machine; a ratio of the medians is a side-by-side comparison. ``before``
    runs ahead of each sample (the CPU benchmarks pause there, for the last one's threads to idle).
    A callable that raises gets its exception in its place in the result, and the others go on.
    """
    samples: list = [([], []) for _ in timed]
    for _ in range(rounds):
        for i, (clock, fn) in enumerate(timed):
            if isinstance(samples[i], Exception):
                continue
            if before is not None:
                before()
            try:
                t, h = clock.sample(fn, flush=flush, share=1.0 / rounds)
            except Exception as e:  # noqa: BLE001 - reported in the caller's row
                samples[i] = e
                continue
            samples[i][0].extend(t)
            samples[i][1].extend(h)
    return [s if isinstance(s, Exception) else summarize(*s) for s in samples]


class CupyEvents:
    """cupy's CUDA events on the current stream (where engine and kernel calls run)."""

    def __init__(self, cupy):
        self.cupy = cupy

    def new_event(self):
        return self.cupy.cuda.Event()

    def elapsed_s(self, start, end) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def flush_buffer(self, nbytes: int):
        return self.cupy.empty(nbytes // 4, dtype=self.cupy.float32)

    def l2_bytes(self) -> int:
        return int(self.cupy.cuda.Device().attributes.get("L2CacheSize", 0))


class TorchEvents:
    """torch's CUDA events on torch's current stream (where torch calls run)."""

    def __init__(self, torch):
        self.torch = torch

    def new_event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def elapsed_s(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def flush_buffer(self, nbytes: int):
        return _TorchBuffer(self.torch.empty(nbytes // 4, dtype=self.torch.float32, device="cuda"))

    def l2_bytes(self) -> int:
        props = self.torch.cuda.get_device_properties(self.torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0))


class _TorchBuffer:
    """A torch tensor with the ``fill(value)`` and ``sum()`` of numpy and cupy arrays."""

    def __init__(self, tensor):
        self.tensor = tensor

    def fill(self, value) -> None:
        self.tensor.fill_(value)

    def sum(self):
        return self.tensor.sum()


def cpu_last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache from sysfs (e.g. L3), or None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None

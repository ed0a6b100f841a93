"""CUDA streams and events, PyTorch's ``torch.cuda.Stream`` / ``Event`` / ``stream()``, on cupy's.

Work queued on one stream runs in order; work on different streams may overlap. An Event marks
a point in a stream: another stream can wait for it, the host can ask whether it has passed, and
two timing events measure the GPU time between them.
"""

from __future__ import annotations

from engine import backend
from engine.cuda._runtime import cuda_device, cupy_for
from engine.cuda._runtime import device as _device_context
from engine.errors import EngineError


class Stream:
    """A CUDA stream of one device (PyTorch's ``torch.cuda.Stream``).

    Args:
        device: the CUDA device (default: the current one).
        priority: lower numbers run first when both streams have work ready (0 is the default
            priority; CUDA clamps to the device's range).

    Example:
        >>> side = engine.cuda.Stream()                      # doctest: +SKIP
        >>> side.wait_stream(engine.cuda.current_stream())  # doctest: +SKIP
        >>> with engine.cuda.stream(side):                  # doctest: +SKIP
        ...     y = model(x)
    """

    def __init__(self, device=None, priority: int = 0):
        dev = cuda_device(device, "engine.cuda.Stream")
        cupy = cupy_for("engine.cuda.Stream", dev)
        with cupy.cuda.Device(dev.index):
            # Non-blocking as PyTorch's streams: no implicit wait on the legacy default stream.
            self._cupy_stream = cupy.cuda.Stream(non_blocking=True, priority=priority)
        self.device = dev
        self.priority = priority

    @classmethod
    def _wrap(cls, cupy_stream, dev) -> "Stream":
        stream = cls.__new__(cls)
        stream._cupy_stream, stream.device, stream.priority = cupy_stream, dev, 0
        return stream

    @property
    def cuda_stream(self) -> int:
        """The raw ``cudaStream_t`` handle (0 for the legacy default stream)."""
        return int(self._cupy_stream.ptr)

    def wait_event(self, event: "Event") -> None:
        """Make later work on this stream wait until ``event`` has passed (the host does not wait)."""
        _check_event("Stream.wait_event", event)
        self._cupy_stream.wait_event(event._cupy_event)

    def wait_stream(self, stream: "Stream") -> None:
        """Make later work on this stream wait for the work queued on ``stream`` so far."""
        self.wait_event(stream.record_event())

    def record_event(self, event: "Event | None" = None) -> "Event":
        """Record ``event`` (a new one when None) at this point of the stream; returns it."""
        event = Event() if event is None else event
        event.record(self)
        return event

    def query(self) -> bool:
        """True when every piece of work queued on this stream has finished."""
        backend.refuse_in_capture("Stream.query", "asks whether a stream is done")
        return bool(self._cupy_stream.done)

    def synchronize(self) -> None:
        """Wait on the host until every piece of work queued on this stream has finished."""
        backend.refuse_in_capture("Stream.synchronize", "waits for a stream")
        self._cupy_stream.synchronize()

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream) and self.cuda_stream == other.cuda_stream and self.device == other.device

    def __hash__(self) -> int:
        return hash((self.cuda_stream, self.device))

    def __repr__(self) -> str:
        return f"<engine.cuda.Stream device={self.device} cuda_stream={self.cuda_stream:#x}>"


class Event:
    """A marker in a CUDA stream (PyTorch's ``torch.cuda.Event``): record it, then wait for it,
    ask whether it has passed, or time the GPU work between two of them.

    Args:
        enable_timing: keep the time the event passed, for :meth:`elapsed_time`.
        blocking: :meth:`synchronize` sleeps instead of spinning.
        interprocess: the event can be shared with another process.

    Example:
        >>> start = engine.cuda.Event(enable_timing=True)   # doctest: +SKIP
        >>> end = engine.cuda.Event(enable_timing=True)     # doctest: +SKIP
        >>> start.record(); step(); end.record()            # doctest: +SKIP
        >>> end.synchronize(); start.elapsed_time(end)      # milliseconds  # doctest: +SKIP
    """

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        cupy = cupy_for("engine.cuda.Event")
        self._cupy_event = cupy.cuda.Event(block=blocking, disable_timing=not enable_timing,
                                           interprocess=interprocess)
        self.enable_timing, self.blocking, self.interprocess = bool(enable_timing), bool(blocking), bool(interprocess)
        self._recorded = False

    def record(self, stream: Stream | None = None) -> None:
        """Mark the current point of ``stream`` (default: the current stream)."""
        stream = current_stream() if stream is None else stream
        self._cupy_event.record(stream._cupy_stream)  # cupy's default is the null stream, not the current one
        self._recorded = True

    def wait(self, stream: Stream | None = None) -> None:
        """Make later work on ``stream`` (default: the current stream) wait for this event."""
        (current_stream() if stream is None else stream).wait_event(self)

    def query(self) -> bool:
        """True when the work before the recorded point has finished (True if never recorded)."""
        backend.refuse_in_capture("Event.query", "asks whether an event has passed")
        return bool(self._cupy_event.done)

    def synchronize(self) -> None:
        """Wait on the host until the recorded point has passed."""
        backend.refuse_in_capture("Event.synchronize", "waits for an event")
        self._cupy_event.synchronize()

    def elapsed_time(self, end_event: "Event") -> float:
        """Milliseconds of GPU time between this event and ``end_event`` (both recorded with
        ``enable_timing=True``, ``end_event`` passed: call ``end_event.synchronize()`` first)."""
        _check_event("Event.elapsed_time", end_event)
        for which, event in (("start", self), ("end", end_event)):
            if not event.enable_timing:
                raise EngineError(f"Event.elapsed_time: the {which} event was created without enable_timing=True")
            if not event._recorded:
                raise EngineError(f"Event.elapsed_time: the {which} event was never recorded; call .record() on it")
        backend.refuse_in_capture("Event.elapsed_time", "reads an event's time")
        cupy = backend.cupy_module()
        return float(cupy.cuda.get_elapsed_time(self._cupy_event, end_event._cupy_event))

    def __repr__(self) -> str:
        return f"<engine.cuda.Event enable_timing={self.enable_timing} recorded={self._recorded}>"


def _check_event(where: str, event) -> None:
    if not isinstance(event, Event):
        raise EngineError(f"{where}: expected an engine.cuda.Event, got {type(event).__name__}")


def current_stream(device=None) -> Stream:
    """The stream that work on ``device`` (default: the current device) is queued on now."""
    dev = cuda_device(device, "engine.cuda.current_stream")
    cupy = cupy_for("engine.cuda.current_stream", dev)
    with cupy.cuda.Device(dev.index):
        return Stream._wrap(cupy.cuda.get_current_stream(), dev)


def default_stream(device=None) -> Stream:
    """The default (legacy null) stream of ``device``."""
    dev = cuda_device(device, "engine.cuda.default_stream")
    cupy = cupy_for("engine.cuda.default_stream", dev)
    return Stream._wrap(cupy.cuda.Stream.null, dev)


class StreamContext:
    """Context manager making ``stream`` current inside the block (None: no change), and its
    device the current device (PyTorch's ``torch.cuda.StreamContext``)."""

    def __init__(self, stream: Stream | None):
        if stream is not None and not isinstance(stream, Stream):
            raise EngineError(f"engine.cuda.stream: expected an engine.cuda.Stream or None, got "
                              f"{type(stream).__name__}")
        self.stream = stream
        self._device = None

    def __enter__(self):
        if self.stream is not None:
            self._device = _device_context(self.stream.device.index)
            self._device.__enter__()
            self.stream._cupy_stream.__enter__()  # cupy keeps a per-thread stack of current streams
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream._cupy_stream.__exit__(*exc)
            self._device.__exit__(*exc)
        return False


def stream(stream: Stream | None) -> StreamContext:
    """``with engine.cuda.stream(s):`` queues the block's GPU work on ``s`` (None: no change)."""
    return StreamContext(stream)

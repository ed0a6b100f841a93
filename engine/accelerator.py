"""``engine.accelerator``: PyTorch 2.6+'s device-generic API (``torch.accelerator``).

The engine's one accelerator kind is CUDA (through cupy), so every call here is the matching
``engine.cuda`` call. On a machine without a usable GPU, as in PyTorch: ``is_available()`` is
False, ``current_accelerator()`` is None, ``device_count()`` is 0, and the calls that need a device
(``current_device_index``, ``set_device_index``, ``synchronize``) raise a DeviceError.

Example:
    >>> import engine
    >>> device = engine.accelerator.current_accelerator().type if engine.accelerator.is_available() else "cpu"
    >>> device in ("cuda", "cpu")
    True
"""

from __future__ import annotations

from engine import cuda
from engine.backend import Device
from engine.errors import DeviceError

__all__ = ["current_accelerator", "current_device_idx", "current_device_index", "device_count", "device_index",
           "is_available", "set_device_idx", "set_device_index", "synchronize"]


def is_available() -> bool:
    """Whether an accelerator (a CUDA device) is usable here. Never raises."""
    return cuda.is_available()


def device_count() -> int:
    """How many accelerator devices are usable here; 0 without one. Never raises."""
    return cuda.device_count()


def current_accelerator(check_available: bool = False) -> Device | None:
    """The accelerator's device type as a Device (``cuda`` with the current index), or None.

    Args:
        check_available: as PyTorch: when True, None is also returned where the accelerator is
            built in but no device answers. The engine only knows CUDA through a working cupy,
            so both settings answer None on a machine without a GPU.
    """
    if not cuda.is_available():
        return None
    return Device("cuda", cuda.current_device())


def _require(where: str) -> None:
    if not cuda.is_available():
        raise DeviceError(f"engine.accelerator.{where}: no accelerator is available here (no CUDA device answers "
                          "through cupy); guard the call with engine.accelerator.is_available()")


def _index(device, where: str) -> int:
    """``device`` (an int, "cuda:N", a Device) as a CUDA device index."""
    if isinstance(device, Device) or isinstance(device, str):
        dev = device if isinstance(device, Device) else Device(*_parse(device, where))
        if dev.type != "cuda":
            raise DeviceError(f"engine.accelerator.{where}: {dev} is not the accelerator's device type (cuda)")
        return dev.index
    if isinstance(device, bool) or not isinstance(device, int):
        raise DeviceError(f"engine.accelerator.{where}: expected a device index, 'cuda:N' or a Device, got {device!r}")
    return device


def _parse(spec: str, where: str) -> tuple[str, int]:
    kind, _, index = spec.strip().lower().partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"engine.accelerator.{where}: {spec!r} is not a device of the accelerator (cuda[:N])")
    return kind, int(index) if index else cuda.current_device()


def current_device_index() -> int:
    """The index of the current accelerator device. Raises DeviceError without an accelerator."""
    _require("current_device_index")
    return cuda.current_device()


def set_device_index(device, /) -> None:
    """Make ``device`` (an index, "cuda:N" or a Device) the current accelerator device; None or a
    negative index changes nothing, as in PyTorch. Raises DeviceError without an accelerator."""
    _require("set_device_index")
    if device is None:
        return
    index = _index(device, "set_device_index")
    if index >= 0:
        cuda.set_device(index)


def synchronize(device=None, /) -> None:
    """Wait for the work queued on ``device`` (default: the current accelerator device).
    Raises DeviceError without an accelerator."""
    _require("synchronize")
    cuda.synchronize(None if device is None else _index(device, "synchronize"))


class device_index:
    """Context manager making ``device`` (an index; None: no change) the current accelerator
    device inside the block and restoring the previous one after it."""

    def __init__(self, device, /):
        self.device, self._previous = device, None

    def __enter__(self):
        if self.device is not None:
            self._previous = current_device_index()
            set_device_index(self.device)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            set_device_index(self._previous)
        return False


current_device_idx, set_device_idx = current_device_index, set_device_index  # PyTorch 2.6's first names

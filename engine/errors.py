"""Error types and the one function that describes operands in error messages."""

from __future__ import annotations


class EngineError(ValueError):
    """Bad input to an engine op; the message names the op and its operands."""


class ShapeError(EngineError):
    """Operand shapes do not fit the op."""


class DTypeError(EngineError):
    """Operand dtypes do not fit the op (the engine never promotes float32 to float64 silently)."""


class DeviceError(EngineError):
    """Operands on different devices, or a device that is not available."""


class GradError(RuntimeError):
    """backward() cannot run as asked (non-scalar without a gradient, nothing requires grad ...)."""


def describe(x) -> str:
    """``Tensor(shape=(2, 3), dtype=float32, device=cpu)`` for tensors, arrays and scalars alike."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return f"{type(x).__name__}({x!r})"
    device = getattr(x, "device", None)
    if device is not None and not isinstance(device, str):
        device = str(device)
        if device.startswith("<CUDA Device"):  # a raw cupy array
            device = f"cuda:{x.device.id}"
    device = device or "cpu"
    kind = "Tensor" if hasattr(x, "requires_grad") else type(x).__name__
    return f"{kind}(shape={tuple(shape)}, dtype={x.dtype}, device={device})"

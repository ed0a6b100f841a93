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


def install_hint(extra: str, packages: str) -> str:
    """How to install an optional extra, in words that work.

    From a source checkout, ``pip install -e ".[extra]"`` (the project is on no package index);
    where the engine is installed as a distribution, ``pip install "<its name>[extra]"`` (pip
    adds the extra's packages to the installed one); and the packages themselves. ``packages``
    names them as pip takes them ("tokenizers", "mpi4py mpich").
    """
    hint = f'pip install -e ".[{extra}]" from a source checkout'
    distribution = _distribution()
    if distribution:
        hint += f', pip install "{distribution}[{extra}]" for the installed {distribution}'
    return f"{hint}, or pip install {packages}"


def _distribution() -> str | None:
    """The name of the installed distribution that holds the ``engine`` package, if any."""
    from importlib import metadata

    try:
        names = metadata.packages_distributions().get("engine", [])
    except Exception:  # noqa: BLE001 - broken metadata of some other distribution: no name rather than no message
        return None
    return names[0] if names else None

"""Load the CUDA C++ sources in this folder with cupy.RawModule: each kernel compiled and looked
up once per device, then reused by every launch.

The same sources and options are what kernels/cuda/nvrtc.py compiles in CI without a GPU, so
the build CI checks is the build that runs. Nothing here imports cupy until a kernel is asked for.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

SOURCE_DIR = Path(__file__).parent

# Options shared by the run-time build (cupy) and the CI check (nvrtc.py). No fast-math: the
# kernels must agree with the numpy reference to float32 rounding.
NVRTC_OPTIONS = ("-std=c++17",)

# What cupy appends on its own to every NVRTC compile, after the caller's options: cupy/cuda/compiler.py,
# ``_compile_with_cache_cuda``: ``options += ('-ftz=true',)`` (in every release from v2 to 14.x).
# The cupy build therefore flushes float32 subnormal inputs and results to zero (docs/kernels.md,
# "Subnormals"). The CI compile check (nvrtc.py) passes these too, so that it checks the build
# that runs; tests/kernels/test_gpu_compile.py checks the installed cupy still appends them.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


def source(name: str) -> str:
    """Text of ``kernels/cuda/<name>.cu``."""
    return (SOURCE_DIR / f"{name}.cu").read_text()


def sources() -> list[Path]:
    """Every .cu file of the package (CI compiles each of them)."""
    return sorted(SOURCE_DIR.glob("*.cu"))


def build_options() -> tuple[str, ...]:
    """The options this package hands to cupy.RawModule (cupy adds CUPY_ADDED_OPTIONS and the architecture)."""
    return NVRTC_OPTIONS + (f"-I{SOURCE_DIR}",)


@functools.cache
def load(name: str, device_id: int):
    """The cupy.RawModule of ``<name>.cu`` for device ``device_id``.

    NVRTC compiles it for that device's architecture on the first kernel lookup (cupy also keeps
    the binary on disk, so later processes skip NVRTC).
    """
    import cupy

    return cupy.RawModule(code=source(name), options=build_options())


@functools.cache
def _function(module: str, kernel: str, device_id: int):
    import cupy

    with cupy.cuda.Device(device_id):  # get_function compiles and loads on the current device
        return load(module, device_id).get_function(kernel)


def function(module: str, kernel: str, device_id: int | None = None):
    """The ``extern "C"`` kernel ``kernel`` of ``<module>.cu`` for ``device_id`` (default: the current one).

    Looked up once per (module, kernel, device) and kept: a launch costs a dictionary lookup, not
    a new cupy kernel object (``RawModule.get_function`` builds one per call). Launch it with
    that device current.
    """
    if device_id is None:
        device_id = current_device()
    return _function(module, kernel, device_id)


_get_device = None  # cupy.cuda.runtime.getDevice, bound on first use (importing this module imports no cupy)


def current_device() -> int:
    """The index of cupy's current device."""
    global _get_device
    if _get_device is None:
        import cupy

        _get_device = cupy.cuda.runtime.getDevice
    return _get_device()


_NOTHING = contextlib.nullcontext()


def on_device(a):
    """The GPU of cupy array ``a`` as a context: inside it cupy allocates, launches kernels and calls
    cuBLAS on that device, whichever device is current outside (``cuda:1`` inputs while device 0
    is current compute on device 1). It is ``a.device`` itself, a ``cupy.cuda.Device``: skipping it
    when ``getDevice()`` matches would need cupy imported here and save little of a call, so the
    guard stays cupy's own (docs/benchmarks.md, "Why the thresholds are where they are").

    Anything else gives a context that does nothing: the wrapper's validator then rejects it by name.
    """
    return a.device if type(a).__module__.startswith("cupy") else _NOTHING


def clear_cache() -> None:
    """Forget every loaded module and kernel (and the bound cupy; the tests swap in a fake cupy)."""
    global _get_device
    load.cache_clear()
    _function.cache_clear()
    _get_device = None

"""How every numba.cuda kernel of this package is launched: one place for streams, devices and
the simulator.

On a GPU the kernels take cupy arrays. Three things make a naive ``kernel[grid, block](*cupy_arrays)``
wrong or slow, and this module handles each once:

- **Stream.** The kernel must run on cupy's current stream, so that it is ordered with the cupy
  ops around it and nothing waits for the device. Cupy's default stream has the pointer 0 (the
  legacy default stream); numba's own default stream is that same stream, so it is used for 0,
  and any other pointer is wrapped as a numba external stream (cached per device and pointer).
- **No host sync per argument.** Given an object with ``__cuda_array_interface__``, numba
  synchronizes on the stream the interface names before it launches (the interface's "stream"
  field, CUDA_ARRAY_INTERFACE_SYNC): one host sync per array argument per launch. The launch
  is already ordered on that very stream, so the arrays are wrapped with ``sync=False``.
- **Device.** The kernel runs on the device its first array lives on, not on whatever device
  happens to be current (``cuda:1`` tensors launched while device 0 is current).

Under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the kernels take numpy arrays and are
launched as they are.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
from numba import cuda


def simulator() -> bool:
    """True when numba.cuda runs kernels in the CUDA simulator (on numpy arrays)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")


def is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def device_of(arrays) -> int:
    """The device index of the first cupy array among ``arrays`` (0 when there is none)."""
    for a in arrays:
        if is_cupy(a):
            return int(a.device.id)
    return 0


def launch(kernel, grid, block, args) -> None:
    """Run ``kernel[grid, block](*args)`` on the device of its arrays, on cupy's current stream."""
    if simulator() or not any(is_cupy(a) for a in args):
        kernel[grid, block](*args)
        return
    import cupy

    device = device_of(args)
    with on_device(device):
        stream = numba_stream(device, cupy.cuda.get_current_stream().ptr)
        kernel[grid, block, stream](*(_as_numba(a, stream) for a in args))


@contextlib.contextmanager
def on_device(device: int):
    """Make ``device`` current for cupy (allocations, streams) and numba (the launch's context)."""
    import cupy

    if cupy.cuda.runtime.getDevice() == device and _numba_current_device() == device:
        yield  # the common case: nothing to switch, nothing to pay
        return
    with cupy.cuda.Device(device), cuda.gpus[device]:
        yield


def _numba_current_device() -> int:
    return int(cuda.get_current_device().id)


@functools.cache
def numba_stream(device: int, ptr: int):
    """Numba's handle on the stream cupy calls ``ptr`` on ``device`` (0: the legacy default stream)."""
    return cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)


def _as_numba(a, stream):
    """A cupy array as a numba device array, with no synchronization (the launch is stream-ordered)."""
    if not is_cupy(a):
        return a
    return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=False)


def compatible_numpy() -> None:
    """Give numpy >= 2.5 back the ``row_stack`` alias that numba-cuda needs to compile anything.

    numba-cuda (every release up to 0.30, now in maintenance mode and not to be fixed upstream:
    NVIDIA/numba-cuda#907) registers an overload of ``np.row_stack`` when its CUDA target first
    loads, and numpy 2.5 removed that name, so the first kernel compile raises AttributeError.
    ``row_stack`` was always exactly ``vstack``, which is what the alias restores; nothing is
    added when numpy still has the name.
    """
    if "row_stack" not in np.__dict__:
        np.row_stack = np.vstack

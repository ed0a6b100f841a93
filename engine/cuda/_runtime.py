"""The device queries of ``engine.cuda`` and the one door to cupy for the package.

Every GPU-only call asks :func:`cupy_for` for cupy: on a machine without CUDA it raises a
DeviceError that names the call and the device, instead of failing inside cupy.
"""

from __future__ import annotations

import types

from engine import backend
from engine.backend import Device
from engine.errors import DeviceError


def cuda_device(device=None, where: str = "engine.cuda") -> Device:
    """``device`` (None: the current CUDA device, an int, "cuda:1", a Device) as a CUDA Device."""
    if device is None:
        return Device("cuda", backend.current_cuda_index())
    if isinstance(device, bool) or not isinstance(device, (int, str, Device)):
        raise DeviceError(f"{where}: expected a CUDA device (an int, 'cuda:N' or a Device), got {device!r}")
    dev = Device("cuda", device) if isinstance(device, int) else backend.device(device)
    if dev.type != "cuda":
        raise DeviceError(f"{where}: expected a CUDA device, got {dev}")
    if dev.index < 0:
        raise DeviceError(f"{where}: device index must be >= 0, got {dev.index}")
    return dev


def cupy_for(where: str, device=None):
    """cupy, once ``device`` (default: the current CUDA device) is known to exist; else a
    DeviceError naming ``where`` and the device."""
    dev = cuda_device(device, where)
    count = backend.cuda_device_count()
    if count == 0:
        raise DeviceError(f"{where}: needs a CUDA device ({dev}), but CUDA is not available here (cupy is not "
                          "installed or no GPU/driver answers); engine.cuda.is_available() is False on this "
                          "machine, so guard GPU-only code with it")
    if dev.index >= count:
        raise DeviceError(f"{where}: device {dev} does not exist; this machine has {count} CUDA device(s)")
    return backend.xp_for(dev)


def is_available() -> bool:
    """Whether a CUDA device is usable here (through cupy). Never raises."""
    return backend.cuda_available()


def device_count() -> int:
    """How many CUDA devices are usable here; 0 without CUDA. Never raises."""
    return backend.cuda_device_count()


def is_initialized() -> bool:
    """Whether the engine has used CUDA in this process (PyTorch's ``torch.cuda.is_initialized``)."""
    return backend.cuda_available() and backend.default_pool_tracker() is not None


def current_device() -> int:
    """The index of the current CUDA device (what ``"cuda"`` without an index means)."""
    cupy_for("engine.cuda.current_device")
    return backend.current_cuda_index()


def set_device(device) -> None:
    """Make ``device`` the current CUDA device of this thread: ``"cuda"`` without an index, new
    allocations and kernel launches go there (PyTorch's ``torch.cuda.set_device``)."""
    dev = cuda_device(device, "engine.cuda.set_device")
    cupy = cupy_for("engine.cuda.set_device", dev)
    cupy.cuda.runtime.setDevice(dev.index)
    backend.set_current_cuda_index(dev.index)


class device:
    """Context manager making ``device`` the current CUDA device inside the block, the previous
    one again after it (PyTorch's ``torch.cuda.device``). ``None`` or a negative index: no change."""

    def __init__(self, device):
        self.index = None if device is None or (isinstance(device, int) and device < 0) \
            else cuda_device(device, "engine.cuda.device").index
        self._previous: list[int] = []

    def __enter__(self):
        if self.index is not None:
            self._previous.append(backend.current_cuda_index())
            set_device(self.index)
        return self

    def __exit__(self, *exc):
        if self.index is not None:
            set_device(self._previous.pop())
        return False


def synchronize(device=None) -> None:
    """Wait until every kernel queued on ``device`` (default: the current one) has finished."""
    dev = cuda_device(device, "engine.cuda.synchronize")
    cupy_for("engine.cuda.synchronize", dev)
    backend.synchronize(dev)


def get_device_properties(device=None, where: str = "engine.cuda.get_device_properties"):
    """Name, total memory (bytes), compute capability and SM count of a CUDA device, as attributes
    named like PyTorch's: ``name``, ``total_memory``, ``major``, ``minor``, ``multi_processor_count``."""
    dev = cuda_device(device, where)
    cupy = cupy_for(where, dev)
    props = cupy.cuda.runtime.getDeviceProperties(dev.index)
    name = props["name"]
    return types.SimpleNamespace(name=name.decode() if isinstance(name, bytes) else str(name),
                                 total_memory=int(props["totalGlobalMem"]), major=int(props["major"]),
                                 minor=int(props["minor"]),
                                 multi_processor_count=int(props["multiProcessorCount"]))


def get_device_name(device=None) -> str:
    """The name of a CUDA device, for example ``'NVIDIA H100 80GB HBM3'``."""
    return get_device_properties(device, "engine.cuda.get_device_name").name


def get_device_capability(device=None) -> tuple[int, int]:
    """The compute capability ``(major, minor)`` of a CUDA device, for example ``(9, 0)``."""
    props = get_device_properties(device, "engine.cuda.get_device_capability")
    return props.major, props.minor


def mem_get_info(device=None) -> tuple[int, int]:
    """``(free, total)`` bytes of a CUDA device's memory, as the driver reports them."""
    dev = cuda_device(device, "engine.cuda.mem_get_info")
    cupy = cupy_for("engine.cuda.mem_get_info", dev)
    with cupy.cuda.Device(dev.index):
        free, total = cupy.cuda.runtime.memGetInfo()
    return int(free), int(total)


def manual_seed(seed: int) -> None:
    """Seed the generator of the current CUDA device (PyTorch's ``torch.cuda.manual_seed``). Without
    CUDA it does nothing, as in PyTorch: scripts call it unconditionally."""
    if backend.cuda_available():
        backend.seed_device(Device("cuda", backend.current_cuda_index()), seed)


def manual_seed_all(seed: int) -> None:
    """Seed the generator of every CUDA device; does nothing without CUDA, as in PyTorch."""
    for index in range(backend.cuda_device_count()):
        backend.seed_device(Device("cuda", index), seed)


def is_bf16_supported() -> bool:
    """Whether bfloat16 tensors can live and compute on the current CUDA device here: False without
    CUDA, below CuPy 14 (no bfloat16) and below compute capability 8.0 (no bfloat16 arithmetic)."""
    if not backend.cuda_available():
        return False
    cupy = backend.xp_for(Device("cuda", backend.current_cuda_index()))
    return int(str(cupy.__version__).split(".")[0]) >= 14 and get_device_capability()[0] >= 8

"""Devices, the array module behind each (numpy on CPU, cupy on CUDA), transfers and RNGs.

The one module of engine/ that knows cupy exists. cupy is imported only when a CUDA device is
asked for, so ``import engine`` on a machine without CUDA is fast and silent.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from engine import kernels
from engine.kernels import threads as _threads
from engine.errors import DeviceError, DTypeError, EngineError


@dataclass(frozen=True)
class Device:
    """Where a tensor lives: ``Device("cpu")`` or ``Device("cuda", index)``.

    Build one from a string with :func:`device` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    type: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"

    def __repr__(self) -> str:
        return f"device({str(self)!r})"


CPU = Device("cpu")


def device(spec: str | Device | None = None) -> Device:
    """Parse ``spec`` ("cpu", "cuda", "cuda:1", a Device, or None for the default device)."""
    if spec is None:
        return default_device()
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise DeviceError(f"device: expected a string like 'cpu' or 'cuda:0' or a Device, got {spec!r}")
    kind, _, index = spec.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return CPU
    if kind == "cuda" and (not index or index.isdigit()):
        return Device("cuda", int(index) if index else _state.cuda_index)
    raise DeviceError(f"device: cannot parse {spec!r}; use 'cpu', 'cuda' or 'cuda:N'")


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices cupy can use; 0 when cupy or a driver is missing. Never raises."""
    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        import cupy  # not cupy_module(): counting devices must not install the allocator

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no driver, no device, broken install: all mean "no CUDA here"
        return 0


def cuda_available() -> bool:
    """True when at least one CUDA device is usable through cupy."""
    return cuda_device_count() > 0


def best_device() -> Device:
    """``cuda:0`` when CUDA is available, else ``cpu``."""
    return Device("cuda", 0) if cuda_available() else CPU


class _DeviceState(threading.local):
    def __init__(self):
        self.default = CPU  # per thread, set on first use (cheaper than getattr with a default)
        self.cuda_index = 0  # what "cuda" without an index means (engine.cuda.set_device)


_state = _DeviceState()


def default_device() -> Device:
    """Device that factories (``zeros``, ``randn`` ...) use when none is given. Starts as cpu."""
    return _state.default


def current_cuda_index() -> int:
    """The CUDA device ``"cuda"`` (without an index) means in this thread: 0 unless
    ``engine.cuda.set_device`` chose another, as in PyTorch."""
    return _state.cuda_index


def set_current_cuda_index(index: int) -> None:
    """Make ``"cuda"`` mean ``cuda:index`` in this thread (engine.cuda.set_device checks the index)."""
    _state.cuda_index = int(index)


def set_default_device(spec: str | Device) -> None:
    """Set the device factories use when none is given (per thread)."""
    _state.default = check_available(device(spec))


def check_available(dev: Device) -> Device:
    """Return ``dev`` if usable here, else raise a DeviceError that says why."""
    if dev.type == "cuda":
        count = cuda_device_count()
        if count == 0:
            raise DeviceError(f"device {dev} requested but CUDA is not available here "
                              "(cupy is not installed or no GPU/driver answers); use device='cpu'")
        if dev.index >= count:
            raise DeviceError(f"device {dev} requested but only {count} CUDA device(s) exist")
    return dev


def xp_for(dev: Device):
    """The array module for ``dev``: numpy or cupy."""
    if dev.type == "cpu":
        return np
    check_available(dev)
    cupy = cupy_module()
    if _cublas_configured is not cupy:  # the first GPU use: cupy takes the engine's matmul precision
        _configure_cublas(cupy)
    return cupy


def array_module(array):
    """numpy or cupy, whichever ``array`` belongs to."""
    return np if isinstance(array, (np.ndarray, np.generic)) else _cupy_of(array)


def address(array) -> int:
    """Address of an array's first element (numpy: host memory; cupy: device memory)."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return int(array.data.ptr)


class _ViewRoot(np.ndarray):
    """An ndarray subclass used only as the base of :func:`rooted_view`'s arrays (never computed with)."""


def rooted_view(flat, start: int, stop: int, shape: tuple):
    """``flat[start:stop].reshape(shape)`` as an array that is the ``.base`` of every view taken from it.

    numpy names the memory's owner as the base of a plain slice's views, so the slice's reference
    count would not see them; it stops that collapse at an array of another type, which the slice
    is made from here. So on the CPU the reference count of the result counts every array that sees
    this memory (the grad Tensors over it, an array from their ``.numpy()``, views of either). On
    cupy it is the plain slice (its views are not counted).
    """
    if isinstance(flat, np.ndarray):
        return flat.view(_ViewRoot)[start:stop].reshape(shape).view(np.ndarray)
    return flat[start:stop].reshape(shape)


def device_of(array) -> Device:
    """The Device holding ``array``."""
    if isinstance(array, (np.ndarray, np.generic)):
        return CPU
    return Device("cuda", int(array.device.id))


def is_array(obj) -> bool:
    return isinstance(obj, np.ndarray) or type(obj).__module__.startswith("cupy")


def to_device(array, dev: Device):
    """Copy ``array`` to ``dev`` (no copy when it is already there)."""
    if device_of(array) == dev:
        return array
    if dev.type == "cpu":
        return to_host(array)
    cupy = xp_for(dev)
    check_cuda_dtype(array.dtype, cupy)
    if _capture.region is not None and isinstance(array, (np.ndarray, np.generic)):
        _refuse_in_capture(f"copies a {tuple(array.shape)} {array.dtype} host array to {dev}")
    with cupy.cuda.Device(dev.index):
        return cupy.asarray(array)


def full_on(dev: Device, shape: tuple, value, dtype):
    """An array of ``shape`` filled with the number ``value`` on ``dev``: on a GPU a fill kernel
    (or memset) with the value as its argument, never a host-to-device copy, so it neither waits
    nor breaks a CUDA graph capture."""
    xp = xp_for(dev)
    with on_device(dev):
        return xp.full(shape, value, dtype=dtype)


def check_cuda_dtype(dtype, cupy) -> None:
    """Refuse a dtype this ``cupy`` cannot hold: bfloat16 arrays need CuPy 14 or later (which
    takes ``ml_dtypes.bfloat16``); CuPy 13 has no bfloat16 and would not say so clearly."""
    if dtype.name == "bfloat16" and int(str(cupy.__version__).split(".")[0]) < 14:
        raise DTypeError(f"bfloat16 on the GPU needs CuPy 14 or later (ml_dtypes.bfloat16 arrays); this "
                         f"CuPy is {cupy.__version__}. Upgrade CuPy, or use float16 / float32 on the GPU")


# ---- float32 matmul precision: PyTorch's set_float32_matmul_precision, applied to cuBLAS -------
#
# One setting, three spellings (as in PyTorch): ``set_float32_matmul_precision("highest" | "high" |
# "medium")``, ``backends.cuda.matmul.allow_tf32`` (True is "high", False "highest") and their
# getters. On the GPU, "high" and "medium" let cuBLAS run float32 GEMMs on TF32 tensor cores
# (PyTorch's CUDA matmuls do the same for both); "highest" keeps them in full float32. The setting
# is cupy's compute type for float32 (and complex64) GEMMs, process-wide, so every ``cupy.matmul``
# follows it: the engine's matmul and linear, and the kernels' GEMMs (kernels/cuda/linear_relu.py).
# On the CPU it is accepted and changes nothing, as in PyTorch.

MATMUL_PRECISIONS = ("highest", "high", "medium")
_matmul_precision = "highest"
_cublas_configured = None  # the cupy module given the current setting, None until the first GPU use


def get_float32_matmul_precision() -> str:
    """The float32 matmul precision: "highest" (the default), "high" or "medium"."""
    return _matmul_precision


def set_float32_matmul_precision(precision: str) -> None:
    """Set the internal precision of float32 matrix multiplications, as PyTorch's function.

    "highest" computes float32 GEMMs in float32; "high" and "medium" allow TensorFloat-32 (10
    mantissa bits) on GPUs that have it (compute capability 8.0 or later). Any other string warns
    and changes nothing, as in PyTorch.
    """
    global _matmul_precision
    if not isinstance(precision, str):
        raise EngineError(f"set_float32_matmul_precision expects a str, but got {type(precision).__name__}")
    if precision not in MATMUL_PRECISIONS:
        warnings.warn(f"{precision} is not one of 'highest', 'high', or 'medium'; the current "
                      "set_float32_matmul_precision call has no effect.", UserWarning, stacklevel=2)
        return
    _matmul_precision = precision
    if _cublas_configured is not None:
        _configure_cublas(_cublas_configured)


# ---- CPU threads -----------------------------------------------------------------------------
# One count for every CPU pool the engine runs (the BLAS behind matmul, numba's parallel kernels);
# kernels/threads.py owns it and docs/architecture.md ("CPU threads") gives the policy.


def set_num_threads(n: int) -> None:
    """Set the number of threads the engine uses for CPU work, as ``torch.set_num_threads``.

    The BLAS (matmuls, through threadpoolctl) and numba's parallel kernels both get ``n``. The
    default follows the CPUs this process may use (affinity and cgroup CPU quota), or
    ``OMP_NUM_THREADS`` when set.

    Example:
        >>> import engine
        >>> engine.set_num_threads(1)
        >>> engine.get_num_threads()
        1
    """
    from engine.kernels import threads

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EngineError(f"set_num_threads: the number of threads must be a positive integer, got {n!r}")
    threads.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the engine uses for CPU work, as ``torch.get_num_threads``."""
    from engine.kernels import threads

    return threads.get_num_threads()


def size_cpu_gemm(x, m: int, n: int, k: int) -> None:
    """Before an (m, k) x (k, n) GEMM on ``x``'s device: on the CPU, the BLAS pool sized for it
    (kernels/threads.py ``for_gemm``: one thread for small GEMMs); nothing for GPU arrays."""
    if isinstance(x, np.ndarray):
        _threads.for_gemm(m, n, k)


def matmul(a, b, op: str = "matmul"):
    """``a @ b`` for two arrays of one device: the one place the engine's GEMMs on raw arrays go.

    numpy arrays: ``a @ b`` itself (numpy's BLAS; nothing changes there). cupy arrays:
    ``kernels/cuda/gemm.py``'s ``matmul``, which calls libcublas directly (a strided-batched GEMM
    for batches, transposed views read in place), because cupy 14's own cuBLAS binding refuses
    every call while a stream is captured, so ``cupy.matmul`` cannot be part of a CUDA graph.
    Where that entry must fall back on ``cupy.matmul`` (an integer or mixed dtype, ROCm, no
    libcublas), a capture raises a CaptureError naming ``op`` instead of cupy's NotImplementedError.
    """
    if isinstance(a, (np.ndarray, np.generic)):
        return a @ b
    try:
        return kernels.gpu_matmul(a, b)
    except NotImplementedError as exc:
        if _capture.region is None:
            raise
        raise CaptureError(
            f"{op}: a {a.shape} {a.dtype} x {b.shape} {b.dtype} product on the GPU inside {_capture.region} "
            "needs cupy's own cuBLAS binding (only float16, bfloat16, float32 and float64 operands of one dtype "
            "go to cuBLAS directly), and cupy refuses every cuBLAS call while a stream is captured. Cast the "
            "operands to one float dtype, or compute this product outside the captured region") from exc


def matmul_allows_tf32() -> bool:
    """``backends.cuda.matmul.allow_tf32``: whether float32 GEMMs may use TF32 ("high" or "medium")."""
    return _matmul_precision != "highest"


def set_matmul_allow_tf32(allow: bool) -> None:
    """``backends.cuda.matmul.allow_tf32 = allow``: "high" when True, "highest" when False."""
    if not isinstance(allow, bool):
        raise EngineError(f"backends.cuda.matmul.allow_tf32 expects a bool, but got {type(allow).__name__}")
    set_float32_matmul_precision("high" if allow else "highest")


def _configure_cublas(cupy) -> None:
    """Give cupy's float32 GEMMs the compute type of the current setting (a Python call, no sync).

    TF32 needs compute capability 8.0 or later; on an older GPU the GEMMs stay in float32, silently,
    as PyTorch's do (cupy itself would warn).
    """
    global _cublas_configured
    linalg = cupy._core._routines_linalg
    tf32 = matmul_allows_tf32() and int(cupy.cuda.Device().compute_capability) >= 80
    cupy._core.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT)
    _cublas_configured = cupy


# ---- host reads: the one door through which device values reach Python ----------------------
#
# Reading a device value on the host (``.get()``, ``.item()``, ``float()``, ``bool()`` of a cupy
# array) waits for every queued kernel: a host sync. A training step must have none, so every
# read the engine does goes through ``to_host`` (``Tensor.item``/``numpy``/``tolist`` and their
# ``float``/``int``/``bool`` spellings call it), which counts them. ``count_host_reads`` lets a
# test assert that a step reads nothing; it counts CPU reads as well, so the check runs on a
# machine without a GPU on the same code path the GPU takes.

class HostReads:
    """How many device->host reads happened inside ``count_host_reads()``, and where."""

    def __init__(self):
        self.count = 0
        self.shapes: list[tuple] = []

    def __repr__(self) -> str:
        return f"HostReads(count={self.count}, shapes={self.shapes[:10]})"


_host_read_counters: list[HostReads] = []


class count_host_reads:
    """Context manager counting the host reads of arrays (numpy or cupy) made through ``to_host``.

    >>> with backend.count_host_reads() as reads:      # doctest: +SKIP
    ...     train_step()
    >>> reads.count
    0
    """

    def __enter__(self) -> HostReads:
        self.reads = HostReads()
        _host_read_counters.append(self.reads)
        return self.reads

    def __exit__(self, *exc):
        _host_read_counters.remove(self.reads)
        return False


def to_host(array) -> np.ndarray:
    """``array`` as a numpy array: a copy (and a wait for the device) for a cupy array.

    Also the natural sync point at which checks deferred on the device are settled (a target
    out of range in cross-entropy, say): see ``kernels.raise_deferred_errors``. Inside a CUDA
    graph capture (:func:`capturing`) a read raises an EngineError naming the caller: it would
    run once, at capture, and never on replay.
    """
    if _capture.region is not None:
        _refuse_in_capture(f"reads a {tuple(getattr(array, 'shape', ()))} {getattr(array, 'dtype', '')} array "
                           "from the device on the host")
    for reads in _host_read_counters:
        reads.count += 1
        reads.shapes.append(tuple(getattr(array, "shape", ())))
    if isinstance(array, (np.ndarray, np.generic)):
        return array
    host = array.get()
    kernels.raise_deferred_errors()
    return host


def on_device(dev: Device):
    """Context manager making ``dev`` current for cupy allocations (a no-op on cpu)."""
    if dev.type == "cpu":
        return _NullContext()
    return xp_for(dev).cuda.Device(dev.index)


def synchronize(dev: Device | None = None) -> None:
    """Wait for queued device work (no-op on cpu); for timing. Refused inside a CUDA graph capture."""
    dev = device(dev)
    if _capture.region is not None:
        _refuse_in_capture("waits for the device (a synchronize)")
    if dev.type == "cuda":
        xp_for(dev).cuda.Device(dev.index).synchronize()
        kernels.raise_deferred_errors()


# ---- CUDA graph capture: what must not happen inside one ------------------------------------
#
# engine.cuda.graph marks the thread as capturing for the length of a capture. The host reads
# and waits above check the mark: on the device they would fail deep inside CUDA (or, worse,
# run once at capture and be missing from every replay), so they raise here, naming the caller.

class _CaptureState(threading.local):
    def __init__(self):
        self.region = None  # what is capturing in this thread (a short description), or None


_capture = _CaptureState()


class CaptureError(DeviceError):
    """Something inside a CUDA graph capture that a replay could not repeat (a host read, a wait,
    a CPU tensor, a shape change between replays)."""


class capturing:
    """Context manager: this thread is capturing a CUDA graph (``region`` names it in errors)."""

    def __init__(self, region: str):
        self.region = region

    def __enter__(self):
        self._previous, _capture.region = _capture.region, self.region
        return self

    def __exit__(self, *exc):
        _capture.region = self._previous
        return False


def capture_region() -> str | None:
    """What this thread is capturing (see :class:`capturing`), or None."""
    return _capture.region


def refuse_in_capture(op: str, what: str) -> None:
    """Raise a CaptureError if this thread is capturing a CUDA graph: ``op`` (a name) ``what``
    (for example "waits for an event") would not be repeated by a replay."""
    if _capture.region is not None:
        _refuse_in_capture(what, op)


def _refuse_in_capture(what: str, op: str | None = None) -> None:
    raise CaptureError(f"{op or _caller()} {what} inside {_capture.region}. A captured region runs on the host "
                       "once, at capture; every replay repeats only its GPU work, so this would happen "
                       "once and never again. Read the static outputs after replay() instead (or move "
                       "the read out of the captured region)")


def _caller() -> str:
    """``Tensor.item (tensor.py:314, called from train.py:40)``: the engine function that led here
    (the outermost of a chain of calls within one engine file, below this module) and the first
    place outside the engine that called it."""
    frame = sys._getframe(1)
    while frame is not None and _file_of(frame) == _HERE:
        frame = frame.f_back
    if frame is None:
        return "a call"
    while frame.f_back is not None and _file_of(frame.f_back) == _file_of(frame):
        frame = frame.f_back  # Tensor.item calls Tensor.numpy: name item, what the user called
    user = frame.f_back
    while user is not None and _file_of(user).startswith(_ENGINE_DIR):
        user = user.f_back
    code = frame.f_code
    where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
    if user is not None and user is not frame:
        where += f", called from {os.path.basename(user.f_code.co_filename)}:{user.f_lineno}"
    return f"{getattr(code, 'co_qualname', code.co_name)} ({where})"


def _file_of(frame) -> str:
    return os.path.normcase(frame.f_code.co_filename)


_HERE = os.path.normcase(__file__)
_ENGINE_DIR = os.path.normcase(os.path.dirname(__file__)) + os.sep


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` where repeated indices accumulate (np.add.at / cupyx.scatter_add).

    On the CPU an integer array indexing dim 0 (a row gather's backward: embeddings) goes to a
    compiled loop with np.add.at's results (kernels/cpu/scatter.py), np.add.at being slow for it.
    """
    if isinstance(target, np.ndarray):
        rows = index[0] if type(index) is tuple and len(index) == 1 else index
        if kernels.scatter_add_rows_takes(target, rows, values):
            kernels.scatter_add_rows(target, rows, values)
        else:
            np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- cupy, imported once, with the default pool's peak tracked ---------------------------------

# Bytes in use in the private pools of CUDA graphs, per device index, as engine.cuda.memory last
# counted them (they change only while a graph captures, and when a graph is dropped).
graph_pool_bytes: dict[int, int] = {}


class PeakTracker:
    """A cupy allocator: the default memory pool's ``malloc``, keeping the peak per device of
    the bytes in use in it and in the graph pools together (cupy's pools know their current use
    only). A peak follows an allocation, so reading the use after each one gives the maximum."""

    def __init__(self, pool):
        self.pool = pool
        self.peak: dict[int, int] = {}

    def malloc(self, size: int):
        memptr = self.pool.malloc(size)
        device_id = memptr.device_id
        used = self.pool.used_bytes() + graph_pool_bytes.get(device_id, 0)
        if used > self.peak.get(device_id, 0):
            self.peak[device_id] = used
        return memptr


_cupy_state = {"module": None, "tracker": None}


def cupy_module():
    """The cupy module, imported once (a function-level ``import`` costs on every call; docs/benchmarks.md).

    On first use the default memory pool's allocator is wrapped by a :class:`PeakTracker` (unless
    the program installed its own allocator), so that ``engine.cuda.max_memory_allocated`` knows
    the peak. A different module object in ``sys.modules`` (a test's stand-in) is picked up.
    """
    module = sys.modules.get("cupy")
    if module is None or module is not _cupy_state["module"]:
        import cupy as module

        _cupy_state["module"], _cupy_state["tracker"] = module, _track_default_pool(module)
    return module


def _track_default_pool(cupy):
    get_pool = getattr(cupy, "get_default_memory_pool", None)
    if get_pool is None:  # a stand-in without memory pools (tests)
        return None
    pool = get_pool()
    if cupy.cuda.get_allocator() != pool.malloc:  # the program chose its own allocator: leave it
        return None
    tracker = PeakTracker(pool)
    cupy.cuda.set_allocator(tracker.malloc)
    return tracker


def default_pool_tracker() -> PeakTracker | None:
    """The tracker of cupy's default pool (None before the first CUDA use, or when the program
    installed its own allocator)."""
    return _cupy_state["tracker"]


def _cupy_of(array):
    module = type(array).__module__
    if module.startswith("cupy"):
        return cupy_module()
    raise TypeError(f"expected a numpy or cupy array, got {type(array).__module__}.{type(array).__name__}")


# ---- random numbers ---------------------------------------------------------------------------

_DEFAULT_SEED = 0
_seed = _DEFAULT_SEED
_generators: dict[Device, object] = {}


_device_seeds: dict[Device, int] = {}  # seeds given to one device (engine.cuda.manual_seed)


def manual_seed(seed: int) -> None:
    """Seed every RNG the engine uses (each device's generator; dropout, init, shuffling)."""
    global _seed
    _seed = int(seed)
    _device_seeds.clear()
    _generators.clear()


def seed_device(dev: Device, seed: int) -> None:
    """Seed the generator of ``dev`` alone (PyTorch's ``torch.cuda.manual_seed``); the next draw
    on ``dev`` starts from ``seed``. ``manual_seed`` later reseeds every device again."""
    _device_seeds[dev] = int(seed)
    _generators.pop(dev, None)


def generator(dev: Device | None = None):
    """The engine's random generator for ``dev``: a numpy Generator on cpu, a cupy one on cuda.

    Refused inside a CUDA graph capture for a GPU: cupy's generator keeps its position on the
    host, so every replay would draw the same numbers (the same dropout mask, step after step).
    """
    dev = device(dev)
    if _capture.region is not None and dev.type == "cuda":
        _refuse_in_capture(f"draws random numbers on {dev} (a replay would repeat the same draw)")
    if dev not in _generators:
        if dev.type == "cpu":
            _generators[dev] = np.random.Generator(np.random.PCG64(_seed))
        else:
            cupy = xp_for(dev)
            with cupy.cuda.Device(dev.index):
                _generators[dev] = cupy.random.RandomState(_device_seeds.get(dev, _seed + dev.index))
    return _generators[dev]


def get_rng_state() -> dict:
    """The CPU generator's state plus the seed: plain ints and strings, safe to store as JSON.

    CUDA generators are not captured: on restore they restart from the seed (cupy's generator
    state cannot be read back portably), so bit-exact resume is guaranteed on cpu.
    """
    return {"seed": _seed, "cpu": generator(CPU).bit_generator.state}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    manual_seed(state["seed"])
    generator(CPU).bit_generator.state = state["cpu"]


def _new_generator(dev: Device, seed: int):
    if dev.type == "cpu":
        return np.random.Generator(np.random.PCG64(seed))
    cupy = xp_for(dev)
    with cupy.cuda.Device(dev.index):
        return cupy.random.RandomState(seed)


class Generator:
    """A random stream of its own, PyTorch's ``torch.Generator``: pass it as ``generator=`` to the
    random functions (``randperm``, ``rand``, ``randn``, ``randint``, ``normal``, ``multinomial``) and
    to the samplers, so a data split is reproducible whatever else draws from the global stream.

    Args:
        device: where the tensors it draws for live ("cpu" default, or "cuda").

    Example:
        >>> g = Generator().manual_seed(1337)                           # doctest: +SKIP
        >>> engine.randperm(10, generator=g)                            # doctest: +SKIP
    """

    _DEFAULT_SEED = 67280421310721  # PyTorch's default seed of a new Generator

    def __init__(self, device: str | Device = "cpu"):
        self.device = check_available(globals()["device"](device))
        self.manual_seed(self._DEFAULT_SEED)

    def manual_seed(self, seed: int) -> "Generator":
        """Restart the stream from ``seed``; returns the generator, as PyTorch's."""
        self._initial_seed = int(seed)
        self.rng = _new_generator(self.device, self._initial_seed)
        return self

    def seed(self) -> int:
        """Reseed from the operating system's entropy; returns the new seed."""
        new = int(np.random.SeedSequence().entropy) % (2 ** 63)
        self.manual_seed(new)
        return new

    def initial_seed(self) -> int:
        """The seed the stream last started from."""
        return self._initial_seed

    def get_state(self):
        """The stream's state (a dict of plain values on the CPU; PyTorch returns a ByteTensor)."""
        if self.device.type != "cpu":
            raise DeviceError("Generator.get_state: the state of a CUDA generator cannot be read back")
        return {"seed": self._initial_seed, "state": self.rng.bit_generator.state}

    def set_state(self, state) -> "Generator":
        """Restore what :meth:`get_state` returned."""
        if self.device.type != "cpu" or not isinstance(state, dict) or "state" not in state:
            raise DeviceError("Generator.set_state: expects what get_state() of a CPU generator returned")
        self._initial_seed = int(state["seed"])
        self.rng.bit_generator.state = state["state"]
        return self

    def __repr__(self) -> str:
        return f"<engine.Generator device={self.device} initial_seed={self._initial_seed}>"


def rng_for(user_generator, dev: Device):
    """The array-level generator to draw for a tensor on ``dev``: the engine's per-device stream, or
    a user's :class:`Generator` (which must be on that device)."""
    if user_generator is None:
        return generator(dev)
    if not isinstance(user_generator, Generator):
        raise TypeError(f"generator= must be an engine.Generator, got {type(user_generator).__name__}")
    if user_generator.device != dev:
        raise DeviceError(f"generator= on {user_generator.device} cannot draw for a tensor on {dev}; create it "
                          f"with engine.Generator(device='{dev}')")
    return user_generator.rng

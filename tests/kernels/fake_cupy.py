"""A stand-in for cupy, just enough to run the host code of the kernels/cuda wrappers without a GPU.

It keeps a current device, like cupy's runtime, and records what the wrappers do with it: the
devices entered with ``Device(...)``, the modules built and kernels looked up (with the device
current at the time), every kernel launch and GEMM with the device current when it was issued.
Arrays carry the device they were allocated on. Nothing is computed: kernels and GEMMs only
record their call; outputs hold whatever ``numpy.empty`` gave.

GEMMs go through a fake cuBLAS (tests/kernels/fake_cublas.py) that computes them with NumPy under
cuBLAS's column-major semantics on the arrays registered here by address, so the GEMM outputs are
real results; ``gemms`` records (current device, operand devices) for both the direct cuBLAS calls
and any ``cupy.matmul`` fallback.

Use it through the :func:`fake_cupy` fixture (import it into the test module): it is put in
``sys.modules["cupy"]`` for one test, with every cache of kernels/cuda cleared before and after,
so that nothing built with the fake outlives the test (on a GPU machine the real cupy follows).
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest

from tests.kernels.fake_cublas import BufferRegistry, FakeCublas

GPU_COUNT = 2
SM_COUNT = 132
HANDLE_BASE = 0xC0B1A5000  # the fake cuBLAS handle of device d is HANDLE_BASE + d
COMPUTE_TYPE_DEFAULT = 1  # cupy._core._routines_linalg.COMPUTE_TYPE_DEFAULT


class ndarray:  # noqa: N801 - named like cupy's, so error messages read "cupy.ndarray(...)"
    """A host array tagged with a device; attributes as the wrappers and validators read them."""

    __module__ = "cupy._core.core"
    __cuda_array_interface__ = None  # marks the type as a GPU array for the registry

    def __init__(self, host: np.ndarray, device_id: int, fake: FakeCupy):
        self.host = host
        self.device_id = device_id
        self._fake = fake
        self.shape, self.dtype, self.size, self.ndim = host.shape, host.dtype, host.size, host.ndim
        self.nbytes, self.flags = host.nbytes, host.flags
        self.data = types.SimpleNamespace(ptr=host.__array_interface__["data"][0], device_id=device_id)

    @property
    def device(self):
        return self._fake.cuda.Device(self.device_id)

    @property
    def T(self):  # noqa: N802
        return ndarray(self.host.T, self.device_id, self._fake)

    def get(self):
        return self.host.copy()

    def copy(self):
        return self._fake._new(self.host.copy())

    def reshape(self, *shape):
        return ndarray(self.host.reshape(*shape), self.device_id, self._fake)

    def astype(self, dtype):
        return self._fake._new(self.host.astype(dtype))

    def fill(self, value):  # a fill kernel on a GPU: here at once
        self.host.fill(value)


class _Kernel:
    def __init__(self, fake: FakeCupy, name: str, device_id: int):
        self.fake, self.name, self.device_id = fake, name, device_id
        self.kernel = types.SimpleNamespace(ptr=id(self))

    def __call__(self, grid, block, args, **kwargs):
        self.fake.launches.append(types.SimpleNamespace(name=self.name, grid=grid, block=block, args=args,
                                                        device=self.fake.current, built_for=self.device_id,
                                                        kernel=self, shared_mem=kwargs.get("shared_mem", 0)))
        run = self.fake.kernel_impls.get(self.name)
        if run is not None:  # a test's NumPy transcription of the kernel: the launch computes
            run(grid, block, tuple(a.host if isinstance(a, ndarray) else a for a in args))


class FakeCupy(types.ModuleType):
    """The fake ``cupy`` module (see the module docstring)."""

    def __init__(self, device_count: int = GPU_COUNT):
        super().__init__("cupy")
        self.current = 0
        self.entered: list[int] = []  # device ids, in the order Device(...) was entered
        self.modules: list = []  # options of each RawModule built
        self.lookups: list[tuple[str, int]] = []  # (kernel, current device) per get_function
        self.launches: list = []
        self.gemms: list[tuple[int, tuple[int, ...]]] = []  # (current device, operand devices)
        self.allocations: list[int] = []  # current device per allocation
        self.memory = BufferRegistry()
        self.cublas = FakeCublas(self.memory.resolve, handle_device=lambda handle: handle - HANDLE_BASE)
        self.kernel_impls: dict = {}  # kernel name -> run(grid, block, host args), for tests that compute
        self.compute_type_f32 = COMPUTE_TYPE_DEFAULT  # what cupy._core.get_compute_type(float32) answers
        fake = self

        class Device:
            compute_capability = "90"  # an H100's, as cupy reports it

            def __init__(self, device=None):
                self.id = fake.current if device is None else int(device)
                self._previous: list[int] = []
                self.attributes = {"MultiProcessorCount": SM_COUNT}

            def __enter__(self):
                fake.entered.append(self.id)
                self._previous.append(fake.current)
                fake.current = self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._previous.pop()
                return False

            def use(self):
                fake.current = self.id

            def synchronize(self):
                pass

        class RawModule:
            def __init__(self, *, code, options=()):
                self.options = options
                fake.modules.append(options)

            def get_function(self, name):
                fake.lookups.append((name, fake.current))
                return _Kernel(fake, name, fake.current)

        self.RawModule = RawModule
        runtime = types.SimpleNamespace(getDevice=lambda: fake.current, getDeviceCount=lambda: device_count,
                                        setDevice=lambda i: setattr(fake, "current", int(i)), is_hip=False)
        driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda ptr, threads, smem: 4)
        stream = types.SimpleNamespace(ptr=0, synchronize=lambda: None)
        self.cuda = types.SimpleNamespace(Device=Device, runtime=runtime, driver=driver,
                                          get_current_stream=lambda: stream,
                                          get_cublas_handle=lambda: HANDLE_BASE + fake.current,
                                          alloc=self._alloc)
        self._core = types.SimpleNamespace(get_compute_type=lambda dtype: fake.compute_type_f32)
        cublas_gemm = self.cublas.gemm_ex

        def gemm_ex(*args):  # also noted in ``gemms``, as the fallback's cupy.matmul is
            status = cublas_gemm(*args)
            self.gemms.append((self.current, self.cublas.calls[-1].devices))
            return status
        self.cublas.gemm_ex = gemm_ex

    # -- the array functions the wrappers call --------------------------------------------------

    def _new(self, host: np.ndarray) -> ndarray:
        self.allocations.append(self.current)
        self.memory.add(host.__array_interface__["data"][0], host, self.current)
        return ndarray(host, self.current, self)

    def empty(self, shape, dtype=np.float64):
        return self._new(np.empty(shape, dtype))

    def _alloc(self, size: int):
        """``cupy.cuda.alloc``: raw device memory (a MemoryPointer), here a registered byte array."""
        block = self._new(np.empty(size, np.uint8))
        return types.SimpleNamespace(ptr=block.data.ptr, device_id=self.current, block=block)

    def zeros(self, shape, dtype=np.float64):
        return self._new(np.zeros(shape, dtype))

    def full(self, shape, fill_value, dtype=None):
        return self._new(np.full(shape, fill_value, dtype))

    def array(self, obj, dtype=None):
        return self._new(np.array(obj, dtype))

    def asarray(self, a, dtype=None):
        return a if isinstance(a, ndarray) else self._new(np.asarray(a, dtype))

    def matmul(self, a, b, out=None):
        self.gemms.append((self.current, (a.device_id, b.device_id) + ((out.device_id,) if out is not None else ())))
        return out if out is not None else self.empty((a.shape[0], b.shape[1]), a.dtype)

    def on(self, device_id: int, host: np.ndarray) -> ndarray:
        """A fake array on ``device_id`` holding ``host`` (not recorded as an allocation)."""
        host = np.ascontiguousarray(host)
        self.memory.add(host.__array_interface__["data"][0], host, device_id)
        return ndarray(host, device_id, self)


CUDA_MODULES = ("engine.kernels.cuda.module", "engine.kernels.cuda.optim", "engine.kernels.cuda.linear_relu",
                "engine.kernels.cuda.gemm",
                "engine.kernels.cuda.softmax_cross_entropy", "engine.kernels.cuda.attention")


def clear_cuda_caches() -> None:
    """Empty every functools cache of the kernels/cuda modules (kernels, device figures, constants)."""
    for name in CUDA_MODULES:
        module = importlib.import_module(name)
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
    importlib.import_module("engine.kernels.cuda.module").clear_cache()


def install_fake_cublas(monkeypatch, cublas) -> None:
    """Route kernels/cuda/gemm.py's cuBLAS calls to ``cublas`` (a :class:`FakeCublas`)."""
    from engine.kernels.cuda import gemm

    monkeypatch.setattr(gemm, "_cublas", lambda: cublas)
    monkeypatch.setattr(gemm, "_workspaces", {})  # workspaces live in the fake's memory: one set per test


@pytest.fixture
def fake_cupy(monkeypatch):
    """A :class:`FakeCupy` as ``cupy`` for one test (two GPUs, device 0 current, the fake cuBLAS)."""
    fake = FakeCupy()
    clear_cuda_caches()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    install_fake_cublas(monkeypatch, fake.cublas)
    yield fake
    monkeypatch.undo()
    clear_cuda_caches()

"""A stand-in for cupy with stream capture: enough of cupy's API for engine.cuda (streams, events,
memory pools, ``begin_capture`` / ``end_capture`` / ``Graph.launch``) and for the engine's own ops
on "GPU" arrays, so that the capture logic runs and is checked on a machine without a GPU.

Arrays (:class:`FakeArray`) hold numpy data and report themselves as cupy arrays (their type's
module is ``cupy._core.core``), with a device and a device address (``a.data.ptr``) handed out by
the current allocator, so pools, peaks and "which memory belongs to the graph" work as on a GPU.

Capture, as on a GPU, runs nothing: every operation is executed at once on the host (so shapes
and Python logic proceed), and while the current stream captures it is also *recorded* as a step
that recomputes its result into the same memory, reading its inputs' memory afresh. At
``end_capture`` the capture's effects are undone, which is what a GPU shows after a capture:
memory allocated during it holds garbage (NaN here) and memory from before it (static inputs,
parameters) holds what it held before. ``Graph.launch`` replays the recorded steps, so a replay
sees new values written into static inputs and device scalars. Host reads (``get``, ``item``,
``bool()``) and waits (``synchronize``, ``done``) while capturing raise, as CUDA refuses them;
``host_reads`` and ``syncs`` count them.

cuBLAS: cupy 14's own cuBLAS routines (``cupy.matmul`` and ``@``, ``dot``, ``vdot``, ``inner``,
``tensordot``, ``einsum``, ``linalg``) raise cupy's ``NotImplementedError('calling cuBLAS API
during stream capture is currently unsupported')`` while the current stream captures, as
``cupy_backends``' ``cublas.setStream`` does. The GEMMs the engine issues itself
(kernels/cuda/gemm.py, through libcublas) run on the fake cuBLAS of tests/kernels/fake_cublas.py
over this fake's memory (the ``fake_gpu`` fixture installs it): executed at once and recorded
like any other write, and, as the engine's rule, refused inside a capture unless a workspace of
the engine's is set on the handle (so cuBLAS would not allocate while capturing).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import types
import weakref

import numpy as np
import pytest
from numpy.lib.mixins import NDArrayOperatorsMixin

from tests.kernels.fake_cublas import DTYPE_NAMES, FakeCublas, FakeCublasError

CUBLAS_HANDLE = 0xC0B1A5000  # the fake cuBLAS handle of device d is CUBLAS_HANDLE + d
# cupy 14's message (cupy_backends/cuda/libs/cublas.pyx, setStream) for any cuBLAS call while capturing
CUPY_CUBLAS_REFUSAL = "calling cuBLAS API during stream capture is currently unsupported"
# numpy functions that cupy runs through its cuBLAS binding (linalg: cuBLAS / cuSOLVER handles, same check)
_CUBLAS_FUNCTIONS = {np.matmul, np.dot, np.vdot, np.inner, np.tensordot, np.einsum}


class CaptureViolation(RuntimeError):
    """What CUDA would raise: an operation that cannot happen while a stream captures."""


class MemoryPointer:
    def __init__(self, ptr: int, size: int, device_id: int, pool):
        self.ptr, self.size, self.device_id, self.pool = ptr, size, device_id, pool


class MemoryPool:
    """cupy.cuda.MemoryPool: blocks from a fake address space; freed blocks are reused by size."""

    def __init__(self, fake: "FakeCupy"):
        self.fake = fake
        self._used: dict[int, int] = {}  # ptr -> size of live blocks
        self._free: dict[int, list[int]] = {}  # size -> free block pointers
        self.mallocs = 0

    def malloc(self, size: int) -> MemoryPointer:
        self.mallocs += 1
        size = max(int(size), 1)
        free = self._free.get(size)
        ptr = free.pop() if free else self.fake._new_address(size)
        self._used[ptr] = size
        return MemoryPointer(ptr, size, self.fake.current_device, self)

    def free(self, ptr: int) -> None:
        size = self._used.pop(ptr)
        self._free.setdefault(size, []).append(ptr)

    def used_bytes(self) -> int:
        return sum(self._used.values())

    def total_bytes(self) -> int:
        return self.used_bytes() + sum(size * len(ptrs) for size, ptrs in self._free.items())

    def free_all_blocks(self, stream=None) -> None:
        self._free.clear()


class FakeArray(NDArrayOperatorsMixin):
    """A "cupy" array: numpy data, a device, a device address; operations go through the fake."""

    __module__ = "cupy._core.core"

    def __init__(self, fake: "FakeCupy", host: np.ndarray, base: "FakeArray | None", memptr: MemoryPointer | None):
        self._fake, self.host, self.base = fake, host, base
        if base is None:
            self.data = memptr
            weakref.finalize(self, memptr.pool.free, memptr.ptr)  # freed when the last reference goes
        else:
            offset = host.__array_interface__["data"][0] - self._root.host.__array_interface__["data"][0]
            self.data = types.SimpleNamespace(ptr=self._root.data.ptr + offset, device_id=self._root.data.device_id)

    @property
    def _root(self) -> "FakeArray":
        """The array owning the memory (a property: a reference to itself would be a cycle)."""
        return self if self.base is None else self.base._root

    # attributes read by the engine
    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    ndim = property(lambda self: self.host.ndim)
    size = property(lambda self: self.host.size)
    strides = property(lambda self: self.host.strides)
    itemsize = property(lambda self: self.host.itemsize)
    nbytes = property(lambda self: self.host.nbytes)
    flags = property(lambda self: self.host.flags)
    device = property(lambda self: self._fake.cuda.Device(self.data.device_id))
    T = property(lambda self: self._fake._run(np.transpose, (self,), {}))

    def __len__(self):
        return len(self.host)

    def __repr__(self):
        return f"FakeArray({self.host!r}, device={self.data.device_id})"

    # protocols: every numpy ufunc / function on these arrays comes here
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul and method == "__call__" and not kwargs:
            return self._fake.matmul(*inputs)
        return self._fake._run(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        if func in _CUBLAS_FUNCTIONS or (getattr(func, "__module__", "").startswith("numpy.linalg")
                                         and func is not np.linalg.norm):
            self._fake.cupy_cublas(func.__name__)
        return self._fake._run(func, args, kwargs)

    # host reads: refused while capturing, as CUDA refuses a synchronous copy then
    def get(self):
        self._fake._host_read("get")
        return self.host.copy()

    def item(self):
        self._fake._host_read("item")
        return self.host.item()

    def __bool__(self):
        self._fake._host_read("__bool__")
        return bool(self.host)

    def __float__(self):
        self._fake._host_read("__float__")
        return float(self.host)

    def __int__(self):
        self._fake._host_read("__int__")
        return int(self.host)

    def tolist(self):
        self._fake._host_read("tolist")
        return self.host.tolist()

    # methods the engine calls, as recorded operations (see _method below the class)

    def astype(self, dtype, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self.dtype and (kwargs.get("order") != "C" or self.flags.c_contiguous):
            return self
        return self._fake._run(lambda h: h.astype(dtype, **kwargs), (self,), {}, allocate=True)

    def copy(self, order="C"):
        return self._fake._run(lambda h: h.copy(order=order), (self,), {}, allocate=True)

    def view(self, *args):
        return self._fake._run(lambda h: h.view(*args), (self,), {})

    def __getitem__(self, index):
        index = self._fake._unwrap(index)
        return self._fake._run(lambda h: h[index], (self,), {})

    def __setitem__(self, index, value):
        index = self._fake._unwrap(index)

        def write(h, v):
            h[index] = v
        self._fake._write(self, write, (self, value))

    def fill(self, value):
        self._fake._write(self, lambda h, v: h.fill(v), (self, value))


def _method(name: str):
    """A FakeArray method running numpy's method of that name as a recorded operation."""
    def method(self, *args, **kwargs):
        return self._fake._run(lambda h, *a, **k: getattr(h, name)(*a, **k), (self, *args), kwargs)
    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "any", "all", "prod", "reshape", "transpose", "ravel", "swapaxes",
              "cumsum"):
    setattr(FakeArray, _name, _method(_name))


class FakeCupy(types.ModuleType):
    """The fake ``cupy`` module (see the module docstring)."""

    __version__ = "14.2.0"

    def __init__(self, device_count: int = 1):
        super().__init__("cupy")
        self.device_count = device_count
        self.current_device = 0
        self._address = itertools.count(1 << 32, 256)
        self._local = threading.local()  # current stream stack and allocator override, per thread
        self.default_pool = MemoryPool(self)
        self._allocator = self.default_pool.malloc
        self.capturing_stream = None
        self._steps: list | None = None
        self._captured_roots: list = []
        self._saved_external: dict = {}
        self.launches = 0
        self.host_reads = self.syncs = 0
        # (a, b, product) dtype names of each GEMM, in order: cupy.matmul's and the fake cuBLAS's calls
        self.gemms: list[tuple[str, str, str]] = []
        self.cupy_cublas_calls: list[str] = []  # cupy's own cuBLAS routines called (matmul, dot ...)
        self._roots: list = []  # weak references to every allocation, for ``resolve``
        self.cublas: FakeCublas | None = None  # the fake libcublas, once installed (install_cublas)
        # cupy.lib.stride_tricks.as_strided: a view of the same memory (numpy's would see no array)
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=lambda a, shape=None, strides=None: self._run(
                lambda h: np.lib.stride_tricks.as_strided(h, shape=shape, strides=strides), (a,), {})))
        self.cuda = self._cuda_namespace()
        # cupyx.scatter_add (the engine's backend.scatter_add on GPU arrays: embedding and index_add backward)
        self.cupyx = types.ModuleType("cupyx")
        self.cupyx.scatter_add = lambda target, index, values: self._write(
            target, lambda t, i, v: np.add.at(t, i, v), (target, index, values))
        # cupy's compute-type API, which the engine sets at the first GPU use (the matmul precision):
        # the last setting is kept for a test to read, nothing else depends on it here.
        self.compute_types: dict = {}
        self._core = types.SimpleNamespace(
            set_compute_type=lambda dtype, kind: self.compute_types.__setitem__(np.dtype(dtype).name, kind),
            get_compute_type=lambda dtype: self.compute_types.get(np.dtype(dtype).name, 1),  # 1: DEFAULT
            _routines_linalg=types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7))

    # ---- addresses and allocation ----------------------------------------------------------------
    def _new_address(self, size: int) -> int:
        address = next(self._address)
        for _ in range((size - 1) // 256):
            next(self._address)  # blocks do not overlap
        return address

    def get_default_memory_pool(self):
        return self.default_pool

    def _current_allocator(self):
        return getattr(self._local, "allocator", None) or self._allocator

    def _allocate(self, host: np.ndarray) -> FakeArray:
        memptr = self._current_allocator()(host.nbytes)
        array = FakeArray(self, np.ascontiguousarray(host) if host.ndim else np.array(host), None, memptr)
        self._roots.append(weakref.ref(array))
        if self._steps is not None:
            self._captured_roots.append(weakref.ref(array))
        return array

    # ---- running operations ------------------------------------------------------------------------
    def _unwrap(self, value):
        if isinstance(value, FakeArray):
            return value.host
        if isinstance(value, tuple):
            return tuple(self._unwrap(v) for v in value)
        if isinstance(value, list):
            return [self._unwrap(v) for v in value]
        if isinstance(value, dict):
            return {k: self._unwrap(v) for k, v in value.items()}
        return value

    def _arrays_in(self, value) -> list:
        if isinstance(value, FakeArray):
            return [value]
        if isinstance(value, (tuple, list)):
            return [a for v in value for a in self._arrays_in(v)]
        if isinstance(value, dict):
            return [a for v in value.values() for a in self._arrays_in(v)]
        return []

    def _run(self, fn, args, kwargs, allocate: bool = False):
        """Run ``fn`` on the host values; results are new memory (allocated) or views of an input.
        While capturing, record a step recomputing each new result into its memory."""
        out = kwargs.get("out")
        if out is not None:  # an in-place ufunc: a write into existing memory
            targets = self._arrays_in(out)
            return self._write(targets[0], lambda *_: fn(*self._unwrap(args), **self._unwrap(kwargs)), targets) \
                if len(targets) == 1 else self._multi_write(fn, args, kwargs, targets)
        result = fn(*self._unwrap(args), **self._unwrap(kwargs))
        inputs = self._arrays_in((args, kwargs))
        wrapped = self._wrap(result, inputs, allocate)
        if self._steps is not None:
            for new in (wrapped if isinstance(wrapped, tuple) else (wrapped,)):
                if isinstance(new, FakeArray) and new.base is None:
                    self._record_recompute(new, wrapped, fn, args, kwargs)
        return wrapped

    def _record_recompute(self, new, wrapped, fn, args, kwargs):
        position = wrapped.index(new) if isinstance(wrapped, tuple) else None

        def step():
            value = fn(*self._unwrap(args), **self._unwrap(kwargs))
            value = value[position] if position is not None else value
            np.copyto(new.host, np.asarray(value).reshape(new.host.shape), casting="unsafe")
        self._steps.append(step)

    def _wrap(self, result, inputs, allocate: bool):
        if isinstance(result, tuple):
            return tuple(self._wrap(r, inputs, allocate) for r in result)
        if isinstance(result, np.generic):
            result = np.asarray(result)
        if not isinstance(result, np.ndarray):
            return result
        if not allocate:
            for a in inputs:
                if np.may_share_memory(result, a.host):
                    return FakeArray(self, result, a, None)  # a view: no memory of its own
        return self._allocate(result)

    def _write(self, target: FakeArray, write, args):
        """Write into existing memory (``out=``, ``a[...] = v``, ``fill``), recorded while capturing."""
        self._note_external_write(target)
        write(*[self._unwrap(a) for a in args])
        if self._steps is not None:
            self._steps.append(lambda: write(*[self._unwrap(a) for a in args]))
        return target

    def _multi_write(self, fn, args, kwargs, targets):
        for t in targets:
            self._note_external_write(t)
        result = fn(*self._unwrap(args), **self._unwrap(kwargs))
        if self._steps is not None:
            self._steps.append(lambda: fn(*self._unwrap(args), **self._unwrap(kwargs)))
        return result if not isinstance(result, np.ndarray) else targets[0]

    def _note_external_write(self, target: FakeArray) -> None:
        """A capture's write into memory that existed before it: undone at end_capture."""
        root = target._root
        if self._steps is None or any(r() is root for r in self._captured_roots):
            return
        self._saved_external.setdefault(id(root), (root, root.host.copy()))

    def _host_read(self, what: str) -> None:
        self.host_reads += 1
        if self._steps is not None:
            raise CaptureViolation(f"cudaErrorStreamCaptureUnsupported: {what} (a synchronous copy) while capturing")

    def _sync(self, what: str) -> None:
        self.syncs += 1
        if self._steps is not None:
            raise CaptureViolation(f"cudaErrorStreamCaptureUnsupported: {what} (a wait) while capturing")

    # ---- GEMMs ---------------------------------------------------------------------------------------
    def cupy_cublas(self, what: str) -> None:
        """A call into cupy's own cuBLAS binding: refused while the current stream captures, as cupy 14 does."""
        self.cupy_cublas_calls.append(what)
        if self._steps is not None and self.get_current_stream() is self.capturing_stream:
            raise NotImplementedError(CUPY_CUBLAS_REFUSAL)

    def resolve(self, ptr: int, dtype):
        """The live allocation holding device address ``ptr``, from ``ptr`` on, as a flat numpy array (for
        the fake cuBLAS), and its device."""
        for ref in reversed(self._roots):
            array = ref()
            if array is not None and array.data.ptr <= ptr < array.data.ptr + max(array.nbytes, 1):
                if array.dtype != np.dtype(dtype):
                    raise FakeCublasError(f"the data type says {np.dtype(dtype)}, the memory at {ptr:#x} holds "
                                          f"{array.dtype}")
                offset, rem = divmod(ptr - array.data.ptr, array.dtype.itemsize)
                if rem:
                    raise FakeCublasError(f"a misaligned pointer {ptr:#x}")
                return array.host.reshape(-1)[offset:], array.data.device_id
        raise FakeCublasError(f"an illegal address: {ptr:#x} is in no live allocation")

    def root_at(self, ptr: int) -> "FakeArray":
        for ref in reversed(self._roots):
            array = ref()
            if array is not None and array.data.ptr <= ptr < array.data.ptr + max(array.nbytes, 1):
                return array
        raise FakeCublasError(f"an illegal address: {ptr:#x} is in no live allocation")

    def cublas_write(self, c_ptr: int, compute) -> None:
        """How a fake cuBLAS call writes C: at once, and recorded while capturing (a graph node)."""
        if self._steps is not None:
            handle = self.cuda.get_cublas_handle()
            if self.cublas is not None and self.cublas.workspaces.get(handle) is None:
                raise FakeCublasError("a cuBLAS GEMM captured with no workspace of the engine's set on the handle: "
                                      "cuBLAS could allocate one inside the capture")
        self._write(self.root_at(c_ptr), lambda *_: compute(), ())

    def _alloc(self, size: int):
        """``cupy.cuda.alloc``: raw memory (no array) from the current allocator, readable by ``resolve``
        as bytes while the returned pointer lives."""
        memptr = self._current_allocator()(int(size))
        block = FakeArray(self, np.zeros(int(size), np.uint8), None, memptr)  # freed with the pointer's holder
        self._roots.append(weakref.ref(block))
        return types.SimpleNamespace(ptr=memptr.ptr, size=int(size), device_id=memptr.device_id, block=block)

    def matmul(self, a, b, out=None):
        """``cupy.matmul`` (and ``@``): the product in the operands' dtype, recorded in ``gemms``.

        For 16-bit operands cupy runs cuBLAS with 16-bit A, B and C and float32 accumulation
        (``CUBLAS_COMPUTE_32F``), so the product is the float32 one rounded once: so it is here. (numpy
        alone gives a float32 product of two bfloat16 arrays: ml_dtypes has no bfloat16 matmul loop.)
        """
        dtype = np.result_type(*(np.asarray(x).dtype if not isinstance(x, FakeArray) else x.dtype for x in (a, b)))

        def gemm(x, y):
            if dtype.name in ("float16", "bfloat16"):
                return np.matmul(x.astype(np.float32), y.astype(np.float32)).astype(dtype)
            return np.matmul(x, y)
        self.cupy_cublas("matmul")
        self.gemms.append((np.dtype(a.dtype).name, np.dtype(b.dtype).name, dtype.name))
        if out is not None:
            return self._write(out, lambda o, x, y: np.copyto(o, gemm(x, y), casting="unsafe"), (out, a, b))
        return self._run(gemm, (a, b), {}, allocate=True)

    # ---- array creation: no array argument, so numpy's dispatch cannot find these ------------------
    def empty(self, shape, dtype=np.float64, order="C"):
        return self._create(lambda: np.empty(shape, dtype))

    def zeros(self, shape, dtype=np.float64):
        return self._create(lambda: np.zeros(shape, dtype))

    def ones(self, shape, dtype=np.float64):
        return self._create(lambda: np.ones(shape, dtype))

    def full(self, shape, fill_value, dtype=None):
        return self._create(lambda: np.full(shape, fill_value, dtype))

    def arange(self, *args, **kwargs):
        return self._create(lambda: np.arange(*args, **kwargs))

    def _create(self, make):
        return self._run(lambda: make(), (), {}, allocate=True)

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        if self._steps is not None:
            raise CaptureViolation("cudaErrorStreamCaptureUnsupported: a host-to-device copy while capturing")
        return self._allocate(np.array(a, dtype=dtype))

    array = asarray

    def ascontiguousarray(self, a, dtype=None):  # numpy's does not dispatch to its argument
        return self._run(lambda h: np.ascontiguousarray(h, dtype=dtype), (a,), {})

    def __getattr__(self, name):  # everything else is numpy's (ufuncs and functions dispatch back here)
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(np, name)

    # ---- cupy.cuda --------------------------------------------------------------------------------
    def _stream_stack(self) -> list:
        stack = getattr(self._local, "streams", None)
        if stack is None:
            stack = self._local.streams = []
        return stack

    def get_current_stream(self):
        stack = self._stream_stack()
        return stack[-1] if stack else self.null_stream

    def _cuda_namespace(self):
        fake = self

        class Device:
            compute_capability = "90"  # an H100's, as cupy reports it

            def __init__(self, device=None):
                self.id = fake.current_device if device is None else int(device)
                self._previous: list[int] = []

            def __enter__(self):
                self._previous.append(fake.current_device)
                fake.current_device = self.id
                return self

            def __exit__(self, *exc):
                fake.current_device = self._previous.pop()
                return False

            def synchronize(self):
                fake._sync("Device.synchronize")

            def __eq__(self, other):  # as cupy's Device: equal when the ids are
                return isinstance(other, Device) and other.id == self.id

            def __hash__(self):
                return hash(self.id)

            def __str__(self):
                return f"<CUDA Device {self.id}>"

        class Graph:
            def __init__(self, steps):
                self.steps = steps

            def launch(self, stream=None):
                fake.launches += 1
                for step in self.steps:
                    step()

            def upload(self, stream=None):
                pass

        class Stream:
            _ptrs = itertools.count(0x1000, 0x10)

            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
                self.ptr = 0 if null else next(Stream._ptrs)
                self.non_blocking, self.priority = non_blocking, priority
                self.capture_mode = None

            def __enter__(self):
                fake._stream_stack().append(self)
                return self

            def __exit__(self, *exc):
                fake._stream_stack().pop()
                return False

            def begin_capture(self, mode=None):
                if self.ptr == 0:
                    raise CaptureViolation("cudaErrorStreamCaptureUnsupported: capture on the legacy null stream")
                if fake._steps is not None:
                    raise CaptureViolation("cudaErrorStreamCaptureImplicit: a capture is already running")
                fake.capturing_stream, fake._steps, self.capture_mode = self, [], mode
                fake._captured_roots, fake._saved_external = [], {}

            def end_capture(self):
                if fake.capturing_stream is not self:
                    raise CaptureViolation("cudaErrorStreamCaptureUnmatched: this stream is not capturing")
                steps, fake._steps, fake.capturing_stream = fake._steps, None, None
                for root, saved in fake._saved_external.values():  # a capture changes nothing...
                    np.copyto(root.host, saved)
                for ref in fake._captured_roots:  # ...and what it allocated holds garbage
                    array = ref()
                    if array is not None and array.dtype.kind == "f":
                        array.host.fill(np.nan)
                fake._captured_roots, fake._saved_external = [], {}
                return Graph(steps)

            def is_capturing(self):
                return fake.capturing_stream is self

            @property
            def done(self):
                fake._sync("Stream.done")
                return True

            def synchronize(self):
                fake._sync("Stream.synchronize")

            def wait_event(self, event):
                event.waited_by.append(self)

        class Event:
            _clock = itertools.count(1)

            def __init__(self, block=False, disable_timing=False, interprocess=False):
                self.disable_timing, self.time, self.stream, self.waited_by = disable_timing, None, None, []

            def record(self, stream=None):
                self.stream, self.time = stream, next(Event._clock)

            @property
            def done(self):
                fake._sync("Event.done")
                return True

            def synchronize(self):
                fake._sync("Event.synchronize")

        def get_elapsed_time(start, end):
            if start.disable_timing or end.disable_timing:
                raise RuntimeError("cudaErrorInvalidResourceHandle")
            return float(end.time - start.time)

        @contextlib.contextmanager
        def using_allocator(allocator=None):
            previous = getattr(fake._local, "allocator", None)
            fake._local.allocator = allocator
            try:
                yield
            finally:
                fake._local.allocator = previous

        def set_allocator(allocator=None):
            fake._allocator = allocator

        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: fake.device_count, getDevice=lambda: fake.current_device,
            setDevice=lambda i: setattr(fake, "current_device", int(i)),
            getDeviceProperties=lambda i: {"name": b"Fake GPU", "totalGlobalMem": 80 << 30, "major": 9, "minor": 0,
                                           "multiProcessorCount": 132},
            memGetInfo=lambda: (70 << 30, 80 << 30),
            streamCaptureModeGlobal=0, streamCaptureModeThreadLocal=1, streamCaptureModeRelaxed=2)
        self.null_stream = Stream(null=True)
        Stream.null = self.null_stream
        return types.SimpleNamespace(
            Device=Device, Stream=Stream, Event=Event, runtime=runtime, MemoryPool=lambda *a: MemoryPool(fake),
            using_allocator=using_allocator, set_allocator=set_allocator, get_allocator=lambda: fake._allocator,
            alloc=fake._alloc, get_cublas_handle=lambda: CUBLAS_HANDLE + fake.current_device,
            get_current_stream=fake.get_current_stream, get_elapsed_time=get_elapsed_time,
            graph=types.SimpleNamespace(Graph=Graph))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A :class:`FakeCupy` as ``cupy`` with one device, for one test; engine state tied to it
    (the allocator tracker, graph capture streams, device generators) is dropped afterwards."""
    from engine import backend
    from engine.cuda import graphs, memory

    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", fake.cupyx)
    monkeypatch.setattr(backend, "cuda_device_count", lambda: fake.device_count)
    monkeypatch.setattr(backend, "_cupy_state", {"module": None, "tracker": None})
    monkeypatch.setattr(backend, "graph_pool_bytes", {})
    monkeypatch.setattr(graphs, "_capture_streams", {})
    monkeypatch.setattr(memory, "_graph_pools", weakref.WeakSet())  # a graph of an earlier test may await gc
    install_cublas(monkeypatch, fake)
    install_linear_relu_kernels(monkeypatch, fake)
    yield fake


def install_linear_relu_kernels(monkeypatch, fake: FakeCupy) -> None:
    """linear_relu.cu's launches (the fused linear_relu and Linear's bias gradient, kernels.gpu_bias_grad)
    run as the NumPy transcriptions of tests/kernels/fake_linear_relu_kernels.py, executed at once and
    recorded like any other write. Each launch is noted in ``fake.kernel_launches`` (its name)."""
    from engine.kernels.cuda import linear_relu
    from tests.kernels.fake_linear_relu_kernels import impls

    table = impls()
    fake.kernel_launches = []

    def function(module, name, device_id=None):
        def launch(grid, block, args):
            fake.kernel_launches.append(name)
            targets = [a for a in args if hasattr(a, "host")]
            fake._multi_write(lambda *hosts: table[name](grid, block, hosts), tuple(args), {}, targets)
        return launch
    monkeypatch.setattr(linear_relu, "function", function)
    monkeypatch.setattr(linear_relu, "_sm_count", lambda device_id: 132)


def install_cublas(monkeypatch, fake: FakeCupy) -> FakeCublas:
    """The fake libcublas over ``fake``'s memory, in place of the real one for kernels/cuda/gemm.py."""
    from engine.kernels.cuda import gemm, module

    monkeypatch.setattr(module, "_get_device", None)  # bound to this fake's runtime at first use
    fake.cublas = FakeCublas(fake.resolve, handle_device=lambda handle: handle - CUBLAS_HANDLE,
                             run=fake.cublas_write)
    execute = fake.cublas._gemm

    def noted(*args):  # also noted in ``gemms``, as cupy.matmul's are (one entry per cuBLAS call)
        status = execute(*args)
        name = DTYPE_NAMES[fake.cublas.calls[-1].data_type]
        fake.gemms.append((name, name, name))
        return status
    fake.cublas._gemm = noted
    monkeypatch.setattr(gemm, "_cublas", lambda: fake.cublas)
    monkeypatch.setattr(gemm, "_workspaces", {})
    monkeypatch.setattr(gemm, "_compute_capability", lambda device_id: 90)
    return fake.cublas

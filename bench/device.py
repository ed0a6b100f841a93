"""The device a benchmark runs on: array module, seeded random inputs, clocks, torch peer.

:class:`BenchDevice` is the one object the kernel and end-to-end benchmarks share. It knows the
engine device (cpu or cuda), the array module, how to make random float32 inputs (never zeros)
from the engine's seeded generator, how to copy arrays to the host and to torch, and which
clock times engine calls and which times torch calls.

torch is optional: :func:`load_torch` returns the module or the reason it is missing, and every
torch column of the report then says that reason instead of a number.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import time

import numpy as np

from bench.timing import Clock, CpuClock, CudaEventClock, CupyEvents, TorchEvents
from engine import backend, dtypes
from engine.kernels import registry

TORCH_MISSING = "torch not installed"


class Unavailable(Exception):
    """A benchmark candidate that cannot run here; the message says why."""


@functools.cache
def _import_torch():
    try:
        return importlib.import_module("torch"), ""
    except ImportError:
        return None, TORCH_MISSING
    except Exception as e:  # noqa: BLE001 - a broken install must not stop the benchmark
        return None, f"torch failed to import: {type(e).__name__}: {e}"


def load_torch(kind: str, tf32: bool):
    """``(torch, "")`` set up for this run, or ``(None, reason)``.

    Sets torch's fp32 matmul precision to match the run's TF32 setting (off by default, as the
    engine's), so GEMM comparisons are like for like.
    """
    torch, reason = _import_torch()
    if torch is None:
        return None, reason
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None, "torch has no CUDA here (CPU-only build or no driver)"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return torch, ""


@functools.cache
def _parallel_copy():
    """A multithreaded numba copy loop (numba_cpu kernels use every core; numpy's copy one)."""
    import numba

    registry.configure_numba_threads()  # the kernels' threading layer, before numba fixes one

    @numba.njit(parallel=True, cache=True)
    def copy(dst, src):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    return copy


@functools.cache
def _parallel_add():
    import numba

    registry.configure_numba_threads()

    @numba.njit(parallel=True, cache=True)
    def add(a, b):
        for i in numba.prange(a.size):
            a[i] += b[i]

    return add


class BenchDevice:
    """One device of a benchmark run.

    Args:
        kind: "cpu" or "cuda".
        clock_settings: keyword arguments of :class:`bench.timing.Clock` (budget, repeats).
        tf32: allow TF32 in fp32 GEMMs, in the engine (``engine.set_float32_matmul_precision``,
            which sets cupy's compute type) and in torch alike.
        use_torch: False to leave torch out even where it is installed.
        settle_s: CPU pause before each timed row (see :meth:`settle`).
        dtype: the kernels' input dtype (``--dtype``): float32, or bfloat16, in which the
            kernel rows get bf16 inputs and the engine and torch peers (and the training steps)
            run inside autocast (:meth:`engine_autocast`, :meth:`torch_autocast`).
    """

    def __init__(self, kind: str, clock_settings: dict, tf32: bool = False, use_torch: bool = True,
                 settle_s: float = 0.3, dtype=np.float32):
        self.kind = kind
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), *dtypes.LOW_PRECISION):
            raise ValueError(f"BenchDevice: dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.settle_s = settle_s
        backend.set_float32_matmul_precision("high" if tf32 else "highest")  # before the first GEMM
        self.device = backend.check_available(backend.device(kind))
        self.xp = backend.xp_for(self.device)
        self.tf32 = tf32
        self.generator = backend.generator(self.device)
        if kind == "cuda":
            self.clock: Clock = CudaEventClock(CupyEvents(self.xp), **clock_settings)
        else:
            self.clock = CpuClock(**clock_settings)
        torch, reason = load_torch(kind, tf32) if use_torch else (None, "torch left out (--no-torch)")
        self.torch, self.torch_reason = torch, reason
        self.torch_clock = None
        if torch is not None:
            self.torch_clock = CudaEventClock(TorchEvents(torch), **clock_settings) if kind == "cuda" \
                else CpuClock(**clock_settings)

    @property
    def rounds(self) -> int:
        """Rounds in which the candidates of one case are timed side by side (bench.timing.
        measure_interleaved). The shared CPU drifts by tens of percent within a minute; on the GPU,
        timed with events, one round suffices, and each candidate's inputs and outputs are freed
        before the next is built (the large cases need a few GB each)."""
        return 3 if self.kind == "cpu" else 1

    @property
    def flushes_cache(self) -> bool:
        """Whether memory-bound rows are timed cold (GPU only: see bench/timing.py)."""
        return self.kind == "cuda"

    # ---- inputs -------------------------------------------------------------------------------
    def random_normal(self, shape, scale: float = 1.0):
        """float32 N(0, scale^2) samples on this device."""
        with backend.on_device(self.device):
            a = self.generator.standard_normal(shape, dtype=np.float32)
            if scale != 1.0:
                a *= np.float32(scale)
        return a

    def random_input(self, shape, scale: float = 1.0):
        """N(0, scale^2) samples in the run's dtype (float32 samples rounded once)."""
        a = self.random_normal(shape, scale)
        return a if self.dtype == a.dtype else a.astype(self.dtype)

    @property
    def low_precision(self) -> bool:
        """Whether the run's dtype is bfloat16 or float16."""
        return dtypes.is_low_precision(self.dtype)

    def engine_autocast(self):
        """``engine.autocast`` in the run's dtype on this device; a region that changes nothing in float32."""
        if not self.low_precision:
            return contextlib.nullcontext()
        import engine

        return engine.autocast(self.kind, dtype=self.dtype)

    def torch_autocast(self):
        """``torch.autocast`` in the run's dtype on this device; a region that changes nothing in float32."""
        if not self.low_precision:
            return contextlib.nullcontext()
        return self.torch.autocast(self.kind, dtype=self.torch_dtype())

    def torch_dtype(self):
        """torch's dtype of the run's dtype."""
        return getattr(self.torch, {"bfloat16": "bfloat16", "float16": "float16"}.get(self.dtype.name, "float32"))

    def random_ints(self, high: int, shape):
        """int64 samples in [0, high)."""
        with backend.on_device(self.device):
            if self.kind == "cpu":
                return self.generator.integers(0, high, shape, dtype=np.int64)
            return self.generator.randint(0, high, shape, dtype=np.int64)

    def asarray(self, host_array):
        """A copy of a numpy array on this device."""
        return backend.to_device(np.ascontiguousarray(host_array), self.device)

    # ---- transfers ----------------------------------------------------------------------------
    def to_host(self, a) -> np.ndarray:
        return backend.to_device(a, backend.CPU)

    def host32(self, a) -> np.ndarray:
        """``a`` on the host, in float32 if it is bfloat16 or float16: what references compute from."""
        return dtypes.upcast(self.to_host(a))

    def to_torch(self, a):
        """A torch copy of array ``a`` on this device (no memory shared with ``a``)."""
        if self.kind == "cpu":
            if a.dtype == dtypes.bfloat16:  # torch cannot take ml_dtypes' bfloat16: share the bits
                return self.torch.from_numpy(np.array(a, copy=True).view(np.uint16)).view(self.torch.bfloat16)
            return self.torch.from_numpy(np.array(a, copy=True))
        return self.torch.from_dlpack(a.copy())

    def torch_to_host(self, t) -> np.ndarray:
        t = t.detach().cpu()
        if t.dtype == self.torch.bfloat16:  # numpy has no bfloat16 of torch's: the same bits as ml_dtypes'
            return t.view(self.torch.uint16).numpy().view(dtypes.bfloat16)
        return t.numpy()

    # ---- housekeeping -------------------------------------------------------------------------
    def settle(self) -> None:
        """On the CPU, pause before timing the next row until idle worker threads stop spinning.

        After a parallel call, OpenMP workers (numba's parallel loops, torch) and OpenBLAS workers
        (numpy's GEMMs) busy-wait for a while before they sleep. On a 2-core machine the next
        row's threads then compete with them, and a GEMM right after a numba parallel loop was
        measured 10-50x slower than alone. Each row is meant to time its library as it runs
        alone; the end-to-end rows time the engine's real mix.
        """
        if self.kind == "cpu" and self.settle_s > 0:
            time.sleep(self.settle_s)

    def synchronize(self) -> None:
        backend.synchronize(self.device)
        if self.torch is not None and self.kind == "cuda":
            self.torch.cuda.synchronize()

    def release(self) -> None:
        """Give cached device memory back between cases (cupy's and torch's pools)."""
        gc.collect()
        if self.kind == "cuda":
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()

    def extra_copies(self, dst, src) -> dict:
        """Copy methods besides ``xp.copyto`` for the bandwidth ceiling."""
        if self.kind == "cuda":
            return {"memcpy_d2d": lambda: dst.data.copy_from_device_async(src.data, src.nbytes)}
        try:
            copy = _parallel_copy()
        except ImportError:
            return {}
        return {"numba_parallel": lambda: copy(dst, src)}

    def inplace_adds(self, a, b) -> dict:
        """``a += b`` ways (the array module's, and numba's multithreaded loop on the CPU)."""
        adds = {"array": lambda: self.xp.add(a, b, out=a)}
        if self.kind == "cpu":
            try:
                add = _parallel_add()
            except ImportError:
                return adds
            adds["numba_parallel"] = lambda: add(a, b)
        return adds

    def name(self) -> str:
        """What the hardware is called (GPU name or CPU model)."""
        if self.kind == "cuda":
            props = self.xp.cuda.runtime.getDeviceProperties(self.device.index)
            name = props.get("name", b"unknown GPU")
            return name.decode() if isinstance(name, bytes) else str(name)
        return cpu_model()


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"

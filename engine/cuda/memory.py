"""GPU memory statistics (PyTorch's ``torch.cuda.memory_allocated`` and friends), from cupy's pools.

What the engine allocates on a GPU comes from cupy's default memory pool, and what a CUDA graph
captures from the graph's private pool (engine/cuda/graphs.py). "Allocated" counts the bytes of
live arrays in those pools; "reserved" the bytes the pools hold from the driver (allocated plus
cached free blocks, which :func:`empty_cache` returns to the driver; a graph's pool stays).

The peak: cupy's pools know their current use only. The engine wraps the default pool's
allocator (engine.backend.PeakTracker, installed at the engine's first CUDA use) to keep the
use after every allocation, and a graph's pool reports its allocations here while it captures.

Without CUDA the statistics answer as PyTorch's do: 0 bytes, an empty ``memory_stats()``, and
``empty_cache()`` does nothing; ``reset_peak_memory_stats`` needs a GPU.
"""

from __future__ import annotations

import weakref

from engine import backend
from engine.cuda._runtime import cuda_device, cupy_for
from engine.errors import EngineError

_graph_pools: "weakref.WeakSet" = weakref.WeakSet()  # the private pools of live CUDA graphs


def register_graph_pool(pool) -> None:
    """Count ``pool`` (an object with ``.pool``, a cupy MemoryPool, and ``.device``) in the statistics
    for as long as it lives."""
    _graph_pools.add(pool)


def note_graph_allocation(device_index: int) -> None:
    """A graph's pool allocated on ``device_index`` (the current device): refresh what the default
    pool's tracker adds for graph pools, and the peak."""
    cupy = backend.cupy_module()
    graph_bytes = _graph_pool_bytes(device_index, "used_bytes")
    backend.graph_pool_bytes[device_index] = graph_bytes
    tracker = backend.default_pool_tracker()
    if tracker is not None:
        total = cupy.get_default_memory_pool().used_bytes() + graph_bytes
        tracker.peak[device_index] = max(tracker.peak.get(device_index, 0), total)


def _graph_pool_bytes(device_index: int, which: str) -> int:
    """Used or total bytes of the live graph pools of one device (cupy pools answer for the
    current device, which the caller has made ``device_index``)."""
    return sum(getattr(p.pool, which)() for p in list(_graph_pools) if p.device.index == device_index)


def _pools_bytes(device, where: str, which: str) -> int:
    dev = cuda_device(device, where)
    if not backend.cuda_available():
        return 0
    cupy = cupy_for(where, dev)
    with cupy.cuda.Device(dev.index):
        return int(getattr(cupy.get_default_memory_pool(), which)()) + _graph_pool_bytes(dev.index, which)


def memory_allocated(device=None) -> int:
    """Bytes of the live GPU arrays on ``device`` (default: the current device); 0 without CUDA."""
    return _pools_bytes(device, "engine.cuda.memory_allocated", "used_bytes")


def memory_reserved(device=None) -> int:
    """Bytes the memory pools of ``device`` hold from the driver (live arrays plus cached free
    blocks); 0 without CUDA."""
    return _pools_bytes(device, "engine.cuda.memory_reserved", "total_bytes")


def _tracker(where: str):
    backend.cupy_module()  # installs the tracker on first use
    tracker = backend.default_pool_tracker()
    if tracker is None:
        raise EngineError(f"{where}: the peak is unknown because this program installed its own cupy allocator "
                          "(cupy.cuda.set_allocator) before the engine's first CUDA use; the engine tracks the "
                          "peak of cupy's default memory pool only")
    return tracker


def max_memory_allocated(device=None) -> int:
    """The largest :func:`memory_allocated` of ``device`` since the engine first used CUDA or since
    :func:`reset_peak_memory_stats`; 0 without CUDA."""
    dev = cuda_device(device, "engine.cuda.max_memory_allocated")
    if not backend.cuda_available():
        return 0
    cupy_for("engine.cuda.max_memory_allocated", dev)
    tracker = _tracker("engine.cuda.max_memory_allocated")
    return max(tracker.peak.get(dev.index, 0), memory_allocated(dev))


def reset_peak_memory_stats(device=None) -> None:
    """Start the peak of ``device`` (default: the current device) again from what is allocated now."""
    dev = cuda_device(device, "engine.cuda.reset_peak_memory_stats")
    cupy_for("engine.cuda.reset_peak_memory_stats", dev)
    _tracker("engine.cuda.reset_peak_memory_stats").peak[dev.index] = memory_allocated(dev)


def empty_cache() -> None:
    """Give the cached free blocks of cupy's default pool back to the driver, on every device, so
    other processes (and nvidia-smi) see the memory free. A CUDA graph's private pool is kept.
    Does nothing without CUDA."""
    if not backend.cuda_available():
        return
    backend.refuse_in_capture("engine.cuda.empty_cache", "frees device memory")
    cupy = backend.cupy_module()
    for index in range(backend.cuda_device_count()):
        with cupy.cuda.Device(index):
            cupy.get_default_memory_pool().free_all_blocks()


def memory_stats(device=None) -> dict:
    """PyTorch's ``memory_stats`` keys the engine knows: ``allocated_bytes.all.current``,
    ``allocated_bytes.all.peak`` and ``reserved_bytes.all.current``; empty without CUDA."""
    if not backend.cuda_available():
        return {}
    return {"allocated_bytes.all.current": memory_allocated(device),
            "allocated_bytes.all.peak": max_memory_allocated(device),
            "reserved_bytes.all.current": memory_reserved(device)}

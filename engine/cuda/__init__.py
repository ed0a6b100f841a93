"""``engine.cuda``: PyTorch's ``torch.cuda`` for the engine's GPU side, on cupy.

- device queries: :func:`is_available`, :func:`device_count`, :func:`current_device`,
  :func:`set_device`, :class:`device`, :func:`get_device_name`, :func:`get_device_capability`,
  :func:`get_device_properties`, :func:`mem_get_info`, :func:`synchronize`, :func:`manual_seed`,
  :func:`manual_seed_all`;
- streams and events: :class:`Stream`, :class:`Event`, :func:`current_stream`,
  :func:`default_stream`, :func:`stream`;
- memory statistics: :func:`memory_allocated`, :func:`max_memory_allocated`,
  :func:`reset_peak_memory_stats`, :func:`memory_reserved`, :func:`memory_stats`,
  :func:`empty_cache`;
- CUDA graphs: :class:`CUDAGraph`, :class:`graph`, :func:`graph_pool_handle`,
  :func:`make_graphed_callables`, :func:`is_current_stream_capturing`;
- ``engine.cuda.amp.autocast`` (PyTorch's deprecated spelling of ``engine.autocast("cuda")``).

Importing it imports no cupy. Without CUDA the queries answer as PyTorch's do without CUDA
(``is_available()`` is False, ``device_count()`` 0, the memory statistics 0, ``empty_cache()``
and ``manual_seed()`` do nothing, ``make_graphed_callables`` returns its callables), and every
call that needs a GPU raises a DeviceError naming itself and the device.

Example:
    >>> import engine
    >>> device = "cuda" if engine.cuda.is_available() else "cpu"
    >>> engine.cuda.memory_allocated() >= 0
    True
"""

from engine.cuda import amp
from engine.cuda._runtime import (current_device, device, device_count, get_device_capability, get_device_name,
                                  get_device_properties, is_available, is_bf16_supported, is_initialized,
                                  manual_seed, manual_seed_all, mem_get_info, set_device, synchronize)
from engine.cuda.graphs import CUDAGraph, graph, graph_pool_handle, is_current_stream_capturing, make_graphed_callables
from engine.cuda.memory import (empty_cache, max_memory_allocated, memory_allocated, memory_reserved, memory_stats,
                                reset_peak_memory_stats)
from engine.cuda.streams import Event, Stream, StreamContext, current_stream, default_stream, stream
from engine.tensor import legacy_tensor_types as _legacy_tensor_types

globals().update(_legacy_tensor_types("cuda"))  # engine.cuda.FloatTensor ... (PyTorch's legacy types)

__all__ = [
    "CUDAGraph", "Event", "Stream", "StreamContext", "amp", "current_device", "current_stream", "default_stream",
    "device", "device_count", "empty_cache", "get_device_capability", "get_device_name", "get_device_properties",
    "graph", "graph_pool_handle", "is_available", "is_bf16_supported", "is_current_stream_capturing",
    "is_initialized", "make_graphed_callables", "manual_seed", "manual_seed_all", "max_memory_allocated",
    "mem_get_info", "memory_allocated", "memory_reserved", "memory_stats", "reset_peak_memory_stats", "set_device",
    "stream", "synchronize",
]

"""CUDA graphs, PyTorch's ``torch.cuda.CUDAGraph`` / ``graph`` / ``make_graphed_callables``, built on
cupy's stream capture (``cupy.cuda.Stream.begin_capture`` / ``end_capture``, ``Graph.launch``).

A capture runs a region of engine code once, on a side stream, and records the GPU work it
queues instead of running it; ``replay()`` then launches all of that work with one call, with no
Python in between. What a replay repeats is exactly the recorded kernels and copies, on the
same memory addresses. Hence the rules (docs/performance.md has the long form):

- Inputs are *static*: a replay reads the arrays the region read at capture. Copy new values
  into them (``static_x.copy_(x)``); rebinding or resizing them is an error at replay.
- Outputs are static too: each replay overwrites them in place.
- Anything decided on the host at capture is frozen: a host read of a device value, a wait, an
  op on CPU tensors, a copy of host data to the device. The engine refuses each of them inside
  a capture with a CaptureError naming the op (engine.backend.to_host, synchronize, to_device,
  and the op watcher below).
- Checks the engine defers to the next sync (a target or index out of range: kernels/deferred.py)
  are collected at capture and queued again by every replay, so each replay's data is checked.
- Memory: everything the region allocates comes from the graph's private cupy MemoryPool (so
  a replay allocates nothing, and no other allocation can reuse the addresses the graph writes);
  graphs may share one pool (``pool=``) if they are replayed in the order they were captured.

On a machine without CUDA, ``CUDAGraph()`` raises a DeviceError and ``make_graphed_callables``
returns its callables unchanged, so code written for graphs still runs on the CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import gc

import numpy as np

from engine import backend
from engine.kernels import deferred
from engine.autograd import Function, _propagate, no_grad, op_label, watch_op_inputs
from engine.backend import CaptureError
from engine.cuda import memory
from engine.cuda._runtime import cuda_device, cupy_for
from engine.cuda.streams import Stream, current_stream
from engine.cuda.streams import stream as stream_context
from engine.errors import EngineError, describe
from engine.nn.module import Module
from engine.tensor import Tensor

__all__ = ["CUDAGraph", "graph", "graph_pool_handle", "is_current_stream_capturing", "make_graphed_callables"]

# capture_error_mode -> the cupy.cuda.runtime constant
_CAPTURE_MODES = {"global": "streamCaptureModeGlobal", "thread_local": "streamCaptureModeThreadLocal",
                  "relaxed": "streamCaptureModeRelaxed"}
# "relaxed", not PyTorch's "global": the private pool is a cupy MemoryPool, which calls cudaMalloc
# when it must grow, and CUDA allows cudaMalloc during capture only in relaxed mode (PyTorch's
# allocator switches the thread to relaxed around its cudaMalloc; cupy has no such switch). The
# host reads and waits that the stricter modes would catch are refused by the engine itself.
DEFAULT_CAPTURE_ERROR_MODE = "relaxed"


class _GraphPool:
    """The private memory of one or more graphs: every allocation of a capture comes from here.

    It records the blocks it hands out, so that a capture can tell the arrays it made (in this
    pool) from the static inputs it read (anywhere else). ``graph_pool_handle()`` and
    ``CUDAGraph.pool()`` return one; graphs given the same pool share its memory.
    """

    def __init__(self, cupy, dev):
        with cupy.cuda.Device(dev.index):
            self.pool = cupy.cuda.MemoryPool()
        self.device = dev
        self._blocks: dict[int, int] = {}  # block start -> largest size handed out there
        self._starts: list[int] | None = None
        memory.register_graph_pool(self)

    def malloc(self, size: int):
        memptr = self.pool.malloc(size)
        start = int(memptr.ptr)
        if size > self._blocks.get(start, -1):
            self._blocks[start] = size
            self._starts = None
        memory.note_graph_allocation(self.device.index)
        return memptr

    def owns(self, address: int) -> bool:
        """Whether ``address`` lies in a block this pool handed out."""
        if self._starts is None:
            self._starts = sorted(self._blocks)
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._starts[i] + max(self._blocks[self._starts[i]], 1)

    def __repr__(self) -> str:
        return f"<engine.cuda graph pool on {self.device}, {len(self._blocks)} blocks>"


def graph_pool_handle() -> _GraphPool:
    """A new private memory pool to share between graphs (``graph(g, pool=handle)``)."""
    cupy = cupy_for("engine.cuda.graph_pool_handle")
    return _GraphPool(cupy, cuda_device())


def is_current_stream_capturing() -> bool:
    """Whether the current stream is capturing a CUDA graph (False without CUDA, as in PyTorch)."""
    if not backend.cuda_available():
        return False
    cupy = backend.cupy_module()
    return bool(cupy.cuda.get_current_stream().is_capturing())


def _data_ptr(array) -> int:
    return int(array.data.ptr)


class _StaticInput:
    """A tensor a capture read from outside the graph's memory; a replay reads the same memory."""

    __slots__ = ("tensor", "data", "op", "shape", "dtype", "strides", "ptr")

    def __init__(self, tensor: Tensor, data, op):
        self.tensor, self.data, self.op = tensor, data, op
        self.shape, self.dtype, self.strides, self.ptr = data.shape, data.dtype, data.strides, _data_ptr(data)

    def check(self) -> None:
        data = self.tensor._data
        if data is self.data:
            return
        if (data.shape, data.dtype, data.strides) == (self.shape, self.dtype, self.strides) \
                and not isinstance(data, (np.ndarray, np.generic)) and _data_ptr(data) == self.ptr:
            self.data = data  # rebound to another array over the same memory: still what the graph reads
            return
        raise CaptureError(
            f"CUDAGraph.replay: {op_label(self.op)} read a static input at capture, a {self.shape} {self.dtype} "
            f"array at {self.ptr:#x}; that tensor now holds {describe(data)} elsewhere (a shape change or a "
            "rebinding between replays). A replay reads the captured memory: copy new values into the "
            "tensor with .copy_() (same shape and dtype), or capture another graph for another shape")


class CUDAGraph:
    """A captured sequence of GPU work, replayed with one launch (PyTorch's ``torch.cuda.CUDAGraph``).

    Capture with ``with engine.cuda.graph(g): ...``; then ``g.replay()`` reruns the recorded work
    on the same memory. On a machine without CUDA, creating one raises a DeviceError.

    Args:
        keep_graph: accepted for PyTorch's signature; cupy always instantiates the graph when the
            capture ends, so there is nothing to keep.

    Example:
        >>> g = engine.cuda.CUDAGraph()                       # doctest: +SKIP
        >>> with engine.cuda.graph(g):                        # doctest: +SKIP
        ...     static_y = model(static_x)
        >>> static_x.copy_(new_x); g.replay()                 # doctest: +SKIP
        >>> static_y                                          # the output for new_x  # doctest: +SKIP
    """

    def __init__(self, keep_graph: bool = False):
        self._cupy = cupy_for("engine.cuda.CUDAGraph")
        self.keep_graph = bool(keep_graph)
        self._graph = None
        self._pool: _GraphPool | None = None
        self._capture: contextlib.ExitStack | None = None
        self._stream = None
        self._reads: dict = {}
        self._static_inputs: tuple = ()
        self._checks: list = []  # the deferred checks the region queued (kernels/deferred.py)

    # ---- capture ----------------------------------------------------------------------------------
    def capture_begin(self, pool=None, capture_error_mode: str = DEFAULT_CAPTURE_ERROR_MODE) -> None:
        """Start capturing the current stream (which must not be the default stream); prefer
        :class:`graph`, which also picks a side stream and ends the capture."""
        if self._graph is not None or self._capture is not None:
            raise EngineError("CUDAGraph.capture_begin: this graph already holds a capture; call reset() first")
        if capture_error_mode not in _CAPTURE_MODES:
            raise ValueError(f"CUDAGraph.capture_begin: capture_error_mode must be one of {sorted(_CAPTURE_MODES)}, "
                             f"got {capture_error_mode!r}")
        if backend.capture_region() is not None:
            raise CaptureError(f"CUDAGraph.capture_begin: this thread is already inside {backend.capture_region()}; "
                               "captures do not nest")
        cupy, dev = self._cupy, cuda_device()
        stream = cupy.cuda.get_current_stream()
        if int(stream.ptr) == 0:
            raise CaptureError("CUDAGraph.capture_begin: the current stream is the default stream, which CUDA cannot "
                               "capture; capture inside `with engine.cuda.graph(g):` (it uses a side stream) or "
                               "`with engine.cuda.stream(engine.cuda.Stream()):`")
        pool = self._pool_for(pool, dev)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(cupy.cuda.using_allocator(pool.malloc))  # this thread's allocations
            stack.enter_context(backend.capturing("an engine.cuda.graph capture"))
            stack.enter_context(watch_op_inputs(self._watch))
            checks = stack.enter_context(deferred.collect([]))
            stream.begin_capture(mode=getattr(cupy.cuda.runtime, _CAPTURE_MODES[capture_error_mode]))
        except BaseException:
            stack.close()
            raise
        self._capture, self._stream, self._pool, self._reads, self._checks = stack, stream, pool, {}, checks

    def _pool_for(self, pool, dev) -> _GraphPool:
        if pool is None:
            return _GraphPool(self._cupy, dev)
        if not isinstance(pool, _GraphPool):
            raise EngineError(f"CUDAGraph.capture_begin: pool must come from engine.cuda.graph_pool_handle() or "
                              f"another graph's pool(), got {type(pool).__name__}")
        if pool.device != dev:
            raise EngineError(f"CUDAGraph.capture_begin: the pool belongs to {pool.device}, the capture runs on {dev}")
        return pool

    def _watch(self, inputs, op) -> None:
        """Every op of the region, before it runs: refuse CPU tensors, note the tensors it reads."""
        for t in inputs:
            if isinstance(t, Tensor):
                data = t._data
                if isinstance(data, (np.ndarray, np.generic)):
                    raise CaptureError(
                        f"{op_label(op)}: operand {describe(t)} is a CPU tensor, inside an engine.cuda.graph "
                        "capture. A replay repeats only GPU work, so this op would run once, at capture, and "
                        "its result would never change: move the tensor to the GPU (.cuda()) before the "
                        "region, or compute it outside the region")
                self._reads.setdefault(id(t), (t, data, op))

    def capture_end(self) -> None:
        """End the capture begun by :meth:`capture_begin`; the graph is ready to replay."""
        if self._capture is None:
            raise EngineError("CUDAGraph.capture_end: no capture is running (call capture_begin first)")
        stack, stream, self._capture = self._capture, self._stream, None
        try:
            self._graph = stream.end_capture()
        finally:
            stack.close()
        self._static_inputs = tuple(_StaticInput(t, data, op) for t, data, op in self._reads.values()
                                    if not self._pool.owns(_data_ptr(data)))
        self._reads = {}
        memory.note_graph_allocation(self._pool.device.index)

    def _abort_capture(self) -> None:
        """Leave capture mode after an error inside the region; nothing is kept."""
        stack, stream, self._capture, self._reads, self._checks = self._capture, self._stream, None, {}, []
        if stack is None:
            return
        try:
            stream.end_capture()
        except Exception:  # noqa: BLE001, S110 - an invalidated capture raises here; the region's error is the one to see
            pass
        finally:
            stack.close()

    # ---- use ------------------------------------------------------------------------------------
    def replay(self) -> None:
        """Launch the captured work on the current stream (asynchronously, like any kernel)."""
        if self._graph is None:
            raise EngineError("CUDAGraph.replay: nothing is captured; capture first with `with engine.cuda.graph(g):`")
        for static in self._static_inputs:
            static.check()
        self._graph.launch(stream=self._cupy.cuda.get_current_stream())
        deferred.requeue(self._checks)  # this replay's values, read at the next sync

    def reset(self) -> None:
        """Drop the captured graph and its hold on the memory pool; the object can capture again."""
        if self._capture is not None:
            raise EngineError("CUDAGraph.reset: a capture is running; end it first")
        device = self._pool.device.index if self._pool is not None else None
        self._graph, self._pool, self._static_inputs, self._checks = None, None, (), []
        if device is not None:
            with self._cupy.cuda.Device(device):
                memory.note_graph_allocation(device)  # the pool may be gone: recount what graphs hold

    def pool(self) -> _GraphPool:
        """This graph's memory pool, to share with a graph captured after it (``graph(g2, pool=g1.pool())``)."""
        if self._pool is None:
            raise EngineError("CUDAGraph.pool: nothing is captured yet")
        return self._pool

    @property
    def static_inputs(self) -> tuple:
        """The tensors the capture read from outside the graph's memory (engine extension): a
        replay reads their memory, so refresh them with ``.copy_()`` before ``replay()``."""
        return tuple(s.tensor for s in self._static_inputs)

    def __repr__(self) -> str:
        state = "captured" if self._graph is not None else "capturing" if self._capture is not None else "empty"
        return f"<engine.cuda.CUDAGraph {state}, {len(self._static_inputs)} static inputs>"


_capture_streams: dict = {}  # device -> the side stream graph() captures on by default


class graph:
    """``with engine.cuda.graph(g):`` captures the block into CUDAGraph ``g`` (PyTorch's
    ``torch.cuda.graph``): it waits for the device, collects garbage, empties the cache, makes a
    side stream current (``stream``, or one kept per device) and captures on it.

    Args:
        cuda_graph: the CUDAGraph to capture into.
        pool: a pool from :func:`graph_pool_handle` or another graph's ``pool()``, to share memory.
        stream: the stream to capture on (default: a side stream kept per device).
        capture_error_mode: "relaxed" (the engine's default; see DEFAULT_CAPTURE_ERROR_MODE),
            "thread_local" or "global".
    """

    def __init__(self, cuda_graph: CUDAGraph, pool=None, stream: Stream | None = None,
                 capture_error_mode: str = DEFAULT_CAPTURE_ERROR_MODE):
        if not isinstance(cuda_graph, CUDAGraph):
            raise EngineError(f"engine.cuda.graph: expected an engine.cuda.CUDAGraph, got {type(cuda_graph).__name__}")
        self.cuda_graph, self.pool, self.capture_error_mode = cuda_graph, pool, capture_error_mode
        if stream is None:
            dev = cuda_device()
            stream = _capture_streams.get(dev) or _capture_streams.setdefault(dev, Stream(dev))
        self.capture_stream = stream
        self._stream_context = stream_context(stream)

    def __enter__(self):
        backend.synchronize(self.capture_stream.device)
        gc.collect()  # drop dead arrays now: their blocks must not be freed into the capture
        memory.empty_cache()
        self._stream_context.__enter__()
        try:
            self.cuda_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)
        except BaseException as exc:
            self._stream_context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None:
                self.cuda_graph.capture_end()
            else:
                self.cuda_graph._abort_capture()
        finally:
            self._stream_context.__exit__(exc_type, exc, traceback)
        return False


# ---- make_graphed_callables ----------------------------------------------------------------------

def _flatten(value, where: str) -> tuple[list, object]:
    """Tensors of a (nested) tuple/list, in order, and a spec to rebuild the structure."""
    if isinstance(value, Tensor):
        return [value], None
    if isinstance(value, (tuple, list)):
        leaves, specs = [], []
        for item in value:
            sub, spec = _flatten(item, where)
            leaves.extend(sub)
            specs.append((len(sub), spec))
        return leaves, (type(value), specs)
    raise EngineError(f"{where}: arguments and outputs must be Tensors or (nested) tuples/lists of Tensors, got "
                      f"{type(value).__name__}")


def _unflatten(leaves, spec):
    if spec is None:
        return leaves[0]
    kind, specs = spec
    items, start = [], 0
    for count, sub in specs:
        items.append(_unflatten(leaves[start:start + count], sub))
        start += count
    return kind(items)


def _gradients(outputs, inputs, grad_outputs, allow_unused: bool, where: str) -> list:
    """d(outputs)/d(inputs) as arrays (None where unused and ``allow_unused``), without touching
    any ``.grad``: the backward walk stops at ``inputs`` and hands their gradients back."""
    roots = [(o, g._data) for o, g in zip(outputs, grad_outputs)]
    found = _propagate(roots, retain_graph=False, stop=frozenset(id(t) for t in inputs), accumulate=False) \
        if roots else {}
    grads = []
    for i, t in enumerate(inputs):
        g = found.get(id(t))
        if g is None and not allow_unused:
            raise EngineError(f"{where}: input {i} ({describe(t)}) is not used to compute the outputs, so it has no "
                              "gradient; pass allow_unused_input=True if that is intended")
        grads.append(g)
    return grads


def make_graphed_callables(callables, sample_args, num_warmup_iters: int = 3, allow_unused_input: bool = False,
                           pool=None):
    """Capture each callable's forward and backward into CUDA graphs and return graphed
    versions (PyTorch's ``torch.cuda.make_graphed_callables``).

    A graphed callable copies its tensor arguments into the static inputs captured with
    ``sample_args``, replays the forward graph and returns the static outputs (overwritten by the
    next call: clone them to keep them); its backward replays the backward graph and hands the
    gradients to autograd, so parameters get ``.grad`` as usual. A Module is returned with its
    ``forward`` replaced (the graphs run while ``module.training`` is what it was at capture).
    Arguments must keep the shapes, dtypes and ``requires_grad`` of ``sample_args``.

    On a machine without CUDA (or with CPU sample tensors) there is nothing to capture: the
    callables are returned unchanged, so the same script runs everywhere.

    Args:
        callables: a callable or Module, or a tuple of them (captured in order, sharing memory).
        sample_args: a tuple of Tensors per callable (a tuple of such tuples for several).
        num_warmup_iters: forward+backward runs on a side stream before capture (compiles
            kernels, fills caches).
        allow_unused_input: allow inputs that the outputs do not depend on (their gradient is None).
        pool: a memory pool to capture into (default: a new one shared by these graphs).
    """
    just_one = not isinstance(callables, tuple)
    funcs = (callables,) if just_one else callables
    all_args = (sample_args,) if just_one else sample_args
    where = "engine.cuda.make_graphed_callables"
    if len(funcs) != len(all_args):
        raise EngineError(f"{where}: {len(funcs)} callables but {len(all_args)} sets of sample_args")
    flat_args = [_flatten(tuple(args), where)[0] for args in all_args]
    if not backend.cuda_available() or any(isinstance(t._data, (np.ndarray, np.generic))
                                           for args in flat_args for t in args):
        return callables  # nothing to capture on the CPU
    for func in funcs:
        if isinstance(func, Module) and "forward" in vars(func):
            raise EngineError(f"{where}: module {type(func).__name__} already has a replaced forward (graphed "
                              "twice?); pass the original module")
    graphed = _make_graphed(funcs, flat_args, num_warmup_iters, allow_unused_input, pool, where)
    return graphed[0] if just_one else tuple(graphed)


def _make_graphed(funcs, flat_args, num_warmup_iters, allow_unused, pool, where) -> list:
    surfaces = [tuple(args) + (tuple(func.parameters()) if isinstance(func, Module) else ())
                for func, args in zip(funcs, flat_args)]
    for surface in surfaces:
        for t in surface:
            if not isinstance(t, Tensor):
                raise EngineError(f"{where}: sample_args must hold Tensors, got {type(t).__name__}")
    warmup_stream = Stream()
    warmup_stream.wait_stream(current_stream())
    with stream_context(warmup_stream):
        for func, args, surface in zip(funcs, flat_args, surfaces):
            for _ in range(num_warmup_iters):
                outputs = _flatten(func(*args), where)[0]
                wanted = [o for o in outputs if o.requires_grad]
                needs = [t for t in surface if t.requires_grad]
                if wanted and needs:
                    seeds = [_empty_like(o) for o in wanted]
                    _gradients(wanted, needs, seeds, allow_unused, where)
                del outputs
    backend.synchronize(cuda_device())
    mempool = graph_pool_handle() if pool is None else pool
    forward_graphs = [CUDAGraph() for _ in funcs]
    backward_graphs = [CUDAGraph() for _ in funcs]
    static_outputs, specs = [], []
    for func, args, fwd in zip(funcs, flat_args, forward_graphs):
        with graph(fwd, pool=mempool):
            out = func(*args)
        leaves, spec = _flatten(out, where)
        static_outputs.append(tuple(leaves))
        specs.append(spec)
    static_grad_outputs, static_grad_inputs = [None] * len(funcs), [None] * len(funcs)
    for i in reversed(range(len(funcs))):  # backward runs in the reverse order of forward
        outputs, surface = static_outputs[i], surfaces[i]
        grad_outs = tuple(_empty_like(o) if o.requires_grad else None for o in outputs)
        needs = [t for t in surface if t.requires_grad]
        with graph(backward_graphs[i], pool=mempool):
            wanted = [o for o in outputs if o.requires_grad]
            grads = _gradients(wanted, needs, [g for g in grad_outs if g is not None], allow_unused, where) \
                if wanted and needs else [None] * len(needs)
        by_input = dict(zip((id(t) for t in needs), grads))
        static_grad_outputs[i] = grad_outs
        static_grad_inputs[i] = tuple(None if by_input.get(id(t)) is None else Tensor._from_op(by_input[id(t)], None)
                                      for t in surface)
    result = []
    for i, func in enumerate(funcs):
        node = _graphed_function(forward_graphs[i], backward_graphs[i], surfaces[i], len(flat_args[i]),
                                 static_outputs[i], static_grad_outputs[i], static_grad_inputs[i])
        result.append(_wrap(func, node, surfaces[i], len(flat_args[i]), specs[i], where))
    return result


def _empty_like(t: Tensor) -> Tensor:
    return Tensor._from_op(t.xp.empty_like(t._data), None)


def _graphed_function(fwd_graph, bwd_graph, surface, n_user_args, static_outputs, static_grad_outputs,
                      static_grad_inputs):
    """The autograd node of one graphed callable: forward and backward are graph replays."""

    class Graphed(Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, given in zip(surface[:n_user_args], inputs):
                if given is not static:
                    _copy_into(static, given, "forward")
            fwd_graph.replay()
            return tuple(o.detach() for o in static_outputs)

        @staticmethod
        def backward(ctx, *grads):
            for static, given in zip(static_grad_outputs, grads):
                if static is not None and given is not None:
                    _copy_into(static, given, "backward")
            bwd_graph.replay()
            return tuple(None if g is None else g.detach() for g in static_grad_inputs)

    Graphed.__name__ = Graphed.__qualname__ = "GraphedCallable"
    return Graphed


def _copy_into(static: Tensor, given, direction: str) -> None:
    if not isinstance(given, Tensor) or given.shape != static.shape or given.dtype != static.dtype \
            or given.device != static.device:
        raise CaptureError(f"graphed callable ({direction}): got {describe(given)} where the capture had "
                           f"{describe(static)}; a graphed callable replays the captured shapes, dtypes and "
                           "devices only (a shape change between replays). Capture another one for this shape")
    with no_grad():
        static.copy_(given)


def _wrap(func, node, surface, n_user_args, spec, where):
    params = surface[n_user_args:]

    def graphed(*user_args):
        flat = _flatten(tuple(user_args), where)[0]
        if len(flat) != n_user_args:
            raise CaptureError(f"graphed callable: got {len(flat)} tensor arguments, the capture had {n_user_args}")
        for i, (given, static) in enumerate(zip(flat, surface)):
            if given.requires_grad != static.requires_grad:
                raise CaptureError(f"graphed callable: argument {i} has requires_grad={given.requires_grad}, the "
                                   f"sample had {static.requires_grad}; the captured backward depends on it")
        outputs = node.apply(*flat, *params)
        return _unflatten(list(outputs if isinstance(outputs, tuple) else (outputs,)), spec)

    if not isinstance(func, Module):
        return graphed
    training, original = func.training, func.forward

    def forward(*user_args):
        return graphed(*user_args) if func.training == training else original(*user_args)

    func.forward = forward  # an instance attribute: Module.__call__ finds it before the class's forward
    return func

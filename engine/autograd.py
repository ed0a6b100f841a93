"""The define-by-run graph: Function, grad mode, and the backward pass.

A :class:`Function` computes on raw arrays (numpy or cupy alike) in ``forward`` and returns the
gradient of each input in ``backward``. ``Function.apply`` wraps the result in a Tensor whose
``grad_fn`` is the Function instance, which holds its input tensors: that is the whole graph.
Backward walks it in reverse topological order with an explicit stack (no recursion limit).

A subclass whose ``forward`` and ``backward`` are staticmethods taking ``ctx`` is a PyTorch-style
Function on Tensors (``ctx.save_for_backward``, ``ctx.saved_tensors``, ``ctx.needs_input_grad``);
see :class:`FunctionCtx`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import weakref

import numpy as np

from engine import backend, dtypes
from engine.amp import autocast_mode as _autocast
from engine.dtypes import is_floating
from engine.errors import DeviceError, EngineError, GradError, describe


class _ThreadMode(threading.local):
    """Per-thread autograd switches, with their defaults set in each new thread (reading an
    attribute a thread never set through ``getattr(local, name, default)`` costs an exception
    inside, on every op)."""

    def __init__(self):
        self.enabled = True  # grad mode (no_grad / enable_grad / set_grad_enabled): ops record a graph
        self.inference = False  # inference_mode: grad mode off, and enable_grad cannot turn it back on
        self.watcher = None  # the innermost watch_grad_inputs callback, if any


_mode = _ThreadMode()


def is_grad_enabled() -> bool:
    return _mode.enabled


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    previous = is_grad_enabled()
    _mode.enabled = enabled
    try:
        yield
    finally:
        _mode.enabled = previous


class no_grad(contextlib.ContextDecorator):
    """Context manager and decorator: ops inside record no graph (evaluation, optimizer steps).

    The mode is per thread, as in PyTorch. The mode to restore is kept on a per-thread stack, not
    on the instance: one decorated function runs in several threads at once, and one instance may
    be entered again while inside it.

    Example:
        >>> with engine.no_grad():        # doctest: +SKIP
        ...     prediction = model(x)
    """

    _enabled = False

    def __enter__(self):
        saved = _mode.__dict__.setdefault("saved", [])
        saved.append(is_grad_enabled())
        _mode.enabled = self._enabled and not _mode.inference

    def __exit__(self, *exc):
        _mode.enabled = _mode.saved.pop()
        return False


class enable_grad(no_grad):
    """Re-enable graph recording inside a ``no_grad`` block (not inside ``inference_mode``: nothing
    records there, as in PyTorch)."""

    _enabled = True


class inference_mode(contextlib.ContextDecorator):
    """Context manager and decorator for pure inference, as ``torch.inference_mode``.

    Inside, ops record no graph and their results have ``requires_grad=False``, even for inputs
    that require grad and even inside ``enable_grad()``; ``inference_mode(False)`` turns it off
    again (and grad mode on) for a nested block. The mode is per thread. Both
    ``@engine.inference_mode()`` and a bare ``@engine.inference_mode`` decorate a function.

    Differences from PyTorch: a tensor made inside is an ordinary tensor (PyTorch marks it an
    "inference tensor" and refuses to save it for a later backward), and ``is_grad_enabled()``
    answers False inside ``enable_grad()`` there (PyTorch answers True but records nothing either).

    Args:
        mode: True to enter inference mode, False to leave it inside the block.

    Example:
        >>> with engine.inference_mode():        # doctest: +SKIP
        ...     logits = model(x)
    """

    def __new__(cls, mode=True):
        if isinstance(mode, bool):
            return super().__new__(cls)
        if callable(mode):  # bare @engine.inference_mode on a function
            return cls(True)(mode)
        raise TypeError(f"inference_mode: mode must be a bool (or a function to decorate), got {type(mode).__name__}")

    def __init__(self, mode: bool = True):
        self.mode = mode

    def __enter__(self):
        saved = _mode.__dict__.setdefault("saved_inference", [])
        saved.append((_mode.enabled, _mode.inference))
        _mode.inference = self.mode
        _mode.enabled = not self.mode

    def __exit__(self, *exc):
        _mode.enabled, _mode.inference = _mode.saved_inference.pop()
        return False

    def clone(self) -> "inference_mode":
        """A new context manager with the same mode (PyTorch's ``inference_mode.clone``)."""
        return type(self)(self.mode)


def is_inference_mode_enabled() -> bool:
    """Whether this thread is inside ``inference_mode()`` (``torch.is_inference_mode_enabled``)."""
    return _mode.inference


@contextlib.contextmanager
def watch_op_inputs(callback):
    """Call ``callback(inputs, op)`` for every op run in this thread inside the block, before it
    runs: ``inputs`` are its operands (Tensors and others), ``op`` names it (a Function class,
    a string such as ``"add_"`` for an in-place Tensor method, or None; :func:`op_label` turns
    it into a name). Blocks nest: an inner block's ops are reported to the outer ones too.

    The hook costs nothing outside a block; activation checkpointing and CUDA graph capture use it.
    """
    outer = _mode.watcher

    def watch(inputs, op=None):
        callback(inputs, op)
        if outer is not None:
            outer(inputs, op)

    _mode.watcher = watch
    try:
        yield
    finally:
        _mode.watcher = outer


def op_label(op) -> str:
    """The name of an op as :func:`watch_op_inputs` reports it."""
    if isinstance(op, type) and issubclass(op, Function):
        return op.op_name()
    return "an op" if op is None else str(op)


@contextlib.contextmanager
def watch_grad_inputs():
    """Collect every tensor requiring grad that an op reads inside the block, in first-use order.

    Activation checkpointing runs a function under ``no_grad`` and must still know which tensors
    from outside it (arguments, parameters, tensors it closes over) the gradient flows to: those
    are exactly the tensors requiring grad that ops read there, since nothing made under
    ``no_grad`` requires grad. Nested blocks report to the enclosing ones too.

    Yields:
        dict: ``id(tensor) -> tensor``, filled while the block runs.
    """
    found = {}

    def note(inputs, op):
        for t in inputs:
            if isinstance(t, _tensor.Tensor) and t.requires_grad and id(t) not in found:
                found[id(t)] = t

    with watch_op_inputs(note):
        yield found


def notify_watcher(tensors, op=None) -> None:
    """Tell the active :func:`watch_op_inputs` blocks that op ``op`` reads ``tensors`` (no-op outside one)."""
    watcher = _mode.watcher
    if watcher is not None:
        watcher(tensors, op)


class Version:
    """How many in-place changes a storage has had. Every tensor viewing one storage (views made
    by ops, ``detach()``) shares one Version; every in-place op bumps it; a Function records the
    versions of the tensors whose arrays it saved, and backward refuses to run it if one moved.

    Every tensor an op makes gets one, so it is built without ``__init__``: the fields start as
    class defaults and become instance attributes when first written.
    """

    value = 0
    _savers = None  # weak references to the graph nodes that saved this memory for backward

    def saved_by(self, node) -> None:
        """Remember that graph node ``node`` keeps this memory for its backward (weakly: a graph
        that is dropped or has run its backward no longer counts)."""
        self._note_saver(weakref.ref(node))

    def _note_saver(self, ref) -> None:
        refs = self._savers
        if refs is None:
            refs = self._savers = []
        elif len(refs) >= 16:  # a long-lived tensor saved by graph after graph: forget the dead ones
            refs[:] = [r for r in refs if _is_live_node(r())]
        refs.append(ref)

    def in_live_graph(self) -> bool:
        """Does a graph that has not yet run its backward keep this memory for it?"""
        return any(_is_live_node(r()) for r in self._savers or ())


def _is_live_node(node) -> bool:
    return node is not None and not getattr(node, "released", False)


def storage_root(array):
    """The array that owns ``array``'s memory (itself, or the end of its ``.base`` chain)."""
    base = getattr(array, "base", None)
    while base is not None and hasattr(base, "shape"):
        array, base = base, getattr(base, "base", None)
    return array


class Function:
    """One differentiable op. Subclasses define ``forward`` and ``backward`` on raw arrays.

    ``forward(self, *arrays, **params)`` returns one array; it may keep what backward needs on
    ``self`` (``self.save(...)`` or plain attributes). ``backward(self, grad)`` returns one gradient
    per tensor input (``None`` where an input needs none), each with that input's shape.
    ``self.needs_input_grad`` tells backward which gradients are wanted.

    Low precision (float16, bfloat16) is computed in float32, here and nowhere else: ``apply`` hands
    forward float32 copies of the inputs (and of 16-bit array params) and rounds the result once
    to the storage dtype, and backward gets a float32 gradient and returns each input's gradient
    rounded to that input's dtype, as PyTorch's CPU kernels do. Ops that only move or view memory
    (reshape, indexing, casts) set ``computes_in_float32 = False``: a view must share its input's
    memory. So do ops whose kernels take 16-bit arrays and apply the same rule themselves
    (``linear_relu``, ``cross_entropy``, the fused ``layer_norm`` and ``gelu``: float32
    accumulation, one rounding), which spares the float32 copies; their forward and backward then
    see the 16-bit arrays and return results in the inputs' dtypes.

    ``computes_in_float32 = "on_cpu"`` (``ON_CPU``) applies the float32 rule to numpy arrays only
    and hands GPU arrays to forward as they are: for the GEMMs (``linear``, ``matmul``), which
    cuBLAS runs on 16-bit arrays with float32 accumulation and one rounding (tensor cores), while
    numpy has no 16-bit GEMM and computes them in float32, as PyTorch's CPU kernels do. Such an
    op's forward and backward must give results in their inputs' dtype when handed 16-bit arrays.
    """

    inputs: tuple = ()
    needs_input_grad: tuple = ()
    saved: tuple = ()
    saved_versions: tuple = ()
    computes_in_float32 = True  # True, False, or ON_CPU (see above)
    # True on a node whose backward is "zeros of the input's shape with ``grad`` written at
    # ``self.index``", a basic index (getitem's slices): backward then keeps ``(index, grad)`` and
    # adds it straight into the input's gradient (see _Scattered) instead of calling ``backward``.
    scatters = False
    low_dtype = None  # the storage dtype forward rounded to, when it computed in float32
    released = False  # True once backward has run and dropped what forward kept

    # Set per subclass once, when it is defined (apply runs for every op, and asking these of the
    # class each time showed in the per-op cost): a PyTorch-style Function (static forward taking
    # ctx), and the op name autocast looks up, None for an op defined outside the engine.
    _ctx_style = False
    _autocast_name = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._ctx_style = isinstance(inspect.getattr_static(cls, "forward"), staticmethod)
        cls._autocast_name = cls.op_name() if cls.__module__.startswith("engine.") else None

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on tensors ``inputs`` (all on one device) and record it in the graph."""
        mode = _mode
        if mode.watcher is not None:
            mode.watcher(inputs, cls)
        if cls._ctx_style:  # a user's op: autocast reaches the engine ops its forward calls
            return _apply_ctx_style(cls, inputs, params)
        if _autocast.state.regions and cls._autocast_name is not None:  # not a user's same-named op
            inputs = tuple(_autocast.cast_inputs(cls._autocast_name, inputs))

        raw, needs, all_numpy, low = [], [], True, None
        for t in inputs:  # one pass (a comprehension is a function call of its own in Python 3.11)
            data = t._data
            raw.append(data)
            needs.append(t.requires_grad)
            if type(data) is not _ndarray or not t._device_is_its_arrays:
                all_numpy = False
            elif low is None and data.dtype in _LOW_PRECISION:  # numpy arrays: the float32 rule applies
                low = data.dtype
        if not all_numpy:  # numpy arrays are all on the CPU: compare devices only for others
            _check_same_device(cls.op_name(), inputs)
            rule = cls.computes_in_float32
            low = _low_precision_of(raw) if rule is True or (rule and _on_cpu(raw)) else None
        elif low is not None and not cls.computes_in_float32:  # asked only when there is a 16-bit input
            low = None
        fn = cls()
        needs = tuple(needs)
        fn.needs_input_grad = needs  # known in forward too, so it can save only what backward uses
        if low is not None:  # array params too: cross_entropy's weight, soft targets
            fn.low_dtype = low
            raw = [dtypes.upcast(a) for a in raw]
            params = {name: dtypes.upcast(value) for name, value in params.items()}
        try:
            out = fn.forward(*raw, **params)
            if low is not None:
                out = dtypes.round_to(out, low)
        except EngineError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            operands = ", ".join(describe(t) for t in inputs)
            raise type(e)(f"{cls.op_name()}: {e} (operands: {operands})") from e
        recorded = True in needs and mode.enabled  # the thread-local read only where a graph is wanted
        result = _tensor.Tensor._from_op(out, fn if recorded else None)
        out = result._data
        if type(out) is not _ndarray or out.base is not None:
            _share_storage(result, inputs)
        else:  # a numpy array owning its memory: a view of an input only if it is that input's array
            for t in inputs:
                if out is t._data:
                    _view_of(result, t)
                    break
        if recorded:
            _record_saved_versions(fn, inputs, result, needs)  # before fn.inputs: no tensors to scan
            fn.inputs = inputs
        return result

    @classmethod
    def op_name(cls) -> str:
        return getattr(cls, "name", cls.__name__.lower())

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def save(self, *arrays) -> None:
        self.saved = arrays

    def release(self) -> None:
        """Drop what forward kept, once backward has used it (unless the graph is retained)."""
        self.__dict__.clear()
        self.released = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__}Backward>"


_ndarray = np.ndarray
_LOW_PRECISION = dtypes.LOW_PRECISION
ON_CPU = "on_cpu"  # Function.computes_in_float32: compute 16-bit numpy arrays in float32, not GPU ones


def _on_cpu(arrays) -> bool:
    """Are an op's input arrays numpy's? (They share one device, checked before this is asked.)"""
    return not arrays or isinstance(arrays[0], _ndarray)


def _low_precision_of(arrays):
    """dtypes.low_precision_of for the arrays an op reads (all arrays: no getattr per element)."""
    for a in arrays:
        if a.dtype in _LOW_PRECISION:
            return a.dtype
    return None


# ---- PyTorch-style Functions: static forward(ctx, ...) / backward(ctx, *grads) on Tensors -------

class FunctionCtx:
    """The ``ctx`` a PyTorch-style Function's ``forward`` and ``backward`` receive.

    Attributes set on it in ``forward`` (``ctx.constant = 3``) are there in ``backward``.

    Attributes:
        needs_input_grad: one bool per argument of ``apply`` (False for non-tensors): whether
            backward must return a gradient for it.
    """

    def __init__(self, needs_input_grad: tuple):
        self.needs_input_grad = needs_input_grad
        self._to_save: tuple = ()
        self._saved_versions: tuple = ()
        self._non_differentiable: tuple = ()
        self._materialize_grads = True
        self._released = False
        self._name = "Function"

    def save_for_backward(self, *tensors) -> None:
        """Keep tensors (inputs, outputs or intermediates; None allowed) for ``backward``.

        Their versions are recorded when ``apply`` returns: changing one in place before backward
        makes backward raise a GradError, as for the engine's own ops.
        """
        from engine.tensor import Tensor

        for i, t in enumerate(tensors):
            if t is not None and not isinstance(t, Tensor):
                raise GradError(f"{self._name}.forward: save_for_backward takes Tensors or None; argument {i} is a "
                                f"{type(t).__name__} (keep other values as attributes of ctx)")
        self._to_save = tensors

    @property
    def saved_tensors(self) -> tuple:
        """What ``save_for_backward`` kept, checked against in-place changes since."""
        if self._released:
            raise GradError(f"backward: trying to backward through {self._name} a second time (or after it); its "
                            "saved tensors were freed. Pass retain_graph=True to the first backward()")
        _check_version_records(self._name, self._saved_versions)
        return self._to_save

    def mark_non_differentiable(self, *tensors) -> None:
        """Outputs that get no gradient (indices, masks): they do not require grad, and backward
        receives zeros (or None, see ``set_materialize_grads``) for them."""
        self._non_differentiable = tensors

    def set_materialize_grads(self, value: bool) -> None:
        """True (default): gradients of outputs that got none are passed to backward as zeros; False: as None."""
        self._materialize_grads = bool(value)

    def mark_dirty(self, *tensors) -> None:
        raise GradError(f"{self._name}.forward: mark_dirty (a Function changing its input in place) is not "
                        "supported; return a new tensor instead")


def _uses_setup_context(cls) -> bool:
    return isinstance(inspect.getattr_static(cls, "setup_context", None), staticmethod)


@functools.cache
def _ctx_node_class(cls) -> type:
    """The graph node type for ``cls`` (named after it, so grad_fn reads <LegendrePolynomial3Backward>)."""
    return type(cls.__name__, (_CtxBackward,), {"user_function": cls, "__module__": cls.__module__})


def _apply_ctx_style(cls, args: tuple, kwargs: dict):
    from engine.tensor import Tensor

    name = cls.__name__
    if kwargs:
        raise TypeError(f"{name}.apply takes positional arguments only (as in PyTorch), got keywords {sorted(kwargs)}")
    tensors = tuple(a for a in args if isinstance(a, Tensor))
    _check_same_device(name, tensors)
    ctx = FunctionCtx(tuple(isinstance(a, Tensor) and a.requires_grad for a in args))
    ctx._name = name
    with _grad_mode(False):
        if _uses_setup_context(cls):
            out = cls.forward(*args)
            cls.setup_context(ctx, args, out)
        else:
            out = cls.forward(ctx, *args)
    outputs = out if isinstance(out, tuple) else (out,)
    if not (is_grad_enabled() and any(ctx.needs_input_grad)):
        return out
    node = _ctx_node_class(cls)()
    node.ctx, node.inputs = ctx, tensors
    node.needs_input_grad = tuple(t.requires_grad for t in tensors)
    node.arg_is_tensor = tuple(isinstance(a, Tensor) for a in args)
    node.output_meta = tuple((o.shape, o.dtype) if isinstance(o, Tensor) else None for o in outputs)
    non_diff = {id(t) for t in ctx._non_differentiable}
    wanted = [i for i, o in enumerate(outputs)
              if isinstance(o, Tensor) and id(o) not in non_diff
              and (o._data.dtype.kind == "c" or is_floating(o._data.dtype))]
    if len(outputs) == 1 and not isinstance(out, tuple):
        results = [_attach(o, node, tensors) if wanted else o for o in outputs]
    else:
        node.packed = Tensor._from_op(outputs[wanted[0]].xp.empty((0,)), node) if wanted else None
        results = list(outputs)
        for i in wanted:
            results[i] = _attach(outputs[i], _SelectOutput(i, len(outputs), node.packed), tensors)
    ctx._saved_versions = _versions_of(ctx._to_save, tensors, results)
    node.saved_versions = ctx._saved_versions
    _note_savers(node, node.saved_versions)
    return tuple(results) if isinstance(out, tuple) else results[0]


def _attach(output, grad_fn, inputs):
    """``output`` as the graph node's result: the tensor itself when forward made it, else a new
    tensor sharing its memory and version (forward returned an input or something already in a graph)."""
    from engine.tensor import Tensor

    fresh = output.grad_fn is None and not output.requires_grad and all(output is not t for t in inputs)
    if fresh:
        output.grad_fn, output.requires_grad = grad_fn, True
        return output
    result = Tensor._from_op(output._data, grad_fn)
    result._version, result._base = output._version, output._base if output._base is not None else output
    return result


def _versions_of(saved, inputs, outputs) -> tuple:
    """(Version, value, True: an output / False: an input / None: another tensor) for each saved tensor."""
    records, seen = [], set()
    for t in saved:
        if t is None or id(t._version) in seen:
            continue
        seen.add(id(t._version))
        if any(t._version is getattr(o, "_version", None) for o in outputs):
            kind = True
        else:
            kind = False if any(t._version is i._version for i in inputs) else None
        records.append((t._version, t._version.value, kind))
    return tuple(records)


def _note_savers(node, records) -> None:
    """Tell each saved memory's Version that ``node`` keeps it (``Tensor.numpy()`` hands such
    memory out read-only, so a write through numpy cannot silently corrupt the gradient)."""
    ref = weakref.ref(node)  # one reference shared by every Version the node saved
    for record in records:
        record[0]._note_saver(ref)


class _SelectOutput(Function):
    """Output ``index`` of a multi-output PyTorch-style Function: hands its gradient to the shared node."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def __init__(self, index: int, count: int, packed):
        self.index, self.count = index, count
        self.inputs, self.needs_input_grad = (packed,), (True,)

    def backward(self, grad):
        return (_OutputGrads(self.count, {self.index: grad}),)

    def __repr__(self) -> str:
        return f"<SelectOutput{self.index}Backward>"


class _OutputGrads:
    """The gradients of a multi-output Function's outputs, gathered on its hidden packed tensor
    (shape (0,), so backward's shape check passes; ``+`` merges, as backward sums gradients)."""

    shape = (0,)

    def __init__(self, count: int, parts: dict):
        self.count, self.parts = count, parts

    def __add__(self, other: "_OutputGrads") -> "_OutputGrads":
        parts = dict(self.parts)
        for k, g in other.parts.items():
            parts[k] = parts[k] + g if k in parts else g
        return _OutputGrads(self.count, parts)


class _CtxBackward(Function):
    """The graph node of one call of a PyTorch-style Function: calls its static backward with Tensors."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    user_function: type = Function

    def backward(self, grad):
        from engine.tensor import Tensor

        ctx, name = self.ctx, self.user_function.__name__
        parts = grad.parts if isinstance(grad, _OutputGrads) else {0: grad}
        xp = backend.array_module(next(iter(parts.values())))
        grads = []
        for i, meta in enumerate(self.output_meta):
            g = parts.get(i)
            if g is None and meta is not None and ctx._materialize_grads:
                g = xp.zeros(meta[0], dtype=meta[1])
            grads.append(None if g is None else Tensor._from_op(g, None))
        with _grad_mode(False):
            returned = self.user_function.backward(ctx, *grads)
        if not isinstance(returned, tuple):
            returned = (returned,)
        if len(returned) != len(self.arg_is_tensor):
            raise GradError(f"{name}.backward returned {len(returned)} gradients for {len(self.arg_is_tensor)} "
                            "arguments of forward; return one per argument (None for non-tensors and inputs that "
                            "need no gradient)")
        out = []
        for position, (is_tensor, g) in enumerate(zip(self.arg_is_tensor, returned)):
            if not is_tensor:
                if g is not None:
                    raise GradError(f"{name}.backward returned a gradient for argument {position}, which is not a "
                                    "Tensor; return None there")
                continue
            if g is not None and not isinstance(g, Tensor):
                raise GradError(f"{name}.backward returned a {type(g).__name__} for argument {position}; return "
                                "a Tensor or None")
            out.append(None if g is None else g._data)
        return tuple(out)

    def release(self) -> None:
        ctx = self.__dict__.get("ctx")
        if ctx is not None:
            ctx._to_save, ctx._released = (), True
        super().release()


def records_nothing(tensor) -> bool:
    """Whether an op reading only ``tensor`` (and Python numbers) would add nothing to a graph and
    be seen by nobody: a numpy-backed tensor that does not require grad, with no watcher installed.
    Ops use it to skip ``Function.apply``'s bookkeeping on the small integer work of data loading
    (``data[i:i + block_size]`` with a 0-d index tensor), where that bookkeeping is most of the cost."""
    return not tensor.requires_grad and _mode.watcher is None and type(tensor._data) is _ndarray


def view_result(array, of) -> "_tensor.Tensor":
    """A no-graph result ``array`` of an op on ``of``, sharing ``of``'s Version when it views its memory
    (what ``Function.apply`` does for a result it does not record)."""
    result = _tensor.Tensor._from_op(array, None)
    _share_storage(result, (of,))
    return result


def _share_storage(result, inputs) -> None:
    """A result that views an input's memory shares its Version (and remembers the tensor it views)."""
    out = result._data
    if getattr(out, "base", None) is None:  # owns its memory: a view only if it is an input's array
        for t in inputs:
            if out is t._data:
                return _view_of(result, t)
        return
    root = storage_root(out)
    for t in inputs:
        if out is t._data or storage_root(t._data) is root:
            return _view_of(result, t)


def _view_of(result, t) -> None:
    result._version = t._version
    result._base = t._base if t._base is not None else t


# Attribute values of a graph node that are never arrays: skipped without asking for .dtype
_NOT_ARRAYS = frozenset({int, float, bool, str, tuple, type(None)})


def _is_array_like(value) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "base")


def _record_saved_versions(fn, inputs, result, needs) -> None:
    """Set ``fn.saved_versions``: (Version, value, is the output) for each input or output tensor
    whose memory ``fn`` kept for backward (the arrays among its attributes and in its tuple
    attributes: ``self.save(...)`` stores a tuple), and tell each such Version that ``fn`` keeps it
    (what :func:`_note_savers` does, done here as each Version is first met: one pass, one weak
    reference). Runs once per recorded op, so the tests are written out inline, and owners are
    found by identity before any storage root is computed. ``needs`` is ``fn.needs_input_grad``
    (flags, set on every node: skipped without looking at its items)."""
    versions = ref = None
    for value in fn.__dict__.values():
        kind = type(value)
        if kind is tuple:
            if value is needs:
                continue
            candidates = value
        elif kind is _ndarray or (kind not in _NOT_ARRAYS and _is_array_like(value)):
            candidates = (value,)
        else:
            continue
        for array in candidates:
            kind = type(array)
            if kind is not _ndarray and (kind in _NOT_ARRAYS or not _is_array_like(array)):
                continue
            for owner in inputs:  # most saved arrays are an input's or the output's own array
                if array is owner._data:
                    break
            else:
                owner = result if array is result._data else _viewed_owner(array, (*inputs, result))
                if owner is None:
                    continue
            version = owner._version
            record = (version, version.value, owner is result)
            if versions is None:  # a list: a node saves one or two memories, a dict cost more to build
                versions = [record]
            else:
                for kept in versions:  # one record per Version, the last owner's kind
                    if kept[0] is version:
                        versions[versions.index(kept)] = record
                        break
                else:
                    versions.append(record)
                if kept[0] is version:  # met before: told already
                    continue
            if ref is None:  # _note_savers' work, inline: one weak reference for every Version
                ref = weakref.ref(fn)
            # Version._note_saver's common cases written out (this runs for every saved array of
            # every recorded op; the call cost ~0.1 us an op); a full list goes to the method.
            refs = version._savers
            if refs is None:
                version._savers = [ref]
            elif len(refs) < 16:
                refs.append(ref)
            else:
                version._note_saver(ref)  # full: it forgets the dead ones first
    if versions is not None:
        fn.saved_versions = tuple(versions)


def _viewed_owner(array, owners):
    """The tensor among ``owners`` whose memory ``array`` views, or None (asked once ``array`` is
    none of their own arrays: :func:`_record_saved_versions` tests identity first)."""
    root = storage_root(array)
    for t in owners:
        data = t._data  # an array owning its memory is its own root: no call to find it
        if data is root or (getattr(data, "base", None) is not None and storage_root(data) is root):
            return t
    return None


def _check_saved_versions(fn) -> None:
    records = fn.saved_versions
    for version, value, _ in records:
        if version.value != value:  # name the op only when there is an error to raise
            _check_version_records(type(fn).__name__.removesuffix('Function'), records)


def _check_version_records(name: str, records) -> None:
    for version, value, is_output in records:
        if version.value != value:
            which = {True: "its output", False: "one of its inputs"}.get(is_output, "a tensor")
            raise GradError(
                f"backward: {name} saved {which} for the gradient, and that "
                f"tensor was then modified by an in-place operation (version {value} -> {version.value}), so the "
                "gradient would be wrong. Clone the tensor (.clone()) before changing it in place, or change it "
                "out of place.")


def _check_same_device(op: str, inputs) -> None:
    devices = {t.device for t in inputs}
    if len(devices) > 1:
        operands = ", ".join(describe(t) for t in inputs)
        raise DeviceError(f"{op}: operands are on different devices ({operands}); "
                          f"move them to one device with .to(device) first")


# Gradient accumulation is a read-modify-write of ``.grad`` (and numpy releases the GIL inside a
# large ``+=``), so concurrent backward() calls into one leaf lose updates unless it is locked, as
# PyTorch locks each AccumulateGrad node. Locks are striped by tensor identity: no lock per tensor
# to create or store, and two leaves share one only rarely (that costs a wait, never correctness).
_GRAD_LOCKS = tuple(threading.Lock() for _ in range(64))  # a power of two: a mask picks one


def grad_lock(tensor) -> threading.Lock:
    """The lock guarding ``tensor.grad`` (and its hook list) against concurrent accumulation."""
    return _GRAD_LOCKS[(id(tensor) >> 4) & 63]  # objects are 16-byte aligned: skip the zero bits


class GradHome:
    """Memory prepared for a leaf's next fresh gradient: its slice of an optimizer's flat gradient buffer.

    An optimizer that updates its parameters from one flat gradient buffer gives each parameter a
    home there (``param._grad_home``, a weak reference). When backward reaches a leaf whose
    ``.grad`` is None it copies the gradient into the home and makes ``.grad`` a Tensor over it,
    instead of a Tensor over a new copy: the optimizer then finds the gradients in its buffer and
    gathers nothing. The copy is the one backward made anyway; the gather's pass is saved.

    A home is taken only while nothing outside the bookkeeping sees its memory (:meth:`is_free`):
    a grad Tensor kept by the user after ``zero_grad(set_to_none=True)``, an array from its
    ``.numpy()``, or a view of either holds a reference to ``array`` (on the CPU views of it have
    it as their base, see ``backend.rooted_view``). Then the gradient gets new memory, and the
    old tensor keeps its values, as in PyTorch.

    Attributes:
        array: the home (a view of the flat buffer, shaped as the parameter).
        param: the parameter array the home was made for; a parameter rebound since (``.to()``,
            ``p.data = ...``) no longer matches, and its gradient goes to new memory.
    """

    __slots__ = ("array", "param", "idle", "__weakref__")

    def __init__(self, array, param):
        self.array, self.param, self.idle = array, param, -1

    def settle(self) -> None:
        """Record the reference count with only the bookkeeping holding ``array`` (call it once the
        owner has stored the array where it keeps it, and holds it in no local variable)."""
        self.idle = sys.getrefcount(self.array)

    def is_free(self) -> bool:
        """Does nothing but the bookkeeping see this memory (no tensor, array or view of it)?"""
        return sys.getrefcount(self.array) == self.idle

    def takes(self, data, g, shape=None, dtype=None) -> bool:
        """May gradient ``g`` of the leaf whose array is ``data`` be written into this home? (``shape``
        and ``dtype``: the gradient's, where ``g`` is only an array on its device, a slice of it.)"""
        home = self.array
        shape = g.shape if shape is None else shape
        dtype = g.dtype if dtype is None else dtype
        fits = (data is self.param and type(g) is type(home) and dtype == home.dtype and shape == home.shape
                and (type(g) is _ndarray or g.device == home.device))
        del home  # not counted by is_free
        return fits and self.is_free()


class _BackwardState(threading.local):
    def __init__(self):
        self.unit = None  # the all-ones seed of the running backward()
        self.queue = None  # callbacks queued for the end of the running backward()


_seed = _callbacks = _BackwardState()


def is_implicit_ones_grad(grad) -> bool:
    """True for the all-ones gradient that ``backward()`` starts a scalar root with.

    A Function whose backward would multiply by the incoming gradient can skip the multiply for
    it, without reading the value back from the device (which would be a host sync).
    """
    return grad is not None and grad is _seed.unit


def backward(root, grad=None, retain_graph: bool = False) -> None:
    """Accumulate d(root)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
    if not root.requires_grad:
        raise GradError(f"backward: {describe(root)} does not require grad and has no grad_fn; "
                        "create the inputs with requires_grad=True (and not under no_grad())")
    implicit = grad is None
    grad = _root_gradient(root, grad, "backward")
    if implicit:
        _seed.unit = grad

    outer_callbacks = _callbacks.queue
    _callbacks.queue = []
    try:
        _propagate([(root, grad)], retain_graph)
        queued = _callbacks.queue
        while queued:  # a callback may queue another
            queued.pop(0)()
    finally:
        _seed.unit = None
        _callbacks.queue = outer_callbacks



def _root_gradient(root, grad, where: str):
    """The gradient array a backward pass from ``root`` starts with: ``grad`` (a Tensor or array
    of the root's shape and device, cast to its dtype), or ones for a one-element root when
    ``grad`` is None."""
    Tensor = _tensor.Tensor
    if grad is None:
        if root._data.size != 1:
            raise GradError(f"{where}: {describe(root)} is not a scalar; pass a gradient of the same "
                            "shape (tensor.backward(grad)) or reduce it first (e.g. .sum() or .mean())")
        return root.xp.ones_like(root._data)
    if isinstance(grad, Tensor) and grad.device != root.device:
        raise GradError(f"{where}: gradient {describe(grad)} is not on {describe(root)}'s device")
    # Cast to the root's dtype, as PyTorch does (a float64 gradient must not make float64 .grads).
    grad = (grad._data if isinstance(grad, Tensor) else root.xp.asarray(grad)).astype(root.dtype, copy=False)
    if grad.shape != root.shape:
        raise GradError(f"{where}: gradient shape {grad.shape} does not match {describe(root)}")
    return grad


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph: bool = False,
         only_inputs: bool = True, allow_unused=None, is_grads_batched: bool = False,
         materialize_grads: bool = False) -> tuple:
    """The gradients of ``outputs`` with respect to ``inputs``, returned rather than accumulated
    (``torch.autograd.grad``, first order): no ``.grad`` of a leaf changes, though non-leaf
    tensors that called ``retain_grad()`` get theirs, as in PyTorch.

    Args:
        outputs: a Tensor or a sequence of Tensors to differentiate.
        inputs: a Tensor or a sequence of Tensors (leaves or not) to differentiate with respect to.
        grad_outputs: the vector of the vector-Jacobian product, one per output (a Tensor of its
            shape, or None for a one-element output, which then gets 1).
        retain_graph: keep the graph for another backward or ``grad`` through it; defaults to
            ``create_graph``. Without it a second pass raises GradError.
        create_graph: must be False: the engine's backward computes on arrays, so a gradient is
            not itself differentiable (no double backward); True raises GradError.
        only_inputs: ignored (deprecated in PyTorch too).
        allow_unused: an input the outputs do not depend on gets None if True, raises GradError
            if False or None (None means False, or True when ``materialize_grads``).
        is_grads_batched: must be False (no vmap over ``grad_outputs``).
        materialize_grads: zeros instead of None for unused inputs.

    Returns:
        tuple: one Tensor (or None) per input, of that input's shape and dtype.

    Example:
        >>> x = engine.tensor([1.0, 2.0], requires_grad=True)   # doctest: +SKIP
        >>> engine.autograd.grad((x * x).sum(), x)
        (tensor([2., 4.]),)
    """
    Tensor = _tensor.Tensor
    if create_graph:
        raise GradError("autograd.grad: create_graph=True (higher-order gradients) is not supported: the engine's "
                        "backward functions compute on arrays, not Tensors, so a gradient has no graph of its own. "
                        "Differentiate twice with finite differences, or use PyTorch for double backward")
    if is_grads_batched:
        raise GradError("autograd.grad: is_grads_batched=True is not supported (it needs vmap); call grad once per "
                        "grad_outputs row")
    if materialize_grads and allow_unused is False:
        raise ValueError("Expected allow_unused to be True or not passed when materialize_grads=True, but got: "
                         "allow_unused=False.")
    allow_unused = materialize_grads if allow_unused is None else allow_unused
    retain_graph = create_graph if retain_graph is None else retain_graph
    outputs = _as_tensor_tuple(outputs, "outputs")
    inputs = _as_tensor_tuple(inputs, "inputs")
    if grad_outputs is None or isinstance(grad_outputs, Tensor):
        grad_outputs = (grad_outputs,) * len(outputs) if grad_outputs is None else (grad_outputs,)
    grad_outputs = tuple(grad_outputs)
    if len(grad_outputs) != len(outputs):
        raise GradError(f"autograd.grad: got {len(grad_outputs)} grad_outputs for {len(outputs)} outputs; pass one "
                        "per output (None for a one-element output)")
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise GradError(f"autograd.grad: input {i} ({describe(t)}) does not require grad, so it has no gradient")
    roots = []
    for i, (out, g) in enumerate(zip(outputs, grad_outputs)):
        if not out.requires_grad:
            raise GradError(f"autograd.grad: output {i} ({describe(out)}) does not require grad and has no grad_fn")
        roots.append((out, _root_gradient(out, g, f"autograd.grad (output {i})")))
    found = _propagate(roots, retain_graph, stop=_walk_limits(outputs, inputs), accumulate=False,
                       keep=frozenset(id(t) for t in inputs))
    results, returned = [], set()
    for i, t in enumerate(inputs):
        g = found.get(id(t))
        if g is None:
            if not allow_unused:
                raise GradError(f"autograd.grad: input {i} ({describe(t)}) was not used to compute the outputs, so "
                                "it has no gradient; pass allow_unused=True to get None for it (materialize_grads=True "
                                "for zeros)")
            results.append(t.xp.zeros_like(t._data) if materialize_grads else None)
            continue
        if id(storage_root(g)) in returned:  # two inputs must not share one gradient array
            g = g.copy()
        returned.add(id(storage_root(g)))
        results.append(g)
    return tuple(None if g is None else Tensor._from_op(g, None) for g in results)


def _as_tensor_tuple(value, what: str) -> tuple:
    Tensor = _tensor.Tensor
    items = (value,) if isinstance(value, Tensor) else tuple(value)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"autograd.grad: {what} must be Tensors, got a {type(t).__name__} at position {i}")
    return items


def _walk_limits(outputs, inputs) -> frozenset:
    """Ids of the tensors where ``grad``'s backward walk can stop: those from which no input can be
    reached through grad_fns (their gradients are of no use), and the inputs from which no other
    input can be reached. An input that another input depends on is walked through, so that the
    other one gets the gradient along that path too."""
    targets = {id(t) for t in inputs}
    reaches = {}  # id -> can an input be reached from this tensor (itself excluded)
    stack = [(t, False) for t in outputs]
    while stack:
        tensor, expanded = stack.pop()
        key = id(tensor)
        fn = tensor.grad_fn
        if fn is not None and fn.released:
            raise _second_pass_error()
        parents = [inp for inp in getattr(fn, "inputs", ()) if inp.requires_grad]
        if expanded:
            reaches[key] = any(id(p) in targets or reaches[id(p)] for p in parents)
        elif key not in reaches:
            reaches[key] = False  # provisional: the graph is acyclic, so no path comes back here
            stack.append((tensor, True))
            stack.extend((p, False) for p in parents if id(p) not in reaches)
    return frozenset(key for key, hit in reaches.items() if not hit)


def saved_bytes(root) -> int:
    """Bytes of the distinct arrays the graph behind ``root`` keeps for its backward (what each node
    saved: activations, masks, statistics), counted once each however many nodes share them.

    A measuring tool (tests and bench/checkpointing.py compare a plain graph with a checkpointed
    one). It counts every array attribute of a node, so an op that keeps a reference to its input
    counts that input too.
    """
    seen, arrays, stack, total = set(), set(), [root], 0
    while stack:
        fn = stack.pop().grad_fn
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        ctx = vars(fn).get("ctx")  # a PyTorch-style node keeps its tensors on its ctx
        kept = tuple(t._data for t in getattr(ctx, "_to_save", ()) if t is not None)
        for value in [*vars(fn).values(), kept]:
            for a in value if isinstance(value, tuple) else (value,):
                if hasattr(a, "nbytes") and hasattr(a, "dtype") and id(a) not in arrays:
                    arrays.add(id(a))
                    total += a.nbytes
        stack.extend(getattr(fn, "inputs", ()))
    return total


def queue_callback(callback) -> None:
    """Run ``callback()`` once the running ``backward()`` has finished (PyTorch's
    ``Variable._execution_engine.queue_callback``): DistributedDataParallel waits for its gradient
    all-reduces there, before the optimizer step. Only valid while a backward runs (from a hook)."""
    queued = _callbacks.queue
    if queued is None:
        raise GradError("queue_callback: no backward() is running; call it from a gradient hook")
    queued.append(callback)


def _propagate(roots, retain_graph: bool, stop=frozenset(), accumulate: bool = True, keep=frozenset()) -> dict:
    """Run backward from ``roots`` ((tensor, gradient array) pairs) through the graph.

    Leaves accumulate into ``.grad`` (and fire their post-accumulate hooks). Tensors whose id is in
    ``stop`` end the walk: their gradients are not accumulated but returned, keyed by id (activation
    checkpointing takes the gradients of a recomputed block's inputs this way). The gradients of
    tensors whose id is in ``keep`` are returned too, and the walk goes on through them. With
    ``accumulate=False`` no leaf's ``.grad`` changes (PyTorch's ``autograd.grad``): gradients
    reaching leaves outside ``stop`` and ``keep`` are dropped; non-leaves that ``retain_grad()``
    still get theirs, as in PyTorch.
    """
    grads = {}
    for tensor, g in roots:
        key = id(tensor)
        grads[key] = g if key not in grads else grads[key] + g
    owned = set()  # keys whose pending gradient is an array this pass made (a sum): added to in place
    for tensor in _topological_order([t for t, _ in roots], stop):
        key = id(tensor)
        if stop and key in stop:
            continue  # its gradient stays in ``grads`` for the caller
        g = grads.pop(key, None)
        if g is None:
            continue
        fn = tensor.grad_fn
        if type(g) is _Scattered and (fn is not None or not accumulate or (keep and key in keep)):
            g = g.dense()
        if keep and key in keep:
            grads[key] = g  # final: every tensor using this one has run its backward
        if fn is None:
            if accumulate:
                if type(g) is _Scattered:
                    _accumulate_scattered(tensor, g)
                else:
                    tensor._accumulate_grad(g)
                hooks = getattr(tensor, "_post_grad_hooks", None)
                if hooks:
                    for hook in tuple(hooks):
                        hook(tensor)  # this leaf's gradient is final for this backward
            continue
        if tensor._retains_grad:
            tensor._accumulate_grad(g)
        # Read before backward: a backward() in another thread through this same graph may release
        # fn meanwhile (clearing its attributes), which must raise, not drop the gradient.
        state = fn.__dict__
        inputs, needs = state.get("inputs"), fn.needs_input_grad
        if inputs is None:
            raise _second_pass_error()
        if fn.saved_versions:
            _check_saved_versions(fn)
        if fn.scatters and g.dtype == inputs[0]._data.dtype:  # a basic-index view: no zeros array yet
            source = inputs[0]._data
            input_grads = (_Scattered(source.shape, source.dtype, fn.index, g),)
        else:
            try:
                input_grads = _low_precision_backward(fn, g, inputs) if fn.low_dtype is not None else fn.backward(g)
            except Exception as exc:
                if "inputs" not in state:
                    raise _second_pass_error() from exc
                raise
        if "inputs" not in state:  # released while it ran: what it read may be partial
            raise _second_pass_error()
        if type(input_grads) is not tuple:
            input_grads = (input_grads,)
        for inp, needed, gi in zip(inputs, needs, input_grads):
            if not needed or gi is None:
                continue
            if gi.shape != inp._data.shape:
                raise GradError(f"{type(fn).__name__}.backward returned a gradient of shape {gi.shape} "
                                f"for input {describe(inp)}")
            key = id(inp)
            if key not in grads:
                grads[key] = gi
            else:
                grads[key] = _sum_gradients(grads[key], gi, key in owned)
                owned.add(key)
        if not retain_graph:
            fn.release()
    if stop or keep:  # the gradients handed back are arrays
        for key, g in grads.items():
            if type(g) is _Scattered:
                grads[key] = g.dense()
    return grads


def _sum_gradients(pending, g, owned: bool):
    """``pending + g``: two gradients of one tensor, summed as dense arrays in arrival order.

    ``owned``: ``pending`` is an array this backward pass made itself (a sum) that nothing else
    holds, so ``g`` is added into it in place (the same values: one pass and no new array).
    Slice gradients (:class:`_Scattered`) join their parts; meeting a dense gradient they become
    one first.
    """
    if type(pending) is _Scattered:
        if type(g) is _Scattered:
            pending.parts.extend(g.parts)
            return pending
        pending, owned = pending.dense(), True
    elif type(g) is _Scattered:
        g = g.dense()
    # (arrays only: a 0-d numpy sum is an immutable scalar; multi-output nodes sum _OutputGrads)
    if owned and getattr(pending, "ndim", 0) and pending.dtype == g.dtype:
        pending += g
        return pending
    return pending + g


class _Scattered:
    """The pending gradient of a tensor that so far reached it only through basic-index views
    (``w[i * C:(i + 1) * C]``, ``x.split(n)``, ``x[:, -1]``): the parts ``(index, grad)`` in arrival
    order, each standing for zeros of ``shape`` with ``grad`` written at ``index``.

    Built as dense arrays (what ``GetItem.backward`` returns), each view would cost a zeros array of
    the whole tensor and each sum a pass over it; here the parts are written into one array when
    the gradient is needed, which for a leaf is the home its optimizer prepared in the flat
    gradient buffer (:func:`_accumulate_scattered`). The values are the dense sum's, bit for bit.
    """

    __slots__ = ("shape", "dtype", "parts")

    def __init__(self, shape: tuple, dtype, index, grad):
        self.shape, self.dtype, self.parts = shape, dtype, [(index, grad)]

    def dense(self):
        """The gradient as a new array."""
        grad = self.parts[0][1]
        return self.into(backend.array_module(grad).zeros(self.shape, dtype=self.dtype), zeroed=True)

    def into(self, out, zeroed: bool = False):
        """Write the gradient into ``out`` (an array of ``shape`` and ``dtype``; ``zeroed``: it holds
        zeros already) and return it.

        The dense sum ``(z1 + z2) + z3 ...`` adds +0.0 wherever a part does not reach, which turns a
        -0.0 into +0.0. So one part is written into zeros as it is; several parts are each added
        into zeros, which gives the dense sum's values, signed zeros included, at every element
        that some part misses: at every element when two parts are disjoint (as the row blocks of
        a packed weight are). Parts that all overlap are summed as the dense arrays.
        """
        parts = self.parts
        if not zeroed:
            out[...] = 0
        if len(parts) == 1:
            index, grad = parts[0]
            out[index] = grad
            return out
        xp = backend.array_module(out)
        views = [_view_at(out, index) for index, _ in parts]
        if all(xp.may_share_memory(a, b) for i, a in enumerate(views) for b in views[i + 1:]):
            total = None
            for index, grad in parts:
                dense = xp.zeros(self.shape, dtype=self.dtype)
                dense[index] = grad
                total = dense if total is None else total + dense
            out[...] = total
            return out
        for view, (_, grad) in zip(views, parts):
            xp.add(view, grad, out=view)
        return out


def _view_at(array, index):
    """``array[index]`` for a basic index, as a view even where it selects one element."""
    items = index if type(index) is tuple else (index,)
    if not any(i is Ellipsis for i in items):
        items = items + (Ellipsis,)  # with an Ellipsis numpy and cupy give a 0-d view, not a scalar
    return array[items]


def _accumulate_scattered(leaf, scattered: _Scattered) -> None:
    """A leaf's slice gradients into its ``.grad``: written straight into its optimizer's home for a
    fresh gradient (no zeros array of the leaf's size, no copy), or into a new array."""
    with grad_lock(leaf):
        if leaf._grad is None:
            home = leaf._grad_home
            home = home() if home is not None else None
            if home is not None and home.takes(leaf._data, scattered.parts[0][1], scattered.shape, scattered.dtype):
                leaf._grad = _tensor.Tensor._from_op(scattered.into(home.array), None)
            else:
                leaf._grad = _tensor.Tensor._from_op(scattered.dense(), None)  # new memory: nothing to copy
            return
    leaf._accumulate_grad(scattered.dense())  # added to the gradient it has, as a dense one is


def _low_precision_backward(fn, g, inputs) -> tuple:
    """``fn.backward`` in float32 (its forward computed in float32), each gradient rounded once to
    its input's dtype: a bfloat16 tensor's gradient is bfloat16."""
    grads = fn.backward(dtypes.upcast(g))
    grads = grads if isinstance(grads, tuple) else (grads,)
    return tuple(gi if gi is None or not hasattr(gi, "dtype") or gi.dtype == inp.dtype
                 or not dtypes.is_floating(inp.dtype) else gi.astype(inp.dtype)
                 for inp, gi in zip(inputs, grads))


def _second_pass_error() -> GradError:
    return GradError("backward: trying to backward through the graph a second time (or in two threads at "
                     "once); its saved arrays were freed. Pass retain_graph=True to the first backward()")


def _topological_order(roots, stop=frozenset()) -> list:
    """Tensors reachable from ``roots`` through grad_fns, each after every tensor that uses it; the
    walk does not go past a tensor whose id is in ``stop``.

    A tensor is listed as soon as its last user is (Kahn's order, depth first), and a leaf at
    once: a parameter's gradient is final, and its post-accumulate hooks fire, right after the
    last op that reads it has run backward, not at the end of the pass. DistributedDataParallel
    starts all-reducing a bucket there, while the rest of backward runs.
    """
    roots = list({id(r): r for r in roots}.values())
    users, edges, stack = {}, {}, list(roots)  # users: id -> how many graph edges read the tensor
    seen = {id(r) for r in roots}
    while stack:
        tensor = stack.pop()
        fn = tensor.grad_fn
        if fn is None or (stop and id(tensor) in stop):
            continue
        # The edges are read once, here (the inputs tuple itself: no user code runs before the
        # ordering pass below walks it, so requires_grad reads the same there).
        inputs = edges[id(tensor)] = getattr(fn, "inputs", ())
        for inp in inputs:
            if not inp.requires_grad:
                continue
            key = id(inp)
            if key in seen:  # another edge into it (or a root that another root reads)
                users[key] = users.get(key, 0) + 1
            else:
                users[key] = 1
                seen.add(key)
                stack.append(inp)
    order, ready = [], [r for r in roots if id(r) not in users]  # a root another root uses waits for it
    while ready:
        tensor = ready.pop()
        order.append(tensor)
        for inp in edges.get(id(tensor), ()):
            if not inp.requires_grad:
                continue
            key = id(inp)
            left = users[key] = users[key] - 1
            if left == 0:
                if inp.grad_fn is None or key in stop:
                    order.append(inp)  # nothing to expand: accumulate (or hand back) its gradient next
                else:
                    ready.append(inp)
    return order


def unbroadcast(grad, shape: tuple, dtype=None):
    """Sum ``grad`` down to ``shape``: the gradient of broadcasting an operand of that shape.

    ``dtype``: the dtype the sums accumulate in, the result rounded once back to ``grad``'s dtype
    (float32 for a 16-bit gradient, see ``engine.kernels.accumulation_dtype``); None sums in
    ``grad``'s own dtype.
    """
    if grad.shape == tuple(shape):
        return grad
    grad_dtype = grad.dtype
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)), dtype=dtype)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True, dtype=dtype)
    return grad if dtype is None else grad.astype(grad_dtype, copy=False)


class _VariableMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _tensor.Tensor)  # every Tensor is a Variable, as in PyTorch


class Variable(metaclass=_VariableMeta):
    """PyTorch's deprecated ``torch.autograd.Variable``, which old tutorials still call.

    ``Variable(t)`` gives what PyTorch gives: a tensor sharing ``t``'s memory, detached from its
    graph, that requires grad only when ``requires_grad=True`` is passed; ``isinstance(x,
    Variable)`` is true for every Tensor. ``volatile`` no longer does anything (PyTorch warns too).

    Raises:
        TypeError: ``data`` is not a Tensor.
    """

    def __new__(cls, data, requires_grad: bool = False, volatile: bool = False):
        if not isinstance(data, _tensor.Tensor):
            raise TypeError(f"Variable data has to be a tensor, but got {type(data).__name__}")
        if volatile:
            import warnings

            warnings.warn("volatile was removed and now has no effect. Use `with torch.no_grad():` instead.",
                          UserWarning, stacklevel=2)
        out = data.detach()
        return out.requires_grad_(True) if requires_grad else out


import engine.tensor as _tensor  # noqa: E402  (tensor.py imports this module: bound late, read per op)

"""The define-by-run graph: Function, grad mode, and the backward pass.

A :class:`Function` computes on raw arrays (numpy or cupy alike) in ``forward`` and returns the
gradient of each input in ``backward``. ``Function.apply`` wraps the result in a Tensor whose
``grad_fn`` is the Function instance, which holds its input tensors: that is the whole graph.
Backward walks it in reverse topological order with an explicit stack (no recursion limit).
"""

from __future__ import annotations

import contextlib
import threading

from engine.errors import DeviceError, EngineError, GradError, describe

_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_mode, "enabled", True)


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

    Example:
        >>> with engine.no_grad():        # doctest: +SKIP
        ...     prediction = model(x)
    """

    def __enter__(self):
        self._ctx = _grad_mode(False)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class enable_grad(no_grad):
    """Re-enable graph recording inside a ``no_grad`` block."""

    def __enter__(self):
        self._ctx = _grad_mode(True)
        self._ctx.__enter__()


class Version:
    """How many in-place changes a storage has had. Every tensor viewing one storage (views made
    by ops, ``detach()``) shares one Version; every in-place op bumps it; a Function records the
    versions of the tensors whose arrays it saved, and backward refuses to run it if one moved."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


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
    """

    inputs: tuple = ()
    needs_input_grad: tuple = ()
    saved: tuple = ()

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on tensors ``inputs`` (all on one device) and record it in the graph."""
        from engine.tensor import Tensor

        _check_same_device(cls.op_name(), inputs)
        fn = cls()
        raw = [t.data for t in inputs]
        needs = tuple(t.requires_grad for t in inputs)
        fn.needs_input_grad = needs  # known in forward too, so it can save only what backward uses
        try:
            out = fn.forward(*raw, **params)
        except EngineError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            operands = ", ".join(describe(t) for t in inputs)
            raise type(e)(f"{cls.op_name()}: {e} (operands: {operands})") from e
        recorded = is_grad_enabled() and any(needs)
        result = Tensor._from_op(out, fn if recorded else None)
        _share_storage(result, inputs)
        if recorded:
            fn.inputs = inputs
            fn.saved_versions = _saved_versions(fn, inputs, result)
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


def _share_storage(result, inputs) -> None:
    """A result that views an input's memory shares its Version (and remembers the tensor it views)."""
    out = result.data
    for t in inputs:
        if out is t.data or (getattr(out, "base", None) is not None and storage_root(out) is storage_root(t.data)):
            result._version = t._version
            result._base = t._base if t._base is not None else t
            return


def _saved_versions(fn, inputs, result) -> tuple:
    """(Version, value) for each input or output tensor whose memory ``fn`` kept for backward."""
    saved = []
    for value in fn.__dict__.values():
        if isinstance(value, tuple):
            saved.extend(v for v in value if hasattr(v, "dtype") and hasattr(v, "base"))
        elif hasattr(value, "dtype") and hasattr(value, "base"):
            saved.append(value)
    if not saved:
        return ()
    owners = [(storage_root(t.data), t) for t in (*inputs, result)]
    versions = {}
    for array in saved:
        root = storage_root(array)
        for owner_root, tensor in owners:
            if root is owner_root:
                versions[id(tensor._version)] = (tensor._version, tensor._version.value, tensor is result)
                break
    return tuple(versions.values())


def _check_saved_versions(fn) -> None:
    for version, value, is_output in getattr(fn, "saved_versions", ()):
        if version.value != value:
            which = "its output" if is_output else "one of its inputs"
            raise GradError(
                f"backward: {type(fn).__name__.removesuffix('Function')} saved {which} for the gradient, and that "
                f"tensor was then modified by an in-place operation (version {value} -> {version.value}), so the "
                "gradient would be wrong. Clone the tensor (.clone()) before changing it in place, or change it "
                "out of place.")


def _check_same_device(op: str, inputs) -> None:
    devices = {t.device for t in inputs}
    if len(devices) > 1:
        operands = ", ".join(describe(t) for t in inputs)
        raise DeviceError(f"{op}: operands are on different devices ({operands}); "
                          f"move them to one device with .to(device) first")


_seed = threading.local()


def is_unit_seed(grad) -> bool:
    """True for the all-ones gradient that ``backward()`` starts a scalar root with.

    A Function whose backward would multiply by the incoming gradient can skip the multiply for
    it, without reading the value back from the device (which would be a host sync).
    """
    return grad is not None and grad is getattr(_seed, "unit", None)


def backward(root, grad=None, retain_graph: bool = False) -> None:
    """Accumulate d(root)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
    from engine.tensor import Tensor

    if not root.requires_grad:
        raise GradError(f"backward: {describe(root)} does not require grad and has no grad_fn; "
                        "create the inputs with requires_grad=True (and not under no_grad())")
    if grad is None:
        if root.data.size != 1:
            raise GradError(f"backward: {describe(root)} is not a scalar; pass a gradient of the same "
                            "shape (tensor.backward(grad)) or reduce it first (e.g. .sum() or .mean())")
        grad = root.xp.ones_like(root.data)
        _seed.unit = grad
    else:
        if isinstance(grad, Tensor) and grad.device != root.device:
            raise GradError(f"backward: gradient {describe(grad)} is not on {describe(root)}'s device")
        # Cast to the root's dtype, as PyTorch does (a float64 gradient must not make float64 .grads).
        grad = (grad.data if isinstance(grad, Tensor) else root.xp.asarray(grad)).astype(root.dtype, copy=False)
        if grad.shape != root.shape:
            raise GradError(f"backward: gradient shape {grad.shape} does not match {describe(root)}")

    try:
        _propagate(root, grad, retain_graph)
    finally:
        _seed.unit = None


def _propagate(root, grad, retain_graph: bool) -> None:
    grads = {id(root): grad}
    for tensor in _topological_order(root):
        g = grads.pop(id(tensor), None)
        if g is None:
            continue
        fn = tensor.grad_fn
        if fn is None or tensor._retains_grad:
            tensor._accumulate_grad(g)
        if fn is None:
            continue
        if getattr(fn, "released", False):
            raise GradError("backward: trying to backward through the graph a second time; its saved "
                            "arrays were freed. Pass retain_graph=True to the first backward()")
        _check_saved_versions(fn)
        input_grads = fn.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        for inp, needed, gi in zip(fn.inputs, fn.needs_input_grad, input_grads):
            if not needed or gi is None:
                continue
            if gi.shape != inp.shape:
                raise GradError(f"{type(fn).__name__}.backward returned a gradient of shape {gi.shape} "
                                f"for input {describe(inp)}")
            key = id(inp)
            grads[key] = gi if key not in grads else grads[key] + gi
        if not retain_graph:
            fn.release()


def _topological_order(root) -> list:
    """Tensors reachable from ``root`` through grad_fns, each after every tensor that uses it."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        tensor, children_done = stack.pop()
        if children_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        fn = tensor.grad_fn
        if fn is not None:
            for inp in getattr(fn, "inputs", ()):
                if inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    order.reverse()
    return order


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` down to ``shape``: the gradient of broadcasting an operand of that shape."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


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
        try:
            out = fn.forward(*raw, **params)
        except EngineError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            operands = ", ".join(describe(t) for t in inputs)
            raise type(e)(f"{cls.op_name()}: {e} (operands: {operands})") from e
        needs = tuple(t.requires_grad for t in inputs)
        if is_grad_enabled() and any(needs):
            fn.inputs = inputs
            fn.needs_input_grad = needs
            return Tensor._from_op(out, fn)
        return Tensor._from_op(out, None)

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
        grad = grad.data if isinstance(grad, Tensor) else root.xp.asarray(grad, dtype=root.dtype)
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


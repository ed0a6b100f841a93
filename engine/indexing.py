"""Indexing, masking, selection, sorting and sampling ops with PyTorch's names and semantics.

``gather``, ``scatter`` (``_add``), ``index_select``, ``index_fill``, ``index_copy``, ``index_put`` (what
``t[index] = value`` records in a graph), ``masked_fill``, ``masked_select``, ``tril``/``triu``,
``sort``/``argsort``/``topk``, ``nonzero``, ``multinomial``, ``isclose``/``allclose``/``equal``.
Each differentiable one is a Function written with its inputs' array module (numpy or cupy);
results keep the input's dtype (integer and bool included), as PyTorch's do.

Index tensors are checked as PyTorch checks them (int64, in range). On the CPU the check reads
the indices at once; on a GPU the bounds are queued as a deferred check (kernels/deferred.py,
raised at the next sync point) and the op meanwhile reads clipped indices, never stray memory.
"""

from __future__ import annotations

import builtins

import numpy as np

from engine import kernels
from engine import backend, dtypes
from engine.autograd import Function, unbroadcast
from engine.errors import DeviceError, DTypeError, EngineError, ShapeError, describe
from engine.tensor import Tensor, _check_fill, _unit_uniform, as_array

__all__ = ["gather", "scatter", "scatter_add", "index_select", "index_fill", "index_copy", "index_put", "masked_fill",
           "masked_select", "tril", "triu", "sort", "argsort", "topk", "nonzero", "argwhere", "count_nonzero",
           "multinomial", "isclose", "allclose", "equal"]


def _xp(a):
    return backend.array_module(a)


# ---- argument checks shared by the ops below -------------------------------------------------------

def normalize_dim(op: str, dim, ndim: int) -> int:
    """``dim`` as a non-negative int, refusing one out of range as PyTorch does (a 0-d tensor takes
    dims -1 and 0)."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    n = builtins.max(ndim, 1)
    if not -n <= dim < n:
        raise ShapeError(f"{op}: dim {dim} is out of range for a tensor with {ndim} dim(s) (expected a dim in "
                         f"[{-n}, {n - 1}])")
    return int(dim) % n


def _tensor_operand(op: str, what: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {what} must be a Tensor, got {type(x).__name__}")
    return x


def checked_index(op: str, index: Tensor, size: int, like: Tensor, allow_negative: bool = False):
    """The raw int64 array of ``index``, checked to address positions of a dim of ``size``.

    ``allow_negative`` accepts [-size, size) and wraps negatives, as PyTorch's index_fill and
    index_put do; gather, scatter and index_select take [0, size) only, as theirs do.
    """
    _tensor_operand(op, "index", index)
    if index.dtype.kind not in "iu":
        raise DTypeError(f"{op}: index must be an integer tensor (int64, as in PyTorch), got {describe(index)}; "
                         "convert with .long()")
    if index.device != like.device:
        raise DeviceError(f"{op}: index {describe(index)} and {describe(like)} are on different devices; move the "
                          f"index with .to('{like.device}')")
    idx = index._data.astype(np.int64, copy=False)
    if not idx.size:
        return idx
    low = -size if allow_negative else 0

    def check(bounds):
        lo, hi = (int(b) for b in bounds)
        if lo < low or hi >= size:
            bad = lo if lo < low else hi
            raise EngineError(f"{op}: indices must be in [{low}, {size}) for a dim of size {size}, got values in "
                              f"[{lo}, {hi}]: index {bad} is out of bounds (index {describe(index)}, input "
                              f"{describe(like)})")

    if isinstance(idx, np.ndarray):
        check((idx.min(), idx.max()))
    else:
        kernels.deferred.defer(_xp(idx).stack([idx.min(), idx.max()]).astype(np.int64), check)
        idx = _xp(idx).clip(idx, low, size - 1)
    return idx % size if allow_negative else idx


def _along(index, dim: int) -> tuple:
    """The advanced index that reads, for every position of ``index``, the element ``index[pos]``
    along ``dim`` and ``pos`` along every other dim (``take_along_axis``'s addressing)."""
    xp = _xp(index)
    grids = [xp.arange(n).reshape([-1 if i == d else 1 for i in range(index.ndim)]) for d, n in enumerate(index.shape)]
    grids[dim] = index
    return tuple(grids)


def _check_gather_shapes(op: str, a: Tensor, dim: int, index: Tensor, src: Tensor | None = None) -> None:
    """PyTorch's rule for gather/scatter: index has the input's number of dims and is no larger
    than it in every dim but ``dim`` (no larger than ``src`` in every dim, for scatter)."""
    if index.ndim != a.ndim and not (index.ndim <= 1 and a.ndim <= 1):
        raise ShapeError(f"{op}: index {describe(index)} must have as many dims as the input {describe(a)}")
    ishape, ashape = index.shape or (1,), a.shape or (1,)
    for d, n in enumerate(ishape):
        if d != dim and n > ashape[d]:
            raise ShapeError(f"{op}: index {describe(index)} is larger than the input {describe(a)} in dim {d} "
                             f"({n} > {ashape[d]}); only dim {dim} may differ")
        if src is not None and n > (src.shape or (1,))[d]:
            raise ShapeError(f"{op}: index {describe(index)} is larger than src {describe(src)} in dim {d}")


def _as_1d(a):
    return a.reshape(1) if a.ndim == 0 else a


# ---- gather / scatter ---------------------------------------------------------------------------------

class Gather(Function):
    computes_in_float32 = False  # moves memory: no arithmetic to do in float32

    def forward(self, a, index=None, dim=0):
        self.shape, self.dim = a.shape, dim
        self.index = index.copy() if builtins.any(self.needs_input_grad) else index  # backward must not see changes
        return _as_1d(a)[_along(_as_1d(index), dim)].reshape(index.shape)

    def backward(self, g):
        grad = _xp(g).zeros(self.shape or (1,), dtype=g.dtype)
        backend.scatter_add(grad, _along(_as_1d(self.index), self.dim), _as_1d(g))  # repeats accumulate
        return grad.reshape(self.shape)


def gather(input: Tensor, dim: int, index: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """``out[i][j][k] = input[index[i][j][k]][j][k]`` (for ``dim=0``), as ``torch.gather``.

    ``index`` is int64 with the input's number of dims, no larger than the input in the other dims;
    the result has ``index``'s shape. The gradient scatter-adds back (repeated indices accumulate).
    """
    input = _tensor_operand("gather", "input", input)
    dim = normalize_dim("gather", dim, input.ndim)
    _check_gather_shapes("gather", input, dim, index)
    idx = checked_index("gather", index, (input.shape or (1,))[dim], input)
    return Gather.apply(input, index=idx, dim=dim)


class Scatter(Function):
    """``input`` with ``src``'s leading block written at ``index`` along ``dim`` (``add=True``: added)."""

    computes_in_float32 = False

    def forward(self, a, src, index=None, dim=0, add=False):
        self.index = index.copy() if builtins.any(self.needs_input_grad) else index
        self.dim, self.add, self.src_shape = dim, add, src.shape
        out = _as_1d(a).copy()
        values = _as_1d(src)[tuple(slice(0, n) for n in _as_1d(index).shape)]
        where = _along(_as_1d(index), dim)
        if add:
            backend.scatter_add(out, where, values)
        else:
            out[where] = values
        return out.reshape(a.shape)

    def backward(self, g):
        xp, where = _xp(g), _along(_as_1d(self.index), self.dim)
        ga = gs = None
        if self.needs_input_grad[0]:
            ga = g
            if not self.add:
                ga = _as_1d(g).copy()
                ga[where] = 0  # overwritten positions do not depend on the input
                ga = ga.reshape(g.shape)
        if self.needs_input_grad[1]:
            gs = xp.zeros(self.src_shape or (1,), dtype=g.dtype)
            gs[tuple(slice(0, n) for n in _as_1d(self.index).shape)] = _as_1d(g)[where]
            gs = gs.reshape(self.src_shape)
        return ga, gs


def _scatter(op: str, input: Tensor, dim, index, src, add: bool, reduce=None) -> Tensor:
    input = _tensor_operand(op, "input", input)
    dim = normalize_dim(op, dim, input.ndim)
    if reduce is not None:
        if reduce not in ("add", "multiply"):
            raise ValueError(f"{op}: reduce must be 'add' or 'multiply', got {reduce!r}")
        if reduce == "multiply":
            return _scatter_multiply(op, input, dim, index, src)
        add = True
    if isinstance(src, Tensor):
        if src.dtype != input.dtype:
            raise DTypeError(f"{op}: src {describe(src)} must have the input's dtype {input.dtype} (PyTorch refuses "
                             "it too); convert it with .to(input.dtype)")
        if src.device != input.device:
            raise DeviceError(f"{op}: src {describe(src)} and input {describe(input)} are on different devices")
    else:
        _check_fill(op, src, np.dtype(input.dtype))
        src = Tensor(input.xp.full(index.shape, src, dtype=input.dtype))
    _check_gather_shapes(op, input, dim, index, src)
    idx = checked_index(op, index, (input.shape or (1,))[dim], input)
    return Scatter.apply(input, src, index=idx, dim=dim, add=add)


def _scatter_multiply(op: str, input: Tensor, dim: int, index: Tensor, src) -> Tensor:
    from engine.autograd import is_grad_enabled

    if is_grad_enabled() and (input.requires_grad or (isinstance(src, Tensor) and src.requires_grad)):
        raise EngineError(f"{op}: reduce='multiply' has no gradient (PyTorch has none either); use it under "
                          "engine.no_grad() or use scatter_reduce's differentiable forms")
    values = src._data if isinstance(src, Tensor) else input.xp.full(index.shape, src, dtype=input.dtype)
    idx = checked_index(op, index, (input.shape or (1,))[dim], input)
    _check_gather_shapes(op, input, dim, index, src if isinstance(src, Tensor) else None)
    out = _as_1d(input._data).copy()
    if not isinstance(out, np.ndarray):
        raise EngineError(f"{op}: reduce='multiply' is not available for GPU tensors ({describe(input)}); move "
                          "the tensors to the CPU")
    np.multiply.at(out, _along(_as_1d(idx), dim), _as_1d(values)[tuple(slice(0, n) for n in _as_1d(idx).shape)])
    return Tensor._from_op(out.reshape(input.shape), None)


def scatter(input: Tensor, dim: int, index: Tensor, src=None, *, value=None, reduce: str | None = None) -> Tensor:
    """Out-of-place ``torch.scatter``: ``input`` with ``src[i][j][k]`` written at
    ``[index[i][j][k]][j][k]`` (for ``dim=0``). ``src`` is a tensor of the input's dtype or a number
    (also as ``value=``). With repeated indices one of the values wins, as in PyTorch; the gradient
    of ``src`` is ``grad.gather(dim, index)``, PyTorch's formula. ``reduce='add'`` adds instead of
    writing (``'multiply'`` too, without a gradient)."""
    if src is None:
        src = value
    if src is None:
        raise TypeError("scatter: pass src (a tensor or a number) or value=")
    return _scatter("scatter", input, dim, index, src, add=False, reduce=reduce)


def scatter_add(input: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """Out-of-place ``torch.scatter_add``: ``src`` added into ``input`` at ``index`` along ``dim``
    (repeated indices accumulate)."""
    return _scatter("scatter_add", input, dim, index, _tensor_operand("scatter_add", "src", src), add=True)


# ---- index_select / index_fill / index_put -----------------------------------------------------------

class IndexSelect(Function):
    computes_in_float32 = False

    def forward(self, a, index=None, dim=0):
        self.shape, self.dim = a.shape, dim
        self.index = index.copy() if builtins.any(self.needs_input_grad) else index
        return _xp(a).take(_as_1d(a), index, axis=dim).reshape(_selected_shape(a.shape, dim, index.size))

    def backward(self, g):
        grad = _xp(g).zeros(self.shape or (1,), dtype=g.dtype)
        g = g.reshape(_selected_shape(self.shape or (1,), self.dim, self.index.size))
        backend.scatter_add(grad, (slice(None),) * self.dim + (self.index,), g)
        return grad.reshape(self.shape)


def _selected_shape(shape: tuple, dim: int, count: int) -> tuple:
    if not shape:
        return ()
    return shape[:dim] + (count,) + shape[dim + 1:]


def _vector_index(op: str, index) -> Tensor:
    index = _tensor_operand(op, "index", index)
    if index.ndim > 1:
        raise ShapeError(f"{op}: index must be 0-d or 1-d, got {describe(index)}")
    return index


def index_select(input: Tensor, dim: int, index: Tensor) -> Tensor:
    """The entries of ``input`` at the positions ``index`` (a 1-d int64 tensor) along ``dim``, as
    ``torch.index_select``; the gradient adds back (repeated indices accumulate)."""
    input = _tensor_operand("index_select", "input", input)
    dim = normalize_dim("index_select", dim, input.ndim)
    idx = checked_index("index_select", _vector_index("index_select", index), (input.shape or (1,))[dim], input)
    return IndexSelect.apply(input, index=idx.reshape(-1), dim=dim)


class IndexPut(Function):
    """``input`` with ``value`` written at ``index`` (any NumPy/PyTorch index): what ``t[index] = v``
    records in a graph, PyTorch's CopySlices. The gradient of ``input`` is zero where it was
    overwritten; that of ``value`` is the gradient at those positions, summed back to its shape
    (a broadcast value collects every position it was written to)."""

    computes_in_float32 = False

    def forward(self, a, value, index=None):
        self.index, self.value_shape, self.value_dtype = index, value.shape, value.dtype
        out = a.copy()
        out[index] = value
        return out

    def backward(self, g):
        ga = gv = None
        if self.needs_input_grad[0]:
            ga = g.copy()
            ga[self.index] = 0
        if self.needs_input_grad[1]:
            gv = unbroadcast(g[self.index], self.value_shape).astype(self.value_dtype, copy=False)
        return ga, gv


def index_put(input: Tensor, index, value) -> Tensor:
    """Out of place ``input[index] = value`` (``value`` a tensor or a number), differentiable in both
    ``input`` and ``value``: the op ``Tensor.__setitem__`` records in a graph."""
    from engine import ops

    input = _tensor_operand("index_put", "input", input)
    index = ops._unwrap_index(index, input)
    if not isinstance(value, Tensor):
        if np.ndim(value) == 0:
            _check_fill("__setitem__", value, np.dtype(input.dtype))
        value = Tensor(as_array(value, dtype=input.dtype, device=input.device))
    elif value.device != input.device:
        raise DeviceError(f"__setitem__: value {describe(value)} and {describe(input)} are on different devices")
    if value.dtype != input.dtype:
        value = ops.cast(value, input.dtype)  # written in the destination's dtype; the gradient comes back cast
    return IndexPut.apply(input, value, index=index)


class IndexFill(Function):
    computes_in_float32 = False

    def forward(self, a, value, index=None, dim=0):
        self.where = (slice(None),) * dim + (index,)
        out = _as_1d(a).copy()
        out[self.where] = value
        return out.reshape(a.shape)

    def backward(self, g):
        ga = gv = None
        filled = _xp(g).zeros(g.shape or (1,), dtype=bool)
        filled[self.where] = True
        filled = filled.reshape(g.shape)
        if self.needs_input_grad[0]:
            ga = _xp(g).where(filled, g.dtype.type(0), g)
        if self.needs_input_grad[1]:
            gv = (g * filled).sum()  # each position once, however often the index names it
        return ga, gv


def _fill_value(op: str, value, like: Tensor) -> Tensor:
    """A fill value (number or 0-d tensor) as a 0-d tensor of ``like``'s dtype and device."""
    from engine import ops

    if isinstance(value, Tensor):
        if value.ndim != 0:
            raise ShapeError(f"{op}: only a 0-dimensional value tensor (or a number) can be the fill value, got "
                             f"{describe(value)} (PyTorch refuses it too)")
        if value.device != like.device:
            value = ops.transfer(value, like.device)
        return ops.cast(value, like.dtype) if value.dtype != like.dtype else value
    if not isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        raise TypeError(f"{op}: the fill value must be a number or a 0-d tensor, got {type(value).__name__}")
    _check_fill(op, value, np.dtype(like.dtype))
    return Tensor(like.xp.asarray(value).astype(like.dtype))


def index_fill(input: Tensor, dim: int, index: Tensor, value) -> Tensor:
    """Out-of-place ``torch.index_fill``: the entries at positions ``index`` along ``dim`` set to
    ``value`` (a number or a 0-d tensor, differentiable)."""
    input = _tensor_operand("index_fill", "input", input)
    dim = normalize_dim("index_fill", dim, input.ndim)
    idx = checked_index("index_fill", _vector_index("index_fill", index), (input.shape or (1,))[dim], input,
                        allow_negative=True)
    return IndexFill.apply(input, _fill_value("index_fill", value, input), index=idx.reshape(-1), dim=dim)


class IndexCopy(Function):
    """``input`` with ``source``'s slices written at ``index`` along ``dim``. The gradient of ``input``
    is zero at the overwritten slices; that of ``source`` is the gradient there (PyTorch's formulas)."""

    computes_in_float32 = False

    def forward(self, a, source, index=None, dim=0):
        self.where = (slice(None),) * dim + (index,)
        out = _as_1d(a).copy()
        out[self.where] = source
        return out.reshape(a.shape)

    def backward(self, g):
        ga = gs = None
        flat = _as_1d(g)
        if self.needs_input_grad[0]:
            ga = flat.copy()
            ga[self.where] = 0
            ga = ga.reshape(g.shape)
        if self.needs_input_grad[1]:
            gs = flat[self.where]
        return ga, gs


def index_copy_operands(op: str, input: Tensor, dim, index, source) -> tuple:
    """Check ``index_copy``'s operands as PyTorch does; return ``(dim, idx, shape)``: the write puts
    ``source`` reshaped to ``shape`` at ``idx`` (a 1-d int64 array) along ``dim`` of the input (1-d
    if it is 0-d).

    ``index`` is an int64 tensor of 0 or 1 dims, its values in [0, size of ``dim``) (on a GPU a
    deferred check, the write meanwhile clipped in range); ``source`` has ``input``'s dtype and
    device and its shape with ``dim`` of length ``index.numel()`` (0-d when ``input`` is a scalar
    or a vector and one slice is written, as PyTorch allows)."""
    input = _tensor_operand(op, "input", input)
    source = _tensor_operand(op, "source", source)
    dim = normalize_dim(op, dim, input.ndim)
    index = _tensor_operand(op, "index", index)
    if index.dtype != np.int64:
        raise DTypeError(f"{op}: index must be an int64 tensor (as in PyTorch), got {describe(index)}; convert "
                         "with .long()")
    if index.ndim > 1:
        raise ShapeError(f"{op}: index must have 0 or 1 dims, got {describe(index)}")
    if source.dtype != input.dtype:
        raise DTypeError(f"{op}: source {describe(source)} must have the input's dtype {input.dtype} (PyTorch "
                         "refuses it too); convert it with .to(input.dtype)")
    if source.device != input.device:
        raise DeviceError(f"{op}: source {describe(source)} and input {describe(input)} are on different devices")
    sizes = input.shape or (1,)
    shape = sizes[:dim] + (index.numel(),) + sizes[dim + 1:]
    scalar_slice = input.ndim <= 1 and source.ndim == 0 and shape == (1,)
    if source.shape != shape and not scalar_slice:
        raise ShapeError(f"{op}: source {describe(source)} must have the shape {shape}: the input's "
                         f"{describe(input)} with dim {dim} of length {index.numel()} (the index's length)")
    return dim, checked_index(op, index, sizes[dim], input).reshape(-1), shape


def index_copy(input: Tensor, dim: int, index: Tensor, source: Tensor) -> Tensor:
    """Out-of-place ``torch.index_copy``: ``input`` with ``source``'s slice ``i`` along ``dim``
    written at position ``index[i]``, differentiable in both. With repeated indices one slice
    wins, as in PyTorch. ``Tensor.index_copy_`` writes in place (a static KV cache's update).

    Example:
        >>> cache = engine.zeros(1, 2, 8, 4)                  # (batch, heads, positions, head dim)
        >>> new = engine.ones(1, 2, 1, 4)
        >>> cache.index_copy(2, engine.tensor([3]), new)[0, 0, :, 0].tolist()
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    """
    dim, idx, shape = index_copy_operands("index_copy", input, dim, index, source)
    src = source if source.shape == shape else source.reshape(shape)
    return IndexCopy.apply(input, src, index=idx, dim=dim)


# ---- masks -------------------------------------------------------------------------------------------

class MaskedFill(Function):
    computes_in_float32 = False

    def forward(self, a, value, mask=None):
        self.mask, self.shape = mask, a.shape
        return _xp(a).where(mask, value, a)

    def backward(self, g):
        zero = g.dtype.type(0)
        ga = unbroadcast(_xp(g).where(self.mask, zero, g), self.shape) if self.needs_input_grad[0] else None
        gv = _xp(g).where(self.mask, g, zero).sum() if self.needs_input_grad[1] else None
        return ga, gv


def _bool_mask(op: str, mask, like: Tensor):
    mask = _tensor_operand(op, "mask", mask)
    if mask.dtype != np.bool_:
        raise DTypeError(f"{op}: only boolean masks are supported (as in PyTorch), got {describe(mask)}; compare to "
                         "get one (mask == 0) or convert with .bool()")
    if mask.device != like.device:
        raise DeviceError(f"{op}: mask {describe(mask)} and {describe(like)} are on different devices")
    try:
        np.broadcast_shapes(mask.shape, like.shape)
    except ValueError:
        raise ShapeError(f"{op}: mask {describe(mask)} does not broadcast with {describe(like)}") from None
    return mask._data


def masked_fill(input: Tensor, mask: Tensor, value) -> Tensor:
    """``input`` with ``value`` where the bool ``mask`` is True (``torch.masked_fill``).

    ``mask`` broadcasts with ``input``; ``value`` is a number or a 0-d tensor (differentiable), cast
    to the input's dtype (``float('-inf')`` into float logits is the attention-mask idiom). The
    gradient of ``input`` is zero where the mask is set.
    """
    input = _tensor_operand("masked_fill", "input", input)
    mask = _bool_mask("masked_fill", mask, input)
    return MaskedFill.apply(input, _fill_value("masked_fill", value, input), mask=mask)


def masked_select(input: Tensor, mask: Tensor) -> Tensor:
    """The 1-d tensor of ``input``'s entries where ``mask`` is True (both broadcast first)."""
    from engine import ops

    input = _tensor_operand("masked_select", "input", input)
    mask = _bool_mask("masked_select", mask, input)
    shape = np.broadcast_shapes(mask.shape, input.shape)
    full = ops.broadcast_to(input, shape) if input.shape != shape else input
    return ops.getitem(full, input.xp.broadcast_to(mask, shape))


class Triangle(Function):
    computes_in_float32 = False

    def forward(self, a, diagonal=0, upper=False):
        self.diagonal, self.upper = diagonal, upper
        return (_xp(a).triu if upper else _xp(a).tril)(a, diagonal)

    def backward(self, g):
        return (_xp(g).triu if self.upper else _xp(g).tril)(g, self.diagonal)


def _triangle(op: str, input: Tensor, diagonal: int, upper: bool) -> Tensor:
    input = _tensor_operand(op, "input", input)
    if input.ndim < 2:
        raise ShapeError(f"{op}: input tensor must have at least 2 dimensions, got {describe(input)}")
    return Triangle.apply(input, diagonal=int(diagonal), upper=upper)


def tril(input: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two dims (``torch.tril``): entries above ``diagonal`` zeroed."""
    return _triangle("tril", input, diagonal, upper=False)


def triu(input: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two dims (``torch.triu``): entries below ``diagonal`` zeroed."""
    return _triangle("triu", input, diagonal, upper=True)


# ---- sorting -------------------------------------------------------------------------------------------

def _argsort(a, dim: int, descending: bool):
    """Stable argsort along ``dim``; NaN counts as the largest value, as in PyTorch. Descending
    order sorts the flipped array ascending and reverses: ties stay in their original order, and
    it needs no negation (which bool and unsigned dtypes cannot take)."""
    xp = _xp(a)
    if not descending:
        return xp.argsort(a, axis=dim, kind="stable")
    n = a.shape[dim]
    order = xp.argsort(xp.flip(a, axis=dim), axis=dim, kind="stable")
    return (n - 1) - xp.flip(order, axis=dim)


def _sorted_by(input: Tensor, dim: int, indices, kind: str):
    from engine.ops import return_types

    idx = Tensor._from_op(indices.astype(np.int64, copy=False), None)
    values = Gather.apply(input, index=indices, dim=dim) if input.ndim else input.clone()
    return getattr(return_types, kind)(values, idx)


def sort(input: Tensor, dim: int = -1, descending: bool = False, stable: bool = False):
    """``(values, indices)`` sorted along ``dim`` (``torch.sort``). Always stable (``stable`` is
    accepted); NaN sorts as the largest value. The gradient goes back to each value's position."""
    input = _tensor_operand("sort", "input", input)
    dim = normalize_dim("sort", dim, input.ndim)
    if input.ndim == 0:
        return _sorted_by(input, 0, input.xp.zeros((), np.int64), "sort")
    return _sorted_by(input, dim, _argsort(input._data, dim, bool(descending)), "sort")


def argsort(input: Tensor, dim: int = -1, descending: bool = False, stable: bool = False) -> Tensor:
    """The indices that sort ``input`` along ``dim`` (``torch.argsort``; stable)."""
    return sort(input, dim, descending, stable).indices


def topk(input: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """The ``k`` largest (or smallest) entries along ``dim`` and their indices (``torch.topk``).

    They come sorted (``sorted=False`` is accepted and gives the same sorted order); ties keep
    their original order; NaN counts as the largest value. The gradient goes to the selected
    positions only.
    """
    input = _tensor_operand("topk", "input", input)
    dim = normalize_dim("topk", dim, input.ndim)
    size = (input.shape or (1,))[dim]
    if isinstance(k, Tensor):
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= size:
        raise ShapeError(f"topk: selected index k={k!r} is out of range for dim {dim} of size {size} of "
                         f"{describe(input)}")
    if input.ndim == 0:
        return _sorted_by(input, 0, input.xp.zeros((), np.int64), "topk")
    order = _argsort(input._data, dim, descending=bool(largest))
    first_k = order[(slice(None),) * dim + (slice(0, int(k)),)]
    return _sorted_by(input, dim, first_k, "topk")


# ---- nonzero -------------------------------------------------------------------------------------------

def nonzero(input: Tensor, *, as_tuple: bool = False):
    """The indices of the non-zero entries (``torch.nonzero``): an int64 (count, ndim) tensor, or
    with ``as_tuple=True`` one 1-d index tensor per dim (a 0-d input counts as 1-d). Its size
    depends on the values, so on a GPU it reads the count back (as PyTorch synchronises too)."""
    input = _tensor_operand("nonzero", "input", input)
    xp, data = input.xp, input._data
    if as_tuple:
        return tuple(Tensor._from_op(i.astype(np.int64, copy=False), None) for i in xp.nonzero(_as_1d(data)))
    return Tensor._from_op(xp.argwhere(data).astype(np.int64, copy=False), None)


def argwhere(input: Tensor) -> Tensor:
    """``torch.argwhere``: ``nonzero(input)``."""
    return nonzero(input)


def count_nonzero(input: Tensor, dim=None) -> Tensor:
    """How many entries are non-zero, over ``dim`` (an int, a tuple, or None for all): int64."""
    input = _tensor_operand("count_nonzero", "input", input)
    axis = None if dim is None else tuple(normalize_dim("count_nonzero", d, input.ndim)
                                          for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
    return Tensor._from_op(input.xp.asarray(input.xp.count_nonzero(input._data, axis=axis), dtype=np.int64), None)


# ---- comparisons of whole tensors ---------------------------------------------------------------------

def _same_dtype(op: str, input: Tensor, other: Tensor) -> None:
    for what, t in (("input", input), ("other", other)):
        _tensor_operand(op, what, t)
    if input.dtype != other.dtype:
        raise DTypeError(f"{op}: {describe(input)} and {describe(other)} have different dtypes (PyTorch refuses "
                         "it too); convert one with .to(dtype)")
    if input.device != other.device:
        raise DeviceError(f"{op}: {describe(input)} and {describe(other)} are on different devices")


def isclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> Tensor:
    """Elementwise ``|input - other| <= atol + rtol * |other|`` as a bool tensor (``torch.isclose``)."""
    _same_dtype("isclose", input, other)
    return Tensor._from_op(input.xp.isclose(input._data, other._data, rtol=rtol, atol=atol, equal_nan=equal_nan),
                           None)


def allclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
    """True if every pair of entries is close (``torch.allclose``; broadcasts; reads one bool)."""
    return bool(backend.to_host(isclose(input, other, rtol, atol, equal_nan)._data.all()))


def equal(input: Tensor, other: Tensor) -> bool:
    """True if both tensors have the same shape and entries (``torch.equal``; reads one bool)."""
    for what, t in (("input", input), ("other", other)):
        _tensor_operand("equal", what, t)
    if input.shape != other.shape:
        return False
    if input.device != other.device:
        raise DeviceError(f"equal: {describe(input)} and {describe(other)} are on different devices")
    return bool(backend.to_host((input._data == other._data).all()))


# ---- sampling ------------------------------------------------------------------------------------------

def multinomial(input: Tensor, num_samples: int, replacement: bool = False, *, generator=None,
                out=None) -> Tensor:
    """Category indices drawn from the rows of ``input`` (non-negative weights, not necessarily
    normalised), as ``torch.multinomial``: int64, shape ``(num_samples,)`` for a 1-d input and
    ``(rows, num_samples)`` for a 2-d one, from the engine's seeded generator (or ``generator``).

    Without replacement a category is drawn at most once per row, each draw in proportion to the
    remaining weights (PyTorch's exponential-race method: the ``num_samples`` largest
    ``weight / Exp(1)``); once the positive weights are used up, zero-weight categories follow in
    index order, as PyTorch's CPU kernel gives them. The weights are checked (finite, non-negative,
    a positive sum per row) on the host: on a GPU that is one read, as PyTorch's own check
    synchronises.
    """
    from engine.ops import write_out

    input = _tensor_operand("multinomial", "input", input)
    if not dtypes.is_floating(input.dtype):
        raise DTypeError(f"multinomial: only floating-point weights are supported (as in PyTorch), got "
                         f"{describe(input)}; convert with .float()")
    if input.ndim not in (1, 2):
        raise ShapeError(f"multinomial: prob_dist must be 1 or 2 dim, got {describe(input)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise ValueError(f"multinomial: num_samples must be a positive int, got {num_samples!r}")
    categories = input.shape[-1]
    if not replacement and num_samples > categories:
        raise ShapeError(f"multinomial: cannot sample n_sample={num_samples} > prob_dist.size(-1)={categories} "
                         "samples without replacement")
    xp, rows = input.xp, input._data.reshape(-1, categories).astype(np.float64)
    _check_weights(rows)
    gen = _generator_for(generator, input.device)
    with backend.on_device(input.device):
        uniform = _unit_uniform(gen, input.device, (rows.shape[0], num_samples), np.float64)
        if replacement:
            drawn = _draw_with_replacement(xp, rows, uniform)
        else:
            # PyTorch's race: weight / Exp(1) per category, the largest num_samples win.
            race = _unit_uniform(gen, input.device, rows.shape, np.float64)
            keys = rows / -xp.log1p(-race)  # zero weights tie at 0, after every positive one (PyTorch's too)
            drawn = _argsort(keys, 1, descending=True)[:, :num_samples]
    drawn = drawn.astype(np.int64).reshape(input.shape[:-1] + (num_samples,))
    return write_out("multinomial", Tensor._from_op(drawn, None), out)


def _check_weights(rows) -> None:
    host = backend.to_host(rows)
    if not np.all(np.isfinite(host)) or np.any(host < 0):
        raise EngineError("multinomial: probability tensor contains either inf, nan or element < 0")
    if np.any(host.sum(axis=1) <= 0):
        raise EngineError("multinomial: invalid multinomial distribution (sum of probabilities <= 0)")


def _draw_with_replacement(xp, rows, uniform):
    """Inverse-CDF draws, row by row (rows are few: a batch of next-token distributions)."""
    cdf = xp.cumsum(rows, axis=1)
    drawn = xp.stack([xp.searchsorted(cdf[r], uniform[r] * cdf[r, -1], side="right") for r in range(rows.shape[0])])
    last_positive = rows.shape[1] - 1 - xp.argmax(rows[:, ::-1] > 0, axis=1)
    return xp.minimum(drawn, last_positive[:, None])  # u * total may round up to total


def _generator_for(generator, device):
    """The generator to draw from: the engine's per-device one, or a user's ``engine.Generator``."""
    if generator is None:
        return backend.generator(device)
    return backend.rng_for(generator, device)

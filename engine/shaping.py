"""Shape and layout ops with PyTorch's names and semantics: ``split``, ``chunk``, ``unbind``,
``narrow``, ``flip``, ``roll``, ``repeat``/``tile``, ``repeat_interleave``, ``movedim``, ``cumsum``,
``bmm``, the ``new_*`` constructors and ``contiguous``.

Views (``split``, ``chunk``, ``unbind``, ``narrow``) are slices of their input, so they share its
memory and version counter, as PyTorch's views do; ``flip``, ``roll``, ``repeat`` and
``repeat_interleave`` return new memory, as PyTorch's do.
"""

from __future__ import annotations

import builtins

import numpy as np

from engine import backend
from engine.autograd import Function
from engine.errors import DTypeError, ShapeError, describe
from engine.indexing import normalize_dim
from engine.tensor import Tensor

__all__ = ["split", "chunk", "unbind", "narrow", "flip", "fliplr", "flipud", "roll", "repeat", "tile",
           "repeat_interleave", "movedim", "cumsum", "bmm", "contiguous"]


def _xp(a):
    return backend.array_module(a)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _dims_arg(dims) -> tuple:
    """``flip(x, (0, 1))``, ``x.flip(0, 1)`` and ``x.flip([0])`` alike."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        return tuple(dims[0])
    return tuple(dims)


def _slice_along(dim: int, start: int, stop: int) -> tuple:
    return (slice(None),) * dim + (slice(start, stop),)


# ---- views: split, chunk, unbind, narrow -------------------------------------------------------------

def split(tensor: Tensor, split_size_or_sections, dim: int = 0) -> tuple:
    """Views of ``tensor`` along ``dim`` (``torch.split``): pieces of ``split_size_or_sections`` each
    (the last may be smaller), or of the listed sizes, which must sum to the dim's size."""
    from engine import ops

    dim = normalize_dim("split", dim, tensor.ndim)
    size = tensor.shape[dim]
    if _is_int(split_size_or_sections):
        step = int(split_size_or_sections)
        if step <= 0 and not (step == 0 and size == 0):
            raise ValueError(f"split: split_size must be positive, got {step} for {describe(tensor)}")
        bounds = [(start, builtins.min(start + step, size)) for start in range(0, size, step)] if step else [(0, 0)]
    else:
        sizes = [int(s) for s in split_size_or_sections]
        if builtins.sum(sizes) != size or builtins.any(s < 0 for s in sizes):
            raise ShapeError(f"split: split sizes {sizes} must be non-negative and sum exactly to {size}, the size "
                             f"of dim {dim} of {describe(tensor)}")
        edges = np.cumsum([0] + sizes).tolist()
        bounds = list(zip(edges[:-1], edges[1:]))
    return tuple(ops.getitem(tensor, _slice_along(dim, lo, hi)) for lo, hi in bounds)


def chunk(input: Tensor, chunks: int, dim: int = 0) -> tuple:
    """``torch.chunk``: at most ``chunks`` views of equal size along ``dim`` (the last may be smaller;
    fewer come back when the size does not fill them, as in PyTorch)."""
    if not _is_int(chunks) or chunks <= 0:
        raise ValueError(f"chunk: chunks must be a positive int, got {chunks!r}")
    dim = normalize_dim("chunk", dim, input.ndim)
    size = input.shape[dim]
    return split(input, -(-size // int(chunks)) if size else 0, dim)


def unbind(input: Tensor, dim: int = 0) -> tuple:
    """The slices of ``input`` along ``dim``, each without that dim (``torch.unbind``)."""
    from engine import ops

    dim = normalize_dim("unbind", dim, input.ndim)
    return tuple(ops.getitem(input, (slice(None),) * dim + (i,)) for i in range(input.shape[dim]))


def narrow(input: Tensor, dim: int, start, length: int) -> Tensor:
    """The view ``input[..., start:start + length, ...]`` along ``dim`` (``torch.narrow``; ``start``
    may be negative or a 0-d integer tensor)."""
    from engine import ops

    dim = normalize_dim("narrow", dim, input.ndim)
    size = input.shape[dim]
    start = int(start)
    if not -size <= start <= size:
        raise ShapeError(f"narrow: start {start} is out of range for dim {dim} of {describe(input)}")
    start = start + size if start < 0 else start
    if length < 0 or start + length > size:
        raise ShapeError(f"narrow: start ({start}) + length ({length}) exceeds dim {dim} of {describe(input)} (size "
                         f"{size})")
    return ops.getitem(input, _slice_along(dim, start, start + length))


# ---- new memory: flip, roll, repeat, repeat_interleave ------------------------------------------------

class Flip(Function):
    computes_in_float32 = False  # moves memory: no arithmetic to do in float32

    def forward(self, a, dims=()):
        self.dims = dims
        return _xp(a).flip(a, axis=dims).copy()  # PyTorch's flip copies: no view sharing the input

    def backward(self, g):
        return _xp(g).flip(g, axis=self.dims)


def flip(input: Tensor, *dims) -> Tensor:
    """``input`` reversed along ``dims`` (``torch.flip(x, dims)``, ``x.flip(0, 1)``): a copy."""
    dims = tuple(sorted({normalize_dim("flip", d, input.ndim) for d in _dims_arg(dims)}))
    return Flip.apply(input, dims=dims) if input.ndim else Flip.apply(input, dims=())


def fliplr(input: Tensor) -> Tensor:
    """Reverse dim 1 (``torch.fliplr``; needs at least 2 dims)."""
    if input.ndim < 2:
        raise ShapeError(f"fliplr: input must have at least 2 dims, got {describe(input)}")
    return flip(input, 1)


def flipud(input: Tensor) -> Tensor:
    """Reverse dim 0 (``torch.flipud``; needs at least 1 dim)."""
    if input.ndim < 1:
        raise ShapeError(f"flipud: input must have at least 1 dim, got {describe(input)}")
    return flip(input, 0)


class Roll(Function):
    computes_in_float32 = False

    def forward(self, a, shifts=(), dims=None):
        self.shifts, self.dims = shifts, dims
        return _xp(a).roll(a, shifts, axis=dims)

    def backward(self, g):
        return _xp(g).roll(g, tuple(-s for s in self.shifts), axis=self.dims)


def roll(input: Tensor, shifts, dims=None) -> Tensor:
    """Entries shifted along ``dims`` with wrap-around (``torch.roll``); without dims the tensor is
    rolled as if flattened."""
    shifts = (shifts,) if _is_int(shifts) else tuple(int(s) for s in shifts)
    if dims is None:
        if len(shifts) != 1:
            raise ShapeError(f"roll: without dims give one shift, got {shifts}")
        from engine import ops

        return ops.reshape(Roll.apply(ops.reshape(input, (-1,)), shifts=shifts, dims=None), input.shape)
    dims = (dims,) if _is_int(dims) else tuple(dims)
    if len(dims) != len(shifts):
        raise ShapeError(f"roll: shifts {shifts} and dims {dims} must have the same length")
    dims = tuple(normalize_dim("roll", d, input.ndim) for d in dims)
    return Roll.apply(input, shifts=shifts, dims=dims)


class Tile(Function):
    computes_in_float32 = False

    def forward(self, a, reps=()):
        self.shape, self.reps = a.shape, reps
        return _xp(a).tile(a, reps)

    def backward(self, g):
        # (r0 * s0, r1 * s1, ...) -> (r0, s0, r1, s1, ...): sum over every repeat axis
        pairs = [n for r, s in zip(self.reps, self.shape) for n in (r, s)]
        return g.reshape(pairs).sum(axis=tuple(range(0, len(pairs), 2))).reshape(self.shape)


def repeat(input: Tensor, *sizes) -> Tensor:
    """``Tensor.repeat``: the tensor tiled ``sizes[i]`` times along dim i (leading new dims when more
    sizes than dims are given); a copy."""
    from engine import ops

    sizes = _dims_arg(sizes)
    if len(sizes) < input.ndim:
        raise ShapeError(f"repeat: number of repeat dims ({len(sizes)}) can not be smaller than the number of dims "
                         f"of {describe(input)}")
    if not builtins.all(_is_int(s) and s >= 0 for s in sizes):
        raise ValueError(f"repeat: repeats must be non-negative ints, got {sizes}")
    shaped = ops.reshape(input, (1,) * (len(sizes) - input.ndim) + input.shape) if len(sizes) > input.ndim else input
    return Tile.apply(shaped, reps=tuple(int(s) for s in sizes))


def tile(input: Tensor, dims) -> Tensor:
    """``torch.tile``: as :func:`repeat`, with fewer ``dims`` than the tensor has padded by ones in front."""
    dims = (dims,) if _is_int(dims) else tuple(dims)
    return repeat(input, (1,) * (input.ndim - len(dims)) + dims)


class RepeatInterleave(Function):
    computes_in_float32 = False

    def forward(self, a, repeats=None, dim=0):
        xp = _xp(a)
        self.shape, self.dim = a.shape, dim
        self.source = xp.repeat(xp.arange(a.shape[dim]), repeats)  # input position of each output position
        return xp.repeat(a, repeats, axis=dim)

    def backward(self, g):
        grad = _xp(g).zeros(self.shape, dtype=g.dtype)
        backend.scatter_add(grad, (slice(None),) * self.dim + (self.source,), g)
        return grad


def repeat_interleave(input: Tensor, repeats=None, dim: int | None = None, *, output_size: int | None = None) -> Tensor:
    """Each entry repeated ``repeats`` times along ``dim`` (``torch.repeat_interleave``); ``repeats`` is
    an int or a 1-d integer tensor with one count per entry; without ``dim`` the input is flattened
    first. ``repeat_interleave(counts)`` alone gives ``0, ..., 0, 1, ..., 1, ...`` (each index its
    count of times)."""
    from engine import ops

    if repeats is None:  # torch.repeat_interleave(repeats)
        counts = input
        if counts.ndim > 1 or counts.dtype.kind not in "iu":
            raise DTypeError(f"repeat_interleave: repeats must be a 0-d or 1-d integer tensor, got {describe(counts)}")
        counts = ops.reshape(counts, (-1,))
        positions = Tensor._from_op(counts.xp.arange(counts.shape[0]), None)
        return repeat_interleave(positions, counts, 0)
    if dim is None:
        input, dim = ops.reshape(input, (-1,)), 0
    dim = normalize_dim("repeat_interleave", dim, input.ndim)
    if input.ndim == 0:
        input = ops.reshape(input, (1,))
    size = input.shape[dim]
    if isinstance(repeats, Tensor):
        if repeats.dtype.kind not in "iu" or repeats.ndim > 1:
            raise DTypeError(f"repeat_interleave: repeats must be an int or a 0-d/1-d integer tensor, got "
                             f"{describe(repeats)}")
        counts = repeats._data.reshape(-1)
        if counts.shape[0] not in (1, size):
            raise ShapeError(f"repeat_interleave: repeats must have one entry per element of dim {dim} ({size}) or "
                             f"one entry, got {describe(repeats)}")
        if counts.shape[0] == 1:
            counts = counts[0]
        elif bool(backend.to_host((counts < 0).any())):
            raise ValueError("repeat_interleave: repeats must be non-negative")
        counts = backend.to_host(counts).tolist() if counts.ndim else int(backend.to_host(counts))  # cupy takes lists
    elif _is_int(repeats):
        counts = int(repeats)
    else:
        raise TypeError(f"repeat_interleave: repeats must be an int or an integer tensor, got {type(repeats).__name__}")
    if np.any(np.asarray(counts) < 0):
        raise ValueError(f"repeat_interleave: repeats must be non-negative, got {repeats!r}")
    result = RepeatInterleave.apply(input, repeats=counts, dim=dim)
    if output_size is not None and result.shape[dim] != output_size:
        raise ShapeError(f"repeat_interleave: output_size={output_size} but the repeats give {result.shape[dim]}")
    return result


def movedim(input: Tensor, source, destination) -> Tensor:
    """``torch.movedim``: move dims ``source`` to positions ``destination`` (ints or sequences)."""
    from engine import ops

    source = (source,) if _is_int(source) else tuple(source)
    destination = (destination,) if _is_int(destination) else tuple(destination)
    if len(source) != len(destination):
        raise ShapeError(f"movedim: source {source} and destination {destination} must have the same length")
    source = [normalize_dim("movedim", d, input.ndim) for d in source]
    destination = [normalize_dim("movedim", d, input.ndim) for d in destination]
    order = [d for d in range(input.ndim) if d not in source]
    for dst, src in sorted(zip(destination, source)):
        order.insert(dst, src)
    return ops.permute(input, order)


# ---- cumulative sums -----------------------------------------------------------------------------------

class CumSum(Function):
    def forward(self, a, axis=0):
        self.axis = axis
        return _xp(a).cumsum(a, axis=axis)

    def backward(self, g):
        xp = _xp(g)
        return xp.flip(xp.cumsum(xp.flip(g, axis=self.axis), axis=self.axis), axis=self.axis)


def cumsum(input: Tensor, dim: int, *, dtype=None) -> Tensor:
    """Running sums along ``dim`` (``torch.cumsum``); integer and bool input give int64, as PyTorch."""
    from engine import ops

    if dtype is not None:
        input = ops.cast(input, dtype)
    elif input.dtype.kind in "biu":
        input = ops.cast(input, np.int64)
    axis = normalize_dim("cumsum", dim, input.ndim)
    if input.ndim == 0:
        return ops.clone(input)
    return CumSum.apply(input, axis=axis)


# ---- batched matrix product ----------------------------------------------------------------------------

def bmm(input: Tensor, mat2: Tensor) -> Tensor:
    """Batched matrix product of (b, n, m) and (b, m, p) tensors (``torch.bmm``): no broadcasting,
    as in PyTorch; use ``matmul`` for that."""
    from engine import ops

    for what, t in (("batch1", input), ("batch2", mat2)):
        if not isinstance(t, Tensor) or t.ndim != 3:
            raise ShapeError(f"bmm: {what} must be a 3-d tensor, got {describe(t)}")
    if mat2.shape[0] != input.shape[0] or mat2.shape[1] != input.shape[2]:
        raise ShapeError(f"bmm: expected batch2 of size [{input.shape[0]}, {input.shape[2]}, p] for batch1 "
                         f"{describe(input)}, got {describe(mat2)}")
    return ops.matmul(input, mat2)


# ---- layout --------------------------------------------------------------------------------------------

def contiguous(input: Tensor) -> Tensor:
    """``Tensor.contiguous()``: the tensor itself when its memory is C-contiguous, else a copy that is
    (recorded in the graph, as PyTorch's)."""
    from engine import ops

    return input if input._data.flags.c_contiguous else ops.clone(input)

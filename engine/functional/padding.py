"""``pad`` in PyTorch's modes (constant, reflect, replicate, circular)."""

from __future__ import annotations


import numpy as np

from engine import backend, indexing, ops
from engine.autograd import Function
from engine.backend import array_module
from engine.errors import ShapeError, describe
from engine.tensor import Tensor


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class PadConstant(Function):
    """``input`` with ``widths`` (numpy's per-dim (before, after), all >= 0) of ``value`` around it."""

    computes_in_float32 = False  # moves memory: no arithmetic to do in float32

    def forward(self, a, widths=(), value=0):
        self.inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, a.shape))
        return array_module(a).pad(a, widths, mode="constant", constant_values=value)

    def backward(self, g):
        return g[self.inner]


def pad(input: Tensor, pad, mode: str = "constant", value: float | None = None) -> Tensor:
    """Pad the last ``len(pad) // 2`` dims of ``input`` (``torch.nn.functional.pad``).

    ``pad`` lists (left, right) widths from the last dim backwards: ``(1, 2)`` pads the last dim by 1
    before and 2 after, ``(1, 1, 2, 0)`` also the one before it. Modes, as PyTorch's:

    - ``"constant"``: fill with ``value`` (0 by default), any number of dims; negative widths crop.
    - ``"reflect"``: mirror without repeating the edge (a width must be smaller than the dim).
    - ``"replicate"``: repeat the edge value.
    - ``"circular"``: wrap around (a width may be at most the dim's size).

    The non-constant modes pad the last 1, 2 or 3 dims of a (C, *) or (N, C, *) input, as PyTorch
    requires. Differentiable: the constant border gets no gradient; reflected, replicated and
    wrapped entries send theirs back to the entries they copy.
    """
    op = "pad"
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(input).__name__}")
    widths = tuple(int(p) for p in pad)
    if len(widths) % 2 or len(widths) // 2 > input.ndim:
        raise ShapeError(f"{op}: padding length must be even and at most 2 * input.dim() ({2 * input.ndim}), got "
                         f"{len(widths)} for {describe(input)}")
    pairs = {input.ndim - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)}
    if mode == "constant":
        return _pad_constant(input, pairs, 0 if value is None else value)
    if mode not in _PAD_MODES:
        raise ValueError(f"{op}: unrecognised padding mode {mode!r}; use 'constant', 'reflect', 'replicate' or "
                         "'circular'")
    if value is not None and value != 0:
        raise ValueError(f"{op}: padding mode {mode!r} does not take a value (only 'constant' does)")
    dims = len(pairs)
    if dims > 3 or input.ndim not in (dims + 1, dims + 2):
        raise ShapeError(f"{op}: {mode} padding of the last {dims} dim(s) needs a {dims + 1}-d or {dims + 2}-d input "
                         f"(unbatched or batched), got {describe(input)}")
    out = input
    for dim, (lo, hi) in pairs.items():
        size = input.shape[dim]
        too_wide = {"reflect": max(lo, hi) >= size, "circular": max(lo, hi) > size}.get(mode, size == 0)
        if min(lo, hi) < 0 or too_wide:
            limit = {"reflect": "smaller than its size", "circular": "at most its size"}.get(mode, "of a non-empty dim")
            raise ShapeError(f"{op}: {mode} padding widths ({lo}, {hi}) of dim {dim} must be non-negative and "
                             f"{limit} ({size}; {describe(input)})")
        if lo or hi:
            source = np.pad(np.arange(size), (lo, hi), mode=_PAD_MODES[mode])  # which entry each position copies
            out = indexing.index_select(out, dim, Tensor(backend.to_device(source, input.device)))
    return out


def _pad_constant(input: Tensor, pairs: dict, value) -> Tensor:
    from engine.tensor import _check_fill

    _check_fill("pad", value, np.dtype(input.dtype))
    crop = [slice(None)] * input.ndim
    widths = [(0, 0)] * input.ndim
    for dim, (lo, hi) in pairs.items():
        size = input.shape[dim]
        start, stop = max(-lo, 0), size - max(-hi, 0)
        if stop < start:
            raise ShapeError(f"pad: negative widths ({lo}, {hi}) crop more than the {size} entries of dim {dim} of "
                             f"{describe(input)}")
        crop[dim], widths[dim] = slice(start, stop), (max(lo, 0), max(hi, 0))
    if any(s != slice(None) for s in crop):
        input = ops.getitem(input, tuple(crop))
    return PadConstant.apply(input, widths=tuple(widths), value=value)

"""Gradient clipping, L1/L2 penalties and flat parameter vectors; ``rnn.pad_sequence``.

Clipping runs after ``loss.backward()`` and before ``optimizer.step()``. It never copies a
gradient to the host: the total norm and the scale stay on the device (one reduction and one
scale pass, no synchronisation) unless ``error_if_nonfinite=True`` asks for a check.

L1 / L2 penalties versus the optimizer's ``weight_decay``:
    ``loss + lam / 2 * l2_penalty(params)`` adds ``lam * p`` to each gradient, exactly what SGD's
    ``weight_decay=lam`` adds. With Adam they differ: a penalty's gradient is rescaled by Adam's
    per-parameter step size, and AdamW's decoupled decay is not a penalty at all. A penalty lets you
    choose the parameters (e.g. weights but not biases or LayerNorm scales) and use L1, which
    drives weights to exactly zero and has no optimizer equivalent.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from engine import backend, dtypes, ops
from engine.autograd import no_grad
from engine.errors import GradError, ShapeError, describe
from engine.tensor import Tensor


def _unique(parameters) -> list[Tensor]:
    """A Tensor or an iterable of them, each once (a tied parameter must not be clipped twice)."""
    if isinstance(parameters, Tensor):
        return [parameters]
    seen, unique = set(), []
    for p in parameters:
        if not isinstance(p, Tensor):
            raise TypeError(f"expected Tensors (e.g. model.parameters()), got a {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _norm(array, norm_type: float):
    """The ``norm_type``-norm of a flattened array as a 0-d array on its device, computed in at least
    float32 (torch's ``vector_norm``: a 16-bit gradient's squares would overflow) and returned in
    the array's dtype. Any real ``norm_type``, as ``torch.linalg.vector_norm``: 0 counts the nonzero
    entries, ``-inf`` is the smallest magnitude, other negative p the p-"norm" of the magnitudes."""
    xp = backend.array_module(array)
    if array.size == 0:
        return xp.zeros((), dtype=array.dtype)
    wide = dtypes.upcast(array)
    if norm_type == math.inf:
        total = xp.abs(wide).max()
    elif norm_type == -math.inf:
        total = xp.abs(wide).min()
    elif norm_type == 0.0:
        total = xp.asarray(xp.count_nonzero(wide), dtype=wide.dtype)
    elif norm_type == 2.0:
        if wide.ndim != 1:
            total = xp.sqrt((wide * wide).sum())
        else:  # cupy.vdot is cupy's own cuBLAS call, refused inside a graph capture: the engine's GEMM entry
            total = xp.sqrt(xp.vdot(wide, wide) if xp is np else backend.matmul(wide, wide, "clip_grad_norm_"))
    elif norm_type == 1.0:
        total = xp.abs(wide).sum()
    else:
        total = (xp.abs(wide) ** norm_type).sum() ** (1.0 / norm_type)
    return total.astype(array.dtype, copy=False)


def _owner(array):
    """The array owning ``array``'s memory (following ``.base`` through arrays of its kind: the
    optimizer's gradient views have an ndarray subclass between them and the buffer, see
    ``backend.rooted_view``)."""
    kind = type(array)
    while isinstance(getattr(array, "base", None), kind):
        array = array.base
    return array


def _spans(arrays: list) -> list:
    """Arrays covering ``arrays`` (of one dtype), each to reduce and scale in place as one: runs of
    C-contiguous arrays that lie end to end in one owner's memory become one 1-D view of it, so
    gradients that are views of an optimizer's flat gradient buffers (``zero_grad(set_to_none=False)``,
    gradients accumulated into them, or after ``GradScaler.unscale_``) come out as one view per
    buffer, whatever order the parameters are listed in (a model's parameters alternate between an
    optimizer's groups); any other array is itself. Owners in first-seen order."""
    return _spans_from(_span_plan(arrays), arrays)


def _span_plan(arrays: list) -> list:
    """How :func:`_spans` covers ``arrays``: ``(owner, start, stop)`` per merged run of an owner's
    flat memory, then the index in ``arrays`` of each array kept as it is."""
    by_owner: dict = {}  # id(owner) -> (owner, its address, [[start, stop], ...])
    alone = []
    for index, a in enumerate(arrays):
        owner = _owner(a)
        if owner is a or not (a.flags.c_contiguous and owner.flags.c_contiguous and owner.dtype == a.dtype):
            alone.append(index)  # owns its memory (a fresh gradient from backward), or cannot be merged
            continue
        entry = by_owner.get(id(owner))
        if entry is None:
            entry = by_owner[id(owner)] = (owner, backend.address(owner), [])
        start = (backend.address(a) - entry[1]) // a.dtype.itemsize
        entry[2].append([start, start + a.size])
    plan = []
    for owner, _, ranges in by_owner.values():
        ranges.sort()
        runs = [ranges[0]]
        for start, stop in ranges[1:]:
            if start == runs[-1][1]:
                runs[-1][1] = stop
            else:  # padding between (never read nor scaled), or an overlap (kept apart, as given)
                runs.append([start, stop])
        plan += [(owner, start, stop) for start, stop in runs]
    return plan + alone


def _spans_from(plan: list, arrays: list) -> list:
    spans = []
    for item in plan:
        if isinstance(item, int):
            spans.append(arrays[item])
        else:
            owner, start, stop = item
            spans.append(owner.reshape(-1)[start:stop])
    return spans


# The last call's plans, kept for the next call with the same gradient arrays: (weak references to
# those arrays, {dtype: plan with each owner weakly referenced}). A training loop clips the same
# gradient views of the optimizer's flat buffers every step, and finding their owners and
# addresses again took ~0.1-0.2 ms of the GPT step's clip (docs/benchmarks.md, issue 26). An
# array's memory and base never change, so the same live arrays have the same plan; nothing is
# kept alive by the cache.
_last_plans: tuple = ((), {})


def _spans_by_dtype(grads: list) -> dict:
    """{dtype: :func:`_spans` of the gradients of that dtype}: what the norm reduces and the scale
    pass multiplies, found once per call (or taken from the last call's, for the same arrays)."""
    global _last_plans
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    refs, plans = _last_plans
    if len(refs) != len(grads) or any(ref() is not g for ref, g in zip(refs, grads)):
        plans = {dtype: _span_plan(same) for dtype, same in by_dtype.items()}
        try:
            weak = {dtype: [item if isinstance(item, int) else (weakref.ref(item[0]),) + item[1:] for item in plan]
                    for dtype, plan in plans.items()}
            _last_plans = (tuple(weakref.ref(g) for g in grads), weak)
        except TypeError:  # an array type without weak references: no cache
            pass
        return {dtype: _spans_from(plans[dtype], same) for dtype, same in by_dtype.items()}
    live = {dtype: [item if isinstance(item, int) else (item[0](),) + item[1:] for item in plan]
            for dtype, plan in plans.items()}
    return {dtype: _spans_from(live[dtype], same) for dtype, same in by_dtype.items()}


# On the CPU a span of at least this many elements is reduced where it lies, the smaller ones
# concatenated and reduced as one: copying a large span costs more than its own reduction call (a
# model's gradients in an optimizer's flat buffers, one span per parameter group, are reduced with no
# copy; docs/benchmarks.md, "The GPT step op by op"). On a GPU every span is concatenated: one copy
# and one reduction launch instead of a few launches per span.
NORM_IN_PLACE_MIN = 1 << 16


def _spans_norm(xp, spans: list, norm_type: float):
    """The ``norm_type``-norm (p > 0) of all the elements of ``spans`` (one dtype, one device): the
    norm of the parts' norms, each part's norm kept in float32 for 16-bit gradients, the total
    rounded once to the spans' dtype."""
    if len(spans) == 1:
        return _norm(spans[0], norm_type)
    large = [s for s in spans if s.size >= NORM_IN_PLACE_MIN] if xp is np else []
    small = [s for s in spans if xp is not np or s.size < NORM_IN_PLACE_MIN]
    parts = large + ([small[0] if len(small) == 1 else xp.concatenate([s.reshape(-1) for s in small])]
                     if small else [])
    if len(parts) == 1:
        return _norm(parts[0], norm_type)
    wide = xp.stack([_norm(dtypes.upcast(part), norm_type) for part in parts])
    return _norm(wide, norm_type).astype(spans[0].dtype, copy=False)


def _device_norm(grads: list, norm_type: float, spans_by_dtype: dict):
    """The total ``norm_type``-norm of gradients on one device, as torch computes it: the norm of
    the per-gradient norms. For p > 0 (and inf) that equals the norm of all the gradients as one
    vector, so it is computed over their merged views (``spans_by_dtype``, from
    :func:`_spans_by_dtype`: one reduction per view, then the norm of those); for p <= 0 the two
    differ, and the per-gradient norms are taken as torch does."""
    xp = backend.array_module(grads[0])
    if norm_type <= 0:
        return _norm(xp.stack([_norm(g, norm_type) for g in grads]), norm_type)
    norms = [_spans_norm(xp, spans, norm_type) for spans in spans_by_dtype.values()]
    if len(norms) == 1:
        return norms[0]
    return _norm(xp.stack([n.astype(norms[0].dtype) for n in norms]), norm_type)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Scale all gradients together so that their joint norm is at most ``max_norm`` (PyTorch's
    ``torch.nn.utils.clip_grad_norm_``).

    The total norm is the norm of the per-gradient norms (for p > 0 the norm of all gradients as
    one vector). Gradients are multiplied by ``min(1, max_norm / (total_norm + 1e-6))`` in place.
    On each device this is one reduction over the gradients (their views merged where they lie end
    to end in one buffer, else concatenated) and one scale pass (one launch per merged view),
    instead of several launches per gradient; nothing is read on the host.

    Args:
        parameters: a Tensor or an iterable of Tensors (those without ``.grad`` are skipped).
        max_norm: the largest allowed norm.
        norm_type: p of the p-norm: any real number or ``float("inf")`` / ``float("-inf")``, as
            ``torch.linalg.vector_norm`` takes (0 counts nonzero entries).
        error_if_nonfinite: raise a GradError if the total norm is NaN or infinite (a host read,
            so a wait for the device).
        foreach: accepted for PyTorch's signature (None, True or False): the engine always takes
            its one-reduction path, which is what foreach buys in PyTorch.

    Returns:
        The total norm before clipping, a 0-d Tensor in the gradients' dtype on the first
        gradient's device.

    Example:
        >>> loss.backward()                                                   # doctest: +SKIP
        >>> nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)        # doctest: +SKIP
        >>> optimizer.step()                                                  # doctest: +SKIP
    """
    norm_type = float(norm_type)
    if math.isnan(norm_type):
        raise ValueError(f"clip_grad_norm_: norm_type must be a real number or +-inf, got {norm_type}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"clip_grad_norm_: foreach must be None, True or False, got {foreach!r}")
    grads = [p.grad for p in _unique(parameters) if p.grad is not None]
    if not grads:
        return Tensor(np.zeros((), np.float32))
    # As torch: no warning for a zero under a negative p, nor for inf gradients scaled by 0 (NaN);
    # a non-finite total norm is what error_if_nonfinite checks.
    with np.errstate(divide="ignore", invalid="ignore"):
        return _clip(grads, float(max_norm), norm_type, error_if_nonfinite)


def _clip(grads: list, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    home = grads[0].device
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g._data)
    spans = {device: _spans_by_dtype(arrays) for device, arrays in by_device.items()}
    xp = backend.xp_for(home)
    with backend.on_device(home):
        norms = []
        for device, arrays in by_device.items():
            with backend.on_device(device):
                norms.append(backend.to_device(_device_norm(arrays, norm_type, spans[device]), home))
        total = norms[0] if len(norms) == 1 else _norm(xp.stack(norms), norm_type)
        if error_if_nonfinite and not bool(backend.to_host(xp.isfinite(total))):
            raise GradError(f"clip_grad_norm_: the total {norm_type}-norm of the gradients is {float(total)}, so they "
                            "cannot be clipped; check the loss for NaN/inf or pass error_if_nonfinite=False")
        scale = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for device in by_device:
        with backend.on_device(device):
            here = backend.to_device(scale, device)
            for dtype, dtype_spans in spans[device].items():
                factor = here.astype(dtype, copy=False)
                for span in dtype_spans:
                    span *= factor
    return Tensor._from_op(total, None)  # as it is: Tensor(array) would make a float64 norm float32


def clip_grad_value_(parameters, clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place."""
    clip_value = float(clip_value)
    if clip_value < 0:
        raise ValueError(f"clip_grad_value_: clip_value must be non-negative, got {clip_value}")
    for p in _unique(parameters):
        if p.grad is not None:
            xp = p.grad.xp
            xp.clip(p.grad._data, -clip_value, clip_value, out=p.grad._data)


def _sum_terms(terms: list[Tensor]) -> Tensor:
    if not terms:
        return Tensor(np.zeros((), np.float32))
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def l1_penalty(parameters) -> Tensor:
    """``sum |p|`` over the given parameters: a differentiable scalar to add to the loss.

    Example:
        >>> weights = [p for name, p in model.named_parameters() if name.endswith("weight")]   # doctest: +SKIP
        >>> loss = criterion(model(x), y) + 1e-4 * nn.utils.l1_penalty(weights)                # doctest: +SKIP
    """
    return _sum_terms([ops.sum(ops.abs(p)) for p in _unique(parameters)])


def l2_penalty(parameters) -> Tensor:
    """``sum p**2`` over the given parameters (no 1/2): add ``lam / 2 * l2_penalty(params)`` to the
    loss for the same gradient as SGD's ``weight_decay=lam``."""
    return _sum_terms([ops.sum(p * p) for p in _unique(parameters)])


def parameters_to_vector(parameters) -> Tensor:
    """All parameters flattened and concatenated into one 1-D tensor (differentiable)."""
    params = _unique(parameters)
    if not params:
        raise ShapeError("parameters_to_vector: no parameters given")
    return ops.concatenate([ops.reshape(p, (-1,)) for p in params])


def vector_to_parameters(vec: Tensor, parameters) -> None:
    """Copy consecutive slices of the 1-D ``vec`` into the parameters, in place (not recorded)."""
    params = _unique(parameters)
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ShapeError(f"vector_to_parameters: {describe(vec)} must be 1-D with {total} elements, one per "
                         "parameter element")
    offset = 0
    with no_grad():
        for p in params:
            chunk = vec._data[offset:offset + p.numel()].reshape(p.shape)
            p.copy_(backend.to_device(chunk, p.device).astype(p.dtype, copy=False))
            offset += p.numel()


from engine.nn.utils import rnn  # noqa: E402  (nn.utils.rnn.pad_sequence, as in PyTorch)

"""Gradient clipping, L1/L2 penalties and flat parameter vectors; ``rnn.pad_sequence``.

Clipping runs after ``loss.backward()`` and before ``optimizer.step()``. It never copies a
gradient to the host: the total norm and the scale stay on the device (one launch per gradient,
no synchronisation) unless ``error_if_nonfinite=True`` asks for a check.

L1 / L2 penalties versus the optimizer's ``weight_decay``:
    ``loss + lam / 2 * l2_penalty(params)`` adds ``lam * p`` to each gradient, exactly what SGD's
    ``weight_decay=lam`` adds. With Adam they differ: a penalty's gradient is rescaled by Adam's
    per-parameter step size, and AdamW's decoupled decay is not a penalty at all. A penalty lets you
    choose the parameters (e.g. weights but not biases or LayerNorm scales) and use L1, which
    drives weights to exactly zero and has no optimizer equivalent.
"""

from __future__ import annotations

import math

import numpy as np

from engine import backend, ops
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
    """The ``norm_type``-norm of a flattened array, as a 0-d array on its device."""
    xp = backend.array_module(array)
    if array.size == 0:
        return xp.zeros((), dtype=array.dtype)
    if math.isinf(norm_type):
        return xp.abs(array).max()
    if norm_type == 2.0:
        return xp.sqrt((array * array).sum())
    if norm_type == 1.0:
        return xp.abs(array).sum()
    return (xp.abs(array) ** norm_type).sum() ** (1.0 / norm_type)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale all gradients together so that their joint norm is at most ``max_norm``.

    The joint norm is the norm of all gradients concatenated into one vector. Gradients are
    multiplied by ``min(1, max_norm / (total_norm + 1e-6))`` in place, as in PyTorch.

    Args:
        parameters: a Tensor or an iterable of Tensors (those without ``.grad`` are skipped).
        max_norm: the largest allowed norm.
        norm_type: p of the p-norm (a positive number or ``float("inf")``).
        error_if_nonfinite: raise if the total norm is NaN or infinite (forces a device sync).

    Returns:
        The total norm before clipping, a 0-d Tensor on the first gradient's device.

    Example:
        >>> loss.backward()                                                   # doctest: +SKIP
        >>> nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)        # doctest: +SKIP
        >>> optimizer.step()                                                  # doctest: +SKIP
    """
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be positive or inf, got {norm_type}")
    grads = [p.grad for p in _unique(parameters) if p.grad is not None]
    if not grads:
        return Tensor(np.zeros((), np.float32))
    home = grads[0].device
    xp = backend.xp_for(home)
    with backend.on_device(home):
        norms = xp.stack([backend.to_device(_norm(g._data, norm_type), home) for g in grads])
        total = _norm(norms, norm_type)
        if error_if_nonfinite and not bool(backend.to_host(xp.isfinite(total))):
            raise GradError(f"clip_grad_norm_: the total {norm_type}-norm of the gradients is {float(total)}, so they "
                            "cannot be clipped; check the loss for NaN/inf or pass error_if_nonfinite=False")
        scale = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g._data *= backend.to_device(scale, g.device).astype(g.dtype)
    return Tensor(total)


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

"""Dropout: ``dropout`` and ``dropout2d``."""

from __future__ import annotations

import warnings

import numpy as np

from engine import backend
from engine.autograd import Function
from engine.dtypes import is_floating
from engine.errors import DTypeError, ShapeError, describe
from engine.tensor import Tensor


class Dropout(Function):
    """Multiply by a saved mask of 0 and 1 / (1 - p); the backward is the same product."""

    name = "dropout"

    def forward(self, x, mask=None):
        self.mask = mask
        return x * mask

    def backward(self, g):
        return g * self.mask


def _uniform_samples(dev, shape: tuple, dtype):
    """Uniform [0, 1) samples on ``dev`` from the engine's seeded generator for that device."""
    gen = backend.generator(dev)
    sample_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    with backend.on_device(dev):
        if dev.type == "cpu":
            return gen.random(shape, dtype=sample_dtype)
        return gen.random_sample(shape, dtype=sample_dtype)


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    The expectation is unchanged, so nothing needs rescaling at evaluation time. Identity when
    ``training`` is False or ``p == 0``. The mask comes from ``engine.backend.generator`` of the
    input's device, so ``engine.manual_seed(s)`` makes it reproducible.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if not is_floating(input.dtype):
        raise DTypeError(f"dropout: input must be floating point, got {describe(input)}")
    if p == 1.0:
        mask = input.xp.zeros(input.shape, dtype=input.dtype)
    else:
        keep = _uniform_samples(input.device, input.shape, input.dtype) >= p
        mask = keep.astype(input.dtype) * input.dtype.type(1.0 / (1.0 - p))
    return Dropout.apply(input, mask=mask)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Channel dropout of (N, C, H, W) input: each whole channel is zeroed with probability ``p``
    and the rest scaled by 1 / (1 - p) (adjacent pixels of a feature map are correlated, so
    element-wise dropout would barely regularise them).

    Other ranks follow PyTorch 2.x, with its warnings: a 3-d input is taken as (N, C, L) (one draw
    per (n, c), PyTorch's current reading, announced to change to unbatched (C, H, W)); a 2-d input
    gets element-wise dropout (deprecated there, as ``dropout`` does it)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout2d: p must be a probability in [0, 1], got {p}")
    if input.ndim not in (2, 3, 4):
        raise ShapeError(f"dropout2d: expected (N, C, H, W) input, got {describe(input)}")
    if input.ndim == 2:
        warnings.warn("dropout2d: Received a 2-D input to dropout2d, which is deprecated and will result in an "
                      "error in a future release. To retain the behavior and silence this warning, please use "
                      "dropout instead.", UserWarning, stacklevel=3)
        return dropout(input, p, training)
    if input.ndim == 3:
        warnings.warn("dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout "
                      "behavior is desired - input is interpreted as shape (N, C, L), where C is the channel dim "
                      "(as PyTorch does; use dropout1d to keep this behaviour).", UserWarning, stacklevel=3)
    if not training or p == 0.0:
        return input
    if not is_floating(input.dtype):
        raise DTypeError(f"dropout2d: input must be floating point, got {describe(input)}")
    # one draw per channel, broadcast over the spatial dims ((H, W), or L for a 3-d input)
    shape = input.shape[:2] + (1,) * (input.ndim - 2)
    keep = _uniform_samples(input.device, shape, input.dtype) >= p
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    mask = keep.astype(input.dtype) * input.dtype.type(scale)
    return Dropout.apply(input, mask=mask)

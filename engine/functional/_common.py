"""Helpers the functional modules share: the fused-kernel switch and contiguity."""

from __future__ import annotations



from engine import ops
from engine.fusion import fused_enabled
from engine.tensor import Tensor


def _use_fused(fused: bool | None) -> bool:
    return fused_enabled() if fused is None else fused


def _contiguous(a):
    return a if a.flags.c_contiguous else a.copy(order="C")


def _contiguous_tensor(t: Tensor) -> Tensor:
    return t if t._data.flags.c_contiguous else ops.clone(t)

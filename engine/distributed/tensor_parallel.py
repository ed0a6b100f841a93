"""Tensor (model) parallelism with Megatron-LM's split of an MLP's two linear layers.

A layer too large for one device is split across the ranks:

- :class:`ColumnParallelLinear` splits the *output* features: rank r holds rows
  ``[start_r, stop_r)`` of the weight (and of the bias) and computes those output features from
  the whole input. Its input passes through "copy to the parallel region": identity in forward,
  an all-reduce (sum) of the input's gradient in backward, since every rank's slice of the
  output depends on the whole input.
- :class:`RowParallelLinear` splits the *input* features: rank r holds columns
  ``[start_r, stop_r)`` of the weight and takes the matching slice of the input (which is what a
  column-parallel layer before it produced). Each rank's product is a partial sum of the output;
  "reduce from the parallel region" all-reduces it in forward (identity in backward); the bias,
  replicated, is added after the reduction.

So ``Column -> elementwise activation -> Row`` costs one all-reduce in forward (Row's) and one in
backward (Column's input gradient), whatever the hidden width. Uneven splits are allowed: the
first ``features % world`` ranks get one feature more (numpy's ``array_split``).

The communication steps are autograd Functions on arrays calling the process group's
collectives, so they work on both backends (MPI on numpy or cupy arrays, NCCL on cupy arrays).
"""

from __future__ import annotations

import engine.functional as F
from engine import backend
from engine.autograd import Function, no_grad
from engine.distributed import core
from engine.errors import ShapeError, describe
from engine.nn.layers import Linear
from engine.nn.module import Module, Parameter
from engine.tensor import Tensor

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "copy_to_parallel_region", "reduce_from_parallel_region",
           "gather_from_parallel_region", "scatter_to_parallel_region", "split_sizes"]


def split_sizes(features: int, world: int) -> list[int]:
    """How many of ``features`` each of ``world`` ranks holds (the first ``features % world`` one more)."""
    return [features // world + (1 if r < features % world else 0) for r in range(world)]


def _bounds(features: int, world: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(features, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ---- the communication steps (autograd Functions on arrays) --------------------------------------

def _all_reduce_copy(array):
    """The sum over ranks of ``array``, in a new array (the input may be shared by the graph)."""
    group = core.group()
    out = array.copy()
    if group.size > 1:
        group.all_reduce(out, "sum")
    return out


def _gather_last_dim(array, features: int):
    """Every rank's ``array`` joined along the last dim (rank order); uneven slices are padded to
    the largest for the collective, which needs equal sizes, and trimmed after."""
    group = core.group()
    if group.size == 1:
        return array
    sizes = split_sizes(features, group.size)
    xp = backend.array_module(array)
    wide = max(sizes)
    padded = array
    if array.shape[-1] != wide:
        padded = xp.zeros((*array.shape[:-1], wide), dtype=array.dtype)
        padded[..., :array.shape[-1]] = array
    stacked = group.all_gather(xp.ascontiguousarray(padded))  # (world, ..., wide)
    return xp.concatenate([stacked[r][..., :n] for r, n in enumerate(sizes)], axis=-1)


class _CopyToParallelRegion(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    name = "copy_to_parallel_region"

    def forward(self, x):
        return x

    def backward(self, g):
        return _all_reduce_copy(g)


class _ReduceFromParallelRegion(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    name = "reduce_from_parallel_region"

    def forward(self, x):
        return _all_reduce_copy(x)

    def backward(self, g):
        return g


class _GatherFromParallelRegion(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    name = "gather_from_parallel_region"

    def forward(self, x, features=None):
        self.features = features
        return _gather_last_dim(x, features)

    def backward(self, g):
        group = core.group()
        start, stop = _bounds(self.features, group.size, group.rank)
        return g[..., start:stop]


class _ScatterToParallelRegion(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    name = "scatter_to_parallel_region"

    def forward(self, x):
        group = core.group()
        self.features = x.shape[-1]
        start, stop = _bounds(self.features, group.size, group.rank)
        return x[..., start:stop]

    def backward(self, g):
        return _gather_last_dim(g, self.features)


def copy_to_parallel_region(x: Tensor) -> Tensor:
    """Identity in forward; all-reduce (sum) of the gradient in backward."""
    return _CopyToParallelRegion.apply(x)


def reduce_from_parallel_region(x: Tensor) -> Tensor:
    """All-reduce (sum) in forward; identity in backward."""
    return _ReduceFromParallelRegion.apply(x)


def gather_from_parallel_region(x: Tensor, features: int) -> Tensor:
    """Join every rank's slice of the last dim (``features`` in all) in forward; backward keeps
    this rank's slice of the gradient."""
    return _GatherFromParallelRegion.apply(x, features=features)


def scatter_to_parallel_region(x: Tensor) -> Tensor:
    """This rank's slice of the last dim in forward; all-gather of the gradient in backward."""
    return _ScatterToParallelRegion.apply(x)


# ---- the layers ---------------------------------------------------------------------------------

class _ParallelLinear(Module):
    split_dim = 0  # the weight dim split across ranks

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype, full: Linear | None):
        super().__init__()
        name = type(self).__name__
        group = core.group()  # raises when no process group was initialized
        self.world_size, self.rank = group.size, group.rank
        self.in_features, self.out_features = int(in_features), int(out_features)
        split = self.out_features if self.split_dim == 0 else self.in_features
        if split < self.world_size:
            which = "out_features" if self.split_dim == 0 else "in_features"
            raise ValueError(f"{name}: {which}={split} cannot be split over {self.world_size} ranks; each rank "
                             "needs at least one feature")
        if full is None:
            # The full layer, initialised as nn.Linear is, from the engine's seeded generator: every
            # rank that seeded alike builds the same one and keeps its own slice.
            full = Linear(self.in_features, self.out_features, bias=bias, device=device, dtype=dtype)
        self.start, self.stop = _bounds(split, self.world_size, self.rank)
        with no_grad():
            w = full.weight._data
            shard = w[self.start:self.stop] if self.split_dim == 0 else w[:, self.start:self.stop]
            self.weight = Parameter(shard.copy())
            if full.bias is None:
                self.bias = None
            else:
                b = full.bias._data
                self.bias = Parameter((b[self.start:self.stop] if self.split_dim == 0 else b).copy())

    def _check_input(self, x: Tensor, features: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor input, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != features:
            raise ShapeError(f"{type(self).__name__}: input {describe(x)} must have {features} features in its last "
                             f"dim (rank {self.rank} of {self.world_size}, weight {describe(self.weight)})")


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's output features (rows) split across the ranks.

    Args:
        in_features: input features (every rank takes the whole input).
        out_features: output features in all; rank r keeps ``split_sizes(out_features, W)[r]``.
        bias: learn a bias (split like the rows).
        gather_output: all-gather the ranks' slices so every rank returns the full output;
            False (default) returns this rank's slice, ready for a :class:`RowParallelLinear`.
        device, dtype: where and in which dtype to make the parameters.

    Attributes:
        weight: this rank's rows, shape ``(stop - start, in_features)``.
        start, stop: the output features this rank holds.

    Example:
        >>> engine.manual_seed(0)       # the same seed on every rank: the same full layer  # doctest: +SKIP
        >>> up = ColumnParallelLinear(512, 2048)                                            # doctest: +SKIP
        >>> down = RowParallelLinear(2048, 512)                                             # doctest: +SKIP
        >>> y = down(F.gelu(up(x)))     # one all-reduce in forward, one in backward       # doctest: +SKIP
    """

    split_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 device=None, dtype=None, *, _full: Linear | None = None):
        super().__init__(in_features, out_features, bias, device, dtype, _full)
        self.gather_output = bool(gather_output)

    @classmethod
    def from_linear(cls, linear: Linear, gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's slice of an existing ``nn.Linear`` (the same on every rank): its rows."""
        _check_linear(cls, linear)
        return cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, _full=linear)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, self.in_features)
        y = F.linear(copy_to_parallel_region(x), self.weight, self.bias)
        return gather_from_parallel_region(y, self.out_features) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (rows {self.start}:{self.stop} "
                f"on rank {self.rank} of {self.world_size}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's input features (columns) split across the ranks.

    Args:
        in_features: input features in all; rank r keeps ``split_sizes(in_features, W)[r]``.
        out_features: output features (every rank returns the whole output).
        bias: learn a bias, replicated on every rank and added after the all-reduce.
        input_is_parallel: the input is already this rank's slice of the features (the output
            of a :class:`ColumnParallelLinear` with ``gather_output=False``); False: the input
            is whole and each rank takes its slice (the gradient is all-gathered in backward).
        device, dtype: where and in which dtype to make the parameters.

    Attributes:
        weight: this rank's columns, shape ``(out_features, stop - start)``.
        start, stop: the input features this rank holds.
    """

    split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 device=None, dtype=None, *, _full: Linear | None = None):
        super().__init__(in_features, out_features, bias, device, dtype, _full)
        self.input_is_parallel = bool(input_is_parallel)

    @classmethod
    def from_linear(cls, linear: Linear, input_is_parallel: bool = True) -> "RowParallelLinear":
        """This rank's slice of an existing ``nn.Linear`` (the same on every rank): its columns."""
        _check_linear(cls, linear)
        return cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel,
                   _full=linear)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_is_parallel:
            self._check_input(x, self.stop - self.start)
        else:
            self._check_input(x, self.in_features)
            x = scatter_to_parallel_region(x)
        y = reduce_from_parallel_region(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (columns {self.start}:{self.stop} on rank {self.rank} of "
                f"{self.world_size}), out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


def _check_linear(cls, linear) -> None:
    if not isinstance(linear, Linear):
        raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")

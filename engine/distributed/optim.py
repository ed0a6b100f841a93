"""ZeRO stage 1: optimizer state sharded across ranks (PyTorch's ``ZeroRedundancyOptimizer``).

Every rank holds the whole model and (after DDP's all-reduce) the same gradients, but an
optimizer such as Adam keeps two more arrays per parameter. ZeRO splits that: the parameters are
partitioned across ranks, each rank builds the wrapped optimizer over its own partition only
(so it keeps state for 1/W of the model), steps that partition, and then every rank's updated
partition is broadcast from its owner, so all ranks end the step with identical parameters.

Checkpoints: :meth:`ZeroRedundancyOptimizer.consolidate_state_dict` gathers the shards onto one
rank, whose :meth:`~ZeroRedundancyOptimizer.state_dict` is then exactly what a plain
single-process optimizer of the same class over the same parameters would return: one file,
loadable with or without ZeRO (:meth:`~ZeroRedundancyOptimizer.load_state_dict` re-shards it).
"""

from __future__ import annotations

import collections

import numpy as np

from engine import backend
from engine.autograd import no_grad
from engine.distributed import core
from engine.distributed.core import DistributedError
from engine.errors import EngineError, ShapeError, describe
from engine.optim.optimizer import (Optimizer, _as_param_groups, _as_param_list, _saved_indices,
                                    _split_state_dict)
from engine.tensor import Tensor

__all__ = ["ZeroRedundancyOptimizer"]


class ZeroRedundancyOptimizer(Optimizer):
    """Wrap ``optimizer_class`` so each rank keeps the optimizer state of its parameter shard only.

    The parameters are assigned to ranks greedily, as PyTorch does: within each param group,
    largest first, each to the rank with the fewest elements so far (counted across groups).
    Every rank builds ``optimizer_class`` over the parameters it owns. :meth:`step` steps them
    with the rank's (already averaged, e.g. by DDP) gradients, then broadcasts each rank's
    updated parameters from it: one broadcast per rank and dtype.

    Args:
        params: an iterable of Tensors or of param-group dicts, the same on every rank (same
            order, shapes and dtypes; checked at construction).
        optimizer_class: the optimizer to wrap (``engine.optim.Adam`` ...).
        process_group: accepted for PyTorch's signature; the world group is used.
        parameters_as_bucket_view: accepted for PyTorch's signature; the wrapped engine
            optimizer already keeps its parameters in flat buffers.
        overlap_with_ddp: must be False (overlapping the step with DDP's backward is not
            implemented).
        **defaults: the wrapped optimizer's hyperparameters (``lr=1e-3``, ``betas=...``).

    Attributes:
        optim: the local optimizer over this rank's shard.
        param_groups: the full param groups (every parameter, all ranks'), with the
            hyperparameters; changes to them (an lr scheduler) reach the local optimizer at the
            next step.

    Example:
        >>> dist.init_process_group()                                            # doctest: +SKIP
        >>> model = DistributedDataParallel(net)                                 # doctest: +SKIP
        >>> opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optim.Adam, lr=1e-3)
        >>> loss.backward(); opt.step()                                          # doctest: +SKIP
        >>> opt.consolidate_state_dict(to=0)                                     # doctest: +SKIP
        >>> if dist.get_rank() == 0: engine.save(opt.state_dict(), "opt.pt")     # doctest: +SKIP
    """

    def __init__(self, params, optimizer_class, process_group=None, parameters_as_bucket_view: bool = False,
                 overlap_with_ddp: bool = False, **defaults):
        name = "ZeroRedundancyOptimizer"
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"{name}: optimizer_class must be an engine optimizer class (engine.optim.Adam ...), "
                            f"got {optimizer_class!r}")
        if overlap_with_ddp:
            raise DistributedError(f"{name}: overlap_with_ddp=True is not supported; step after backward")
        self._group = core.group()  # raises when no process group was initialized
        self.rank, self.world_size = self._group.rank, self._group.size
        self.optimizer_class, self.defaults = optimizer_class, dict(defaults)
        self.param_groups: list[dict] = []
        self._owner: dict[int, int] = {}  # id(param) -> rank
        self._sizes = [0] * self.world_size  # elements assigned to each rank so far
        self._consolidated: dict | None = None
        local_groups = [self._partition(group) for group in _as_param_groups(name, params)]
        self.optim = optimizer_class(local_groups, **defaults)
        self._adopt_hyperparams()
        self._check_same_on_every_rank()

    # ---- partition ------------------------------------------------------------------------------
    def _partition(self, param_group: dict) -> dict:
        """Record ``param_group`` as a full group and return this rank's part of it."""
        if not isinstance(param_group, dict):
            raise EngineError(f"ZeroRedundancyOptimizer.add_param_group: expected a dict with a 'params' key, got "
                              f"{type(param_group).__name__}")
        params = _as_param_list("ZeroRedundancyOptimizer", param_group.get("params"))
        if any(id(p) in self._owner for p in params):
            raise EngineError("ZeroRedundancyOptimizer: some parameters already belong to another group; each "
                              "parameter may appear in one group only")
        devices = {p.device for p in params} | {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise EngineError(f"ZeroRedundancyOptimizer: parameters on several devices ({sorted(map(str, devices))}); "
                              "one rank's model lives on one device")
        # PyTorch's greedy rule: largest first (a stable sort keeps the given order among equals),
        # each to the rank with the fewest elements so far (the lowest such rank).
        for p in sorted(params, key=lambda t: t.numel(), reverse=True):
            rank = int(np.argmin(self._sizes))
            self._owner[id(p)] = rank
            self._sizes[rank] += p.numel()
        full = {**param_group, "params": params}
        self.param_groups.append(full)
        return {**param_group, "params": [p for p in params if self._owner[id(p)] == self.rank]}

    def owner(self, param: Tensor) -> int:
        """The rank that owns ``param`` (steps it and keeps its optimizer state)."""
        try:
            return self._owner[id(param)]
        except KeyError:
            raise EngineError(f"ZeroRedundancyOptimizer.owner: {describe(param)} is not one of this optimizer's "
                              "parameters") from None

    def _params(self) -> list[Tensor]:
        """Every parameter in global order: the order a plain optimizer's state_dict indexes."""
        return [p for group in self.param_groups for p in group["params"]]

    def _device(self):
        params = self._params()
        return params[0].device if params else backend.default_device()

    def _rank_params(self, rank: int) -> list[Tensor]:
        return [p for p in self._params() if self._owner[id(p)] == rank]

    def _check_same_on_every_rank(self) -> None:
        """Every rank must list the same parameters, or the partitions (and broadcasts) disagree."""
        meta = [[(tuple(p.shape), str(p.dtype)) for p in g["params"]] for g in self.param_groups]
        metas = self._group.allgather_object(meta, "ZeroRedundancyOptimizer") if self.world_size > 1 else [meta]
        if any(m != metas[0] for m in metas):
            bad = next(r for r, m in enumerate(metas) if m != metas[0])
            raise ShapeError(f"ZeroRedundancyOptimizer: the parameters differ across ranks (rank 0 has "
                             f"{_summary(metas[0])}, rank {bad} has {_summary(metas[bad])}); every rank must pass "
                             f"the same parameters in the same order (this is rank {self.rank})")

    # ---- hyperparameters ------------------------------------------------------------------------
    def _adopt_hyperparams(self) -> None:
        """Full groups take the local optimizer's hyperparameters (its defaults filled in)."""
        for full, local in zip(self.param_groups, self.optim.param_groups):
            full.update({k: v for k, v in local.items() if k != "params"})

    def _push_hyperparams(self) -> None:
        """Changes made to the full groups (an lr scheduler) go to the local optimizer."""
        for full, local in zip(self.param_groups, self.optim.param_groups):
            local.update({k: v for k, v in full.items() if k != "params"})

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its parameters are partitioned with the same greedy rule, after the
        existing ones (which keep their owners). Call it on every rank alike."""
        local = self._partition(param_group)
        self.optim.add_param_group(local)
        self._adopt_hyperparams()
        self._check_same_on_every_rank()

    # ---- the step -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter (all ranks' shards: backward fills them all)."""
        self.optim.zero_grad(set_to_none)
        with no_grad():
            for p in self._params():
                if self._owner[id(p)] == self.rank or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # GradScaler: its check walks every parameter's gradient (all ranks', so every rank decides the
    # same skip) rather than the local optimizer's flat buffers; step() hands grad_scale / found_inf on.
    _amp_unscale_grads_ = None

    def step(self, closure=None):
        """Step this rank's shard, then broadcast every shard from its owner; returns closure()'s loss."""
        core.check_alive(self._group, "ZeroRedundancyOptimizer.step")
        self._consolidated = None  # a consolidated state is out of date once parameters move
        self._push_hyperparams()
        scaling = {name: getattr(self, name) for name in ("grad_scale", "found_inf") if hasattr(self, name)}
        for name, value in scaling.items():
            setattr(self.optim, name, value)
        try:
            loss = self.optim.step(closure)
        finally:
            for name in scaling:
                delattr(self.optim, name)
        self._adopt_hyperparams()
        self._broadcast_shards()
        return loss

    def _broadcast_shards(self) -> None:
        """One broadcast per rank and dtype: the owner packs its updated parameters into one flat
        array, the others unpack it into theirs."""
        if self.world_size == 1:
            return
        with no_grad():
            for rank in range(self.world_size):
                for params in _by_dtype(self._rank_params(rank)):
                    arrays = [p._data for p in params] if rank == self.rank else None
                    flat = _broadcast_flat(self._group, arrays, sum(p.numel() for p in params), params[0].dtype,
                                           params[0].device, rank)
                    if rank != self.rank:
                        _unpack_into(flat, params)

    def grads_finite(self):
        """A device flag: are all gradients finite (every parameter's, as the Trainer's NaN guard
        must decide the same on every rank)? None when no parameter has a gradient."""
        flag = None
        for p in self._params():
            if p.grad is not None:
                ok = p.grad.xp.all(p.grad.xp.isfinite(p.grad._data), keepdims=True)
                flag = ok if flag is None else flag & backend.to_device(ok, backend.device_of(flag))
        return flag

    @property
    def state(self) -> dict:
        """This rank's optimizer state (its shard's parameters only)."""
        return self.optim.state

    def _sync(self) -> None:
        pass  # the local optimizer keeps its own buffers in order

    # ---- checkpoints ----------------------------------------------------------------------------
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's optimizer state onto rank ``to`` (call it on every rank).

        Afterwards :meth:`state_dict` on rank ``to`` returns the full state dict, indexed as a
        plain ``optimizer_class`` over the same parameters would index it. Each rank broadcasts
        its shard in turn (metadata pickled over MPI, arrays with the backend's broadcast).
        """
        core.check_alive(self._group, "ZeroRedundancyOptimizer.consolidate_state_dict")
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < self.world_size:
            raise DistributedError(f"ZeroRedundancyOptimizer.consolidate_state_dict: to={to!r} is not a rank of the "
                                   f"world of {self.world_size}")
        local = self.optim.state_dict()
        local_params = [p for g in self.optim.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(self._params())}
        mine = {index[id(local_params[i])]: entry for i, entry in local["state"].items()}
        state = {}
        for rank in range(self.world_size):
            entries = mine if rank == self.rank else None
            got = _broadcast_state(self._group, entries, rank, keep=self.rank == to, device=self._device())
            if self.rank == to:
                state.update(got)
        if self.rank != to:
            self._consolidated = None
            return
        groups, start = [], 0
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(saved)
        self._consolidated = {"state": dict(sorted(state.items())), "param_groups": groups}

    def state_dict(self) -> dict:
        """The full state dict gathered by :meth:`consolidate_state_dict` (on that rank only).

        It is what a plain ``optimizer_class`` over the same parameters returns, so it loads into
        one (``engine.optim.Adam(model.parameters()).load_state_dict(sd)``) or into a
        ZeroRedundancyOptimizer over any number of ranks.
        """
        if self._consolidated is None:
            raise DistributedError(f"ZeroRedundancyOptimizer.state_dict: no consolidated state on rank {self.rank}; "
                                   "call consolidate_state_dict(to=rank) on every rank first (after the last step), "
                                   "then state_dict() on that rank")
        return self._consolidated

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state dict (from :meth:`state_dict` or a plain optimizer's) on every rank;
        each rank keeps the state of its own shard."""
        name = "ZeroRedundancyOptimizer.load_state_dict"
        groups, state = _split_state_dict(name, state_dict)
        if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise EngineError(f"{name}: the state dict's param groups hold "
                              f"{[len(g.get('params', ())) for g in groups]} parameters but this optimizer's hold "
                              f"{[len(g['params']) for g in self.param_groups]}; build it over the same parameters")
        indices = [_saved_indices(name, g, saved) for g, saved in enumerate(groups)]
        self._check_every_entry(name, indices, state)
        local_groups, local_state, local_index = [], {}, 0
        for saved, saved_indices, full in zip(groups, indices, self.param_groups):
            local = []
            for saved_index, p in zip(saved_indices, full["params"]):
                if self._owner[id(p)] != self.rank:
                    continue
                entry = state.get(saved_index)
                if entry is not None:
                    local_state[local_index] = entry
                local.append(local_index)
                local_index += 1
            local_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": local})
        self.optim.load_state_dict({"state": local_state, "param_groups": local_groups})
        self._adopt_hyperparams()
        self._consolidated = None

    def _check_every_entry(self, name: str, indices: list[list[int]], state: dict) -> None:
        """Validate the whole state dict on every rank before any rank loads its part: indices
        unique and all listed, every entry fit for its parameter (the local optimizer's own
        checks: names, shapes, step). A rank checks the other ranks' entries too, so that every
        rank accepts or refuses the same file."""
        listed = [i for group in indices for i in group]
        repeated = sorted(i for i, n in collections.Counter(listed).items() if n > 1)
        if repeated:
            raise EngineError(f"{name}: the state dict lists parameter indices {repeated} more than once; each "
                              "parameter has one index")
        unknown = sorted(set(state) - set(listed))
        if unknown:
            raise EngineError(f"{name}: the state dict has state for parameter indices {unknown} that no param "
                              "group lists")
        allowed = set(self.optim._all_buffer_names())
        for index, p in zip(listed, self._params()):
            self.optim._restore_entry(name, index, state.get(index), p, allowed)

    def __repr__(self) -> str:
        return (f"ZeroRedundancyOptimizer(rank {self.rank} of {self.world_size}, "
                f"{len(self._rank_params(self.rank))} of {len(self._params())} parameters here, "
                f"optimizer_class={self.optimizer_class.__name__}, {self.defaults})")


# ---- helpers ------------------------------------------------------------------------------------

def _summary(meta) -> str:
    count = sum(len(g) for g in meta)
    return f"{count} parameters in {len(meta)} group(s): {[s for g in meta for s, _ in g][:6]}..."


def _by_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    groups: dict = {}
    for p in params:
        groups.setdefault(np.dtype(p.dtype), []).append(p)
    return list(groups.values())


def _broadcast_flat(group, arrays, total: int, dtype, device, src: int):
    """Broadcast the concatenation of ``arrays`` (given on ``src`` only; ``total`` elements of
    ``dtype`` on ``device``) and return it as one flat array on every rank."""
    xp = backend.xp_for(device)
    with backend.on_device(device):
        if arrays is not None:
            flat = xp.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) != 1 else \
                xp.array(arrays[0].reshape(-1), copy=True)
        else:
            flat = xp.empty(total, dtype=dtype)
    if group.size > 1:
        group.broadcast(flat, src)
    return flat


def _unpack_into(flat, params: list[Tensor]) -> None:
    start = 0
    for p in params:
        n = p.numel()
        p._data[...] = flat[start:start + n].reshape(p.shape)
        p._version.value += 1  # an in-place update, as the owner's optimizer step is
        start += n


def _broadcast_state(group, entries: dict | None, src: int, keep: bool, device) -> dict:
    """Rank ``src``'s optimizer state entries {global index: {"step": n, name: Tensor}} on every
    rank (returned where ``keep``): the layout pickled over MPI, the arrays broadcast flat, one
    broadcast per dtype, received on ``device`` (this rank's parameters' device)."""
    layout = None
    if entries is not None:
        layout = {i: {k: ("array", tuple(v.shape), str(v.dtype)) if isinstance(v, Tensor) else ("value", v)
                      for k, v in entry.items()} for i, entry in entries.items()}
    if group.size > 1:
        layout = group.bcast_object(layout, src, "ZeroRedundancyOptimizer.consolidate_state_dict")
    out = {i: {k: spec[1] for k, spec in entry.items() if spec[0] == "value"} for i, entry in layout.items()}
    by_dtype: dict = {}
    for i, entry in sorted(layout.items()):
        for k, spec in entry.items():
            if spec[0] == "array":
                by_dtype.setdefault(spec[2], []).append((i, k, spec[1]))
    for dtype, slots in by_dtype.items():
        sizes = [int(np.prod(shape)) for _, _, shape in slots]
        arrays = [entries[i][k]._data for i, k, _ in slots] if entries is not None else None
        flat = _broadcast_flat(group, arrays, sum(sizes), np.dtype(dtype), device, src)
        if keep:
            start = 0
            for (i, k, shape), n in zip(slots, sizes):
                out[i][k] = Tensor._from_op(flat[start:start + n].reshape(shape).copy(), None)
                start += n
    return out if keep else {}

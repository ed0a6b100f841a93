"""Parallel training wrappers: DistributedDataParallel (data parallelism over engine.distributed), and
DataParallel as PyTorch runs it on one device.

DistributedDataParallel (DDP) keeps one replica of the model per rank. At construction it checks
that every rank built the same parameters (names, shapes, dtypes) and copies rank 0's parameters
and buffers to all ranks. During ``backward()`` it averages the gradients over the ranks, in
buckets of about ``bucket_cap_mb`` each, launching a bucket's non-blocking all-reduce as soon as
the last gradient in it is final (a post-accumulate-grad hook; backward makes a parameter's
gradient final right after the last op that reads it has run backward), so the communication of
the later layers' buckets overlaps the backward of the earlier layers. A callback queued on the
running backward waits for every bucket and writes the averages into ``.grad`` before
``backward()`` returns, so the optimizer step that follows sees averaged gradients.

Buckets are filled in reverse parameter order (roughly the order gradients become final) and are
launched strictly in index order on every rank: MPI and NCCL match collectives by order, so a
rank that happens to finish bucket 2 before bucket 1 waits for bucket 1 to be complete before
launching either.

Unused parameters: at the end of a synchronized backward, one small all-reduce on the host (over
MPI, also under NCCL: no device sync) sums one flag per parameter (1 where its gradient hook ran on
this rank since the last synchronized backward), so every rank knows how many ranks used each. A
parameter no rank used keeps its ``.grad`` (None stays None) with ``find_unused_parameters=True``;
without it, backward raises on every rank, naming the parameters (as PyTorch's DDP raises at the
next iteration).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from engine import autograd
from engine.autograd import no_grad
from engine.distributed import core as dist
from engine.distributed.core import DistributedError
from engine.errors import ShapeError
from engine.nn.module import Module
from engine.tensor import Tensor


class _Bucket:
    __slots__ = ("params", "offsets", "numel", "flat", "ready", "work")

    def __init__(self, params: list):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.flat = None
        self.ready: set = set()
        self.work = None


class DistributedDataParallel(Module):
    """Data-parallel training of ``module`` on every rank of the process group (PyTorch's DDP).

    Args:
        module: the model; every rank must build the same parameters (checked here).
        bucket_cap_mb: the size of a gradient bucket (one all-reduce each), in MiB.
        broadcast_buffers: copy rank 0's buffers (BatchNorm statistics) to every rank at the start
            of each forward in training mode.
        find_unused_parameters: allow parameters that take no part in the loss on some or all
            ranks. A parameter used by some ranks gets the average over all ranks (the others
            contribute zeros); one used by no rank keeps its ``.grad`` (None stays None, so weight
            decay does not move it). Without it (the default, as in PyTorch) a parameter without a
            gradient on any rank makes backward raise on every rank, naming it.

    ``forward`` calls the wrapped module; ``.module`` is the module itself (save its
    ``state_dict()`` to load it without DDP; DDP's own keys carry the ``module.`` prefix, as in
    PyTorch). Inside ``with ddp.no_sync():`` backward only accumulates local gradients; the first
    backward after it averages the accumulated sum.

    Example:
        >>> dist.init_process_group()                                # doctest: +SKIP
        >>> model = DistributedDataParallel(Net())
        >>> loss_fn(model(x), y).backward()                         # gradients averaged over ranks
        >>> optimizer.step()
    """

    def __init__(self, module: Module, device_ids=None, output_device=None, dim: int = 0,
                 broadcast_buffers: bool = True, bucket_cap_mb: float = 25, find_unused_parameters: bool = False,
                 **_ignored):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel: expected an engine.nn.Module, got {type(module).__name__}")
        group = dist.group()
        self.module = module
        object.__setattr__(self, "broadcast_buffers", bool(broadcast_buffers))
        object.__setattr__(self, "bucket_cap_mb", float(bucket_cap_mb))
        object.__setattr__(self, "_pg", group)
        object.__setattr__(self, "_require_sync", True)
        object.__setattr__(self, "find_unused_parameters", bool(find_unused_parameters))
        named, seen = [], set()
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        object.__setattr__(self, "_params", [p for _, p in named])
        object.__setattr__(self, "_names", {id(p): name for name, p in named})
        object.__setattr__(self, "_used", set())  # ids of parameters whose hook ran since the last sync
        _check_same_model(group, module, named)
        self._sync_module_states()
        buckets = _make_buckets(self._params, int(self.bucket_cap_mb * 2 ** 20))
        object.__setattr__(self, "_buckets", buckets)
        object.__setattr__(self, "_bucket_of", {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)})
        object.__setattr__(self, "_next", 0)  # the next bucket to launch this backward
        object.__setattr__(self, "_armed", False)  # a finishing callback is queued on this backward
        # buckets launched from a gradient hook (overlapping backward) and from the final callback
        object.__setattr__(self, "stats", {"buckets": len(buckets), "launched_in_backward": 0, "launched_at_end": 0})
        ref = weakref.ref(self)

        def ready(param, ref=ref):
            ddp = ref()
            if ddp is not None:
                ddp._grad_ready(param)
        object.__setattr__(self, "_handles", [p.register_post_accumulate_grad_hook(ready) for p in self._params])

    def __del__(self):
        for handle in getattr(self, "_handles", ()):
            handle.remove()

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        dist.check_alive(self._pg, "DistributedDataParallel")
        if self.broadcast_buffers and self.training and self._pg.size > 1:
            buffers = [b for _, b in self.module.named_buffers()]
            if buffers:
                _broadcast_coalesced(self._pg, buffers)
        self._reset_pass()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside this block accumulates local gradients without communicating."""
        previous = self._require_sync
        object.__setattr__(self, "_require_sync", False)
        try:
            yield
        finally:
            object.__setattr__(self, "_require_sync", previous)

    # ---- construction ---------------------------------------------------------------------------
    def _sync_module_states(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (one broadcast per dtype and device)."""
        if self._pg.size == 1:
            return
        tensors = [p for _, p in self.module.named_parameters()] + [b for _, b in self.module.named_buffers()]
        _broadcast_coalesced(self._pg, tensors)

    # ---- backward -------------------------------------------------------------------------------
    def _reset_pass(self) -> None:
        for b in self._buckets:
            b.ready.clear()
            b.work = None
        object.__setattr__(self, "_next", 0)
        object.__setattr__(self, "_armed", False)

    def _grad_ready(self, param) -> None:
        self._used.add(id(param))  # also inside no_sync: the gradient goes into the next sync
        if not self._require_sync:
            return
        dist.check_alive(self._pg, "DistributedDataParallel (backward)")
        if not self._armed:
            object.__setattr__(self, "_armed", True)
            autograd.queue_callback(self._finish)
        bucket, index = self._bucket_of[id(param)]
        bucket.ready.add(index)
        for b in self._buckets[:self._next]:  # drive MPI's progress on the buckets in flight
            if b.work is not None:
                b.work.test()
        while self._next < len(self._buckets) and len(self._buckets[self._next].ready) == \
                len(self._buckets[self._next].params):
            self._launch(self._buckets[self._next])
            object.__setattr__(self, "_next", self._next + 1)
            self.stats["launched_in_backward"] += 1

    def _launch(self, bucket: _Bucket) -> None:
        first = bucket.params[0]
        if bucket.flat is None:
            bucket.flat = first.xp.empty(bucket.numel, dtype=first.dtype)
        flat = bucket.flat
        for p, offset in zip(bucket.params, bucket.offsets):
            n = p.numel()
            if p.grad is None:
                flat[offset:offset + n] = 0  # unused on this rank: contributes nothing
            else:
                flat[offset:offset + n] = p.grad._data.reshape(-1)
        bucket.work = self._pg.all_reduce_async(flat, "avg")

    def _finish(self) -> None:
        """At the end of backward: launch what is left (in order), wait for all, write the averages."""
        try:
            while self._next < len(self._buckets):
                self._launch(self._buckets[self._next])
                object.__setattr__(self, "_next", self._next + 1)
                self.stats["launched_at_end"] += 1
            counting = self._count_users()  # after every bucket: the same collective order on every rank
            for bucket in self._buckets:
                bucket.work.wait()
            users = counting()
            if not self.find_unused_parameters and any(n < self._pg.size for n in users.values()):
                raise self._unused_error(users)
            with no_grad():
                for bucket in self._buckets:
                    for p, offset in zip(bucket.params, bucket.offsets):
                        if users[id(p)] == 0:
                            continue  # no rank used it: .grad stays as it was (None stays None)
                        averaged = bucket.flat[offset:offset + p.numel()].reshape(p.shape)
                        if p.grad is None:
                            p.grad = Tensor(averaged.copy())
                        else:
                            p.grad._data[...] = averaged
                            p.grad._version.value += 1
        finally:
            self._used.clear()
            self._reset_pass()

    def _count_users(self):
        """Start summing the ranks' usage flags; returns a function giving {id(param): ranks that used it}."""
        flags = np.array([id(p) in self._used for p in self._params], np.int32)
        work = self._pg.all_reduce_host_async(flags, "sum") if self._pg.size > 1 else None

        def users() -> dict:
            if work is not None:
                work.wait()
            return {id(p): int(n) for p, n in zip(self._params, flags)}
        return users

    def _unused_error(self, users: dict) -> DistributedError:
        unused = [self._names[id(p)] for p in self._params if users[id(p)] < self._pg.size]
        here = [self._names[id(p)] for p in self._params if id(p) not in self._used]
        return DistributedError(
            f"DistributedDataParallel: parameters that took no part in producing the loss on some rank(s): "
            f"{', '.join(unused)} (on this rank {self._pg.rank}: {', '.join(here) or 'none'}). Pass "
            "find_unused_parameters=True to DistributedDataParallel to allow it (a parameter no rank used then "
            "keeps its .grad; one some ranks used gets the average over all ranks), and make sure every output "
            "of forward takes part in the loss. The gradients were not averaged.")


def _make_buckets(params: list, cap_bytes: int) -> list:
    """Consecutive runs of ``params`` in reverse order, each of one dtype and device and at most
    ``cap_bytes`` (a parameter larger than the cap gets a bucket of its own)."""
    buckets, current, size = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap_bytes or p.dtype != current[0].dtype or p.device != current[0].device):
            buckets.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(_Bucket(current))
    return buckets


def _broadcast_coalesced(group, tensors: list, src: int = 0) -> None:
    """Broadcast ``tensors`` from ``src`` with one collective per (device, dtype), in place."""
    runs: dict = {}
    for t in tensors:
        runs.setdefault((str(t.device), str(t.dtype)), []).append(t)
    with no_grad():
        for run in runs.values():
            xp = run[0].xp
            flat = xp.concatenate([t._data.reshape(-1) for t in run])
            group.broadcast(flat, src)
            offset = 0
            for t in run:
                n = t.numel()
                t._data[...] = flat[offset:offset + n].reshape(t.shape)
                t._version.value += 1
                offset += n


def _check_same_model(group, module: Module, named: list) -> None:
    """Raise (on every rank) when the ranks' models differ in parameter names, shapes or dtypes."""
    if group.size == 1:
        return
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in named]
    mine += [("buffer " + name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]
    everyone = group.allgather_object(mine, "DistributedDataParallel")
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        if theirs == reference:
            continue
        for a, b in zip(reference, theirs):
            if a != b:
                raise ShapeError(f"DistributedDataParallel: the ranks built different models: rank 0 has {a[0]} "
                                 f"{a[1]} {a[2]}, rank {rank} has {b[0]} {b[1]} {b[2]} (this is rank {group.rank}); "
                                 "every rank must construct the same model")
        raise ShapeError(f"DistributedDataParallel: the ranks built different models: rank 0 has "
                         f"{len(reference)} parameters and buffers, rank {rank} has {len(theirs)} (this is rank "
                         f"{group.rank}); every rank must construct the same model")


DDP = DistributedDataParallel

# Tensor parallelism (Megatron's split) lives beside the process group; nn.parallel is where users look.
from engine.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402,F401


class DataParallel(Module):
    """PyTorch's ``nn.DataParallel`` on one device: ``forward`` calls the wrapped module on the inputs
    as they are, which is what PyTorch does without CUDA or with one GPU. Parameters and the state
    dict are the module's under ``module.`` (``model.module.fc.weight``), as in PyTorch.

    Splitting a batch over several GPUs in one process is not done: with several ``device_ids``
    the module still runs on the first device only (same results, one GPU's speed), with a
    warning; use :class:`DistributedDataParallel` to train on several devices.

    Args:
        module: the module to wrap.
        device_ids: CUDA device indices (or devices); default all visible ones, none on a CPU machine.
        output_device: accepted for PyTorch compatibility (outputs stay where the module puts them).
        dim: the batch dim PyTorch would scatter along (kept as an attribute).
    """

    def __init__(self, module: Module, device_ids=None, output_device=None, dim: int = 0):
        super().__init__()
        from engine import backend

        if not isinstance(module, Module):
            raise TypeError(f"DataParallel: expected a Module, got {type(module).__name__}")
        self.module, self.dim = module, dim
        if device_ids is None:
            device_ids = list(range(backend.cuda_device_count()))
        self.device_ids = [d if isinstance(d, int) else backend.device(d).index for d in device_ids]
        self.output_device = output_device if output_device is not None else (self.device_ids[0] if self.device_ids
                                                                               else None)
        if len(set(self.device_ids)) > 1:
            import warnings

            warnings.warn(f"DataParallel runs the module on cuda:{self.device_ids[0]} only (the engine does not split a "
                          "batch over GPUs in one process); use DistributedDataParallel for several devices",
                          UserWarning, stacklevel=2)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

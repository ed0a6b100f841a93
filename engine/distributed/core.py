"""The process group and the collectives on engine Tensors (PyTorch's ``torch.distributed`` names).

One process group per process, the world: ranks and world size come from the MPI launcher
(``mpiexec -n 4 python train.py``) through mpi4py; a script started without a launcher is a
world of one. Two backends:

- ``"mpi"``: mpi4py's non-blocking buffer collectives (Iallreduce, Ibcast, Iallgather,
  Ireduce_scatter_block) on numpy arrays; cupy arrays go through a host staging copy unless the MPI is CUDA-aware.
- ``"nccl"``: ``cupy.cuda.nccl`` on CUDA tensors, one rank per GPU; MPI only launches the
  processes and carries NCCL's unique id.

Collectives change tensors in place, as PyTorch's do: they write into the tensor's array and bump
its version, and like every in-place op they refuse a tensor that requires grad while grad mode
is on (run them under ``engine.no_grad()`` or on ``.detach()``).

A rank that leaves while the others wait for it ends the job, whatever the way it leaves (an
exception, KeyboardInterrupt, sys.exit with any status, the end of its script): see
engine/distributed/faults.py. Before any data moves, every public collective checks that the
ranks make the same call (see ``_agree``).
"""

from __future__ import annotations

import enum
import importlib.util

import numpy as np

from engine import kernels
from engine import backend
from engine.autograd import is_grad_enabled
from engine.distributed import faults
from engine.errors import DTypeError, EngineError, GradError, ShapeError, describe, install_hint
from engine.tensor import Tensor


class DistributedError(EngineError):
    """Misuse of engine.distributed: no process group, a second init, a bad rank or list."""


class ReduceOp(enum.Enum):
    """How ``all_reduce`` and ``reduce_scatter`` combine the ranks' values."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"

    def __repr__(self) -> str:
        return f"ReduceOp.{self.name}"


class _State:
    group = None  # the backend's process group object (MPIGroup / NCCLGroup)


_state = _State()


# ---- the process group ------------------------------------------------------------------------

def is_available() -> bool:
    """True when mpi4py is installed (the MPI backend can start)."""
    return importlib.util.find_spec("mpi4py") is not None


def is_mpi_available() -> bool:
    return is_available()


def is_nccl_available() -> bool:
    """True when mpi4py is installed and cupy with NCCL answers on a CUDA device."""
    if not is_available() or backend.cuda_device_count() == 0:
        return False
    try:
        from engine.distributed import nccl

        return nccl.available()
    except Exception:  # noqa: BLE001 - a broken cupy or NCCL library means no NCCL backend here
        return False


def is_initialized() -> bool:
    return _state.group is not None


def init_process_group(backend: str | None = None, *, world_size: int = -1, rank: int = -1, **rendezvous) -> None:
    """Join the world the MPI launcher started; ``backend`` is "mpi", "gloo", "nccl", or None (nccl
    when the default device is CUDA, else mpi). Raises when a process group already exists.

    "gloo" is PyTorch's CPU backend: here it is the MPI backend under that name (``get_backend()``
    answers "gloo"), so scripts written for ``init_process_group("gloo")`` run under mpiexec.

    PyTorch's rendezvous arguments (``init_method``, ``store``, ``timeout`` ...) are accepted and
    unused: MPI's launcher has already placed every process. A ``world_size`` or ``rank`` given
    must agree with the launcher's, else the script expects another world than it runs in: that
    raises rather than training on a wrong shard.
    """
    from engine import backend as engine_backend

    if _state.group is not None:
        raise DistributedError("init_process_group: the process group is already initialized; call "
                               "destroy_process_group() first to start a new one")
    if backend is None:
        backend = "nccl" if engine_backend.default_device().type == "cuda" else "mpi"
    backend = str(backend).lower()
    if backend not in ("mpi", "gloo", "nccl"):
        raise DistributedError(f"init_process_group: unknown backend {backend!r}; use 'mpi' or 'gloo' (CPU "
                               "tensors, or cupy through the host) or 'nccl' (CUDA tensors)")
    if not is_available():
        raise DistributedError("init_process_group: mpi4py is not installed; "
                               f"{install_hint('distributed', 'mpi4py mpich')} (the mpich wheel brings mpiexec)")
    from mpi4py import MPI

    if backend == "nccl":
        from engine.distributed.nccl import NCCLGroup

        _state.group = NCCLGroup(MPI.COMM_WORLD)
    else:
        from engine.distributed.mpi import MPIGroup

        _state.group = MPIGroup()
        _state.group.name = backend  # get_backend() answers what was asked for ("gloo" runs on MPI)
    faults.group_started()
    for name, asked, actual in (("world_size", world_size, _state.group.size), ("rank", rank, _state.group.rank)):
        if asked not in (-1, None) and int(asked) != actual:
            group, _state.group = _state.group, None
            faults.group_destroyed()
            group.destroy()
            raise DistributedError(f"init_process_group: {name}={asked} was asked for, but the launcher started "
                                   f"this process as {name} {actual}; launch with mpiexec -n <world_size>, or "
                                   "drop the argument")
    _share_cpu_threads(MPI)


def _share_cpu_threads(MPI) -> None:
    """Split the process's CPUs (affinity and cgroup quota) between the node's ranks, for numba's
    parallel kernels (unless the user set NUMBA_NUM_THREADS) and for the BLAS behind numpy's matmuls
    (unless OPENBLAS_NUM_THREADS / MKL_NUM_THREADS is set), through the engine's one owner of the
    CPU threads (engine/kernels/threads.py): N ranks each
    running all-core kernels on one machine oversubscribe it, and OpenBLAS's waiting threads spin,
    so a step can take several times as long. A rank waiting in MPI polls a core too."""
    try:
        shared = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local_size = shared.Get_size()
        shared.Free()
    except Exception:  # noqa: BLE001 - an MPI without shared-memory split types: no per-node thread split
        return
    if local_size < 2:
        return
    from engine.kernels import threads

    threads.apply_default(max(1, threads.available_cpus() // local_size))


def destroy_process_group() -> None:
    """Leave the process group (MPI itself stays up until the process exits)."""
    group = _group("destroy_process_group")
    _state.group = None
    group.destroyed = True  # DDP, ZeRO and the parallel layers built on it refuse to use it now
    faults.group_destroyed()
    group.destroy()


def get_rank() -> int:
    return _group("get_rank").rank


def get_world_size() -> int:
    return _group("get_world_size").size


def get_backend() -> str:
    return _group("get_backend").name


def get_local_rank() -> int:
    """The rank among the processes on this node (the GPU a rank uses under nccl)."""
    group = _group("get_local_rank")
    local = getattr(group, "local_rank", None)
    if local is None:
        from mpi4py import MPI

        shared = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local = group.local_rank = shared.Get_rank()
        shared.Free()
    return local


def _group(op: str):
    if _state.group is None:
        raise DistributedError(f"{op}: the default process group is not initialized; call "
                               "engine.distributed.init_process_group() first (and launch with mpiexec)")
    return _state.group


def group():
    """The backend's process group object (for engine internals: DDP, ZeRO, tensor parallel)."""
    return _group("group")


def check_alive(group, who: str) -> None:
    """Raise when ``group`` (the process group DDP, ZeRO or a parallel layer was built on) has been
    destroyed: its collectives would still reach MPI and pair with whatever the other ranks do."""
    if getattr(group, "destroyed", False):
        raise DistributedError(f"{who}: the process group it was built on has been destroyed "
                               "(destroy_process_group()); build it again after init_process_group()")


# ---- what every rank must agree on before a collective -----------------------------------------
#
# A collective pairs the ranks' calls by order alone. Before any data moves, every public
# collective exchanges a small description of the call (one pickled allgather): which collective
# it is and its place in the sequence, its reduce op or source rank, the tensor's shape and dtype,
# and whether this rank could take part at all (its own argument checks, and the device checks
# deferred on it, which would otherwise raise inside the collective on that rank alone). Any
# difference raises the same error on every rank, so none is left waiting.

def _agree(g, op: str, describe_call) -> dict:
    """Run ``describe_call()`` (this rank's checks; returns the call's description), settle the
    deferred device checks, compare with every rank, and raise on every rank on a difference."""
    g.calls = getattr(g, "calls", 0) + 1
    error, call = None, None
    try:
        call = describe_call()
        kernels.raise_deferred_errors()
    except Exception as e:  # noqa: BLE001 - raised below, on every rank, once all have heard of it
        error = e
    mine = {"collective": (g.calls, op), "error": f"{type(error).__name__}: {error}" if error else None,
            **(call or {})}
    everyone = [mine] if g.size == 1 else g.allgather_object(mine, op)
    failed = [(r, c["error"]) for r, c in enumerate(everyone) if c["error"]]
    if error is not None:
        raise error
    if failed:
        reports = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise DistributedError(f"{op}: {_ranks(failed)} could not take part ({reports}); no rank entered the "
                               f"collective (this is rank {g.rank})")
    for key, kind in (("collective", DistributedError), ("reduce op", DistributedError),
                      ("src", DistributedError), ("shape", ShapeError), ("dtype", DTypeError)):
        values = [c.get(key) for c in everyone]
        if any(v != values[0] for v in values):
            ranks = ", ".join(f"rank {r} {_show(key, v)}" for r, v in enumerate(values))
            raise kind(f"{op}: the ranks {_DIFFERENT[key]} ({ranks}); every rank must make the same collective "
                       f"calls, in the same order, with the same arguments (this is rank {g.rank})")
    return mine


_DIFFERENT = {"collective": "called different collectives", "reduce op": "passed different reduce ops",
              "src": "passed different src ranks", "shape": "passed tensors of different shapes",
              "dtype": "passed tensors of different dtypes"}


def _ranks(failed) -> str:
    return "rank " + str(failed[0][0]) if len(failed) == 1 else "ranks " + ", ".join(str(r) for r, _ in failed)


def _show(key: str, value) -> str:
    if key == "collective":
        return f"calls {value[1]} (its collective #{value[0]})"
    return f"has {key} {value}"


def _op_name(op) -> str:
    if isinstance(op, ReduceOp):
        return op.value
    if isinstance(op, str) and op.lower() in ("sum", "avg", "max", "min"):
        return op.lower()
    raise DistributedError(f"unknown reduce op {op!r}; use ReduceOp.SUM, AVG, MAX or MIN")


def _check_reduction(op: str, reduce_op: str, dtype) -> None:
    """The reductions take every numeric dtype, exactly: bool (SUM and MAX are a logical or, MIN a
    logical and, as in PyTorch), the integers, float16/bfloat16/float32/float64 and complex64/128.
    Raise where the result could not be exact: MAX or MIN of complex numbers (PyTorch refuses them
    too) and AVG of integers or bools."""
    dt = np.dtype(dtype)
    name = f"ReduceOp.{reduce_op.upper()}"
    if dt.kind not in "biufc" and dt.name != "bfloat16":
        raise DTypeError(f"{op}: cannot reduce {dt} tensors; use a numeric dtype")
    if dt.kind == "c" and reduce_op in ("max", "min"):
        raise DTypeError(f"{op} does not support {name} on complex tensors ({dt}): complex numbers have no order "
                         "(PyTorch refuses it too); reduce the real and imaginary parts, or abs(), as you mean it")
    if dt.kind in "biu" and reduce_op == "avg":
        raise DTypeError(f"{op}: {name} of {dt} tensors would have to round; use ReduceOp.SUM and divide, or "
                         "convert the tensor to a floating dtype first")


def _check_tensor(op: str, tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{op}: expected an engine Tensor, got {type(tensor).__name__}")
    if is_grad_enabled() and tensor.requires_grad:
        raise GradError(f"{op}: in-place collective on {describe(tensor)}, which requires grad; run it under "
                        "engine.no_grad() (as DDP and optimizers do) or on tensor.detach()")
    tensor._check_inplace(op)


def _meta(tensor) -> dict:
    return {"shape": tuple(tensor.shape), "dtype": str(tensor.dtype)}


def _finish(tensor) -> None:
    tensor._version.value += 1


class Work:
    """What a collective returns with ``async_op=True``: ``wait()`` completes it."""

    def __init__(self, inner, tensor):
        self._inner, self._tensor = inner, tensor

    def wait(self) -> bool:
        if self._inner is not None:
            self._inner.wait()
            self._inner = None
            _finish(self._tensor)
        return True

    def is_completed(self) -> bool:
        return self._inner is None or self._inner.test()


def all_reduce(tensor: Tensor, op=ReduceOp.SUM, group=None, async_op: bool = False):
    """Combine ``tensor`` over all ranks (sum, average, max or min), in place on every rank."""
    g = _group("all_reduce")

    def describe_call():
        _check_tensor("all_reduce", tensor)
        name = _op_name(op)
        _check_reduction("all_reduce", name, tensor.dtype)
        return {"reduce op": name, **_meta(tensor)}
    name = _agree(g, "all_reduce", describe_call)["reduce op"]
    if async_op:
        return Work(g.all_reduce_async(tensor._data, name), tensor)
    g.all_reduce(tensor._data, name)
    _finish(tensor)
    return None


def broadcast(tensor: Tensor, src: int, group=None, async_op: bool = False):
    """Copy rank ``src``'s ``tensor`` into ``tensor`` on every other rank."""
    g = _group("broadcast")

    def describe_call():
        _check_tensor("broadcast", tensor)
        _check_rank(g, "broadcast", src)
        return {"src": int(src), **_meta(tensor)}
    _agree(g, "broadcast", describe_call)
    g.broadcast(tensor._data, int(src))
    _finish(tensor)
    return Work(None, tensor) if async_op else None


def all_gather(tensor_list: list, tensor: Tensor, group=None, async_op: bool = False):
    """Fill ``tensor_list[r]`` with rank r's ``tensor`` on every rank (a list of world-size tensors)."""
    g = _group("all_gather")

    def describe_call():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"all_gather: expected an engine Tensor to send, got {type(tensor).__name__}")
        _check_list(g, "all_gather", "tensor_list", tensor_list, tensor)
        return _meta(tensor)
    _agree(g, "all_gather", describe_call)
    gathered = g.all_gather(tensor._data)
    for r, out in enumerate(tensor_list):
        out._data[...] = gathered[r]
        _finish(out)
    return Work(None, tensor) if async_op else None


def reduce_scatter(output: Tensor, input_list: list, op=ReduceOp.SUM, group=None, async_op: bool = False):
    """``output`` on rank r = the reduction over all ranks of their ``input_list[r]``."""
    g = _group("reduce_scatter")

    def describe_call():
        _check_tensor("reduce_scatter", output)
        name = _op_name(op)
        _check_list(g, "reduce_scatter", "input_list", input_list, output, written=False)
        _check_reduction("reduce_scatter", name, output.dtype)
        return {"reduce op": name, **_meta(output)}
    name = _agree(g, "reduce_scatter", describe_call)["reduce op"]
    xp = output.xp
    stacked = xp.stack([t._data for t in input_list])
    g.reduce_scatter(output._data, stacked, name)
    _finish(output)
    return Work(None, output) if async_op else None


def barrier(group=None, async_op: bool = False):
    """Wait until every rank reaches this call."""
    g = _group("barrier")
    _agree(g, "barrier", dict)
    g.barrier()
    return None


def _check_rank(group, op: str, rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < group.size:
        raise DistributedError(f"{op}: src rank {rank!r} is not in the world of {group.size} rank(s)")


def _check_list(group, op: str, name: str, tensors, like: Tensor, written: bool = True) -> None:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != group.size:
        n = len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__
        raise DistributedError(f"{op}: {name} must be a list of world-size ({group.size}) tensors, got {n}")
    for r, t in enumerate(tensors):
        if written:
            _check_tensor(op, t)
        elif not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{r}] is a {type(t).__name__}, not an engine Tensor")
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            raise ShapeError(f"{op}: {name}[{r}] is {describe(t)} but the tensor is {describe(like)}; every entry "
                             "must have its shape, dtype and device (rank "
                             f"{group.rank})")

"""The MPI process group: collectives through mpi4py's buffer interface (no pickling).

numpy arrays go to MPI as they are (a C-contiguous staging copy where the array is a strided
view). cupy arrays go directly when mpi4py reports a CUDA-aware MPI, otherwise through a host
staging copy (device -> host, the collective, host -> device). Reductions go over the wire in a
dtype MPI reduces (:func:`wire_dtype`); broadcast and all-gather move raw bytes, so they take any
dtype.

Every collective is started non-blocking and waited for with ``faults.wait``, which ends the job
when a peer exits while this rank waits for it (a blocking MPI call would wait forever).
"""

from __future__ import annotations

import pickle

import numpy as np

from engine import backend
from engine.distributed import faults
from engine.dtypes import is_floating
from engine.errors import DTypeError

# numpy dtypes MPI reduces natively (mpi4py maps the typecode to the MPI datatype); complex ones
# for SUM only (MPI defines no MAX or MIN on them).
_NATIVE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                 np.uint8, np.uint16, np.uint32, np.uint64, np.complex64, np.complex128)}


def _mpi():
    from mpi4py import MPI

    return MPI


def cuda_aware() -> bool:
    """Whether the MPI library under mpi4py takes device pointers (MPIX_Query_cuda_support)."""
    query = getattr(_mpi(), "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # noqa: BLE001 - an MPI without the MPIX extension
        return False


def wire_dtype(dtype) -> np.dtype:
    """The dtype a reduction of ``dtype`` travels in: itself where MPI reduces it, float32 for the
    half floats (float16, bfloat16: MPI has no standard half type; one rounding at the end), uint8
    for bool (reduced with MAX or MIN, see :func:`mpi_op`)."""
    dtype = np.dtype(dtype)
    if dtype in _NATIVE:
        return dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return np.dtype(np.float32)
    raise DTypeError(f"the mpi backend cannot reduce {dtype} tensors")


def mpi_op(op: str, dtype):
    """The MPI operation for ``op`` on ``dtype``: bool's SUM is a logical or (as in PyTorch), so
    MAX on its uint8 wire values (a SUM of 0/1 bytes would wrap at 256 ranks)."""
    MPI = _mpi()
    if np.dtype(dtype) == np.bool_:
        return MPI.MIN if op == "min" else MPI.MAX
    return {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


class MPIWork:
    """A pending non-blocking collective; ``wait()`` completes it and runs its finishing step."""

    def __init__(self, request, finish=None, op: str = "all_reduce"):
        self.request, self.finish, self.op = request, finish, op
        self.number = faults.started()  # made right after the request started: its place in the order

    def test(self) -> bool:
        """Drive MPI's progress engine; True once the operation has completed."""
        if self.request is None:
            return True
        done = self.request.Test()
        return bool(done)

    def wait(self) -> None:
        if self.request is not None:
            faults.wait(self.request, self.op, self.number)
            self.request = None
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()

    def is_completed(self) -> bool:
        return self.test()


class MPIGroup:
    """The world communicator, driven with uppercase (buffer) mpi4py calls."""

    name = "mpi"

    def __init__(self):
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._cuda_aware = None

    # ---- staging --------------------------------------------------------------------------------
    def _on_host(self, array) -> bool:
        if isinstance(array, np.ndarray):
            return True
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return not self._cuda_aware

    def _stage(self, array, dtype=None):
        """(the buffer MPI reads and writes, a function that writes it back into ``array``).

        ``dtype``: the wire dtype of a reduction (None: the bytes move as they are). The buffer is
        ``array`` itself where MPI can use it, else a C-contiguous copy: on the host when the MPI is
        not CUDA-aware, else on the device, and then the device is synchronized after that copy was
        queued, so that MPI never reads a buffer a kernel is still writing.
        """
        staged = array
        if not isinstance(array, np.ndarray) and self._on_host(array):
            staged = _copy_to_host(array)
        if dtype is not None and staged.dtype != dtype:
            staged = staged.astype(dtype, order="C")
        elif not staged.flags.c_contiguous:
            staged = backend.array_module(staged).ascontiguousarray(staged)
        if not isinstance(staged, np.ndarray):
            _wait_for_device(staged)  # device pointers: every kernel writing ``staged`` first
        if staged is array:
            return staged, lambda: None

        def write_back():
            if isinstance(array, np.ndarray):
                array[...] = staged
            else:
                array[...] = backend.array_module(array).asarray(staged).astype(array.dtype, copy=False)
        return staged, write_back

    @staticmethod
    def _bytes(array):
        """A raw-byte view of a contiguous array (for dtype-agnostic copies)."""
        return array.reshape(-1).view(np.uint8)

    @staticmethod
    def _wait(request, op: str) -> None:
        MPIWork(request, None, op).wait()

    # ---- collectives ----------------------------------------------------------------------------
    def all_reduce(self, array, op: str) -> None:
        self.all_reduce_async(array, op).wait()

    def all_reduce_async(self, array, op: str) -> MPIWork:
        """Iallreduce in place; the work's ``wait()`` finishes it (and divides for avg)."""
        buf, write_back = self._stage(array, wire_dtype(array.dtype))
        request = self.comm.Iallreduce(_mpi().IN_PLACE, buf, op=mpi_op(op, array.dtype))

        def finish():
            if op == "avg":
                _divide(buf, self.size)
            write_back()
        return MPIWork(request, finish, "all_reduce")

    def all_reduce_host_async(self, array: np.ndarray, op: str) -> MPIWork:
        """An all-reduce of a small host array (DDP's usage flags), over MPI under either backend."""
        return self.all_reduce_async(array, op)

    def broadcast(self, array, src: int) -> None:
        buf, write_back = self._stage(array)
        self._wait(self.comm.Ibcast(self._bytes(buf), root=src), "broadcast")
        write_back()

    def all_gather(self, array):
        """Every rank's ``array`` stacked: shape (world, *array.shape), on ``array``'s device."""
        buf, _ = self._stage(array)
        out = np.empty((self.size, *buf.shape), buf.dtype) if isinstance(buf, np.ndarray) else \
            backend.array_module(buf).empty((self.size, *buf.shape), buf.dtype)
        self._wait(self.comm.Iallgather(self._bytes(buf), self._bytes(out)), "all_gather")
        if not isinstance(array, np.ndarray) and isinstance(out, np.ndarray):
            out = backend.array_module(array).asarray(out)
        return out

    def reduce_scatter(self, out, stacked, op: str) -> None:
        """``out`` = the reduction over ranks of ``stacked[rank]`` (stacked: (world, *out.shape))."""
        wire = wire_dtype(out.dtype)
        send, _ = self._stage(stacked, wire)
        recv, write_back = self._stage(out, wire)
        self._wait(self.comm.Ireduce_scatter_block(send, recv, op=mpi_op(op, out.dtype)), "reduce_scatter")
        if op == "avg":
            _divide(recv, self.size)
        write_back()

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")

    def allgather_object(self, obj, op: str) -> list:
        return allgather_object(self.comm, obj, op)

    def bcast_object(self, obj, root: int, op: str):
        return bcast_object(self.comm, obj, root, op)

    def destroy(self) -> None:
        pass  # COMM_WORLD lives until MPI finalizes at exit


# ---- small pickled messages, waited for like the collectives ---------------------------------

def allgather_object(comm, obj, op: str) -> list:
    """Every rank's ``obj`` (pickled), in rank order; ``op`` names the caller in a fault report."""
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.empty(comm.Get_size(), np.int64)
    MPIWork(comm.Iallgather(np.array([data.size], np.int64), sizes), None, op).wait()
    gathered = np.empty(int(sizes.sum()), np.uint8)
    MPIWork(comm.Iallgatherv(data, [gathered, sizes]), None, op).wait()
    ends = np.cumsum(sizes)
    return [pickle.loads(gathered[end - size:end].tobytes()) for size, end in zip(sizes, ends)]


def bcast_object(comm, obj, root: int, op: str):
    """Rank ``root``'s ``obj`` (pickled) on every rank."""
    data = np.frombuffer(pickle.dumps(obj), np.uint8) if comm.Get_rank() == root else None
    size = np.array([data.size if data is not None else 0], np.int64)
    MPIWork(comm.Ibcast(size, root=root), None, op).wait()
    buf = data.copy() if data is not None else np.empty(int(size[0]), np.uint8)
    MPIWork(comm.Ibcast(buf, root=root), None, op).wait()
    return pickle.loads(buf.tobytes())


# ---- device arrays -------------------------------------------------------------------------------

def _copy_to_host(array) -> np.ndarray:
    """A host copy of a device array that leaves deferred device checks queued (kernels.deferred):
    settled here, a failed check would raise on one rank in the middle of a collective that the
    others have entered, and they would wait for it forever. The public collectives settle them
    before they start, on every rank together (core._agree); DDP's and ZeRO's are left to the
    rank's next sync point, outside any collective."""
    return backend.array_module(array).asnumpy(array)


def _wait_for_device(array) -> None:
    """Wait for the kernels queued on ``array``'s device (without settling deferred checks, as
    above): MPI reads device memory directly, outside CUDA's stream order."""
    backend.array_module(array).cuda.Device(array.device.id).synchronize()


def _divide(array, n: int) -> None:
    if not (array.dtype.kind == "c" or is_floating(array.dtype)):
        raise DTypeError(f"ReduceOp.AVG of {array.dtype} values would round; use ReduceOp.SUM and divide")
    array /= n

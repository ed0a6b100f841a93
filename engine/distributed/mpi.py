"""The MPI process group: collectives through mpi4py's buffer interface (no pickling).

numpy arrays go to MPI as they are (a C-contiguous staging copy where the array is a strided
view). cupy arrays go directly when mpi4py reports a CUDA-aware MPI, otherwise through a host
staging copy (device -> host, the collective, host -> device). float16 is reduced through a
float32 copy (MPI has no standard half type); broadcast and all-gather move raw bytes, so they
take any dtype.
"""

from __future__ import annotations

import numpy as np

from engine import backend

# numpy dtypes MPI reduces natively (mpi4py maps the typecode to the MPI datatype).
_REDUCIBLE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                    np.uint8, np.uint16, np.uint32, np.uint64)}


def _mpi():
    from mpi4py import MPI

    return MPI


def cuda_aware() -> bool:
    """Whether the MPI library under mpi4py takes device pointers (MPIX_Query_cuda_support)."""
    query = getattr(_mpi(), "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # an MPI without the MPIX extension
        return False


class MPIWork:
    """A pending non-blocking collective; ``wait()`` completes it and runs its finishing step."""

    def __init__(self, request, finish=None):
        self.request, self.finish = request, finish

    def test(self) -> bool:
        """Drive MPI's progress engine; True once the operation has completed."""
        if self.request is None:
            return True
        done = self.request.Test()
        return bool(done)

    def wait(self) -> None:
        if self.request is not None:
            self.request.Wait()
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
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "avg": MPI.SUM}

    # ---- staging --------------------------------------------------------------------------------
    def _on_host(self, array) -> bool:
        if isinstance(array, np.ndarray):
            return True
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return not self._cuda_aware

    def _stage(self, array, reduce: bool):
        """(buffer MPI can use, a function that writes the buffer back into ``array``)."""
        staged = array
        if not isinstance(array, np.ndarray):
            if self._on_host(array):
                staged = backend.to_host(array)  # a fresh host copy
            else:
                backend.synchronize(backend.device_of(array))  # device pointers: queued kernels first
        if reduce and staged.dtype not in _REDUCIBLE:
            staged = staged.astype(np.float32 if staged.dtype.kind == "f" else np.int64)
        elif not staged.flags.c_contiguous:
            staged = backend.array_module(staged).ascontiguousarray(staged)
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

    # ---- collectives ----------------------------------------------------------------------------
    def all_reduce(self, array, op: str) -> None:
        buf, write_back = self._stage(array, reduce=True)
        self.comm.Allreduce(_mpi().IN_PLACE, buf, op=self._ops[op])
        if op == "avg":
            _divide(buf, self.size)
        write_back()

    def all_reduce_async(self, array, op: str) -> MPIWork:
        """Iallreduce in place; the work's ``wait()`` finishes it (and divides for avg)."""
        buf, write_back = self._stage(array, reduce=True)
        request = self.comm.Iallreduce(_mpi().IN_PLACE, buf, op=self._ops[op])

        def finish():
            if op == "avg":
                _divide(buf, self.size)
            write_back()
        return MPIWork(request, finish)

    def broadcast(self, array, src: int) -> None:
        buf, write_back = self._stage(array, reduce=False)
        self.comm.Bcast(self._bytes(buf), root=src)
        write_back()

    def all_gather(self, array):
        """Every rank's ``array`` stacked: shape (world, *array.shape), on ``array``'s device."""
        buf, _ = self._stage(array, reduce=False)
        out = np.empty((self.size, *buf.shape), buf.dtype) if isinstance(buf, np.ndarray) else \
            backend.array_module(buf).empty((self.size, *buf.shape), buf.dtype)
        self.comm.Allgather(self._bytes(buf), self._bytes(out))
        if not isinstance(array, np.ndarray) and isinstance(out, np.ndarray):
            out = backend.array_module(array).asarray(out)
        return out

    def reduce_scatter(self, out, stacked, op: str) -> None:
        """``out`` = the reduction over ranks of ``stacked[rank]`` (stacked: (world, *out.shape))."""
        send, _ = self._stage(stacked, reduce=True)
        recv, write_back = self._stage(out, reduce=True)
        self.comm.Reduce_scatter_block(send, recv, op=self._ops[op])
        if op == "avg":
            _divide(recv, self.size)
        write_back()

    def barrier(self) -> None:
        self.comm.Barrier()

    def destroy(self) -> None:
        pass  # COMM_WORLD lives until MPI finalizes at exit


def _divide(array, n: int) -> None:
    if array.dtype.kind == "f":
        array /= n
    else:
        array //= n

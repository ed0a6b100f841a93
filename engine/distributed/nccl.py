"""The NCCL process group: GPU-to-GPU collectives through ``cupy.cuda.nccl``.

One rank per GPU: rank r uses device ``local_rank % device_count`` (local rank = the rank among
the processes on its node). MPI still launches the processes and carries the setup: rank 0 makes
NCCL's unique id and broadcasts it over MPI, every rank then joins the NcclCommunicator. Barriers
go over MPI as well (host-side).

Collectives run on a side stream that first waits for the work queued so far on the current
stream, so an all-reduce launched during backward overlaps the backward kernels queued after it;
``wait()`` of the returned work makes the current stream wait for the collective (no host sync).

This module imports cupy directly (tests/test_layers.py allows it for this file only): NCCL is a
cupy facility, not an array operation that engine/backend.py could wrap.
"""

from __future__ import annotations

import cupy
import numpy as np
from cupy.cuda import nccl

from engine.distributed import mpi as mpi_group
from engine.dtypes import is_floating

_DTYPES = {
    "float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
    "int8": nccl.NCCL_INT8, "uint8": nccl.NCCL_UINT8, "int32": nccl.NCCL_INT32, "uint32": nccl.NCCL_UINT32,
    "int64": nccl.NCCL_INT64, "uint64": nccl.NCCL_UINT64,
}
if hasattr(nccl, "NCCL_BFLOAT16"):  # NCCL >= 2.10
    _DTYPES["bfloat16"] = nccl.NCCL_BFLOAT16
_OPS = {"sum": nccl.NCCL_SUM, "avg": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}


def available() -> bool:
    try:
        return bool(nccl.available) if hasattr(nccl, "available") else True
    except Exception:  # noqa: BLE001 - a broken NCCL library means NCCL is not available
        return False


class NCCLWork:
    """A collective queued on the side stream; ``wait()`` orders the current stream after it."""

    def __init__(self, event, finish=None):
        self.event, self.finish = event, finish

    def test(self) -> bool:
        return self.event.done

    is_completed = test

    def wait(self) -> None:
        cupy.cuda.get_current_stream().wait_event(self.event)
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()


class NCCLGroup:
    name = "nccl"

    def __init__(self, mpi_comm):
        self.mpi = mpi_comm
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        from mpi4py import MPI

        local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = local.Get_rank()
        local.Free()
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            raise RuntimeError("init_process_group('nccl'): no CUDA device answers on this machine; use backend='mpi'")
        self.device_index = self.local_rank % count
        cupy.cuda.Device(self.device_index).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)  # a small tuple of bytes; the one pickled message
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    # ---- helpers --------------------------------------------------------------------------------
    def _check(self, array, op_name: str):
        if not isinstance(array, cupy.ndarray):
            raise TypeError(f"{op_name}: the nccl backend takes CUDA tensors; got a host array (use backend='mpi' "
                            "for CPU tensors, or move the tensor with .cuda())")
        if array.device.id != self.device_index:
            raise RuntimeError(f"{op_name}: tensor is on cuda:{array.device.id} but this rank's NCCL communicator "
                               f"uses cuda:{self.device_index}")

    def _begin(self):
        """Make the side stream wait for what the current stream has queued so far."""
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)

    def _end(self, finish=None) -> NCCLWork:
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return NCCLWork(done, finish)

    @staticmethod
    def _contiguous(array):
        return array if array.flags.c_contiguous else cupy.ascontiguousarray(array)

    @staticmethod
    def _bytes(buf):
        """(pointer, count, NCCL dtype) moving ``buf``'s raw bytes (broadcast, all-gather: any dtype)."""
        return buf.data.ptr, buf.nbytes, nccl.NCCL_UINT8

    @staticmethod
    def _wire(buf, op: str):
        """(count, NCCL dtype, NCCL op) reducing the contiguous ``buf`` in place: complex as its
        (real, imaginary) pairs (SUM only: core refuses MAX/MIN), bool as bytes with MAX for SUM
        (a logical or, as in PyTorch) and MIN for MIN (a logical and)."""
        dtype = np.dtype(buf.dtype)
        if dtype.kind == "c":
            return buf.size * 2, _DTYPES[np.dtype(f"f{dtype.itemsize // 2}").name], _OPS[op]
        if dtype == np.bool_:
            return buf.size, nccl.NCCL_UINT8, nccl.NCCL_MIN if op == "min" else nccl.NCCL_MAX
        if dtype.name not in _DTYPES:
            raise TypeError(f"the nccl backend cannot reduce {dtype} tensors")
        return buf.size, _DTYPES[dtype.name], _OPS[op]

    # ---- collectives ----------------------------------------------------------------------------
    def all_reduce_async(self, array, op: str) -> NCCLWork:
        self._check(array, "all_reduce")
        buf = self._contiguous(array)
        count, dtype, nccl_op = self._wire(buf, op)
        self._begin()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, count, dtype, nccl_op, self.stream.ptr)
        if op == "avg":
            with self.stream:
                _divide(buf, self.size)

        def finish():
            if buf is not array:
                array[...] = buf
        return self._end(finish)

    def all_reduce(self, array, op: str) -> None:
        self.all_reduce_async(array, op).wait()

    def broadcast(self, array, src: int) -> None:
        self._check(array, "broadcast")
        buf = self._contiguous(array)
        self._begin()
        ptr, count, dtype = self._bytes(buf)
        self.comm.broadcast(ptr, ptr, count, dtype, src, self.stream.ptr)
        self._end().wait()
        if buf is not array:
            array[...] = buf

    def all_gather(self, array):
        self._check(array, "all_gather")
        buf = self._contiguous(array)
        out = cupy.empty((self.size, *buf.shape), buf.dtype)
        self._begin()
        ptr, count, dtype = self._bytes(buf)
        self.comm.allGather(ptr, out.data.ptr, count, dtype, self.stream.ptr)
        self._end().wait()
        return out

    def reduce_scatter(self, out, stacked, op: str) -> None:
        self._check(out, "reduce_scatter")
        send = self._contiguous(stacked)
        recv = self._contiguous(out)
        count, dtype, nccl_op = self._wire(recv, op)
        self._begin()
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, count, dtype, nccl_op, self.stream.ptr)
        if op == "avg":
            with self.stream:
                _divide(recv, self.size)
        self._end().wait()
        if recv is not out:
            out[...] = recv

    def barrier(self) -> None:
        cupy.cuda.get_current_stream().synchronize()
        self.stream.synchronize()
        mpi_group.MPIWork(self.mpi.Ibarrier(), None, "barrier").wait()

    def all_reduce_host_async(self, array: np.ndarray, op: str):
        """An all-reduce of a small host array (DDP's usage flags), over MPI: no device sync."""
        request = self.mpi.Iallreduce(mpi_group._mpi().IN_PLACE, array, op=mpi_group.mpi_op(op, array.dtype))
        return mpi_group.MPIWork(request, None, "all_reduce")

    def allgather_object(self, obj, op: str) -> list:
        return mpi_group.allgather_object(self.mpi, obj, op)

    def bcast_object(self, obj, root: int, op: str):
        return mpi_group.bcast_object(self.mpi, obj, root, op)

    def destroy(self) -> None:
        self.stream.synchronize()
        self.comm.destroy()


def _divide(array, n: int) -> None:
    if not (array.dtype.kind == "c" or is_floating(array.dtype)):
        raise TypeError(f"ReduceOp.AVG of {array.dtype} values would round; use ReduceOp.SUM and divide")
    array /= n

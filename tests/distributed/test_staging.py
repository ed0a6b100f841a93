"""The MPI backend's staging of device (cupy) arrays, in call order, without a GPU.

With a CUDA-aware MPI, MPI reads device memory directly, outside CUDA's stream order: every copy
that produces the buffer MPI reads (a dtype conversion, a contiguous copy) must be complete, so
the device is synchronized after the copies are queued and before the MPI call. A recorded call
order stands in for the GPU: stand-in device arrays log their copies, a stand-in cupy logs the
device synchronizations, a stand-in communicator logs what MPI is handed.
"""

import types

import numpy as np
import pytest

from engine import backend
from engine.distributed import mpi

LOG: list = []


class DeviceArray:
    """A host array posing as a cupy array on device 0; its copies are queued device work."""

    __module__ = "cupy._core.core"

    def __init__(self, host):
        self.host = host
        self.shape, self.dtype, self.flags = host.shape, host.dtype, host.flags
        self.device = types.SimpleNamespace(id=0)

    def astype(self, dtype, order="K", copy=True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        LOG.append("copy")
        return DeviceArray(self.host.astype(dtype, order=order))

    def reshape(self, *shape):
        return DeviceArray(self.host.reshape(*shape))

    def view(self, dtype):
        return DeviceArray(self.host.view(dtype))

    def __setitem__(self, key, value):
        LOG.append("write back")
        self.host[key] = value.host if isinstance(value, DeviceArray) else value


class Device:
    def __init__(self, index):
        self.index = index

    def synchronize(self):
        LOG.append("synchronize")


def ascontiguousarray(array):
    LOG.append("copy")
    return DeviceArray(np.ascontiguousarray(array.host))


fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device), ascontiguousarray=ascontiguousarray,
                                  asarray=lambda a: a)


class Request:
    def Wait(self):  # noqa: N802 - mpi4py's name
        pass

    def Test(self):  # noqa: N802
        return True


class Comm:
    def _mpi_reads(self, *buffers):
        LOG.append("MPI")
        for b in buffers:
            assert isinstance(b, DeviceArray) and b.host.flags.c_contiguous
        return Request()

    def Iallreduce(self, inplace, buf, op):  # noqa: N802
        return self._mpi_reads(buf)

    def Ibcast(self, buf, root):  # noqa: N802
        return self._mpi_reads(buf)

    def Ireduce_scatter_block(self, send, recv, op):  # noqa: N802
        return self._mpi_reads(send, recv)


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setattr(backend, "array_module", lambda a: np if isinstance(a, np.ndarray) else fake_cupy)
    monkeypatch.setattr(mpi, "_mpi", lambda: types.SimpleNamespace(IN_PLACE=None, SUM="sum", MAX="max", MIN="min"))
    g = object.__new__(mpi.MPIGroup)
    g.comm, g.rank, g.size, g._cuda_aware = Comm(), 0, 1, True  # a CUDA-aware MPI: device pointers
    LOG.clear()
    yield g
    LOG.clear()


def test_a_dtype_conversion_is_complete_before_mpi_reads_it(group):
    group.all_reduce(DeviceArray(np.ones(4, np.float16)), "sum")  # reduced through float32
    assert LOG[:3] == ["copy", "synchronize", "MPI"], LOG


def test_a_contiguous_copy_is_complete_before_mpi_reads_it(group):
    strided = DeviceArray(np.ones((4, 4), np.float32)[:, 1])
    group.all_reduce(strided, "sum")
    assert LOG[:3] == ["copy", "synchronize", "MPI"], LOG
    LOG.clear()
    group.broadcast(DeviceArray(np.ones((4, 4), np.float32)[:, 1]), 0)
    assert LOG[:3] == ["copy", "synchronize", "MPI"], LOG


def test_queued_work_is_complete_before_mpi_reads_an_array_as_it_is(group):
    group.all_reduce(DeviceArray(np.ones(4, np.float32)), "sum")
    assert LOG == ["synchronize", "MPI"], LOG


def test_reduce_scatter_syncs_after_both_staging_copies(group):
    stacked = DeviceArray(np.ones((1, 4), np.float16))
    out = DeviceArray(np.zeros(4, np.float16))
    group.reduce_scatter(out, stacked, "sum")
    mpi_at = LOG.index("MPI")
    copies = [i for i, e in enumerate(LOG[:mpi_at]) if e == "copy"]
    last_sync = max(i for i, e in enumerate(LOG[:mpi_at]) if e == "synchronize")
    assert len(copies) == 2 and max(copies) < last_sync < mpi_at, LOG

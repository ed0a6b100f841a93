"""The NCCL backend and the MPI backend with cupy arrays, on the GPUs this machine has (a one-GPU
machine runs NCCL with world size 1)."""

import pytest

from tests.distributed.launch import check, mpiexec, requires_mpi4py, run_mpi

pytestmark = [requires_mpi4py, pytest.mark.gpu]


def _gpus() -> int:
    from engine import backend

    return backend.cuda_device_count()


@pytest.mark.parametrize("backend", ["nccl", "mpi"])
def test_collectives_and_ddp_on_cuda(backend):
    world = max(1, _gpus())
    if world > 1 and mpiexec() is None:
        world = 1  # no launcher here: one rank, on one GPU (mpi4py's singleton)
    assert f"gpu ok {backend} {world}" in check(run_mpi("gpu.py", world, backend, timeout=120))

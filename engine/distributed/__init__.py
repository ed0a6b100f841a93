"""Distributed training over MPI (mpi4py) and NCCL (cupy), with PyTorch's ``torch.distributed`` names.

    mpiexec -n 4 python train.py            # or: python -m engine.distributed.run -n 4 train.py

    import engine.distributed as dist
    dist.init_process_group()               # "mpi" on CPU, "nccl" when the default device is CUDA
    dist.all_reduce(t, op=dist.ReduceOp.SUM)

See docs/distributed.md.
"""

from engine.distributed.core import (DistributedError, ReduceOp, Work, all_gather, all_reduce, barrier, broadcast,
                                     destroy_process_group, get_backend, get_local_rank, get_rank, get_world_size,
                                     init_process_group, is_available, is_initialized, is_mpi_available,
                                     is_nccl_available, reduce_scatter)

__all__ = ["DistributedError", "ReduceOp", "Work", "all_gather", "all_reduce", "barrier", "broadcast",
           "destroy_process_group", "get_backend", "get_local_rank", "get_rank", "get_world_size",
           "init_process_group", "is_available", "is_initialized", "is_mpi_available", "is_nccl_available",
           "reduce_scatter"]

from engine.distributed import optim  # noqa: E402,F401  (dist.optim.ZeroRedundancyOptimizer, as torch.distributed.optim)

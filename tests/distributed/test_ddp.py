"""DistributedDataParallel under mpiexec: parity with one process on W times the batch, identical
parameters on every rank, no_sync accumulation, overlap, buffers, mismatched models."""

import pytest

from tests.distributed.launch import check, requires_mpi, run_mpi

pytestmark = requires_mpi


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_ddp_matches_one_process_on_the_whole_batch(world):
    assert f"ddp ok {world}" in check(run_mpi("ddp.py", world))


def test_ddp_needs_a_process_group():
    import engine.distributed as dist
    from engine import nn
    from engine.nn.parallel import DistributedDataParallel

    with pytest.raises(dist.DistributedError, match="init_process_group"):
        DistributedDataParallel(nn.Linear(2, 2))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.slow
def test_unused_parameters_and_a_destroyed_group(world):
    # find_unused_parameters=True: unused by all -> .grad None (weight decay leaves it alone), used by
    # rank 0 only -> averaged over the world; without it: a clear error on every rank; after
    # destroy_process_group(): forward raises.
    assert f"ddp unused ok {world}" in check(run_mpi("ddp_unused.py", world, timeout=90))

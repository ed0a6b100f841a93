"""Tensor parallelism (Column/RowParallelLinear) under mpiexec: parity with the unsplit MLP."""

import pytest

from tests.distributed.launch import check, requires_mpi, run_mpi

pytestmark = requires_mpi


@pytest.mark.parametrize("world", [1, 2, 3])  # 3: the hidden width 10 splits unevenly (4, 3, 3)
@pytest.mark.slow
def test_column_relu_row_mlp_matches_the_unsplit_mlp(world):
    assert f"tensor parallel ok {world}" in check(run_mpi("tensor_parallel.py", world))


def test_split_sizes_and_no_process_group():
    import engine
    import engine.distributed as dist
    from engine.distributed.tensor_parallel import ColumnParallelLinear, split_sizes

    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(8, 2) == [4, 4] and sum(split_sizes(7, 5)) == 7
    if dist.is_initialized():
        pytest.skip("a process group is up in this process")
    with pytest.raises(dist.DistributedError, match="init_process_group"):
        ColumnParallelLinear(4, 4)
    assert engine.nn.parallel.ColumnParallelLinear is ColumnParallelLinear

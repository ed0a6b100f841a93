"""Collectives over MPI with 2 and 3 ranks (3: a world that is not a power of two), and faults."""

import time

import pytest

from tests.distributed.launch import check, requires_mpi, run_mpi

pytestmark = requires_mpi


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.slow
def test_collectives(world):
    assert f"collectives ok {world}" in check(run_mpi("collectives.py", world))


@pytest.mark.slow
def test_one_failing_rank_ends_the_job_naming_it():
    start = time.monotonic()
    result = run_mpi("fault.py", 2, timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30
    assert "engine.distributed: rank 1 failed: RuntimeError: rank one fails on purpose" in result.stderr
    assert "fault was not detected" not in result.stdout


@pytest.mark.slow
def test_single_process_without_launcher_is_a_world_of_one():
    import subprocess
    import sys

    from tests.distributed.launch import ROOT, mpi_env

    # A world_size the launcher did not start is refused (the script would shard its data wrongly),
    # and leaves no process group behind.
    code = ("import engine, engine.distributed as d\n"
            "try:\n    d.init_process_group(world_size=2)\nexcept d.DistributedError as e:\n"
            "    assert 'world_size=2 was asked for' in str(e) and not d.is_initialized()\n"
            "else:\n    raise SystemExit('world_size=2 accepted in a world of one')\n"
            "d.init_process_group(world_size=1, rank=0); t = engine.ones(2); d.all_reduce(t)\n"
            "print(d.get_rank(), d.get_world_size(), t.tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "[1.0,", "1.0]"]


def test_api_without_process_group():
    import engine.distributed as dist

    assert dist.is_available()
    assert not dist.is_initialized()
    with pytest.raises(dist.DistributedError, match="not initialized"):
        dist.get_rank()
    with pytest.raises(dist.DistributedError, match="unknown backend"):
        dist.init_process_group("nope")  # gloo is accepted: the MPI backend under its CPU name


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.slow
def test_every_collective_on_every_dtype(world):
    # complex64 went through int64 (1.5+2j became 1+0j); MAX/MIN of complex and AVG of integers raise
    assert f"dtypes ok {world}" in check(run_mpi("dtypes.py", world, timeout=120))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_ranks_agree_on_the_call_before_any_data_moves(world):
    # reduce op, src, dtype, the collective itself, one rank's argument error or deferred device
    # error: raised on every rank, and the ranks stay in step
    assert f"agree ok {world}" in check(run_mpi("agree.py", world, timeout=120))


@pytest.mark.parametrize("world", [1, 2])
def test_gloo_is_accepted_as_the_cpu_backend(world):
    # init_process_group("gloo"), PyTorch's CPU backend, runs on MPI under mpiexec; get_backend() says "gloo"
    assert f"gloo ok {world}" in check(run_mpi("gloo.py", world, timeout=90))

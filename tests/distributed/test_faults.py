"""A rank that leaves while the others wait in a collective ends the job, whatever the way it leaves
(sys.exit with any status, KeyboardInterrupt, the end of its script); a job whose ranks all end
normally, with or without destroy_process_group(), exits 0 without aborting."""

import re
import time

import pytest

from tests.distributed.launch import check, requires_mpi, run_mpi

pytestmark = requires_mpi


@pytest.mark.parametrize("way", ["exit0", "exit2", "destroy_exit0", "interrupt", "thread_then_exit"])
@pytest.mark.slow
def test_a_rank_that_leaves_ends_the_job_naming_it(way):
    start = time.monotonic()
    result = run_mpi("leave.py", 2, way, timeout=40)  # a hang is the bug: run_mpi fails the test at 40 s
    elapsed = time.monotonic() - start
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "rank 1" in result.stderr and "aborting the job" in result.stderr, result.stderr
    assert "was not detected" not in result.stdout
    assert elapsed < 30


@pytest.mark.slow
def test_the_report_says_how_the_rank_left():
    exited = run_mpi("leave.py", 2, "exit0", timeout=40).stderr
    assert ("engine.distributed: rank 1 exited (its script ended or called sys.exit(), without "
            "destroy_process_group()) while rank 0 waits for it in all_reduce; aborting the job") in exited
    interrupted = run_mpi("leave.py", 2, "interrupt", timeout=40).stderr
    assert "engine.distributed: rank 1 failed: KeyboardInterrupt" in interrupted


@pytest.mark.parametrize("way", ["clean", "clean_destroy", "late", "destroy_then_work"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_a_clean_end_exits_zero_without_aborting(way, world):
    out = check(run_mpi("leave.py", world, way, timeout=60))
    assert sorted(re.findall(r"rank (\d+) done", out)) == [str(r) for r in range(world)], out  # lines may interleave

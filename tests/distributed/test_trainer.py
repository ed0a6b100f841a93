"""The Trainer and the main job with --distributed, under mpiexec."""

import re

import pytest

from tests.distributed.launch import check, requires_mpi, run_mpi

pytestmark = requires_mpi


@pytest.mark.slow
def test_trainer_distributed_logs_on_rank_0_combines_figures_and_resumes(tmp_path):
    assert "trainer ok 2" in check(run_mpi("trainer.py", 2, tmp_path))


@pytest.mark.slow
def test_digits_main_job_distributed(tmp_path):
    out = check(run_mpi("engine.examples.digits", 2, "--distributed", "--epochs", "3", "--quiet", "--out",
                        tmp_path / "digits", module=True, timeout=120))
    assert "data parallel on 2 rank(s) (mpi): batch 32 per rank, 64 in all" in out
    assert out.count("test accuracy") == 1  # rank 0 reports; rank 1 stays silent
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.9
    assert (tmp_path / "digits" / "best.ckpt").exists()

"""Run a script under ``mpiexec -n N`` from the tests, with a timeout.

Tests in tests/distributed/ call :func:`run_mpi` with a worker script (tests/distributed/workers/)
and assert on its exit status and output. ``requires_mpi`` skips them, with the reason, where
mpi4py or mpiexec is missing (``pip install -e .[test]`` brings both: mpi4py and the mpich wheel).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH."""
    from engine.distributed.run import find_mpiexec

    return find_mpiexec()


def _missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install -e .[test] or .[distributed])"
    if mpiexec() is None:
        return "no mpiexec next to the Python interpreter or on PATH (pip install mpich)"
    return None


requires_mpi = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
# A world of one needs no launcher (mpi4py starts a singleton): enough for the GPU tests on a
# machine with mpi4py but no mpiexec, such as the lent GPU machines' image.
requires_mpi4py = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                                     reason="mpi4py is not installed (pip install -e .[test] or .[distributed])")


def mpi_env() -> dict:
    """The environment the ranks run in: the repository importable, MPICH settled for containers."""
    from engine.distributed.run import launch_env

    env = launch_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_mpi(script, n: int, *args, timeout: float = 60, module: bool = False) -> subprocess.CompletedProcess:
    """``mpiexec -n n python script args...`` (``python -m script`` with module=True); output captured."""
    target = ["-m", str(script)] if module else [str(WORKERS / script if not Path(str(script)).is_absolute()
                                                     else script)]
    launcher = [mpiexec(), "-n", str(n)] if n > 1 or mpiexec() is not None else []  # n == 1: a singleton
    cmd = [*launcher, sys.executable, *target, *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")


def check(result: subprocess.CompletedProcess) -> str:
    """The job's stdout, after asserting that it exited 0 (showing its output where it did not)."""
    assert result.returncode == 0, (f"exit status {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr}")
    return result.stdout

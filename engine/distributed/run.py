"""``python -m engine.distributed.run -n 4 train.py args...``: a thin wrapper over ``mpiexec``.

It finds mpiexec (next to the running Python first: the mpich wheel installs it into the venv's
bin/, then on PATH), sets the environment MPICH needs in containers, and execs
``mpiexec -n N <this python> train.py args...``. Everything else (ranks, world size, the process
group) is MPI's; plain ``mpiexec -n 4 python train.py`` works the same way.

    python -m engine.distributed.run -n 2 -m engine.examples.digits --distributed
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def find_mpiexec() -> str | None:
    """The mpiexec beside ``sys.executable`` (a venv with the mpich wheel), else on PATH, else None."""
    for name in ("mpiexec", "mpirun"):
        here = Path(sys.executable).parent / name
        if here.is_file() and os.access(here, os.X_OK):
            return str(here)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    return None


def launch_env(env: dict) -> dict:
    """``env`` plus what MPICH's launcher needs on one machine inside a container: fork the ranks
    locally (no ssh), with unbuffered output so ranks' lines show as they are printed."""
    env.setdefault("HYDRA_LAUNCHER", "fork")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.distributed.run",
        description="Launch a training script on N ranks with mpiexec (from the mpich wheel or PATH).")
    parser.add_argument("-n", "--nproc", "--np", type=int, default=1, help="number of ranks (processes)")
    parser.add_argument("-m", dest="module", action="store_true", help="the target is a module (python -m)")
    parser.add_argument("target", help="the script (or module with -m) to run on every rank")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    opts = parser.parse_args(argv)
    if opts.nproc < 1:
        parser.error(f"-n must be at least 1, got {opts.nproc}")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        from engine.errors import install_hint

        sys.stderr.write("engine.distributed.run: mpiexec not found next to the Python interpreter "
                         f"({Path(sys.executable).parent}) nor on PATH; install the MPI wheels with "
                         f"{install_hint('distributed', 'mpi4py mpich')}\n")
        return 2
    target = ["-m", opts.target] if opts.module else [opts.target]
    cmd = [mpiexec, "-n", str(opts.nproc), sys.executable, *target, *opts.args]
    os.execve(mpiexec, cmd, launch_env(dict(os.environ)))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""Tests that run numba.cuda kernels under the Numba CUDA simulator.

The simulator must be switched on before numba is first imported, so these tests run in their
own process: tests/kernels/test_cudasim_suite.py starts it with NUMBA_ENABLE_CUDASIM=1. In any
other pytest process this folder is not collected.
"""

import os

if os.environ.get("NUMBA_ENABLE_CUDASIM", "") in ("", "0"):
    collect_ignore_glob = ["test_*.py"]

"""engine._host_memory: ``import engine`` keeps freed host memory for the next arrays (glibc only)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A step's pattern: arrays of a few MB allocated, written and freed again and again. The minor page
# faults of the last rounds are counted: with freed memory kept there are none to take.
CHILD = """
import resource
import engine, numpy as np
from engine import _host_memory
print("kept", _host_memory.keep_freed_memory())
def round_():
    arrays = [np.ones(n, np.float32) for n in (1 << 19, 1 << 18, 3 << 18, 1 << 20)]
    del arrays
for _ in range(20):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    round_()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "ENGINE_KEEP_HOST_MEMORY"}
    full.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), **env)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return dict(line.split() for line in out.splitlines() if line.startswith(("kept", "faults")))


def _glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not _glibc(), reason="the setting is glibc's mallopt")
def test_arrays_freed_and_allocated_again_take_no_page_faults():
    result = _child()
    assert result["kept"] == "True"
    assert int(result["faults"]) < 50, result  # ~4 MB a round would be ~1000 faults each time if returned


@pytest.mark.skipif(not _glibc(), reason="the setting is glibc's mallopt")
@pytest.mark.parametrize("env", [{"ENGINE_KEEP_HOST_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_users_choice_wins(env):
    assert _child(**env)["kept"] == "False"

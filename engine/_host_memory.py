"""glibc's malloc told to keep freed host memory for the next arrays (called once by ``import engine``).

A training step frees and allocates the same few-MB arrays again and again (activations, their
gradients, GEMM outputs). With glibc's defaults the freed memory at the top of the heap goes back
to the kernel once more than a few MB of it is free (``M_TRIM_THRESHOLD``, which glibc raises to
twice the largest freed mmap'd chunk), and the next arrays fault it in again, page by page: the
GPT step of bench/gpt_step.py took ~10,000 minor page faults and 22 ms of system time per step on
the 2-core VM (torch's step ~900 faults), and none with the settings below (docs/benchmarks.md,
"The GPT step op by op").

The settings: blocks under ``MMAP_THRESHOLD`` come from the heap (glibc's own ceiling for its
dynamic threshold), and up to ``TRIM_THRESHOLD`` of free memory stays at the heap's top (glibc's
dynamic rule at that ceiling: twice the threshold). Larger arrays are mmap'd and unmapped as
before. A user's ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` (read by glibc at process
start) wins, as does ``ENGINE_KEEP_HOST_MEMORY=0``; other C libraries (musl, macOS, Windows) are
left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
USER_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Apply the thresholds above through glibc's ``mallopt``; True when they were set."""
    if not sys.platform.startswith("linux") or os.environ.get("ENGINE_KEEP_HOST_MEMORY") == "0":
        return False
    if any(name in os.environ for name in USER_VARS):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt takes other parameters
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                     TRIM_THRESHOLD))

"""Busy neighbour processes for ``python -m bench --load N``: the engine on a shared machine.

Each neighbour is a separate Python process spinning in a pure-Python loop (``while True: pass``):
one core's worth of demand that never sleeps, like another user's training job or test run. They
start before the loaded measurements, run for their whole duration and are stopped (terminated,
then waited for) when the block ends, also when the block raises.

Example:
    >>> from bench.load import Neighbours
    >>> with Neighbours(1) as neighbours:         # doctest: +SKIP
    ...     pass                                  # time something beside one busy process
"""

from __future__ import annotations

import subprocess
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h

SPIN = "while True:\n    pass\n"
DESCRIPTION = "pure-Python spin loop (while True: pass), one process each"


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the benchmark dies (killed, it runs no
    ``finally``), so that no spinning neighbour outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Neighbours:
    """``count`` busy processes while the ``with`` block runs (none for count 0)."""

    def __init__(self, count: int):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"bench --load: the number of busy neighbours must be an integer >= 0, got {count!r}")
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "Neighbours":
        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                       preexec_fn=_die_with_parent))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def running(self) -> int:
        """How many neighbours are alive now."""
        return sum(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []

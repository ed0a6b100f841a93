"""The one owner of the CPU's thread pools: the BLAS behind numpy's matmuls and numba's parallel regions.

The engine runs two kinds of parallel CPU work: GEMMs in the BLAS (OpenBLAS in numpy's wheels, with
its own pthread pool) and the numba_cpu kernels' ``parallel=True`` regions (numba's threading
layer). Each pool sized by itself takes every core of the host; this module gives both the same
count, :func:`get_num_threads`, which follows the CPUs this process may actually use
(:func:`available_cpus`: affinity and cgroup CPU quota), not ``os.cpu_count()``.

The count applies to every pool at once:

* the BLAS through threadpoolctl (``threadpool_limits(n, user_api="blas")``, kept in force);
* numba through ``numba.set_num_threads``, which is per Python thread in numba: every call into a
  parallel kernel goes through :func:`kernels.registry.numba_parallel`, which sets the calling
  thread's count to the owner's before the region starts (:func:`sync_numba_threads`).

How the two pools share the cores (docs/architecture.md, "CPU threads"; the measurements are in
docs/benchmarks.md): numba's workqueue layer, whose workers sleep between regions
(kernels.registry.configure_numba_threads), runs every parallel region on the count; the BLAS,
whose OpenBLAS workers meet at a barrier in each GEMM and spin after it, is sized per GEMM
(:func:`for_gemm`, called before the engine's GEMMs; :func:`gemm_threads` decides): the count from
BLAS_PARALLEL_MIN multiply-adds on; one thread below BLAS_QUIET_MIN; in between as many threads as
the machine has CPUs that other processes leave free (:class:`RunQueueWatch` reads the run queue
every LOAD_CHECK_S). So on a quiet machine the GEMMs use every core, and beside busy processes
the small and mid-size ones leave no descheduled worker for the barrier and no spinning worker
for the next numba region to wait behind. The numba_cpu kernels' mid-size regions follow the same
look (:func:`parallel_region`): from a kernel's PARALLEL_MIN up to REGION_ALWAYS_MIN elements they
run in parallel only while two CPUs are free, else on the calling thread.

Defaults: ``OMP_NUM_THREADS`` when set (as PyTorch reads it), else :func:`available_cpus`. A pool
the user sized by its own variable (``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``BLIS_NUM_THREADS`` for the BLAS, ``NUMBA_NUM_THREADS`` for numba) keeps that size until
:func:`set_num_threads` is called. The default is applied on the first call that needs it (the
first numba_cpu kernel, :func:`get_num_threads`, ``import engine``), never at ``import engine.kernels``.

Example:
    >>> from engine.kernels import threads
    >>> threads.set_num_threads(1)            # doctest: +SKIP
    >>> threads.get_num_threads()             # doctest: +SKIP
    1
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .registry import KernelError

BLAS_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# A GEMM of at least this many multiply-adds (m * n * k) runs on the engine's count of BLAS threads
# whatever the load (:func:`for_gemm`): its split saves more than a late thread at OpenBLAS's
# barrier costs, even on a busy machine (docs/benchmarks.md, "CPU threads").
BLAS_PARALLEL_MIN = 1 << 30
# From this many multiply-adds up to BLAS_PARALLEL_MIN a GEMM runs on as many BLAS threads as the
# machine has CPUs that no other process wants (:func:`gemm_threads`); below it on one. OpenBLAS's
# workers meet at a barrier in each GEMM and spin after it: beside a busy process a descheduled
# worker stalls the barrier and the numba region after it, so mid-size GEMMs go back to one thread
# (docs/benchmarks.md, "CPU threads" and "Why the thresholds are where they are").
BLAS_QUIET_MIN = 1 << 22
# How often (seconds) :func:`for_gemm` looks at the run queue, and how many looks it averages: one
# look costs ~0.1 ms (/proc reads), and the run queue is noisy, so ~1 s of looks decide.
LOAD_CHECK_S = 0.2
LOAD_SAMPLES = 5
PROC_LOADAVG = Path("/proc/loadavg")
PROC_TASKS = Path("/proc/self/task")

_lock = threading.Lock()
_state = {"n": None, "blas_limiter": None, "blas_owned": False}
_blas = {"controllers": (), "current": None}  # the BLAS libraries' controllers, the count last set on them


# --------------------------------------------------------------------------------------------
# How many CPUs this process may use
# --------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

    A quota of 1.5 CPUs counts as 2 (as the JVM and .NET round it): one thread per whole CPU would
    leave half a CPU of quota unused. At least 1.
    """
    count = _affinity_cpus()
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), or None without one.

    cgroup v2: ``cpu.max`` (``"200000 100000"``, or ``"max 100000"`` for none) of the process's
    cgroup and of each parent up to the root, the smallest limit winning. cgroup v1: the cpu
    controller's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 is none). ``root`` and
    ``proc_cgroup`` default to /sys/fs/cgroup and /proc/self/cgroup (tests point them at a fake tree).
    """
    root = CGROUP_ROOT if root is None else Path(root)
    try:
        lines = (PROC_CGROUP if proc_cgroup is None else Path(proc_cgroup)).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 unified hierarchy: "0::/path"
            limits += _v2_limits(root, path)
        elif "cpu" in controllers.split(","):
            limits += _v1_limits(root, controllers, path)
    return min(limits) if limits else None


def _v2_limits(root: Path, path: str) -> list[float]:
    found = []
    directory = root / path.lstrip("/")
    while True:
        quota = _ratio(directory / "cpu.max", None)
        if quota is not None:
            found.append(quota)
        if directory == root or root not in directory.parents:
            return found
        directory = directory.parent


def _v1_limits(root: Path, controllers: str, path: str) -> list[float]:
    for mount in (controllers, "cpu,cpuacct", "cpu"):  # the mount point's name varies by distribution
        for directory in (root / mount / path.lstrip("/"), root / mount):
            quota = _ratio(directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us")
            if quota is not None:
                return [quota]
    return []


def _ratio(quota_file: Path, period_file: Path | None) -> float | None:
    """quota / period from cpu.max ("quota period") or from the two v1 files; None for no limit."""
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


# --------------------------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------------------------


def default_num_threads() -> int:
    """``OMP_NUM_THREADS`` when it is a positive integer (as PyTorch), else :func:`available_cpus`."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        value = 0
    return value if value > 0 else available_cpus()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in every CPU pool the engine runs: the BLAS and numba's parallel kernels.

    Raises:
        KernelError: ``n`` is not a positive integer.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KernelError(f"set_num_threads: the number of threads must be a positive integer, got {n!r}")
    with _lock:
        _apply(n, respect_env=False)


def get_num_threads() -> int:
    """The thread count of the engine's CPU pools (the default of :func:`default_num_threads` until set)."""
    ensure_default()
    return _state["n"]


def ensure_default() -> None:
    """Apply the default count once, unless :func:`set_num_threads` came first."""
    if _state["n"] is None:
        with _lock:
            if _state["n"] is None:
                _apply(default_num_threads(), respect_env=True)


def apply_default(n: int) -> None:
    """Use ``n`` threads per pool as the default: like :func:`set_num_threads`, but a pool the user
    sized by its own environment variable keeps that size (engine.distributed splits the node's
    CPUs between its ranks with this). A positive ``OMP_NUM_THREADS`` is the user's count per
    process, and wins over ``n``."""
    if os.environ.get("OMP_NUM_THREADS"):
        n = default_num_threads()
    with _lock:
        _apply(n, respect_env=True)


def _apply(n: int, respect_env: bool) -> None:
    if not (respect_env and any(os.environ.get(v) for v in BLAS_VARS)):
        _limit_blas(n)
        _state["blas_owned"] = True
    if not (respect_env and os.environ.get("NUMBA_NUM_THREADS")):
        _state["numba"] = n
    _state["n"] = n
    sync_numba_threads()


def _limit_blas(n: int) -> None:
    """Every BLAS loaded in the process to ``n`` threads (threadpoolctl; numpy's OpenBLAS, torch's MKL)."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController().select(user_api="blas")
    _state["blas_limiter"] = controller.limit(limits=n)  # stays in force: not used as a context
    _blas.update(controllers=tuple(controller.lib_controllers), current=n)


def for_gemm(m: int, n: int, k: int) -> None:
    """Size the BLAS pool for the GEMM about to run, (m, k) x (k, n), by :func:`gemm_threads`: the
    engine's count from BLAS_PARALLEL_MIN multiply-adds on; from BLAS_QUIET_MIN the CPUs no other
    process wants (:class:`RunQueueWatch`); else one thread. Cheap enough for every GEMM (one
    ctypes call per BLAS library when the count changes, a look at /proc every LOAD_CHECK_S;
    docs/benchmarks.md, "Why the thresholds are where they are"). Leaves a BLAS sized by the user's
    own environment variable alone."""
    size = m * n * k
    if size < BLAS_QUIET_MIN and _blas["current"] == 1:  # the usual small GEMM: one thread, already set
        return
    if _state["n"] is None:
        ensure_default()
    if not _state["blas_owned"]:
        return
    count = _state["n"]
    others = _watch.others() if count > 1 and BLAS_QUIET_MIN <= size < BLAS_PARALLEL_MIN else None
    want = gemm_threads(size, count, others, _HOST_CPUS)
    if want != _blas["current"]:
        for lib in _blas["controllers"]:
            lib.set_num_threads(want)
        _blas["current"] = want


def gemm_threads(size: int, count: int, others: float | None, host_cpus: int) -> int:
    """BLAS threads for a GEMM of ``size`` multiply-adds when the engine's count is ``count``.

    ``others``: the mean number of other processes' runnable threads on the machine
    (:class:`RunQueueWatch`; None when unknown), ``host_cpus``: the machine's CPUs (the run queue
    counts the whole machine's). ``count`` from BLAS_PARALLEL_MIN on; one below BLAS_QUIET_MIN; in
    between the CPUs left by the others (rounded to the nearest), at least one and at most
    ``count``, and one when the load is unknown (the choice that is safe on a busy machine).
    """
    if count <= 1 or size >= BLAS_PARALLEL_MIN:
        return count
    if size < BLAS_QUIET_MIN:
        return 1
    return free_threads(count, others, host_cpus)


def free_threads(count: int, others: float | None, host_cpus: int) -> int:
    """The CPUs that ``others`` (other processes' mean runnable threads, None when unknown) leave
    free on a machine of ``host_cpus``, rounded to the nearest, at least one and at most ``count``;
    one when the load is unknown (the choice that is safe on a busy machine)."""
    if others is None:
        return 1
    return max(1, min(count, math.floor(host_cpus - others + 0.5)))


# From this many elements a numba_cpu kernel's parallel build runs whatever the load
# (:func:`parallel_region`): at this size one thread takes milliseconds, and beside one busy process
# the split lost ~5 % to the serial loop (GELU, docs/benchmarks.md, issue 26) where a quiet machine
# gains nearly half.
REGION_ALWAYS_MIN = 1 << 22


def parallel_region(size: int, parallel_min: int) -> bool:
    """Whether a numba_cpu kernel over ``size`` elements runs its parallel build: never under the
    kernel's ``parallel_min``; from REGION_ALWAYS_MIN always; in between only while other processes
    leave two or more CPUs free (:func:`region_threads`)."""
    if size < parallel_min:
        return False
    return size >= REGION_ALWAYS_MIN or region_threads() >= 2


def region_threads() -> int:
    """Threads for a mid-size numba parallel region now: :func:`free_threads` of the engine's count
    under the busiest of the run queue's last looks (:class:`RunQueueWatch`, shared with the GEMMs'
    choice, which takes their mean).

    A region of workqueue's workers waits for its slowest chunk: beside a busy process a
    descheduled worker makes a two-thread region of a few hundred microseconds slower than one
    thread (docs/benchmarks.md, issue 26). The costs are lopsided (a wait for a time slice against
    ~0.1 ms saved), so a CPU counts as free only when no look of the last second saw it wanted.
    Kernels whose work is that size ask this and run serially when it is 1; larger ones take the
    count regardless.
    """
    count = get_num_threads()
    if count <= 1:
        return count
    return free_threads(count, _watch.busiest(), _HOST_CPUS)


def others_runnable(loadavg: Path | None = None, tasks: Path | None = None) -> int | None:
    """Runnable threads on the machine that belong to other processes, now.

    The running count of ``/proc/loadavg`` (its fourth field, "running/total": every runnable
    thread on the machine) minus this process's threads in state R (``/proc/self/task/*/stat``):
    the engine's own threads (a BLAS worker spinning after its GEMM, torch's pool) do not count as
    load, or a choice of two threads would read as a busy machine and undo itself. None where
    /proc cannot be read (not Linux). ``loadavg`` and ``tasks`` default to the real files (tests
    point them at fakes).
    """
    try:
        running = int((PROC_LOADAVG if loadavg is None else loadavg).read_text().split()[3].split("/")[0])
        own = 0
        for task in (PROC_TASKS if tasks is None else tasks).iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2:stat.rindex(")") + 3] == "R"  # the field after "(comm)"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


class RunQueueWatch:
    """The mean of the last LOAD_SAMPLES looks at :func:`others_runnable`, one look per LOAD_CHECK_S.

    Looks happen when :meth:`others` is asked (before a mid-size GEMM), so a process that runs no
    GEMM reads nothing. ``reader`` and ``clock`` default to the real ones (tests pass fakes).
    """

    def __init__(self, reader=others_runnable, clock=time.monotonic):
        self.reader, self.clock = reader, clock
        self.samples: deque = deque(maxlen=LOAD_SAMPLES)
        self.next_look = None

    def others(self) -> float | None:
        """Other processes' runnable threads, averaged over the last looks (None when unknown)."""
        self._look()
        return sum(self.samples) / len(self.samples) if self.samples else None

    def busiest(self) -> int | None:
        """The most runnable threads of other processes that one of the last looks saw (None when unknown)."""
        self._look()
        return max(self.samples) if self.samples else None

    def _look(self) -> None:
        now = self.clock()
        if self.next_look is None or now >= self.next_look:
            if self.next_look is not None and now - self.next_look > LOAD_CHECK_S * LOAD_SAMPLES:
                self.samples.clear()  # looks older than the window (no GEMM for a while) say nothing of now
            self.next_look = now + LOAD_CHECK_S
            seen = self.reader()
            if seen is None:
                self.samples.clear()
            else:
                self.samples.append(seen)


_watch = RunQueueWatch()
_HOST_CPUS = os.cpu_count() or 1


def reapply_blas_limit() -> None:
    """Limit BLAS libraries loaded since the count was set (threadpoolctl sees only those loaded at
    the time): numba loads scipy's OpenBLAS when it compiles its first kernel. Called once per parallel
    kernel, after its first call, not per call (its cost: docs/benchmarks.md, "Why the thresholds are
    where they are")."""
    if _state["blas_owned"]:
        with _lock:
            _limit_blas(_state["n"])


def numba_threads() -> int | None:
    """The count numba's regions run with (None until the default is applied, or when the user's
    NUMBA_NUM_THREADS rules): capped at numba's pool size, fixed when numba started."""
    wanted = _state.get("numba")
    if wanted is None:
        return None
    import numba

    return min(wanted, numba.config.NUMBA_NUM_THREADS)


def sync_numba_threads() -> None:
    """Set the calling Python thread's numba thread count to the owner's (numba keeps one per thread).

    Cheap when it already matches (docs/benchmarks.md, "Why the thresholds are where they are");
    called before every parallel region.
    """
    if _state.get("numba") is None or "numba" not in sys.modules:  # nothing to set, or numba not in use yet
        return
    from .registry import configure_numba_threads

    configure_numba_threads()  # numba's first thread query starts its pool: with the engine's layer
    import numba

    wanted = numba_threads()
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)

"""engine.set_num_threads / get_num_threads: one count for the BLAS and numba, following the CPU quota.

The readers of the cgroup files are tested on fake cgroup trees; the count the engine picks is
tested with the readers monkeypatched, and in child processes (the pools' sizes are fixed when
numba and the BLAS start, and the test runner's own environment pins them to 1): one pinned to one
CPU with ``taskset``, one that sets and reads the count from two Python threads.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine.kernels import threads

ROOT = Path(__file__).resolve().parents[1]
POOL_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "NUMBA_THREADING_LAYER")


def _tree(tmp_path, proc_lines, files):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    for rel, text in files.items():
        path = tmp_path / "cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path / "cgroup", proc


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    root, proc = _tree(tmp_path, ["0::/outer/inner"], {"cpu.max": "max 100000", "outer/cpu.max": "300000 100000",
                                                       "outer/inner/cpu.max": "150000 100000"})
    assert threads.cgroup_cpu_quota(root, proc) == 1.5
    root, proc = _tree(tmp_path / "b", ["0::/outer/inner"], {"outer/cpu.max": "50000 100000",
                                                             "outer/inner/cpu.max": "max 100000"})
    assert threads.cgroup_cpu_quota(root, proc) == 0.5  # the parent's limit binds the child


def test_cgroup_without_limit_or_files_is_no_quota(tmp_path):
    root, proc = _tree(tmp_path, ["0::/"], {"cpu.max": "max 100000"})
    assert threads.cgroup_cpu_quota(root, proc) is None
    assert threads.cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = _tree(tmp_path, ["4:cpu,cpuacct:/job", "3:memory:/job"],
                       {"cpu,cpuacct/job/cpu.cfs_quota_us": "250000", "cpu,cpuacct/job/cpu.cfs_period_us": "100000"})
    assert threads.cgroup_cpu_quota(root, proc) == 2.5
    root, proc = _tree(tmp_path / "none", ["4:cpu,cpuacct:/job"],
                       {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1", "cpu,cpuacct/job/cpu.cfs_period_us": "100000"})
    assert threads.cgroup_cpu_quota(root, proc) is None


@pytest.mark.parametrize("affinity, quota, expected", [(8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (8, 0.3, 1),
                                                        (2, 6.0, 2), (1, None, 1)])
def test_available_cpus_is_affinity_capped_by_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(threads, "_affinity_cpus", lambda: affinity)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: quota)
    assert threads.available_cpus() == expected


def test_default_follows_quota_unless_omp_num_threads(monkeypatch):
    monkeypatch.setattr(threads, "_affinity_cpus", lambda: 16)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 3.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.default_num_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.default_num_threads() == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_set_num_threads_refuses_bad_counts(bad):
    with pytest.raises(engine.EngineError, match="positive integer"):
        engine.set_num_threads(bad)


def test_set_get_round_trip_in_process():
    from threadpoolctl import threadpool_info

    before = engine.get_num_threads()
    try:
        engine.set_num_threads(1)
        assert engine.get_num_threads() == 1
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and all(n == 1 for n in blas)
    finally:
        engine.set_num_threads(before)
    assert engine.get_num_threads() == before


# ------------------------------------------------------------------------------------------------
# Child processes: the pools started fresh, with no thread variables set
# ------------------------------------------------------------------------------------------------


def _child(scenario: str, prefix=(), **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in POOL_VARS}
    clean.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), **env)
    proc = subprocess.run([*prefix, sys.executable, __file__, scenario], cwd=ROOT, env=clean, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_default_follows_affinity_in_a_pinned_child():
    seen = _child("report", prefix=("taskset", "-c", "0"))
    assert seen["engine"] == 1
    assert seen["numpy_blas"] == [1] and all(n == 1 for n in seen["blas"])
    assert seen["numba"] == 1


def test_blas_and_numba_follow_set_num_threads_in_every_python_thread():
    seen = _child("set", NUMBA_NUM_THREADS="2")  # numba's pool: 2 threads even on a 1-CPU runner
    assert seen["default"] == seen["available"]
    for n in ("1", "2"):
        assert seen[n]["engine"] == int(n)
        assert seen[n]["numpy_blas"] == [int(n)]  # the BLAS behind numpy's matmuls
        assert all(b == int(n) for b in seen[n]["blas"])  # and any other loaded by then (numba's scipy BLAS)
        assert seen[n]["numba"] == int(n)
        assert seen[n]["numba_in_new_thread"] == int(n)  # numba's count is per thread: the owner sets it
    # with 2 threads set: a GEMM under BLAS_PARALLEL_MIN multiply-adds runs on one BLAS thread beside
    # busy processes, on two on a quiet machine
    assert seen["gemm"] == {"small": [1], "large": [2], "small_again": [1], "small_quiet": [2]}


@pytest.mark.parametrize("size, count, others, cpus, expected", [
    (1 << 30, 2, 5.0, 2, 2),         # a large GEMM: the engine's count whatever the load
    ((1 << 22) - 1, 2, 0.0, 2, 1),   # a small one: one thread even on a quiet machine
    (1 << 24, 2, 0.0, 2, 2),         # mid-size, quiet: every thread
    (1 << 24, 2, 0.4, 2, 2),         # a stray runnable thread now and then is no load
    (1 << 24, 2, 0.6, 2, 1),         # mostly one other process: its CPU is not ours
    (1 << 24, 2, 3.0, 2, 1),         # busy
    (1 << 24, 2, None, 2, 1),        # load unknown: the busy machine's choice
    (1 << 24, 8, 3.0, 8, 5),         # the CPUs the others leave
    (1 << 24, 4, 1.0, 64, 4),        # a big host: never above the engine's count
    (1 << 24, 1, 0.0, 2, 1),         # one thread set: one thread
])
def test_gemm_threads_follow_size_and_the_others_load(size, count, others, cpus, expected):
    assert threads.gemm_threads(size, count, others, cpus) == expected


def test_region_threads_follow_the_others_load(monkeypatch):
    """A mid-size numba region gets the CPUs other processes leave, as a mid-size GEMM does."""
    engine.get_num_threads()
    monkeypatch.setitem(threads._state, "n", 2)
    monkeypatch.setattr(threads, "_HOST_CPUS", 2)
    for others, expected in ((0, 2), (1, 1), (3, 1), (None, 1)):
        monkeypatch.setattr(threads, "_watch", threads.RunQueueWatch(reader=lambda o=others: o, clock=lambda: 0.0))
        assert threads.region_threads() == expected
    # one look of five saw another process: the GEMMs' mean (0.2) calls the CPU free, a region does not
    looks, now = iter([0, 0, 1, 0, 0]), [0.0]
    watch = threads.RunQueueWatch(reader=lambda: next(looks), clock=lambda: now[0])
    monkeypatch.setattr(threads, "_watch", watch)
    for _ in range(5):
        answer = threads.region_threads()
        now[0] += threads.LOAD_CHECK_S
    assert list(watch.samples) == [0, 0, 1, 0, 0] and answer == 1
    assert threads.free_threads(2, sum(watch.samples) / 5, 2) == 2  # what the GEMMs' mean would give
    monkeypatch.setitem(threads._state, "n", 1)
    monkeypatch.setattr(threads, "_watch", threads.RunQueueWatch(reader=lambda: 0, clock=lambda: 0.0))
    assert threads.region_threads() == 1  # one thread set: one thread


def test_parallel_region_follows_size_and_spare_cpus(monkeypatch):
    spare = [2]
    monkeypatch.setattr(threads, "region_threads", lambda: spare[0])
    assert not threads.parallel_region(999, 1000)
    assert threads.parallel_region(1000, 1000)
    spare[0] = 1  # a busy neighbour: mid-size kernels stay on the calling thread, large ones split
    assert not threads.parallel_region(1000, 1000)
    assert threads.parallel_region(threads.REGION_ALWAYS_MIN, 1000)


def _fake_proc(tmp_path, running: int, states: list[str]):
    (tmp_path / "tasks").mkdir(parents=True)
    (tmp_path / "loadavg").write_text(f"3.10 2.05 1.50 {running}/140 12345\n")
    for tid, state in enumerate(states, start=100):
        (tmp_path / "tasks" / str(tid)).mkdir()
        # a thread name with spaces and a parenthesis, as /proc allows
        (tmp_path / "tasks" / str(tid) / "stat").write_text(f"{tid} (py (worker) 1) {state} 1 {tid} 0 0\n")
    return tmp_path / "loadavg", tmp_path / "tasks"


def test_others_runnable_leaves_out_this_process_threads(tmp_path):
    loadavg, tasks = _fake_proc(tmp_path, running=4, states=["R", "S", "R", "S"])
    assert threads.others_runnable(loadavg, tasks) == 2
    loadavg, tasks = _fake_proc(tmp_path / "quiet", running=2, states=["R", "R", "S"])
    assert threads.others_runnable(loadavg, tasks) == 0
    assert threads.others_runnable(tmp_path / "missing", tasks) is None


def test_others_runnable_reads_this_machine():
    seen = threads.others_runnable()
    assert seen is None or (isinstance(seen, int) and seen >= 0)


def test_run_queue_watch_averages_looks_spaced_in_time():
    now, looks = [0.0], []

    def reader():
        looks.append(now[0])
        return [0, 2, 2, 2, 2, 2, 2][len(looks) - 1]

    watch = threads.RunQueueWatch(reader=reader, clock=lambda: now[0])
    assert watch.others() == 0
    now[0] += threads.LOAD_CHECK_S / 2
    assert watch.others() == 0 and len(looks) == 1  # no second look within LOAD_CHECK_S
    for _ in range(threads.LOAD_SAMPLES + 1):
        now[0] += threads.LOAD_CHECK_S
        watch.others()
    assert len(looks) == threads.LOAD_SAMPLES + 2
    assert watch.others() == 2  # the quiet look has left the window


def test_run_queue_watch_forgets_looks_older_than_its_window():
    values, now = iter([3, 3, 0]), [0.0]
    watch = threads.RunQueueWatch(reader=lambda: next(values), clock=lambda: now[0])
    watch.others()
    now[0] += threads.LOAD_CHECK_S
    assert watch.others() == 3
    now[0] += 100.0  # no GEMM for a long while, then a quiet machine
    assert watch.others() == 0


def test_run_queue_watch_forgets_on_unreadable_proc():
    values = iter([0, None])
    now = [0.0]
    watch = threads.RunQueueWatch(reader=lambda: next(values), clock=lambda: now[0])
    assert watch.others() == 0
    now[0] += threads.LOAD_CHECK_S
    assert watch.others() is None


class _FakeBlas:
    def __init__(self):
        self.counts = []

    def set_num_threads(self, n):
        self.counts.append(n)


def test_for_gemm_sizes_the_blas_by_the_watch(monkeypatch):
    engine.get_num_threads()  # the default applied, so for_gemm does not apply it over the fakes
    blas = _FakeBlas()
    monkeypatch.setitem(threads._state, "n", 2)
    monkeypatch.setitem(threads._state, "blas_owned", True)
    monkeypatch.setitem(threads._blas, "controllers", (blas,))
    monkeypatch.setitem(threads._blas, "current", None)
    monkeypatch.setattr(threads, "_HOST_CPUS", 2)
    others = [0]
    monkeypatch.setattr(threads, "_watch", threads.RunQueueWatch(reader=lambda: others[0], clock=lambda: 0.0))
    threads.for_gemm(1024, 512, 128)      # 2^26 multiply-adds on a quiet machine
    threads.for_gemm(64, 64, 64)          # small
    others[0] = 3
    threads._watch = threads.RunQueueWatch(reader=lambda: others[0], clock=lambda: 0.0)
    threads.for_gemm(1024, 512, 128)      # the same GEMM beside busy processes
    threads.for_gemm(1024, 1024, 1024)    # large
    assert blas.counts == [2, 1, 2]       # the busy mid-size one stays on 1: no call


@pytest.mark.parametrize("code, env, expected", [
    ("import engine", {}, "4"),                          # set before numpy loads OpenBLAS
    ("import bench", {}, "4"),                           # the bench imports engine first
    ("import numpy, engine", {}, None),                  # too late to matter: left unset
    ("import engine", {"OPENBLAS_THREAD_TIMEOUT": "9"}, "9"),  # the user's value wins
])
def test_openblas_workers_stop_spinning_when_engine_comes_first(code, env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", f"{code}, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"],
                         env=environ, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out == str(expected)


def _report() -> dict:
    import numba
    from threadpoolctl import threadpool_info

    from engine.kernels.registry import numba_parallel

    @numba.njit
    def region_threads():
        return numba.get_num_threads()

    region = numba_parallel(region_threads)  # the wrapper every parallel kernel goes through
    seen = {}

    def in_new_thread():
        seen["value"] = region()

    import threading

    in_main = region()  # compiles, and loads whatever BLAS numba's compiler loads: limited after this call
    worker = threading.Thread(target=in_new_thread)
    worker.start()
    worker.join()
    return {"engine": engine.get_num_threads(), "numba": in_main, "numba_in_new_thread": seen["value"],
            "blas": [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"],
            "numpy_blas": [pool["num_threads"] for pool in threadpool_info()
                           if pool["user_api"] == "blas" and "numpy" in pool["filepath"]]}


if __name__ == "__main__":
    from threadpoolctl import threadpool_info

    if sys.argv[1] == "report":
        print(json.dumps(_report()))
    else:
        result = {"default": engine.get_num_threads(), "available": threads.available_cpus()}
        for count in (1, 2):
            engine.set_num_threads(count)
            result[str(count)] = _report()
        small, large = threads.BLAS_PARALLEL_MIN // 64 - 1, threads.BLAS_PARALLEL_MIN // 64
        threads._watch = threads.RunQueueWatch(reader=lambda: 5)  # a busy machine: the test runner's load must not decide
        result["gemm"] = {}
        for name, m in (("small", small), ("large", large), ("small_again", small)):
            threads.for_gemm(m, 8, 8)
            result["gemm"][name] = [pool["num_threads"] for pool in threadpool_info()
                                    if pool["user_api"] == "blas" and "numpy" in pool["filepath"]]
        threads._HOST_CPUS = 2
        threads._watch = threads.RunQueueWatch(reader=lambda: 0)  # a quiet 2-CPU machine
        threads.for_gemm(small, 8, 8)
        result["gemm"]["small_quiet"] = [pool["num_threads"] for pool in threadpool_info()
                                         if pool["user_api"] == "blas" and "numpy" in pool["filepath"]]
        print(json.dumps(result))

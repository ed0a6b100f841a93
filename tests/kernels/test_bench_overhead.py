"""bench/overhead.py runs and reports a row per fused-kernel entry point (no timing asserted:
the machines are noisy; the figures themselves are in the commit messages and docs)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np

import kernels
from bench import overhead
from kernels import registry

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_has_a_row_per_entry_point():
    rows = overhead.run("cpu", quick=True)
    assert [row["kernel"] for row in rows] == list(overhead.ENTRY_POINTS)
    assert set(overhead.ENTRY_POINTS) <= set(kernels.__all__)
    for row in rows:
        for column in ("checks_us", "dispatch_us", "host_us"):
            assert math.isfinite(row[column]) and row[column] > 0, row
        assert math.isclose(row["host_us"], row["checks_us"] + row["dispatch_us"])
    assert "adam_step" in overhead.format_table(rows)


def test_the_stubbed_impl_is_restored():
    p = np.ones(4, np.float32)
    before = registry.choose("sgd_step", [p]).fn
    overhead.run("cpu", quick=True)
    assert registry.choose("sgd_step", [p]).fn is before
    kernels.sgd_step(p, np.ones(4, np.float32), lr=0.5)
    assert p.tolist() == [0.5] * 4, "the real kernel runs again after the benchmark"


def test_command_line():
    run = subprocess.run([sys.executable, "-m", "bench.overhead", "--device", "cpu", "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for name in overhead.ENTRY_POINTS:
        assert any(line.startswith(name + " ") for line in lines), (name, run.stdout)

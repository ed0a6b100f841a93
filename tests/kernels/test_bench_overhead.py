"""bench/overhead.py runs and reports a row per fused-kernel entry point and per engine op beside
torch (no timing asserted: the machines are noisy; the figures themselves are in the commit
messages and docs/performance.md)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from bench import overhead
from engine.kernels import registry

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


@pytest.mark.slow
def test_command_line():
    run = subprocess.run([sys.executable, "-m", "bench.overhead", "--device", "cpu", "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for name in overhead.ENTRY_POINTS:
        assert any(line.startswith(name + " ") for line in lines), (name, run.stdout)


@pytest.mark.slow
def test_the_op_table_has_engine_and_torch_figures_per_op():
    pytest.importorskip("torch")
    rows = overhead.run_ops("cpu", number=3, repeat=2)
    assert [row["op"] for row in rows][:2] == ["a + b (grad)", "a * b (grad)"]
    assert any(row["op"].startswith("MLP") for row in rows)
    for row in rows:
        for column in ("engine_us", "torch_us", "engine_min_us", "torch_min_us"):
            assert math.isfinite(row[column]) and row[column] > 0, row
        assert math.isclose(row["ratio"], row["engine_us"] / row["torch_us"])
    table = overhead.format_ops_table(rows)
    assert "((a*b+a).tanh()*b).sum().backward()" in table and "ratio min" in table


@pytest.mark.slow
def test_another_checkout_is_measured_in_its_own_processes():
    pytest.importorskip("torch")
    rows = overhead.compare_trees([str(ROOT), str(ROOT)], number=2, rounds=1)
    assert len(rows) == len(overhead.run_ops("cpu", number=1, repeat=1))
    for row in rows:
        assert row[str(ROOT)]["min_us"] > 0 and row["torch"]["median_us"] > 0
    assert "this tree" in overhead.format_compare_table(rows, [str(ROOT), str(ROOT)])

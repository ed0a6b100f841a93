"""The benchmark harness: formulas, timers, and a tiny end-to-end run whose JSON is checked.

The tiny run (``python -m bench --tiny``) exercises every kernel, every peer and the training
step on sizes that take seconds; its figures mean nothing, but every field must be there, the
arithmetic between fields must hold, and every candidate must match the numpy reference.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import __main__ as cli
from bench import device as bench_device
from bench import kernels as kbench
from bench import e2e_common, end_to_end, gpt_decode, roofline, timing
from engine.kernels import registry
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent

ROW_FIELDS = {
    "kernel", "case", "params", "size", "impl", "role", "device", "status", "bytes", "flops", "flushed_cache",
    "reference", "max_rel_err", "median_s", "spread", "min_s", "max_s", "q25_s", "q75_s", "repeats",
    "host_median_s", "GBps", "TFLOPs", "fraction_of_copy_bw", "fraction_of_gemm", "roofline_fraction", "bound",
    "vs_torch", "vs_torch_peer", "vs_unfused", "vs_unfused_peer", "target",
}
E2E_FIELDS = {"model", "layers", "batch", "impl", "device", "status", "params", "flops", "median_s", "spread",
              "host_median_s", "host_over_device", "repeats", "samples_per_s", "TFLOPs", "fraction_of_gemm",
              "loss_step1", "loss_step3", "loss_rel_err", "loss_step3_rel_err", "vs_torch", "vs_torch_peer",
              "target"}


def torch_installed() -> bool:
    return bench_device._import_torch()[0] is not None


# ---- formulas ---------------------------------------------------------------------------------

def test_byte_counts_match_the_design_guide():
    assert roofline.adam_work(1000).bytes == 28 * 1000  # read p, g, m, v; write p, m, v
    for fn in (roofline.sgd_work, roofline.adagrad_work, roofline.rmsprop_work):
        assert fn(1000).bytes == 20 * 1000
    n, c = 8192, 1024
    assert roofline.cross_entropy_work(n, c).bytes == 2 * n * c * 4 + n * 8 + n * 4
    assert roofline.linear_relu_forward_work(3, 5, 7).flops == 2 * 3 * 5 * 7 + 2 * 3 * 7
    assert roofline.linear_relu_forward_work(3, 5, 7).bytes == (15 + 35 + 7 + 21) * 4
    assert roofline.linear_relu_backward_work(3, 5, 7).flops == 4 * 3 * 5 * 7 + 2 * 3 * 7
    assert roofline.copy_work(10).bytes == 80


def test_roofline_floor_and_achieved_figures():
    ceilings = roofline.Ceilings(copy_bandwidth=100e9, gemm_flops=1e12, details={})
    memory = roofline.Work(bytes=10**9, flops=10**6)  # 10 ms of memory, 1 us of compute
    assert ceilings.floor_s(memory) == pytest.approx(0.01)
    got = roofline.achieved(memory, 0.02, ceilings)
    assert got["GBps"] == pytest.approx(50.0)
    assert got["fraction_of_copy_bw"] == pytest.approx(0.5)
    assert got["roofline_fraction"] == pytest.approx(0.5)
    assert got["bound"] == "memory"
    compute = roofline.Work(bytes=10**6, flops=10**12)  # 1 s of compute
    got = roofline.achieved(compute, 4.0, ceilings)
    assert got["TFLOPs"] == pytest.approx(0.25)
    assert got["roofline_fraction"] == pytest.approx(0.25)
    assert got["bound"] == "compute"


# ---- timing -----------------------------------------------------------------------------------

def test_summarize_median_quartiles_and_spread():
    m = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (m.median_s, m.min_s, m.max_s, m.repeats) == (3.0, 1.0, 5.0, 5)
    assert (m.q25_s, m.q75_s) == (2.0, 4.0)
    assert m.spread == pytest.approx(2.0 / 3.0)
    assert m.host_median_s == 3.0
    assert timing.summarize([1.0, 2.0], host_times=[0.1, 0.3]).host_median_s == pytest.approx(0.2)


def test_repeat_count_fits_budget_within_bounds():
    assert timing.repeat_count(0.01, 1.0, 3, 50) == 50
    assert timing.repeat_count(0.1, 1.0, 3, 50) == 10
    assert timing.repeat_count(1.0, 1.0, 3, 50) == 3
    assert timing.repeat_count(0.0, 1.0, 3, 50) == 50


def test_cpu_clock_times_a_known_sleep():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.004)

    clock = timing.CpuClock(budget_s=0.02, warmup=1, min_repeats=3, max_repeats=4, flush_bytes=2**20)
    m = clock.measure(nap, flush=True)
    assert 3 <= m.repeats <= 4
    assert len(calls) == m.repeats + 1  # the warm-up call is not timed
    assert 0.004 <= m.min_s <= m.median_s <= m.max_s < 0.5


def test_interleaved_timing_takes_turns_and_isolates_a_failure():
    order = []
    clock = timing.CpuClock(budget_s=0.0, warmup=1, min_repeats=2, max_repeats=2)

    def broken():
        order.append("broken")
        raise RuntimeError("out of memory")

    results = timing.measure_interleaved([(clock, lambda: order.append("a")), (clock, broken),
                                          (clock, lambda: order.append("b"))], rounds=3)
    # Each round: a's warm-up and timed call, broken once (then skipped), b's; a and b alternate.
    assert order == ["a", "a", "broken", "b", "b"] + ["a", "a", "b", "b"] * 2
    assert isinstance(results[1], RuntimeError)
    assert results[0].repeats == results[2].repeats == 3  # one timed call per round (a third of 2, rounded)


# ---- checks -----------------------------------------------------------------------------------

def test_max_relative_error_is_relative_to_the_largest_reference_value():
    ref = {"a": np.array([1.0, -4.0]), "b": np.array([2.0])}
    got = {"a": np.array([1.0, -3.0]), "b": np.array([2.0]), "extra": np.zeros(3)}
    assert kbench.max_relative_error(got, ref) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shape"):
        kbench.max_relative_error({"a": np.zeros(3)}, ref)


def test_sample_indices_cover_both_ends():
    assert kbench.sample_indices(10, 100).tolist() == list(range(10))
    idx = kbench.sample_indices(10**6, 256)
    assert idx[0] == 0 and idx[-1] == 10**6 - 1
    assert len(idx) <= 256 and np.all(np.diff(idx) > 0)


def test_kernel_selection_by_prefix():
    assert kbench.select_kernels(["linear_relu"]) == ["linear_relu_forward", "linear_relu_backward"]
    assert set(kbench.select_kernels(None)) >= set(kbench.FAMILIES)
    with pytest.raises(SystemExit, match="unknown kernel"):
        kbench.select_kernels(["no_such_kernel"])


# ---- a tiny run, checked through its JSON -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = cli.main(["--tiny", "--device", "cpu", "--quiet", "--json", str(out / "r.json"),
                       "--markdown", str(out / "r.md")])
    return result, json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


@pytest.mark.slow
def test_tiny_run_json_has_environment_and_ceilings(tiny_run):
    result, saved, _ = tiny_run
    assert saved["schema"] == 1 and saved["settings"]["mode"] == "tiny"
    env = saved["environment"]
    for key in ("date_utc", "device", "device_name", "cpu_model", "cpu_count", "python", "versions", "threads",
                "tf32", "torch", "load_average_1_5_15min"):
        assert key in env, key
    assert env["device"] == "cpu" and env["tf32"]["enabled"] is False
    for lib in ("numpy", "numba", "cupy", "torch"):
        assert lib in env["versions"]
    assert env["versions"]["numpy"] == np.__version__
    assert "blas" in env["threads"] and "torch" in env["threads"]
    ceil = saved["ceilings"]
    # rates, not timings: only their sign and an upper bound no machine reaches are checked, since a
    # busy machine can slow the small copy and GEMM by orders of magnitude (seen: 7.6e-5 TFLOP/s at
    # load 9.6 on 2 cores)
    assert 0 < ceil["copy_bandwidth_GBps"] < 10_000
    assert 0 < ceil["gemm_TFLOPs"] < 2_000
    assert ceil["copy_method"] in ("array_copy", "numba_parallel")


@pytest.mark.slow
def test_tiny_run_covers_every_kernel_impl_and_peer(tiny_run):
    rows = tiny_run[1]["kernels"]
    for kernel in kbench.FAMILIES:
        impls = {r["impl"] for r in rows if r["kernel"] == kernel}
        assert {"numpy", "numba_cpu"} <= impls, kernel
        assert any(r["role"] == "unfused" for r in rows if r["kernel"] == kernel), kernel
        assert any(r["role"] == "torch" for r in rows if r["kernel"] == kernel), kernel
    assert not [r for r in rows if r["status"].startswith("error")], [r["status"] for r in rows]


@pytest.mark.slow
def test_tiny_run_rows_are_complete_and_consistent(tiny_run):
    ceil = tiny_run[1]["ceilings"]
    for row in tiny_run[1]["kernels"]:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        if row["status"] != "ok":
            assert row["status"].startswith("unavailable: ") and row["median_s"] is None
            continue
        assert row["repeats"] >= 2
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["GBps"] == pytest.approx(row["bytes"] / row["median_s"] / 1e9)
        assert row["fraction_of_copy_bw"] == pytest.approx(row["GBps"] / ceil["copy_bandwidth_GBps"])
        assert row["reference"] == "numpy impl"
        # float32 agreement with the numpy reference; a bfloat16 / float16 row (attention) within
        # two units in the last place of its dtype
        agreement = {"bfloat16": 2 ** -6, "float16": 2 ** -9}.get(row["params"].get("dtype"), 1e-4)
        assert row["max_rel_err"] < agreement, row
        if row["kernel"] == "adam_step":
            assert row["bytes"] == 28 * row["params"]["n"] and row["flushed_cache"] is False  # CPU: warm caches
        if row["vs_unfused"] is not None:
            assert row["vs_unfused"] > 0 and row["vs_unfused_peer"].startswith("engine")


@pytest.mark.slow
def test_tiny_run_ratios_and_targets(tiny_run):
    rows = tiny_run[1]["kernels"]
    adam = {r["impl"]: r for r in rows if r["kernel"] == "adam_step"}
    numba_row, unfused = adam["numba_cpu"], adam["engine Adam(fused=False)"]
    assert numba_row["vs_unfused"] == pytest.approx(unfused["median_s"] / numba_row["median_s"])
    assert numba_row["target"].startswith(("met", "missed"))
    assert "x numpy, target >= 3x" in numba_row["target"]  # the CPU Adam target, at the tiny size
    assert adam["numpy"]["target"] == ""  # the reference has no target
    forward = {r["impl"]: r for r in rows if r["kernel"] == "linear_relu_forward"}
    assert "plain-GEMM TFLOP/s" in forward["numba_cpu"]["target"]
    if torch_installed():
        peer = adam["torch Adam(fused=True)"]
        if peer["status"] == "ok":
            assert numba_row["vs_torch"] == pytest.approx(peer["median_s"] / numba_row["median_s"])


@pytest.mark.slow
def test_tiny_run_end_to_end_rows(tiny_run):
    rows = tiny_run[1]["end_to_end"]
    assert {r["impl"] for r in rows} == {"engine F + optim.Adam", "engine F + optim.Adam, CUDA graph",
                                         "engine nn + optim.Adam", "torch eager"}
    captured = next(r for r in rows if r["impl"].endswith(", CUDA graph"))
    assert captured["status"] == "unavailable: a CUDA graph captures GPU work; this run is on the CPU"
    assert captured["target"] == "" and captured["median_s"] is None
    for row in rows:
        assert E2E_FIELDS <= set(row)
        assert row["model"] == "tiny_mlp" and row["layers"] == [64, 48, 32, 10]
        assert row["flops"] == 6 * 8 * (64 * 48 + 48 * 32 + 32 * 10)
        assert row["params"] == 64 * 48 + 48 + 48 * 32 + 32 + 32 * 10 + 10
        if row["status"] == "ok":
            assert row["samples_per_s"] == pytest.approx(row["batch"] / row["median_s"])
            assert math.isfinite(row["loss_step1"]) and row["loss_rel_err"] < 1e-4
            if row["impl"].startswith("engine") and row["vs_torch"] is not None:
                verdict = "met" if 1 / row["vs_torch"] <= 1.3 else "missed"  # the CPU step-time target
                assert row["target"].startswith(f"{verdict}: {1 / row['vs_torch']:.2f}x torch's step time")
        else:
            assert row["status"].startswith("unavailable: ")
    assert rows[0]["status"] == "ok"


@pytest.mark.slow
def test_tiny_run_markdown_has_every_table(tiny_run):
    md = tiny_run[2]
    for kernel in kbench.FAMILIES:
        assert f"## {kernel}" in md
    assert "| case | impl | time |" in md and "## End to end" in md
    assert "copy bandwidth" in md


# ---- --dtype bf16: bf16 rows ----------------------------------------------------------------------

BF16_FAMILIES = ["linear_relu_forward", "linear_relu_backward", "softmax_cross_entropy", "layer_norm", "adam_step"]


@pytest.fixture(scope="module")
def bf16_run():
    return cli.main(["--tiny", "--device", "cpu", "--quiet", "--dtype", "bf16", "--kernel", *BF16_FAMILIES])


@pytest.mark.slow
def test_bf16_run_gives_bf16_rows_that_say_what_does_not_take_bf16(bf16_run):
    assert bf16_run["settings"]["dtype"] == "bfloat16"
    rows = bf16_run["kernels"]
    assert {r["kernel"] for r in rows} == set(BF16_FAMILIES)
    assert not [r for r in rows if r["status"].startswith("error")], [r["status"] for r in rows]
    for row in rows:
        assert ROW_FIELDS <= set(row) and row["dtype"] == "bfloat16"
        if row["role"] == "impl" and row["status"] != "ok":
            # a kernel impl that has no bf16 path yet names the dtypes it takes, instead of failing the run
            assert row["status"].startswith("unavailable: takes no bfloat16 inputs yet: "), row["status"]
            assert "bfloat16" in row["status"] and "float32" in row["status"]
        elif row["role"] != "impl":
            assert row["status"] == "ok" or (row["role"] == "torch" and row["status"].startswith("unavailable: ")), row
    for kernel in BF16_FAMILIES:  # the engine's own path runs in bf16 everywhere, checked against float32
        engine_rows = [r for r in rows if r["kernel"] == kernel and r["impl"].startswith("engine")]
        assert engine_rows and all(r["status"] == "ok" for r in engine_rows), kernel
        errors = [(r["impl"], r["max_rel_err"]) for r in engine_rows]
        assert all(0 < err < 2 ** -6 for _, err in errors), errors
    for row in rows:
        if row["status"] == "ok":
            assert row["reference"] == "numpy impl" and row["max_rel_err"] < 2 ** -5, row  # bf16 rounding, not worse
            if row["kernel"] == "linear_relu_forward":
                n, k, m = (row["params"][key] for key in "NKM")
                assert row["bytes"] == (n * k + m * k + m + n * m) * 2  # 2-byte elements
            if row["kernel"] == "adam_step":
                assert row["bytes"] == 14 * row["params"]["n"]


@pytest.mark.slow
def test_bf16_run_compares_with_torch_under_autocast(bf16_run):
    if not torch_installed():
        pytest.skip("torch not installed")
    rows = {(r["kernel"], r["impl"]): r for r in bf16_run["kernels"]}
    for kernel, peer in (("linear_relu_forward", "torch relu(linear)"),
                         ("softmax_cross_entropy", "torch F.cross_entropy")):
        torch_row = rows[(kernel, peer)]
        assert torch_row["status"] == "ok"
        unfused = next(r for (k, _), r in rows.items() if k == kernel and r["role"] == "unfused")
        assert unfused["vs_torch_peer"] == peer and unfused["vs_torch"] > 0
    e2e = bf16_run["end_to_end"]
    assert {r["dtype"] for r in e2e} == {"bfloat16"}
    by_impl = {r["impl"]: r for r in e2e}
    # same weights and data, both under autocast(bfloat16): the first losses agree to bf16 rounding
    assert by_impl["torch eager"]["status"] == "ok" and by_impl["torch eager"]["loss_rel_err"] < 2 ** -7


def test_bf16_targets_are_issue_21s_and_only_where_it_names_them():
    bf16 = dict(dtype="bfloat16")
    square = {"N": 4096, "K": 4096, "M": 4096}
    forward = [kernel_row("cupy", square, TFLOPs=700.0, vs_torch=0.93, vs_torch_peer="torch relu(linear)", **bf16),
               kernel_row("gemm x @ W.T", square, role="gemm", TFLOPs=760.0, **bf16)]
    assert statuses("linear_relu_forward", "cuda", forward)["cupy"] == "met"  # >= 0.9x torch in bf16 (> 1x in fp32)
    forward[0]["vs_torch"] = 0.85
    assert statuses("linear_relu_forward", "cuda", forward)["cupy"] == (
        "missed: 0.85x torch relu(linear), target >= 0.9x")
    vocab = {"N": 8192, "C": 50304}
    ce = [kernel_row("cupy", vocab, fraction_of_copy_bw=0.83, vs_torch=1.7, vs_torch_peer="torch F.cross_entropy",
                     **bf16)]
    assert statuses("softmax_cross_entropy", "cuda", ce)["cupy"] == "met"
    ce_fp32_size = [kernel_row("cupy", {"N": 8192, "C": 32768}, fraction_of_copy_bw=0.9, vs_torch=2.0, **bf16)]
    assert statuses("softmax_cross_entropy", "cuda", ce_fp32_size)["cupy"] == kbench.NO_TARGET_AT_SIZE
    adam = [kernel_row("cupy", ADAM_TARGET, fraction_of_copy_bw=0.9, vs_torch=1.2, **bf16)]
    assert statuses("adam_step", "cuda", adam)["cupy"] == ""  # no bf16 target for the optimizers


def test_bf16_gpu_sweeps_measure_every_bf16_target_case():
    class Low:
        kind, low_precision = "cuda", True

    for mode in ("full", "quick"):
        for kernel, target in kbench.CUDA_TARGETS_LOW_PRECISION.items():
            # each case builder holds its size as its default arguments: (N, C), or ((N, K, M),)
            sizes = [b.__defaults__ if len(b.__defaults__) > 1 else b.__defaults__[0]
                     for b in kbench.cases_for(kernel, Low(), mode)]
            assert tuple(target.params.values()) in sizes, (mode, kernel, sizes)


@pytest.mark.slow
def test_without_torch_the_columns_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_device, "_import_torch", lambda: (None, bench_device.TORCH_MISSING))
    result = cli.main(["--tiny", "--device", "cpu", "--quiet", "--kernel", "adam_step", "--skip-e2e"])
    rows = {r["impl"]: r for r in result["kernels"]}
    assert rows["torch Adam(fused=True)"]["status"] == "unavailable: torch not installed"
    assert rows["numba_cpu"]["vs_torch"] is None
    assert rows["numba_cpu"]["vs_torch_peer"] == "torch not installed"
    assert "vs torch: torch not installed" in rows["numba_cpu"]["target"]
    assert result["environment"]["torch"] == "torch not installed"


@pytest.mark.slow
def test_an_impl_whose_module_is_missing_is_reported_unavailable():
    registry.register("adam_step", "not_written_yet", "engine.kernels.cpu.no_such_module:adam_step", array_kind="numpy")
    try:
        result = cli.main(["--tiny", "--device", "cpu", "--quiet", "--kernel", "adam_step", "--skip-e2e",
                           "--no-torch"])
    finally:
        del registry._REGISTRY["adam_step"]["not_written_yet"]
    row = next(r for r in result["kernels"] if r["impl"] == "not_written_yet")
    assert row["status"].startswith("unavailable: ModuleNotFoundError")
    assert "no_such_module" in row["status"]
    assert any(r["impl"] == "numba_cpu" and r["status"] == "ok" for r in result["kernels"])


@pytest.mark.slow
def test_cli_runs_from_the_source_checkout(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--device", "cpu", "--kernel", "sgd_step",
                           "--skip-e2e", "--no-torch", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sgd_step" in proc.stdout and "ceilings:" in proc.stdout
    rows = json.loads(out.read_text())["kernels"]
    assert {r["impl"] for r in rows if r["status"] == "ok"} >= {"numpy", "numba_cpu"}


@pytest.mark.gpu
def test_tiny_run_on_the_gpu():
    result = cli.main(["--tiny", "--device", "cuda", "--quiet"])
    env, rows = result["environment"], result["kernels"]
    assert env["device"] == "cuda" and "driver_version" in env["gpu"] and env["gpu"]["sm_count"] > 0
    assert result["ceilings"]["copy_bandwidth_GBps"] > 10
    assert not [r for r in rows if r["status"].startswith("error")], [r["status"] for r in rows]
    for kernel in kbench.FAMILIES:
        impls = {r["impl"] for r in rows if r["kernel"] == kernel}
        assert "cupy" in impls and "numpy" not in impls, kernel
    for row in rows:
        if row["status"] == "ok":
            assert row["flushed_cache"] == (row["kernel"] not in ("linear_relu_forward", "linear_relu_backward"))
            assert row["max_rel_err"] < 1e-4, row
            assert 0 < row["host_median_s"] and 0 < row["median_s"]
    assert all(r["status"] == "ok" for r in result["end_to_end"] if r["impl"].startswith("engine F"))
    assert all(r["host_over_device"] > 0 for r in result["end_to_end"] if r["status"] == "ok")


# ---- targets: which rows get a verdict (pure functions, nothing timed) -------------------------

def kernel_row(impl, params, role="impl", status="ok", **figures):
    row = {"impl": impl, "role": role, "status": status, "params": params, "median_s": 1e-3,
           "fraction_of_copy_bw": None, "TFLOPs": None, "vs_torch": None, "vs_torch_peer": None}
    row.update(figures)
    return row


def statuses(kernel, device, rows, mode="full"):
    by_name = {r["impl"]: r for r in rows}
    return {r["impl"]: kbench.target_status(r, kernel, device, mode, by_name) for r in rows}


ADAM_TARGET = {"n": 2**27}


def test_gpu_adam_target_applies_to_cupy_at_2_27_only():
    fast = dict(fraction_of_copy_bw=0.94, vs_torch=1.16, vs_torch_peer="torch Adam(fused=True)")
    at_target = statuses("adam_step", "cuda", [
        kernel_row("cupy", ADAM_TARGET, **fast), kernel_row("numba_cuda", ADAM_TARGET, **fast),
        kernel_row("engine Adam(fused=True)", ADAM_TARGET, role="engine", **fast),
        kernel_row("torch Adam(fused=True)", ADAM_TARGET, role="torch")])
    assert at_target == {"cupy": "met", "numba_cuda": kbench.NO_TARGET_FOR_IMPL,
                         "engine Adam(fused=True)": "", "torch Adam(fused=True)": ""}
    small = statuses("adam_step", "cuda", [kernel_row("cupy", {"n": 2**20}, fraction_of_copy_bw=0.62,
                                                      vs_torch=5.7, vs_torch_peer="torch Adam(fused=True)"),
                                           kernel_row("numba_cuda", {"n": 2**20}, fraction_of_copy_bw=0.03)])
    assert small == {"cupy": kbench.NO_TARGET_AT_SIZE, "numba_cuda": kbench.NO_TARGET_FOR_IMPL}
    assert small["cupy"] == "- (no target at this size)" and not small["cupy"].startswith(("met", "missed"))


def test_gpu_target_says_what_was_missed_and_by_how_much():
    slow = kernel_row("cupy", ADAM_TARGET, fraction_of_copy_bw=0.80, vs_torch=0.9,
                      vs_torch_peer="torch Adam(fused=True)")
    got = statuses("adam_step", "cuda", [slow])["cupy"]
    assert got == "missed: 80% of copy BW, target >= 85%; 0.90x torch Adam(fused=True), target > 1x"
    no_torch = kernel_row("cupy", ADAM_TARGET, fraction_of_copy_bw=0.9, vs_torch_peer="torch not installed")
    assert statuses("adam_step", "cuda", [no_torch])["cupy"] == "met (vs torch: torch not installed)"


def test_gpu_cross_entropy_and_linear_relu_targets():
    ce = {"N": 8192, "C": 32768}
    rows = [kernel_row("cupy", ce, fraction_of_copy_bw=0.87, vs_torch=1.4, vs_torch_peer="torch F.cross_entropy")]
    assert statuses("softmax_cross_entropy", "cuda", rows)["cupy"] == (
        "missed: 1.40x torch F.cross_entropy, target >= 1.5x")
    for c in (1024, 8192, 131072):  # smaller: launch-bound; larger: the row no longer fits on chip
        rows = [kernel_row("cupy", {"N": 8192, "C": c}, fraction_of_copy_bw=0.25, vs_torch=2.6)]
        assert statuses("softmax_cross_entropy", "cuda", rows)["cupy"] == kbench.NO_TARGET_AT_SIZE
    square = {"N": 4096, "K": 4096, "M": 4096}
    forward = [kernel_row("cupy", square, TFLOPs=50.3, vs_torch=1.01, vs_torch_peer="torch relu(linear)"),
               kernel_row("gemm x @ W.T", square, role="gemm", TFLOPs=50.3),
               kernel_row("numba_cuda", square, TFLOPs=5.7, vs_torch=0.11)]
    assert statuses("linear_relu_forward", "cuda", forward) == {
        "cupy": "met", "gemm x @ W.T": "", "numba_cuda": kbench.NO_TARGET_FOR_IMPL}
    other = [kernel_row("cupy", {"N": 8192, "K": 4096, "M": 4096}, TFLOPs=50.2, vs_torch=0.99)]
    assert statuses("linear_relu_forward", "cuda", other)["cupy"] == kbench.NO_TARGET_AT_SIZE
    backward = [kernel_row("cupy", square, vs_torch=0.98, vs_torch_peer="torch autograd")]
    assert statuses("linear_relu_backward", "cuda", backward)["cupy"] == (
        "missed: 0.98x torch autograd, target > 1x")


def test_gpu_rows_without_a_target_and_rows_that_did_not_run():
    sgd = [kernel_row("cupy", {"n": 2**27}, fraction_of_copy_bw=0.96, vs_torch=1.1)]
    assert statuses("sgd_step", "cuda", sgd)["cupy"] == ""  # no target for this kernel at all
    failed = [kernel_row("cupy", ADAM_TARGET, status="error: OutOfMemoryError: ..."),
              kernel_row("numba_cuda", {"n": 2**20}, status="error: CudaAPIError: ...")]
    assert statuses("adam_step", "cuda", failed) == {"cupy": "not measured",
                                                     "numba_cuda": kbench.NO_TARGET_FOR_IMPL}
    setup = {"kernel": "adam_step", "case": "setup", "impl": "-", "role": "impl", "status": "error: ..."}
    assert kbench.target_status(setup, "adam_step", "cuda", "full", {}) == "not measured"


def test_cpu_verdicts_are_unchanged_at_every_size():
    # The CPU keeps a verdict on numba_cpu at every size (the GPU targets as a distance, plus >= 3x
    # numpy at CPU_ADAM_TARGET_SIZE); numpy, the reference, has none.
    rows = [kernel_row("numba_cpu", {"n": 2**16}, fraction_of_copy_bw=0.57, vs_torch=1.48,
                       vs_torch_peer="torch Adam(fused=True)"),
            kernel_row("numpy", {"n": 2**16})]
    got = statuses("adam_step", "cpu", rows)
    assert got == {"numba_cpu": "missed: 57% of copy BW, target >= 85%", "numpy": ""}
    n = kbench.CPU_ADAM_TARGET_SIZE["full"]
    rows = [kernel_row("numba_cpu", {"n": n}, median_s=1e-2, fraction_of_copy_bw=1.08, vs_torch=1.02,
                       vs_torch_peer="torch Adam(fused=True)"),
            kernel_row("numpy", {"n": n}, median_s=1.1e-1)]
    assert statuses("adam_step", "cpu", rows)["numba_cpu"] == "met"
    rows[1]["median_s"] = 2e-2
    assert statuses("adam_step", "cpu", rows)["numba_cpu"] == "missed: 2.00x numpy, target >= 3x"


def test_gpu_sweeps_measure_every_target_case():
    for mode in ("full", "quick"):
        sweep = kbench.SWEEPS[("cuda", mode)]
        assert kbench.CUDA_TARGETS["adam_step"].params["n"] in sweep["adam_step"], mode
        target = kbench.CUDA_TARGETS["softmax_cross_entropy"].params
        assert (target["N"], target["C"]) in sweep["softmax_cross_entropy"], mode
        for kernel in ("linear_relu_forward", "linear_relu_backward"):
            target = kbench.CUDA_TARGETS[kernel].params
            assert (target["N"], target["K"], target["M"]) in sweep["linear_relu"], mode
        batches = dict(end_to_end.BATCHES[("cuda", mode)], **{"gpt-decode": gpt_decode.BATCHES[("cuda", mode)]})
        for model, batch in end_to_end.TARGET_CASES["cuda"]:
            assert batch in batches[model], (mode, model)
    assert end_to_end.MODELS["mlp"] == (784, 1024, 1024, 10) and end_to_end.MODELS["wide"] == (4096, 4096, 4096)


def test_gpu_attention_sweep_has_the_tensor_core_rows():
    """Issue 22's attention rows (GPU only; a CPU run never sweeps them): bf16 and float32 (whose
    3xTF32 candidate runs on tensor cores) at B*H=128, L=S=1024, D 64 and 128, causal and not, and
    an L=S=8192 bf16 row for the O(L) memory point."""
    sweep = kbench.SWEEPS[("cuda", "full")]["attention"]
    for e in (64, 128):
        for causal in (False, True):
            assert (128, 1024, 1024, e, causal, "bfloat16") in sweep, (e, causal)
            assert (128, 1024, 1024, e, causal) in sweep, (e, causal)
    assert (16, 8192, 8192, 64, False, "bfloat16") in sweep
    for mode in ("full", "quick", "tiny"):
        assert max(case[1] for case in kbench.SWEEPS[("cpu", mode)]["attention"]) <= 1024, mode


def e2e_row(model, batch, impl="engine F + optim.Adam", status="ok", vs_torch=None):
    return {"model": model, "batch": batch, "impl": impl, "status": status, "vs_torch": vs_torch,
            "vs_torch_peer": "torch eager" if vs_torch else None}


def test_end_to_end_gpu_target_applies_at_the_issue_cases_only():
    assert end_to_end.target_status(e2e_row("mlp", 256, vs_torch=1.05), "cuda") == (
        "met: 0.95x torch's step time, target <= 1x")
    assert end_to_end.target_status(e2e_row("wide", 1024, vs_torch=0.85), "cuda") == (
        "missed: 1.18x torch's step time, target <= 1x")
    assert end_to_end.target_status(e2e_row("wide", 1024, impl="engine nn + optim.Adam", vs_torch=0.85),
                                    "cuda").startswith("missed")
    for model, batch in (("mlp", 64), ("mlp", 4096), ("wide", 256), ("wide", 4096), ("tiny_mlp", 8)):
        assert end_to_end.target_status(e2e_row(model, batch, vs_torch=0.67), "cuda") == (
            end_to_end.NO_TARGET_AT_BATCH), (model, batch)
    assert end_to_end.target_status(e2e_row("mlp", 256, impl="torch eager"), "cuda") == ""
    assert end_to_end.target_status(e2e_row("mlp", 256, status="error: boom"), "cuda") == ""


def test_a_captured_step_has_the_issues_captured_targets_on_the_gpu_only():
    graph = "engine F + optim.Adam, CUDA graph"
    assert end_to_end.target_status(e2e_row("mlp", 256, impl=graph, vs_torch=3.0), "cuda") == (
        "met: 0.33x torch's step time, target <= 0.4x")
    assert end_to_end.target_status(e2e_row("mlp", 256, impl=graph, vs_torch=2.0), "cuda") == (
        "missed: 0.50x torch's step time, target <= 0.4x")
    assert end_to_end.target_status(e2e_row("wide", 1024, impl=graph, vs_torch=1.05), "cuda").startswith(
        "met: 0.95x torch's step time, target <= 0.97x")
    for model, batch in (("mlp", 64), ("gpt", 64)):
        assert end_to_end.target_status(e2e_row(model, batch, impl=graph, vs_torch=3.0), "cuda") == (
            end_to_end.NO_TARGET_AT_BATCH)
    assert end_to_end.target_status(e2e_row("mlp", 64, impl=graph, status="unavailable: cpu"), "cpu") == ""


def test_a_captured_step_warms_up_then_captures_once_and_replays(fake_gpu):
    import engine

    w = engine.tensor(np.ones(3, np.float32), device="cuda")
    calls = []

    def step():
        calls.append(1)
        with engine.no_grad():
            w.add_(1.0)
        return w.sum()

    replay = e2e_common.graph_replays(step)
    values = [float(replay().item()) for _ in range(4)]
    assert values == [6.0, 9.0, 12.0, 15.0]  # eager warm-up, capture + replay, replay, replay
    assert len(calls) == 2 and fake_gpu.launches == 3


def test_end_to_end_cpu_target_applies_at_every_batch():
    for model, batch in (("mlp", 64), ("wide", 32), ("tiny_mlp", 8)):
        assert end_to_end.target_status(e2e_row(model, batch, vs_torch=0.8), "cpu") == (
            "met: 1.25x torch's step time, target <= 1.3x")
    assert end_to_end.target_status(e2e_row("mlp", 64, vs_torch=0.7), "cpu").startswith("missed: 1.43x")


def test_step_profile_smoke_run_reports_each_case_and_a_profile():
    from bench import step_profile

    result = step_profile.main(["--device", "cpu", "--steps", "3", "--smoke", "--top", "5"])
    assert [row["batch"] for row in result["steps"]] == [b for b, _ in step_profile.SMOKE_CASES]
    for row in result["steps"]:
        assert row["host_us"] > 0 and row["total_us"] >= row["host_us"]
    assert "function calls" in result["profile"] and "tottime" in result["profile"]

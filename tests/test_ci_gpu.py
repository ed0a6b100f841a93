""".ci/gpu: its dry run wires every step, its summary reads real-run outputs, and a step that
times out is killed and recorded while the next one still runs."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu"
STEPS = ("env", "pytest", "digits", "bench", "nccl", "memcheck", "racecheck")


def _load():
    loader = SourceFileLoader("ci_gpu", str(SCRIPT))
    spec = importlib.util.spec_from_loader("ci_gpu", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_gpu"] = module  # dataclasses look their module up here
    loader.exec_module(module)
    return module


ci = _load()


# ---- (a) the dry run, as CI runs it -----------------------------------------------------------

@pytest.mark.slow
def test_dry_run_wires_every_step(tmp_path):
    out = tmp_path / "out"
    assert os.access(SCRIPT, os.X_OK), ".ci/gpu must be executable"
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)  # any cwd: the script moves to the repository root
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("env.txt", "summary.md", "bench.json", "bench.md", "pytest.log", "digits.log", "bench.log",
                 "nccl.log", "comm.json", "memcheck.log", "racecheck.log"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | ok | 0 |" in summary, step
        assert f"{step}: start" in proc.stdout and f"{step}: ok" in proc.stdout
    assert "dry run" in summary and "**PASS**" in summary
    collected = int(summary.split("collected ", 1)[1].split(" tests (dry run)")[0])
    assert collected > 0
    env = ci.parse_env((out / "env.txt").read_text())
    assert env["python"].startswith(".".join(map(str, sys.version_info[:2])))
    assert len(env["git commit"]) == 40 or env["git commit"].startswith("unavailable")
    assert "gpu" in env and "cupy" in env and "date (UTC)" in env
    bench = json.loads((out / "bench.json").read_text())
    assert bench["settings"]["mode"] == "tiny" and bench["kernels"]
    assert "import and argument parsing only (dry run): ok" in summary
    assert "dry run: imported engine.examples.digits" in (out / "digits.log").read_text()
    assert "mpi on cpu, 1 rank(s): all-reduce peak algbw" in summary
    assert "- memcheck: cases on numba_cpu without the sanitizer (dry run): 48 cases right, 0 wrong" in summary
    assert summary in proc.stdout  # printed at the end


# ---- (b) the summary on r2-like (all passed) and r1-like (failures) outputs ---------------------

ENV_TXT = """\
nvidia-smi: name, driver_version, memory.total [MiB]
gpu: NVIDIA H200, 580.159.04, 143771 MiB
nvcc: Cuda compilation tools, release 13.0, V13.0.88
python: 3.12.3 (/usr/bin/python3)
cupy: 14.2.0
cupy cuda: runtime 13020, driver 13000, 1 device(s)
numba: 0.68.0
numba-cuda: 0.30.4
numpy: 2.5.2
torch: 2.11.0+cu130 (CUDA 13.0, cuda available True)
cuda-bindings: 13.3.1
git commit: 947d000aaaabbbbccccddddeeeeffff000011112
date (UTC): 2026-11-26T01:35:01+00:00
"""

DIGITS_LOG = """\
epoch 15/40  loss 0.0028  accuracy 1.0000  val_loss 0.1598  val_accuracy 0.9778  lr 0.0014  0.05s (25725 samples/s)
early stopping at epoch 15; restored the weights of epoch 7 (val_loss 0.1447)
test accuracy 0.9778  precision 0.9783  recall 0.9776  F1 0.9777
15 epochs in 9.4s (median 48 ms per epoch) on cuda:0; best checkpoint: runs/digits/best.ckpt
"""


def _junit(cases):
    """cases: (classname, name, outcome) with outcome passed / failed / error / skipped."""
    body = []
    for classname, name, outcome in cases:
        inner = {"passed": "", "skipped": '<skipped type="pytest.skip" message="no CUDA device">x</skipped>',
                 "failed": '<failure message="AttributeError: module \'numpy\' has no attribute \'row_stack\'">'
                           "trace</failure>",
                 "error": '<error message="failed on setup with &quot;fixture boom&quot;">trace</error>'}[outcome]
        body.append(f'<testcase classname="{classname}" name="{name}" time="0.1">{inner}</testcase>')
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" '
            f'tests="{len(cases)}">' + "".join(body) + "</testsuite></testsuites>")


def _kernel_row(impl, n, target, status="ok", fraction=0.62, vs_torch=5.74):
    return {"kernel": "adam_step", "case": f"n={n:,}", "impl": impl, "role": "impl", "status": status,
            "median_s": 1.1104e-05, "GBps": 2644.1, "TFLOPs": 1.23, "bound": "memory",
            "fraction_of_copy_bw": fraction, "fraction_of_gemm": 0.024, "vs_torch": vs_torch,
            "vs_torch_peer": "torch Adam(fused=True)", "target": target}


def _bench(error_rows=0):
    kernels = [
        _kernel_row("cupy", 1048576, "missed: 62% of copy BW, target >= 85%"),
        _kernel_row("cupy", 16777216, "met", fraction=0.94, vs_torch=1.06),
        _kernel_row("numpy", 1048576, ""),
        _kernel_row("torch Adam(fused=True)", 1048576, "", status="unavailable: torch: no fused RMSprop"),
    ]
    kernels += [_kernel_row("numba_cuda", 1048576, "not measured",
                            status="error: AttributeError: module 'numpy' has no attribute 'row_stack'")] * error_rows
    e2e = [{"model": "mlp", "batch": 64, "impl": "engine F + optim.Adam", "status": "ok", "median_s": 0.00141,
            "TFLOPs": 0.506, "fraction_of_gemm": 0.0099, "vs_torch": 0.673, "vs_torch_peer": "torch eager",
            "target": "missed: 1.49x torch's step time, target <= 1x"},
           {"model": "mlp", "batch": 64, "impl": "torch eager", "status": "ok", "median_s": 0.00095,
            "TFLOPs": 0.75, "vs_torch": None, "target": ""}]
    return {"schema": 1, "settings": {"mode": "full", "device": "cuda"}, "kernels": kernels, "end_to_end": e2e}


def _results(**overrides):
    results = [ci.StepResult(name, [], log, ci.TIMEOUTS[name], rc=0, wall_s=w)
               for name, log, w in (("env", "env.txt", 2.0), ("pytest", "pytest.log", 41.5),
                                    ("digits", "digits.log", 12.25), ("bench", "bench.log", 63.0),
                                    ("nccl", "nccl.log", 9.0), ("memcheck", "memcheck.log", 40.0),
                                    ("racecheck", "racecheck.log", 55.0))]
    for r in results:
        for key, value in overrides.get(r.name, {}).items():
            setattr(r, key, value)
    return results


# compute-sanitizer's closing lines as its tools print them, after the cases' own lines
CASES_OK = "attention E=33 mask=none causal=False [cupy]: ok\nsanitize cases: 30 passed, 0 failed\n"
MEMCHECK_LOG = "========= COMPUTE-SANITIZER\n" + CASES_OK + "========= ERROR SUMMARY: 0 errors\n"
RACECHECK_LOG = ("========= COMPUTE-SANITIZER\n" + CASES_OK
                 + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
COMM = {"world_size": 1, "backend": "nccl", "device": "cuda:0",
        "allreduce": [{"bytes": 4096, "time_us": 9.0, "algbw_GBps": 0.46, "busbw_GBps": 0.0},
                      {"bytes": 16777216, "time_us": 12.1, "algbw_GBps": 1386.5, "busbw_GBps": 0.0}],
        "ddp": {"params": 3159050, "batch_per_rank": 64, "step_ms": 2.31, "single_process_step_ms": 2.05}}


def _write_run(tmp_path, cases, bench, digits=DIGITS_LOG, memcheck=MEMCHECK_LOG, racecheck=RACECHECK_LOG):
    (tmp_path / "memcheck.log").write_text(memcheck)
    (tmp_path / "racecheck.log").write_text(racecheck)
    (tmp_path / "comm.json").write_text(json.dumps(COMM))
    (tmp_path / "env.txt").write_text(ENV_TXT)
    (tmp_path / "junit.xml").write_text(_junit(cases))
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "digits.log").write_text(digits)
    return tmp_path


def test_summary_of_a_passing_run(tmp_path):  # like r2: 816 passed
    cases = [("tests.kernels.test_optim", f"test_step[{i}-cupy]", "passed") for i in range(6)]
    out = _write_run(tmp_path, cases, _bench())
    results = _results()
    summary = ci.build_summary(out, results, dry_run=False)
    assert "NVIDIA H200, 580.159.04, 143771 MiB" in summary
    assert "cupy 14.2.0 (CUDA runtime 13020, driver 13000, 1 device(s))" in summary
    assert "torch 2.11.0+cu130" in summary and "numba-cuda 0.30.4" in summary and "cuda-bindings 13.3.1" in summary
    assert "6 tests: 6 passed, 0 failed, 0 errors, 0 skipped" in summary
    assert "Failing tests" not in summary
    assert "test accuracy 0.9778" in summary and "median 48 ms per epoch on cuda:0" in summary
    assert "| pytest | ok | 0 | 41.5 s | 240 s | pytest.log |" in summary
    # the rows with a verdict, each with its figure; the numpy reference and torch rows have none
    assert "6 rows, 3 with a target: 1 met, 2 missed" in summary
    assert ("| adam_step | n=1,048,576 | cupy | 11.1 us; 2644 GB/s (62% of copy BW); 5.74x vs torch "
            "| missed: 62% of copy BW, target >= 85% |") in summary
    assert "| adam_step | n=16,777,216 | cupy | 11.1 us; 2644 GB/s (94% of copy BW); 1.06x vs torch | met |" in summary
    assert ("| mlp | batch 64 | engine F + optim.Adam | 1.41 ms; 0.506 TFLOP/s (1% of GEMM); 0.67x vs torch "
            "| missed: 1.49x torch's step time, target <= 1x |") in summary
    assert "| numpy |" not in summary and "torch eager" not in summary
    assert "nccl on cuda:0, 1 rank(s): all-reduce peak algbw 1386.5 GB/s at 16,777,216 bytes" in summary
    assert "DDP step 2.31 ms vs 2.05 ms alone" in summary
    assert "- memcheck: 0 errors; 30 cases right, 0 wrong" in summary
    assert "- racecheck: 0 hazards; 30 cases right, 0 wrong" in summary
    assert "**PASS**" in summary and "Failed or timed out" not in summary
    assert ci.exit_status(out, results) == 0
    assert ci._check_sanitizer(out, MEMCHECK_LOG) is None and ci._check_sanitizer(out, RACECHECK_LOG) is None
    assert ci._check_comm(out, "") is None


def test_sanitizer_findings_fail_their_step(tmp_path):
    hazard = RACECHECK_LOG.replace("0 hazards displayed (0 errors, 0 warnings)",
                                   "2 hazards displayed (0 errors, 2 warnings)")
    assert ci._check_sanitizer(tmp_path, hazard) == "racecheck reported 2 hazard(s)"  # warnings: exit code 0
    wrong = MEMCHECK_LOG.replace("30 passed, 0 failed", "29 passed, 1 failed")
    assert ci._check_sanitizer(tmp_path, wrong) == "1 case(s) gave a wrong result"
    refused = ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
               "cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorUnknown\n")
    problem = ci._check_sanitizer(tmp_path, refused)
    assert problem == "compute-sanitizer cannot run on this machine (Device not supported): nothing was checked"
    assert ci._check_sanitizer(tmp_path, CASES_OK) == ("no 'ERROR SUMMARY' or 'RACECHECK SUMMARY' line "
                                                       "from compute-sanitizer")
    out = _write_run(tmp_path, [("tests.kernels.test_optim", "test_step[0-cupy]", "passed")], _bench(),
                     racecheck=refused)
    summary = ci.build_summary(out, _results(racecheck={"problem": problem}), dry_run=False)
    assert "- racecheck: not run, compute-sanitizer says: Device not supported" in summary
    assert "**FAIL**" in summary
    (out / "comm.json").unlink()
    assert ci._check_comm(out, "") == "no readable comm.json (FileNotFoundError)"


def test_sanitize_cases_cover_the_issue_shapes_and_catch_a_wrong_number():
    cases = ci.SANITIZE_CASES
    sys.path.insert(0, str(cases.parent))
    try:
        import sanitize_cases as sc
    finally:
        sys.path.remove(str(cases.parent))
    labels = [label for family, _ in sc.FAMILIES for label, _ in family()]
    assert len(labels) == 48
    for e in (33, 64, 128):
        for mask in ("none", "shared", "key_padding", "full"):
            for causal in (False, True):
                assert f"attention E={e} mask={mask} causal={causal}" in labels
    for dtype, e in (("bfloat16", 64), ("bfloat16", 128), ("float16", 64), ("float16", 128), ("float32-3xtf32", 64),
                     ("float32-3xtf32", 128)):
        for mask, causal in (("none", True), ("key_padding", False), ("full", True)):
            assert f"attention_tc {dtype} E={e} mask={mask} causal={causal}" in labels
    assert (sc.BATCH * sc.HEADS, sc.L, sc.S) == (6, 37, 70)
    assert {"layer_norm D=99 affine=True", "layer_norm D=4097 affine=False",
            "gelu n=1001 approximate=tanh"} <= set(labels)
    import numpy as np

    want = [np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4), np.array([0.0, -np.inf], np.float32)]
    assert sc.mismatch(("a", "b"), [w.copy() for w in want], want, np.asarray) is None
    off = [want[0] + 1e-2, want[1]]
    assert sc.mismatch(("a", "b"), off, want, np.asarray).startswith("a: max abs error")
    assert sc.mismatch(("a", "b"), [want[0], np.zeros(2, np.float32)], want, np.asarray) == \
        "b: non-finite entries differ from the reference"
    import ml_dtypes  # 16-bit outputs: compared as float32 within the rtol their case gives

    bf16 = [w.astype(ml_dtypes.bfloat16) for w in want]
    assert sc.mismatch(("a", "b"), [w + np.float32(2e-2) for w in want[:1]] + bf16[1:], bf16, np.asarray,
                       sc.TC_RTOL["bfloat16"]) is None
    assert sc.mismatch(("a", "b"), [want[0] + np.float32(0.2), bf16[1]], bf16, np.asarray,
                       sc.TC_RTOL["bfloat16"]).startswith("a: max abs error")


def test_summary_of_a_failing_run(tmp_path):  # like r1: 239 failed, numba_cuda rows errored in the bench
    failing = "test_soft_targets[6x517-float64-numba_cuda]"
    cases = [("tests.kernels.test_softmax_cross_entropy", failing, "failed"),
             ("tests.kernels.test_optim", "test_step[adam-numba_cuda]", "failed"),
             ("tests.test_bench", "test_tiny_run_on_the_gpu", "failed"),
             ("tests.nn.test_layers.TestLinear", "test_backward[cuda]", "error"),
             ("tests.kernels.test_optim", "test_step[adam-cupy]", "passed"),
             ("tests.kernels.test_optim", "test_step[sgd-cupy]", "passed"),
             ("tests.data.test_augment", "test_on_device[cuda]", "skipped")]
    out = _write_run(tmp_path, cases, _bench(error_rows=2))
    problem = ci._check_bench(out, "")
    assert problem == "2 benchmark row(s) failed with an error (listed in summary.md)"
    results = _results(pytest={"rc": 1}, bench={"problem": problem})
    summary = ci.build_summary(out, results, dry_run=False)
    assert "7 tests: 2 passed, 3 failed, 1 errors, 1 skipped" in summary
    assert "Failing tests (4 of 4):" in summary
    assert (f"- `tests/kernels/test_softmax_cross_entropy.py::{failing}` (failed): "
            "AttributeError: module 'numpy' has no attribute 'row_stack'") in summary
    assert "- `tests/nn/test_layers.py::TestLinear::test_backward[cuda]` (error): " in summary
    assert "| pytest | failed | 1 |" in summary and "| bench | failed | 0 |" in summary
    assert "- pytest: exit code 1 (see pytest.log)" in summary
    assert f"- bench: {problem} (see bench.log)" in summary
    assert "Rows that failed with an error (2):" in summary
    assert "- adam_step n=1,048,576 numba_cuda: error: AttributeError: module 'numpy' has no attribute 'row_stack'" \
        in summary
    assert "**FAIL** (2 step(s) failed or timed out; 4 test(s) failed)" in summary
    assert "test accuracy 0.9778" in summary
    assert ci.exit_status(out, results) == 1


def test_failing_tests_alone_fail_the_run_and_at_most_50_ids_are_listed(tmp_path):
    cases = [("tests.kernels.test_optim", f"test_step[{i}]", "failed") for i in range(60)]
    out = _write_run(tmp_path, cases, _bench())
    results = _results()  # every step "ok": the failures alone make the exit status 1
    summary = ci.build_summary(out, results, dry_run=False)
    assert "Failing tests (50 of 60):" in summary
    assert sum(line.startswith("- `tests/kernels/test_optim.py::test_step[") for line in summary.splitlines()) == 50
    assert "test_step[49]" in summary and "test_step[50]" not in summary
    assert ci.exit_status(out, results) == 1


def test_missing_outputs_are_said_not_crashed_on(tmp_path):
    results = _results(pytest={"rc": None, "timed_out": True}, bench={"rc": 1})
    summary = ci.build_summary(tmp_path, results, dry_run=False)
    assert "device and versions: no env.txt" in summary
    assert "no junit.xml (the step timed out)" in summary
    assert "no test accuracy in digits.log" in summary
    assert "no bench.json" in summary
    assert "- pytest: timed out after 240 s (killed; see pytest.log)" in summary
    assert ci.exit_status(tmp_path, results) == 1


def test_parsers_on_real_output_lines(tmp_path):
    job = ci.parse_digits(DIGITS_LOG)
    assert job == {"accuracy": 0.9778, "precision": 0.9783, "recall": 0.9776, "f1": 0.9777, "epochs": 15,
                   "seconds": 9.4, "median_ms": 48.0, "device": "cuda:0"}
    assert ci.collected_count("816/2389 tests collected (1573 deselected) in 2.74s") == 816
    assert ci.collected_count("12 tests collected in 0.51s") == 12
    assert ci.collected_count("no tests collected (40 deselected) in 0.2s") == 0
    assert ci._check_collected(tmp_path, "no tests ran in 0.1s") == "collected no tests marked gpu"
    assert ci._check_digits(tmp_path, DIGITS_LOG) is None
    assert ci._check_digits(tmp_path, DIGITS_LOG.replace("on cuda:0", "on cpu")) == "ran on cpu, not on cuda"
    (tmp_path / "junit.xml").write_text(_junit([("tests.test_ops", f"test_add[{i}]", "skipped") for i in range(3)]))
    assert "all 3 tests skipped" in ci._check_tests(tmp_path, "")


# ---- (c) time limits: a timed-out step is killed and recorded, the next one still runs ----------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see the killed child")
@pytest.mark.slow
def test_a_step_that_times_out_is_recorded_and_the_next_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    steps = [ci.Step("slow", ["sh", "-c", f"sleep 5 & echo $! > {pid_file}; echo started; sleep 5"], "slow.log", 1),
             ci.Step("next", [sys.executable, "-c", "print('next step ran')"], "next.log", 30)]
    lines = []
    started = time.monotonic()
    results = ci.run_steps(steps, tmp_path, echo=lines.append)
    # 1 s, then SIGTERM ends both sleeps at once; unkilled they would take 10 s (the bound leaves a
    # busy machine room: it tells killed from not killed, it does not time the kill)
    assert time.monotonic() - started < 9
    slow, nxt = results
    assert slow.timed_out and slow.status == "timed out" and not slow.ok and slow.rc is None
    assert 0.9 <= slow.wall_s < 9
    assert "started" in (tmp_path / "slow.log").read_text()
    assert "timed out after 1 s" in (tmp_path / "slow.log").read_text()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the step's background child survived: the process group was not killed"
    assert nxt.ok and nxt.status == "ok" and nxt.rc == 0
    assert (tmp_path / "next.log").read_text() == "next step ran\n"
    assert lines[1].startswith("[.ci/gpu] 1/2 slow: timed out") and lines[3].startswith("[.ci/gpu] 2/2 next: ok")
    summary = ci.build_summary(tmp_path, results, dry_run=False)
    assert "| slow | timed out | - |" in summary and "| next | ok | 0 |" in summary
    assert "- slow: timed out after 1 s (killed; see slow.log)" in summary
    assert ci.exit_status(tmp_path, results) == 1


@pytest.mark.slow
def test_the_overall_budget_cuts_a_step_short_and_skips_the_rest(tmp_path):
    steps = [ci.Step("slow", ["sleep", "5"], "slow.log", 30),
             ci.Step("after", [sys.executable, "-c", "print('ran')"], "after.log", 30)]
    results = ci.run_steps(steps, tmp_path, budget_s=ci.RESERVE_S + 1.5, echo=lambda line: None)
    assert results[0].timed_out and results[0].timeout <= 1.5
    assert results[1].status == "skipped" and not (tmp_path / "after.log").exists()
    assert "- after: not run: the overall time budget was spent" in ci.build_summary(tmp_path, results, False)


def test_real_run_commands_and_time_limits(tmp_path):
    assert sum(ci.TIMEOUTS.values()) > ci.BUDGET_S == 540  # the budget, not the sum, bounds the run to 9 min
    timeouts, budget = ci.timeouts_from_env({"CI_GPU_TIMEOUT_PYTEST": "12", "CI_GPU_BUDGET": "100"})
    assert timeouts == {"env": 60, "pytest": 12, "digits": 90, "bench": 330, "nccl": 60, "memcheck": 120,
                        "racecheck": 150} and budget == 100
    with pytest.raises(SystemExit):
        ci.timeouts_from_env({"CI_GPU_TIMEOUT_BENCH": "soon"})
    env, tests, digits, bench, nccl, memcheck, racecheck = ci.build_steps(tmp_path, dry_run=False, timeouts=timeouts)
    assert [s.name for s in (env, tests, digits, bench, nccl, memcheck, racecheck)] == list(STEPS)
    assert nccl.argv[1:7] == ["-m", "bench.comm", "-n", "1", "--backend", "nccl"]
    assert str(tmp_path / "comm.json") in nccl.argv
    for step, tool in ((memcheck, "memcheck"), (racecheck, "racecheck")):
        assert Path(step.argv[0]).name == "compute-sanitizer"
        assert step.argv[1:5] == ["--tool", tool, "--error-exitcode", "1"]
        assert step.argv[-3:] == [str(ci.SANITIZE_CASES), "--device", "cuda"] and step.log == f"{tool}.log"
    assert tests.argv[1:7] == ["-m", "pytest", "-m", "gpu", "-q", "-p"] and "-x" not in tests.argv
    assert f"--junitxml={tmp_path / 'junit.xml'}" in tests.argv and tests.timeout == 12
    assert ("-n" in tests.argv) == (importlib.util.find_spec("xdist") is not None)
    assert ("--timeout" in tests.argv) == (importlib.util.find_spec("pytest_timeout") is not None)
    assert digits.argv[1:5] == ["-m", "engine.examples.digits", "--device", "cuda"]
    assert bench.argv[1:5] == ["-m", "bench", "--device", "cuda"] and str(tmp_path / "bench.json") in bench.argv
    assert (env.log, tests.log, digits.log, bench.log) == ("env.txt", "pytest.log", "digits.log", "bench.log")

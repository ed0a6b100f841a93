"""The GPT training-step rows of bench/end_to_end.py (bench/gpt_step.py): same model both sides,
same first losses, a step-time ratio to torch and a verdict against the CPU target."""

import math

import pytest

from bench import device as bench_device
from bench import end_to_end, gpt_step, roofline
from engine import backend
from engine.examples.gpt import GPT


class _Quiet:
    def working(self, message):
        pass

    def row_done(self, row):
        pass


def test_gpt_parameter_count_and_flops_match_the_example_model():
    model = GPT(gpt_step.VOCAB, gpt_step.BLOCK, gpt_step.D_MODEL, gpt_step.N_LAYERS, gpt_step.N_HEADS)
    assert gpt_step.parameter_count() == model.num_parameters() == 834_304
    tokens, d = 16 * gpt_step.BLOCK, gpt_step.D_MODEL
    assert gpt_step.step_flops(16) == 3 * (2 * tokens * (4 * 12 * d * d + 256 * d) + 4 * 4 * 16 * 64 * 64 * d)


@pytest.mark.slow
def test_gpt_rows_run_side_by_side_with_torch():
    backend.manual_seed(0)
    bd = bench_device.BenchDevice("cpu", dict(budget_s=0.005, warmup=1, min_repeats=2, max_repeats=3), settle_s=0.0)
    ceilings = roofline.measure_ceilings(bd, bd.clock, copy_elements=2**16, gemm_size=64)
    rows = end_to_end._run_config(bd, ceilings, "gpt", gpt_step.LAYERS, 4, _Quiet(), setup=gpt_step.setup,
                                  variants=gpt_step.VARIANTS, base_row=gpt_step.base_row)
    engine_row, captured_row, torch_row = rows
    assert engine_row["impl"] == "engine GPT + AdamW" and engine_row["status"] == "ok"
    assert captured_row["impl"] == "engine GPT + AdamW, CUDA graph"
    assert captured_row["status"] == "unavailable: a CUDA graph captures GPU work; this run is on the CPU"
    assert engine_row["model"] == "gpt" and engine_row["params"] == 834_304 and engine_row["batch"] == 4
    assert math.isclose(engine_row["loss_step1"], math.log(256), rel_tol=0.1)  # small init: near uniform
    if torch_row["status"] != "ok":
        assert torch_row["status"].startswith("unavailable: ")
        assert "vs torch" in engine_row["target"]
        pytest.skip(f"torch: {torch_row['status']}")
    # same weights and data: the losses agree to float32 rounding, after three AdamW steps too
    assert engine_row["loss_rel_err"] == 0.0 and torch_row["loss_rel_err"] < 1e-5
    assert torch_row["loss_step3_rel_err"] < 1e-4
    assert engine_row["vs_torch"] == pytest.approx(torch_row["median_s"] / engine_row["median_s"])
    assert engine_row["target"].startswith(("met", "missed")) and "target <= 1.3x" in engine_row["target"]


@pytest.mark.slow
def test_gpt_rows_in_bf16_run_both_sides_under_autocast():
    rows = {}
    for dtype in ("float32", "bfloat16"):
        backend.manual_seed(0)
        bd = bench_device.BenchDevice("cpu", dict(budget_s=0.005, warmup=1, min_repeats=2, max_repeats=3),
                                      settle_s=0.0, dtype=dtype)
        ceilings = roofline.measure_ceilings(bd, bd.clock, copy_elements=2**16, gemm_size=64)
        rows[dtype] = end_to_end._run_config(bd, ceilings, "gpt", gpt_step.LAYERS, 2, _Quiet(), setup=gpt_step.setup,
                                             variants=gpt_step.VARIANTS, base_row=gpt_step.base_row)
    engine32, engine16 = rows["float32"][0], rows["bfloat16"][0]
    assert engine16["status"] == "ok" and engine16["dtype"] == "bfloat16"
    assert engine16["loss_step1"] != engine32["loss_step1"]  # the forward did run in bf16
    assert math.isclose(engine16["loss_step1"], engine32["loss_step1"], rel_tol=2 ** -7)
    torch16 = rows["bfloat16"][-1]
    if torch16["status"] != "ok":
        pytest.skip(f"torch: {torch16['status']}")
    # same weights and data, both under autocast(bfloat16): the first losses agree to bf16 rounding
    assert torch16["loss_rel_err"] < 2 ** -7 and torch16["loss_step3_rel_err"] < 2 ** -5


def test_gpt_profile_times_both_frameworks_op_by_op(capsys):
    pytest.importorskip("torch")
    from bench import gpt_profile

    result = gpt_profile.main(["--batch", "1", "--rounds", "1", "--steps", "1", "--policy", "default", "one-thread"])
    assert set(result["steps"]) == {"engine (default)", "engine (one-thread)", "torch"}
    assert all(seconds > 0 for seconds in result["steps"].values())
    engine_ops = result["engine (default)"]
    for category in ("linear (GEMM+bias) fwd", "linear (GEMM+bias) bwd", "attention fwd", "gelu bwd",
                     "layer_norm fwd", "optimizer", "clip_grad_norm"):
        assert engine_ops[category] > 0, category
    assert result["torch_profile"]["linear (GEMM+bias)"] > 0
    # the instrumentation is removed again: a Function's forward is its own
    from engine.functional.linear import Linear
    assert Linear.forward.__qualname__ == "Linear.forward"
    assert "| category" in capsys.readouterr().out

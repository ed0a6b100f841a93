"""The GPT decode rows of bench/end_to_end.py (bench/gpt_decode.py): one generated token with the KV
cache, the cat cache, the static cache and torch eager side by side on the same logits; the
captured row is GPU only; the verdicts use issue 23's decode targets on the GPU."""

import pytest

from bench import __main__ as bench_cli
from bench import device as bench_device
from bench import end_to_end, gpt_decode, roofline
from engine import backend


class _Quiet:
    def working(self, message):
        pass

    def row_done(self, row):
        pass


def test_decode_flops_count_one_token_of_the_bench_gpt():
    d, layers, vocab = 128, 4, 256
    assert gpt_decode.token_flops(1) == 2 * (layers * 12 * d * d + vocab * d) + layers * 4 * 48.5 * d
    assert gpt_decode.LAYERS == (256, 64, 128, 4, 4, 32, 64)


def test_the_cli_takes_gpt_decode_as_a_model():
    assert bench_cli.parse_args(["--model", "gpt-decode", "gpt"]).model == ["gpt-decode", "gpt"]


@pytest.mark.slow
def test_decode_rows_run_side_by_side_with_torch_on_the_same_logits():
    backend.manual_seed(0)
    bd = bench_device.BenchDevice("cpu", dict(budget_s=0.005, warmup=1, min_repeats=2, max_repeats=3), settle_s=0.0)
    ceilings = roofline.measure_ceilings(bd, bd.clock, copy_elements=2**16, gemm_size=64)
    rows = end_to_end._run_config(bd, ceilings, "gpt-decode", gpt_decode.LAYERS, 1, _Quiet(), setup=gpt_decode.setup,
                                  variants=gpt_decode.VARIANTS, base_row=gpt_decode.base_row)
    cat, static, captured, torch_row = rows
    assert [r["impl"] for r in rows] == [name for name, _, _ in gpt_decode.VARIANTS]
    assert cat["status"] == static["status"] == "ok" and cat["model"] == "gpt-decode" and cat["batch"] == 1
    assert captured["status"] == "unavailable: a CUDA graph captures GPU work; this run is on the CPU"
    # the first three tokens' logits of the static cache are the cat cache's, to float32 rounding
    assert static["loss_rel_err"] < 1e-5 and static["loss_step3_rel_err"] < 1e-5
    assert cat["loss_step1"] != cat["loss_step3"]  # three different tokens were decoded
    assert cat["samples_per_s"] == pytest.approx(1 / cat["median_s"])
    if torch_row["status"] != "ok":
        assert torch_row["status"].startswith("unavailable: ")
        pytest.skip(f"torch: {torch_row['status']}")
    assert torch_row["loss_rel_err"] < 1e-5 and torch_row["loss_step3_rel_err"] < 1e-5
    for row in (cat, static):
        assert row["vs_torch"] == pytest.approx(torch_row["median_s"] / row["median_s"])
        assert row["target"].startswith(("met", "missed")) and "target <= 1.3x" in row["target"]


def _row(impl, vs_torch):
    return {"model": "gpt-decode", "batch": 1, "impl": impl, "status": "ok", "vs_torch": vs_torch,
            "vs_torch_peer": "torch eager"}


def test_on_the_gpu_decode_rows_get_issue_23s_targets():
    assert end_to_end.target_status(_row("engine GPT decode, cat cache", 1 / 0.9), "cuda") == \
        "met: 0.90x torch's step time, target <= 1x"
    assert end_to_end.target_status(_row(gpt_decode.CAPTURED_NAME, 1 / 0.35), "cuda") == \
        "missed: 0.35x torch's step time, target <= 0.3x"
    assert end_to_end.target_status(_row(gpt_decode.CAPTURED_NAME, 1 / 0.25), "cuda").startswith("met: 0.25x")
    assert end_to_end.target_status(dict(_row("engine GPT decode, static cache", 2.0), batch=4), "cuda") == \
        end_to_end.NO_TARGET_AT_BATCH

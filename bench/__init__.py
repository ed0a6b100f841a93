"""Benchmarks of the fused kernels and of whole training steps, against torch and the roofline.

Run ``python -m bench --help`` from the repository root (no install needed). Layout:

- bench/timing.py: CPU (perf_counter) and GPU (CUDA events) clocks, warm-up, median, spread.
- bench/roofline.py: bytes and FLOPs per kernel; copy-bandwidth and GEMM ceilings.
- bench/device.py: the device a run uses (array module, random inputs, torch peer).
- bench/kernels/: the kernel sweep, one module per kernel family (every impl, unfused and torch peers, targets).
- bench/end_to_end.py: training-step benchmarks; bench/gpt_step.py the GPT rows; bench/e2e_common.py
  what both build their rows with (end_to_end imports gpt_step, nothing imports back).
- bench/report.py: progress, terminal table, JSON, Markdown, plot.

Nothing imports bench: it sits above engine and kernels.
"""

import engine  # noqa: E402, F401  first, before numpy: its OpenBLAS setting (engine/__init__.py) must see numpy unloaded

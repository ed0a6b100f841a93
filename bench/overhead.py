"""``python -m bench.overhead``: the Python cost of one fused-kernel call, before anything launches.

The target is at most 15 us of host Python per fused-kernel call, so that small training steps
stay launch-bound rather than interpreter-bound. Per public entry point (kernels.adam_step ...)
on small arrays it reports, in microseconds per call (median of repeats, after warm-up):

- ``checks_us``: the shared validator every impl runs first (validate_adam, validate_forward ...);
- ``dispatch_us``: the public wrapper plus the registry (kernels.call -> choose -> the impl), with
  the impl itself swapped for a function that returns at once;
- ``host_us``: the two together, the part of (a) every impl pays on any device.

With ``--device cuda`` two more columns time the whole host side of a real call on cupy arrays
(perf_counter around the call, no sync inside the timed region; the device is drained between
samples so that a full launch queue never blocks a call): ``cupy_us`` (the default choice for cupy
arrays) and ``numba_cuda_us`` (forced with ``impl="numba_cuda"``).

Examples:
    python3 -m bench.overhead                      # CPU figures (a)
    python3 -m bench.overhead --device cuda        # (a) plus the cupy and numba_cuda host times
    python3 -m bench.overhead --quick --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

import kernels
from kernels import registry
from kernels.cpu import linear_relu as cpu_linear_relu
from kernels.cpu import optim as cpu_optim
from kernels.cpu import softmax_cross_entropy as cpu_sce

TARGET_US = 15.0
ENTRY_POINTS = ("adam_step", "sgd_step", "adagrad_step", "rmsprop_step", "softmax_cross_entropy",
                "linear_relu_forward", "linear_relu_backward")


def _cases(xp) -> dict:
    """kernel -> (args, kwargs, checks): a small, typical call and the validator its impls run first.

    ``xp`` is numpy or cupy; the arrays are float32 (int64 targets), small enough that only the
    host side matters.
    """
    rng = np.random.default_rng(0)

    def arr(*shape):
        return xp.asarray(rng.standard_normal(shape).astype(np.float32))

    n = 1024
    p, g, m, v = arr(n), arr(n), arr(n), xp.abs(arr(n))
    adam_kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
                   amsgrad=False, maximize=False, step=3)
    sgd_kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                  first_step=False)
    adagrad_kw = dict(lr=0.01, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step=3, maximize=False)
    rmsprop_kw = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=False,
                      maximize=False)
    logits = arr(8, 10)
    targets = xp.asarray(rng.integers(0, 10, 8).astype(np.int64))
    sce_kw = dict(ignore_index=-100, label_smoothing=0.0, grad_scale=0.125, compute_grad=True)
    x, w, b = arr(8, 16), arr(32, 16), arr(32)
    y = xp.maximum(arr(8, 32), 0)
    dy = arr(8, 32)
    return {
        "adam_step": ((p, g, m, v, None), adam_kw,
                      lambda: cpu_optim.validate_adam(p, g, m, v, None, **adam_kw)),
        "sgd_step": ((p, g, m), sgd_kw, lambda: cpu_optim.validate_sgd(p, g, m, **sgd_kw)),
        "adagrad_step": ((p, g, v), adagrad_kw, lambda: cpu_optim.validate_adagrad(p, g, v, **adagrad_kw)),
        "rmsprop_step": ((p, g, v, m, None), rmsprop_kw,
                         lambda: cpu_optim.validate_rmsprop(p, g, v, m, None, **rmsprop_kw)),
        "softmax_cross_entropy": ((logits, targets, None), sce_kw,
                                  lambda: cpu_sce.validate_softmax_cross_entropy(logits, targets, None, **sce_kw)),
        "linear_relu_forward": ((x, w, b), {}, lambda: cpu_linear_relu.validate_forward(x, w, b)),
        "linear_relu_backward": ((dy, x, w, y), {"compute_grad_x": True},
                                 lambda: cpu_linear_relu.validate_backward(dy, x, w, y)),
    }


def _per_call_us(fn, number: int, repeat: int) -> float:
    """Median over ``repeat`` runs of ``number`` back-to-back calls, in us per call (after a warm-up)."""
    timer = timeit.Timer(fn)
    timer.timeit(max(number // 10, 1))
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


@contextlib.contextmanager
def _stub_impl(kernel: str, arrays):
    """Swap the impl an unforced call picks for a function that returns at once (restored after)."""
    chosen = registry.choose(kernel, arrays)
    saved = chosen.__dict__.get("fn")
    chosen.__dict__["fn"] = lambda *args, **kwargs: None  # the cached_property's slot
    try:
        yield
    finally:
        if saved is None:
            chosen.__dict__.pop("fn", None)
        else:
            chosen.__dict__["fn"] = saved


def measure_host(quick: bool = False, xp=np) -> list[dict]:
    """(a) per kernel: the shared checks and the registry dispatch, on arrays of ``xp``."""
    number, repeat = (200, 5) if quick else (2000, 15)
    rows = []
    for kernel, (args, kw, checks) in _cases(xp).items():
        public = getattr(kernels, kernel)
        arrays = [a for a in args if a is not None]
        checks_us = _per_call_us(checks, number, repeat)
        with _stub_impl(kernel, arrays):
            dispatch_us = _per_call_us(lambda: public(*args, **kw), number, repeat)
        rows.append({"kernel": kernel, "checks_us": checks_us, "dispatch_us": dispatch_us,
                     "host_us": checks_us + dispatch_us})
    return rows


def _cuda_call_us(fn, samples: int, sync) -> float:
    """Median perf_counter time of one real call, the device drained between samples (untimed)."""
    for _ in range(20):  # warm-up: compiles, caches, first-call imports
        fn()
    sync()
    times = []
    for i in range(samples):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if i % 50 == 49:
            sync()
    sync()
    return statistics.median(times) * 1e6


def measure_cuda(rows: list[dict], quick: bool = False) -> list[dict]:
    """(b) add ``cupy_us`` and ``numba_cuda_us``: the host side of a real call on cupy arrays."""
    import cupy

    samples = 300 if quick else 2000
    sync = cupy.cuda.Device().synchronize
    cases = _cases(cupy)
    for row in rows:
        args, kw, _ = cases[row["kernel"]]
        public = getattr(kernels, row["kernel"])
        for impl, column in ((None, "cupy_us"), ("numba_cuda", "numba_cuda_us")):
            try:
                row[column] = _cuda_call_us(lambda: public(*args, **kw, impl=impl), samples, sync)
            except Exception as e:  # one failing impl must not hide the others' figures
                row[column] = None
                row[column.replace("_us", "_error")] = f"{type(e).__name__}: {e}"[:200]
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Every row for ``device`` ('cpu': (a) only; 'cuda': (a) and the real GPU calls)."""
    rows = measure_host(quick)
    if device == "cuda":
        measure_cuda(rows, quick)
    return rows


def format_table(rows: list[dict]) -> str:
    columns = ["checks_us", "dispatch_us", "host_us"] + [c for c in ("cupy_us", "numba_cuda_us") if c in rows[0]]
    lines = [f"{'kernel':<24}" + "".join(f"{c:>15}" for c in columns)]
    for row in rows:
        cells = "".join(f"{row[c]:>15.2f}" if row.get(c) is not None else f"{'error':>15}" for c in columns)
        lines.append(f"{row['kernel']:<24}{cells}")
    lines.append(f"(us per call, median; target: host Python <= {TARGET_US:g} us per fused-kernel call)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a second or two; noisier)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = run(args.device, args.quick)
    print(format_table(rows))
    for row in rows:
        for key in ("cupy_error", "numba_cuda_error"):
            if key in row:
                print(f"{row['kernel']}: {key}: {row[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()

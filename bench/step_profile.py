"""``python -m bench.step_profile``: where the host time of one training step goes.

The end-to-end benchmark says whether a step is host-bound (its host/device column); this says
why. For the engine's nn MLP step (Linear/ReLU, CrossEntropyLoss, Adam) it prints, per model:

- host µs per step: the time for the host to queue ``steps`` steps (no sync inside), and the time
  once the device has drained too; on a GPU the step is host-bound when the two are equal;
- a cProfile of the smallest model's step, by own time: cupy's calls appear by name (``matmul``,
  ``sum``, ``array``), so their host cost per call can be read off beside the engine's Python.

With ``--gemms`` (cuda only) it also times the GEMM shapes of those steps on the device, cupy
against torch, to tell a slow GEMM from a slow host.

Examples:
    python3 -m bench.step_profile --device cuda --gemms
    python3 -m bench.step_profile --device cpu --steps 5      # a smoke run (tests use it)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

import engine
from engine import backend, nn, optim

# (batch, layer widths): the end-to-end benchmark's target cases and one device-bound batch.
CASES = [(256, (784, 1024, 1024, 10)), (4096, (784, 1024, 1024, 10)), (1024, (4096, 4096, 4096))]
SMOKE_CASES = [(8, (16, 12, 4))]
# (m, k, n, transpose a, transpose b) of the forward, input-gradient and weight-gradient GEMMs.
GEMMS = [(1024, 4096, 4096, False, True), (1024, 4096, 4096, False, False), (4096, 1024, 4096, True, False),
         (256, 784, 1024, False, True), (256, 1024, 1024, False, True), (1024, 256, 1024, True, False)]


def make_step(device: str, batch: int, widths: tuple):
    """A closure running one training step of an MLP with the given widths on ``device``."""
    engine.manual_seed(0)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], device=device))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = engine.tensor(rng.standard_normal((batch, widths[0])).astype(np.float32), device=device)
    y = engine.tensor(rng.integers(0, widths[-1], batch), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, device: str, steps: int) -> dict:
    """Host µs per step (queueing only) and µs per step once the device has drained."""
    dev = backend.device(device)
    for _ in range(3):
        step()
    backend.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - start
    backend.synchronize(dev)
    total = time.perf_counter() - start
    return {"host_us": host / steps * 1e6, "total_us": total / steps * 1e6}


def profile(step, device: str, steps: int, top: int) -> str:
    """cProfile of ``steps`` steps, the ``top`` entries by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    backend.synchronize(backend.device(device))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def gemm_rows(reps: int = 50) -> list[dict]:
    """Device µs per GEMM, cupy.matmul against torch.matmul, TF32 off in both."""
    import cupy
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False

    def device_us(fn):
        for _ in range(5):
            fn()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / reps * 1e3

    rows = []
    for m, k, n, ta, tb in GEMMS:
        a = cupy.random.standard_normal((k, m) if ta else (m, k), dtype=cupy.float32)
        b = cupy.random.standard_normal((n, k) if tb else (k, n), dtype=cupy.float32)
        ta_, tb_ = torch.as_tensor(a, device="cuda"), torch.as_tensor(b, device="cuda")
        left, right = (a.T if ta else a), (b.T if tb else b)
        tleft, tright = (ta_.T if ta else ta_), (tb_.T if tb else tb_)
        out, tout = cupy.empty((m, n), cupy.float32), torch.empty((m, n), device="cuda")
        cupy_us = device_us(lambda: cupy.matmul(left, right, out=out))
        torch_us = device_us(lambda: torch.matmul(tleft, tright, out=tout))
        rows.append({"m": m, "k": k, "n": n, "transpose_a": ta, "transpose_b": tb,
                     "cupy_us": cupy_us, "torch_us": torch_us})
    return rows


def run(device: str, steps: int, top: int, gemms: bool, smoke: bool = False) -> dict:
    cases = SMOKE_CASES if smoke else CASES
    result = {"device": device, "steps": []}
    first = None
    for batch, widths in cases:
        step = make_step(device, batch, widths)
        first = first or step
        times = time_steps(step, device, steps)
        result["steps"].append({"batch": batch, "widths": widths, **times})
        print(f"batch {batch:5d} widths {widths}: host {times['host_us']:8.0f} us/step, "
              f"with the device {times['total_us']:8.0f} us/step", flush=True)
    result["profile"] = profile(first, device, steps, top)
    print(result["profile"])
    if gemms:
        result["gemms"] = gemm_rows()
        for r in result["gemms"]:
            print(f"gemm m={r['m']} k={r['k']} n={r['n']} ta={r['transpose_a']} tb={r['transpose_b']}: "
                  f"cupy {r['cupy_us']:.1f} us, torch {r['torch_us']:.1f} us, "
                  f"cupy/torch {r['cupy_us'] / r['torch_us']:.3f}")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--steps", type=int, default=50, help="steps timed and profiled per case")
    p.add_argument("--top", type=int, default=30, help="profile entries shown")
    p.add_argument("--gemms", action="store_true", help="also time the GEMM shapes, cupy vs torch (cuda)")
    p.add_argument("--smoke", action="store_true", help="one tiny model (seconds; the figures mean nothing)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if backend.cuda_available() else "cpu")
    if args.gemms and device != "cuda":
        raise SystemExit("bench.step_profile: --gemms needs --device cuda")
    return run(device, args.steps, args.top, args.gemms, smoke=args.smoke)


if __name__ == "__main__":
    main()

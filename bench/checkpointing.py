"""Activation checkpointing: memory kept for backward and step time, plain vs checkpointed.

    python -m bench.checkpointing [--blocks 8] [--width 512] [--batch 512] [--repeats 5]

A deep MLP (``blocks`` x [Linear(width, width), ReLU, Dropout(0.1)]) on the CPU, three ways:
plain; every block under ``checkpoint``; ``checkpoint_sequential`` in 2 segments. For each it
reports the bytes of the arrays the graph holds after the forward (what backward will read),
the peak of traced allocations over forward + backward (tracemalloc sees numpy's buffers), and
the median forward + backward time. Figures hold for the machine they were taken on.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import engine
from engine import nn
from engine.autograd import saved_bytes
from engine.utils.checkpoint import checkpoint, checkpoint_sequential


def variants(model):
    blocks = list(model)
    return {
        "plain": lambda x: model(x),
        "checkpoint per block": lambda x: _each(blocks, x),
        "checkpoint_sequential(2)": lambda x: checkpoint_sequential(model, 2, x),
    }


def _each(blocks, x):
    for block in blocks:
        x = checkpoint(block, x)
    return x


def measure(run, x, repeats: int) -> dict:
    gc.collect()
    tracemalloc.start()
    out = run(x)
    loss = out.sum()
    held = saved_bytes(loss)
    loss.backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).sum().backward()
        times.append(time.perf_counter() - start)
    return {"held": held, "peak": peak, "time": statistics.median(times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.checkpointing", description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    engine.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(), nn.Dropout(0.1))
                            for _ in range(args.blocks)])
    x = engine.randn(args.batch, args.width, requires_grad=True)
    rows = {name: measure(run, x, args.repeats) for name, run in variants(model).items()}
    base = rows["plain"]
    print(f"MLP {args.blocks} x [Linear({args.width}, {args.width}), ReLU, Dropout], batch {args.batch}, cpu")
    print("| variant | held for backward | peak traced (fwd+bwd) | fwd+bwd time |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['held'] / 2**20:.1f} MiB ({r['held'] / base['held']:.2f}x) | "
              f"{r['peak'] / 2**20:.1f} MiB ({r['peak'] / base['peak']:.2f}x) | "
              f"{r['time'] * 1e3:.0f} ms ({r['time'] / base['time']:.2f}x) |")


if __name__ == "__main__":
    main()

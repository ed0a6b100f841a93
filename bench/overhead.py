"""``python -m bench.overhead``: the host (Python) cost of one engine op and of one fused-kernel call.

Two tables. The first, per engine op on tiny tensors (4x4, so that only the host side matters),
gives microseconds per call for the engine beside torch on the same device, measured in one run
(median of ``repeat`` runs of ``number`` back-to-back calls): ``a + b`` with grad, ``a * b``, a
4x4 matmul, tanh, sum, the issue's chain ``((a*b + a).tanh() * b).sum().backward()``, the ops of
a small MLP (linear, relu, cross_entropy), one whole MLP step (forward, backward, Adam) and the
get_batch of Karpathy's bigram / nanoGPT lecture scripts (32 slices ``data[i:i+8]`` by 0-d index
tensors from ``randint``, stacked). A ratio engine / torch at or below 1 is the target.

The second table is about the kernels layer:

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
    python3 -m bench.overhead                      # both tables on the CPU
    python3 -m bench.overhead --device cuda        # (a) plus the cupy and numba_cuda host times
    python3 -m bench.overhead --quick --json out.json
    python3 -m bench.overhead --ops-only           # only the engine-vs-torch op table
    python3 -m bench.overhead --against /tmp/old   # this tree's ops beside another checkout's
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

from engine import kernels
from engine.kernels import registry
from engine.kernels.cpu import linear_relu as cpu_linear_relu
from engine.kernels.cpu import optim as cpu_optim
from engine.kernels.cpu import softmax_cross_entropy as cpu_sce

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
            except Exception as e:  # noqa: BLE001 - one failing impl must not hide the others' figures
                row[column] = None
                row[column.replace("_us", "_error")] = f"{type(e).__name__}: {e}"[:200]
    return rows


# ---- engine ops beside torch ---------------------------------------------------------------

def _op_cases(lib, device: str) -> dict:
    """Op label -> a zero-argument callable that runs it once with ``lib`` (engine or torch) on
    ``device``. The engine follows PyTorch's API, so one builder serves both libraries."""
    lib.manual_seed(0)
    nn, F = lib.nn, lib.nn.functional
    a, b = (lib.randn(4, 4, device=device, requires_grad=True) for _ in range(2))
    ca, cb = lib.randn(4, 4, device=device), lib.randn(4, 4, device=device)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)
    opt = lib.optim.Adam(model.parameters(), lr=1e-3)
    x, y = lib.randn(8, 16, device=device), lib.randint(0, 10, (8,), device=device)
    logits = lib.randn(8, 10, device=device, requires_grad=True)
    weight, bias = model[0].weight, model[0].bias

    def chain():
        ((a * b + a).tanh() * b).sum().backward()

    def mlp_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    text = lib.randint(0, 65, (10000,), device=device)

    def get_batch():  # Karpathy's bigram/nanoGPT get_batch: 0-d index tensors from randint slice the data
        ix = lib.randint(len(text) - 8, (32,), device=device)
        return (lib.stack([text[i:i + 8] for i in ix]), lib.stack([text[i + 1:i + 8 + 1] for i in ix]))

    return {
        "a + b (grad)": lambda: a + b,
        "a * b (grad)": lambda: a * b,
        "a * b (no grad)": lambda: ca * cb,
        "matmul 4x4 (grad)": lambda: a @ b,
        "tanh (grad)": lambda: a.tanh(),
        "sum (grad)": lambda: a.sum(),
        "((a*b+a).tanh()*b).sum().backward()": chain,
        "linear 8x16->32 (grad)": lambda: F.linear(x, weight, bias),
        "relu (grad)": lambda: F.relu(a),
        "cross_entropy 8x10 (grad)": lambda: F.cross_entropy(logits, y),
        "MLP 16-32-10 step (fwd+bwd+Adam)": mlp_step,
        "bigram get_batch 32x8 (0-d index slicing)": get_batch,
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _loop_us(fn, number: int, sync, clock=time.perf_counter) -> float:
    """One timed run of ``number`` back-to-back calls of ``fn``, in us per call. The garbage
    collector stays on (timeit turns it off): collecting the graphs is part of the cost of an op."""
    start = clock()
    for _ in range(number):
        fn()
    sync()
    return (clock() - start) / number * 1e6


def _torch_for(device: str):
    """torch, if installed and able to run on ``device``; else None (the torch column stays empty)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if device == "cpu" or torch.cuda.is_available() else None


def run_ops(device: str = "cpu", quick: bool = False, number: int | None = None, repeat: int | None = None,
            clock: str = "wall") -> list[dict]:
    """The engine-vs-torch op table: per op, the median over ``repeat`` runs of ``number`` calls,
    in us per call, the two libraries' runs interleaved so that both see the same machine load.

    ``clock="cpu"`` times the process's CPU time instead of the wall clock: on a machine shared
    with other work it leaves out the time the process waits for a core (on the CPU device only:
    a GPU's work is not the process's CPU time)."""
    if clock not in CLOCKS or (clock == "cpu" and device != "cpu"):
        raise ValueError(f"run_ops: clock must be 'wall' or, on the CPU, 'cpu'; got {clock!r} on {device}")
    import engine

    number = number or (100 if quick else 500)
    repeat = repeat or (3 if quick else 7)
    libs = {"engine": (engine, engine.cuda.synchronize if device == "cuda" else (lambda: None))}
    torch = _torch_for(device)
    if torch is not None:
        libs["torch"] = (torch, torch.cuda.synchronize if device == "cuda" else (lambda: None))
    with _one_torch_thread(torch):
        return _measure_ops(libs, device, number, repeat, CLOCKS[clock])


@contextlib.contextmanager
def _one_torch_thread(torch):
    """torch on one intra-op thread while the op table runs: ops this small never split across
    threads, but on a loaded machine torch's idle OpenMP workers spin against the timed thread
    (seen on a busy 2-core VM: the MLP step at 12.9 ms with 2 threads, 0.38 ms with 1)."""
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _measure_ops(libs: dict, device: str, number: int, repeat: int, clock) -> list[dict]:
    cases = {name: _op_cases(lib, device) for name, (lib, _) in libs.items()}
    rows = []
    for op in cases["engine"]:
        samples = {name: [] for name in libs}
        for name, (_, sync) in libs.items():  # warm-up: first-call imports, caches, optimizer state
            _loop_us(cases[name][op], max(number // 10, 3), sync)
        for _ in range(repeat):
            for name, (_, sync) in libs.items():
                samples[name].append(_loop_us(cases[name][op], number, sync, clock))
        row = {"op": op, "device": device}
        for name in libs:
            row[f"{name}_us"] = statistics.median(samples[name])
            row[f"{name}_min_us"] = min(samples[name])
        if "torch_us" in row:
            row["ratio"] = row["engine_us"] / row["torch_us"]
            row["ratio_min"] = row["engine_min_us"] / row["torch_min_us"]
        rows.append(row)
    return rows


OPS_COLUMNS = (("engine_us", "engine"), ("torch_us", "torch"), ("ratio", "ratio"),
               ("engine_min_us", "engine min"), ("torch_min_us", "torch min"), ("ratio_min", "ratio min"))


def format_ops_table(rows: list[dict]) -> str:
    """The op table: medians and their ratio, then the fastest runs and theirs (on a loaded
    machine the fastest run is the one least disturbed by other processes)."""
    width = max(len(row["op"]) for row in rows) + 2
    lines = [f"{'op (' + rows[0]['device'] + ')':<{width}}" + "".join(f"{title:>11}" for _, title in OPS_COLUMNS)]
    for row in rows:
        cells = "".join(f"{row[key]:>11.2f}" if key in row else f"{'-':>11}" for key, _ in OPS_COLUMNS)
        lines.append(f"{row['op']:<{width}}{cells}")
    lines.append("(us per call: median and fastest of interleaved runs; ratio = engine / torch, target <= 1)")
    return "\n".join(lines)


def compare_trees(trees: list[str], device: str = "cpu", quick: bool = False, number: int | None = None,
                  rounds: int | None = None, clock: str = "wall") -> list[dict]:
    """The op table for the engine of several checkouts (paths; the first is labelled "this tree"), side by side:
    each round runs every tree once in its own process, rounds alternate trees, so all see the
    same machine load. Per op and tree: the median and the fastest round, in us per call; torch's
    figures are pooled over every process.

    A checkout of an older commit (``git worktree add /tmp/old <commit>``) measures a regression;
    it needs only an ``engine`` package that this file's op cases can drive."""
    number = number or (100 if quick else 300)
    rounds = rounds or (3 if quick else 7)
    samples: dict[str, list] = {tree: [] for tree in trees}
    for _ in range(rounds):
        for tree in trees:
            samples[tree].append(_ops_in_process(tree, device, number, clock))
    rows = []
    for i, first in enumerate(samples[trees[0]][0]):
        row = {"op": first["op"], "device": device}
        for tree in trees:
            runs = [run[i]["engine_us"] for run in samples[tree]]
            row[tree] = {"median_us": statistics.median(runs), "min_us": min(runs)}
        torch_runs = [run[i]["torch_us"] for tree in trees for run in samples[tree] if "torch_us" in run[i]]
        if torch_runs:
            row["torch"] = {"median_us": statistics.median(torch_runs), "min_us": min(torch_runs)}
        rows.append(row)
    return rows


def _ops_in_process(tree: str, device: str, number: int, clock: str) -> list[dict]:
    """One round of the op table for the engine at ``tree``, in a fresh interpreter."""
    import os
    import subprocess

    root = os.path.abspath(tree)
    code = (f"import sys; sys.path.insert(0, {root!r}); import engine, json, importlib.util as u\n"
            f"assert engine.__file__.startswith({root!r}), engine.__file__\n"
            f"spec = u.spec_from_file_location('_overhead_of_other_tree', {__file__!r})\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"print(json.dumps(m.run_ops({device!r}, number={number}, repeat=1, clock={clock!r})))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if done.returncode:
        raise RuntimeError(f"bench.overhead --against {tree}: the run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_compare_table(rows: list[dict], trees: list[str]) -> str:
    names = ["this tree"] + [Path(t).resolve().name for t in trees[1:]] + (["torch"] if "torch" in rows[0] else [])
    keys = list(trees) + (["torch"] if "torch" in rows[0] else [])
    width = max(len(row["op"]) for row in rows) + 2
    lines = [f"{'op (' + rows[0]['device'] + ')':<{width}}" + "".join(f"{n[:14]:>15}" for n in names)
             + "   fastest:" + "".join(f"{n[:12]:>13}" for n in names)]
    for row in rows:
        lines.append(f"{row['op']:<{width}}" + "".join(f"{row[k]['median_us']:>15.2f}" for k in keys) + " " * 11
                     + "".join(f"{row[k]['min_us']:>13.2f}" for k in keys))
    lines.append("(us per call: median and fastest of rounds that alternate the trees, one process per round)")
    return "\n".join(lines)


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds; noisier)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--ops-only", action="store_true", help="only the engine-vs-torch op table")
    only.add_argument("--kernels-only", action="store_true", help="only the fused-kernel table")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="op tables: wall time, or the process's CPU time (cpu device only; steadier on a busy "
                        "machine)")
    p.add_argument("--against", nargs="+", metavar="DIR",
                   help="also measure the engine ops of these checkouts (git worktree add DIR COMMIT), side by side "
                        "with this one; implies --ops-only")
    args = p.parse_args(argv)
    result = {}
    if args.against:
        trees = [str(Path(__file__).resolve().parent.parent), *args.against]
        result["compare"] = compare_trees(trees, args.device, args.quick, clock=args.clock)
        print(format_compare_table(result["compare"], trees))
    elif not args.kernels_only:
        result["ops"] = run_ops(args.device, args.quick, clock=args.clock)
        print(format_ops_table(result["ops"]))
    if not args.ops_only and not args.against:
        result["kernels"] = rows = run(args.device, args.quick)
        print(format_table(rows))
        for row in rows:
            for key in ("cupy_error", "numba_cuda_error"):
                if key in row:
                    print(f"{row['kernel']}: {key}: {row[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

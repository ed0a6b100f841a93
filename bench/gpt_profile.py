"""``python -m bench.gpt_profile``: the GPT training step op by op, engine beside torch, in one process.

The step is bench/gpt_step.py's (the ``--model gpt`` row: 4 layers, d_model 128, block 64, AdamW,
gradient clipping). Both frameworks' steps run in the same process, alternated round by round, so
that they see the same load; the load average is printed beside every table.

- Whole steps: the median time per step of each framework, uninstrumented, with its minor page
  faults and system CPU time per step (``getrusage``).
- Op by op: each engine ``Function``'s forward and backward, the optimizer step, the gradient
  clipping and ``zero_grad`` timed by wrappers (category totals, ms per step); torch's ops from
  ``torch.profiler`` (self CPU time of the aten ops, in the same categories). "other" is the step's
  time outside the listed categories (the engine: Python, autograd bookkeeping, element-wise ops
  that are not Functions; torch: its dispatcher and autograd engine).

``--policy`` times the engine under several BLAS thread policies side by side (kernels/threads.py:
``BLAS_PARALLEL_MIN`` and ``BLAS_QUIET_MIN`` set for the engine's steps only).

Examples:
    python -m bench.gpt_profile --batch 16 --rounds 5
    python -m bench.gpt_profile --batch 64 --policy default one-thread all-threads --no-profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Engine Function classes by category (class names); anything else goes under "shaping/elementwise".
ENGINE_CATEGORIES = {
    "Linear": "linear (GEMM+bias)", "LinearReLU": "linear (GEMM+bias)", "MatMul": "linear (GEMM+bias)",
    "ScaledDotProductAttention": "attention", "ScaledDotProductAttentionHeads": "attention", "FusedGELU": "gelu", "GELU": "gelu",
    "FusedLayerNorm": "layer_norm", "LayerNorm": "layer_norm", "CrossEntropy": "cross_entropy",
    "Embedding": "embedding",
}
# torch aten op name fragments by category, checked in order.
TORCH_CATEGORIES = (
    ("scaled_dot_product", "attention"), ("flash_attention", "attention"), ("_efficient_attention", "attention"),
    ("addmm", "linear (GEMM+bias)"), ("aten::mm", "linear (GEMM+bias)"), ("aten::bmm", "linear (GEMM+bias)"),
    ("aten::linear", "linear (GEMM+bias)"), ("aten::matmul", "linear (GEMM+bias)"),
    ("gelu", "gelu"), ("layer_norm", "layer_norm"), ("log_softmax", "cross_entropy"), ("nll_loss", "cross_entropy"),
    ("cross_entropy", "cross_entropy"), ("embedding", "embedding"), ("adam", "optimizer"),
    ("norm", "clip_grad_norm"), ("foreach", "clip_grad_norm"),
)


# (BLAS_PARALLEL_MIN, BLAS_QUIET_MIN) per --policy; None: the code's own.
POLICIES = {"default": None, "one-thread": (1 << 30, 1 << 30), "all-threads": (1 << 22, 1 << 22)}


def _engine_category(cls_name: str) -> str:
    return ENGINE_CATEGORIES.get(cls_name, f"shaping/elementwise ({cls_name})")


class EngineOpTimer:
    """Wraps every engine Function's forward/backward and the step's optimizer calls with timers."""

    def __init__(self):
        self.totals = defaultdict(float)
        self.enabled = False
        self._patched = []

    def _wrap(self, owner, attr, label):
        original = owner.__dict__[attr]
        totals = self.totals
        timer = self

        def timed(*args, **kwargs):
            if not timer.enabled:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self._patched.append((owner, attr, original))

    def install(self, opt_class, clip_module):
        from engine.autograd import Function

        def subclasses(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from subclasses(sub)

        for cls in set(subclasses(Function)):
            if cls._ctx_style:
                continue
            for attr, phase in (("forward", "fwd"), ("backward", "bwd")):
                if attr in cls.__dict__:
                    self._wrap(cls, attr, f"{_engine_category(cls.__name__)} {phase}")
        self._wrap(_defining_class(opt_class, "step"), "step", "optimizer")
        self._wrap(_defining_class(opt_class, "zero_grad"), "zero_grad", "zero_grad")
        self._wrap(clip_module, "clip_grad_norm_", "clip_grad_norm")

    def uninstall(self):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched = []


def _torch_category(name: str) -> str | None:
    for fragment, category in TORCH_CATEGORIES:
        if fragment in name:
            return category
    return None


def torch_profile(torch, step, steps: int) -> dict:
    """ms per step by category from torch.profiler's self CPU times (and the profiled step's wall time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    totals = defaultdict(float)
    for event in prof.key_averages():
        category = _torch_category(event.key)
        totals[category or f"other aten ({event.key})"] += event.self_cpu_time_total / 1e3 / steps
    totals["(profiled step)"] = wall * 1e3 / steps
    return totals


def engine_profile(step, timer: EngineOpTimer, steps: int) -> dict:
    timer.totals.clear()
    timer.enabled = True
    start = time.perf_counter()
    try:
        for _ in range(steps):
            step()
    finally:
        timer.enabled = False
    wall = time.perf_counter() - start
    totals = {k: v * 1e3 / steps for k, v in timer.totals.items()}
    totals["(profiled step)"] = wall * 1e3 / steps
    return totals


def _merge(rows: list[dict]) -> dict:
    """Median per key over rounds."""
    keys = set().union(*rows)
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def _collapse(totals: dict, top: int = 6) -> dict:
    """Fold the many small 'shaping/elementwise (...)' and 'other aten (...)' entries: the ``top``
    largest stay by name, the rest are summed."""
    out, small = {}, defaultdict(float)
    folded = [k for k in totals if k.startswith(("shaping/elementwise", "other aten"))]
    keep = set(sorted(folded, key=lambda k: -totals[k])[:top])
    for k, v in totals.items():
        if k in folded and k not in keep:
            small["shaping/elementwise (rest)" if k.startswith("shaping") else "other aten (rest)"] += v
        else:
            out[k] = v
    out.update(small)
    return out


def _usage() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far (zeros where ``resource`` is
    missing): a step that faults its arrays in afresh spends its time in the kernel."""
    try:
        import resource
    except ImportError:  # Windows
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpt_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="rounds of engine and torch steps, alternated")
    p.add_argument("--steps", type=int, default=5, help="steps per framework per round")
    p.add_argument("--policy", nargs="+", choices=tuple(POLICIES), default=["default"],
                   help="the engine's BLAS thread policies to time side by side: default (the code's), "
                        "one-thread (GEMMs under 2^30 multiply-adds on one BLAS thread whatever the load), "
                        "all-threads (every GEMM from 2^22 on the engine's count whatever the load)")
    p.add_argument("--no-profile", action="store_true", help="whole steps only")
    p.add_argument("--threads", type=int, default=None, help="engine.set_num_threads / torch.set_num_threads")
    args = p.parse_args(argv)

    import torch

    import engine
    import engine.nn.utils as nn_utils
    from bench import gpt_step
    from bench.device import BenchDevice
    from engine.kernels import registry, threads

    registry.configure_numba_threads()
    if args.threads:
        engine.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    bd = BenchDevice("cpu", {"budget_s": 1.0})
    timer = EngineOpTimer()  # installed before the step is built: the step binds clip_grad_norm_
    from engine import optim
    timer.install(optim.AdamW, nn_utils)
    weights, x, y = gpt_step.setup(bd, gpt_step.LAYERS, args.batch)
    e_step, _ = gpt_step.engine_step(bd, weights, x, y)
    t_step, _ = gpt_step.torch_step(bd, weights, x, y)
    def engine_with(policy):
        values = POLICIES[policy]

        def step():
            saved = threads.BLAS_PARALLEL_MIN, threads.BLAS_QUIET_MIN
            threads.BLAS_PARALLEL_MIN, threads.BLAS_QUIET_MIN = values or saved
            try:
                return e_step()
            finally:
                threads.BLAS_PARALLEL_MIN, threads.BLAS_QUIET_MIN = saved
        return step if hasattr(threads, "BLAS_QUIET_MIN") else e_step  # an older tree: its own policy only

    variants = [(f"engine ({policy})", engine_with(policy)) for policy in args.policy] + [("torch", t_step)]
    chosen = defaultdict(int)  # BLAS thread counts the engine's mid-size GEMMs got
    decide = getattr(threads, "gemm_threads", None)

    def counting(size, count, others, host_cpus):
        want = decide(size, count, others, host_cpus)
        if threads.BLAS_QUIET_MIN <= size < threads.BLAS_PARALLEL_MIN:
            chosen[want] += 1
        return want

    if decide is not None:  # an older tree has no gemm_threads
        threads.gemm_threads = counting
    for _, step in variants:  # warm-up: compilation, allocator arenas
        for _ in range(3):
            step()
    print(f"GPT step, batch {args.batch}, engine threads {engine.get_num_threads()}, torch threads "
          f"{torch.get_num_threads()}; load average at start {load_average()}", flush=True)
    times, faults, system = defaultdict(list), defaultdict(int), defaultdict(float)
    for _ in range(args.rounds):
        for name, step in variants:
            for _ in range(args.steps):
                before = _usage()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
                after = _usage()
                faults[name] += after[0] - before[0]
                system[name] += after[1] - before[1]
    torch_median = statistics.median(times["torch"])
    print("  mid-size GEMMs by BLAS threads chosen (all policies): "
          + ", ".join(f"{n} thread(s): {c}" for n, c in sorted(chosen.items())))
    result = {"batch": args.batch, "load_start": load_average(), "steps": {}}
    print(f"whole steps (median of {args.rounds * args.steps}), load average now {load_average()}:")
    for name, _ in variants:
        med = statistics.median(times[name])
        result["steps"][name] = med
        steps = len(times[name])
        print(f"  {name:40s} {med * 1e3:8.1f} ms   {med / torch_median:5.2f}x torch   "
              f"{faults[name] / steps:7.0f} page faults, {system[name] * 1e3 / steps:5.1f} ms system time per step")
    if args.no_profile:
        return result

    engine_rows, torch_rows = defaultdict(list), []
    try:
        for _ in range(args.rounds):
            for name, step in variants[:-1]:
                engine_rows[name].append(engine_profile(step, timer, args.steps))
            torch_rows.append(torch_profile(torch, t_step, args.steps))
    finally:
        timer.uninstall()
    t = _collapse(_merge(torch_rows))
    for name, rows in engine_rows.items():
        e = _collapse(_merge(rows))
        print(f"\nop by op, ms per step (median over {args.rounds} rounds of {args.steps} steps), "
              f"{name} vs torch; load average {load_average()}:")
        print_table(e, t)
        result[name] = e
    result["torch_profile"] = t
    return result


def print_table(e: dict, t: dict) -> None:
    """One line per category: engine forward, backward and total beside torch's total."""
    rows = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # fwd, bwd, engine total, torch
    for key, value in e.items():
        base, _, phase = key.rpartition(" ")
        if phase in ("fwd", "bwd"):
            rows[base][0 if phase == "fwd" else 1] += value
            rows[base][2] += value
        else:
            rows[key][2] += value
    for key, value in t.items():
        rows[key][3] += value
    print(f"  | {'category':52s} | engine fwd | engine bwd | engine | torch |")
    print(f"  | {'-' * 52} | --- | --- | --- | --- |")
    for key in sorted(rows, key=lambda k: -(rows[k][2] + rows[k][3])):
        f, b, total, tt = rows[key]
        print(f"  | {key:52s} | {f:6.2f} | {b:6.2f} | {total:6.2f} | {tt:6.2f} |")


def _defining_class(cls, attr):
    for klass in cls.__mro__:
        if attr in klass.__dict__:
            return klass
    raise AttributeError(attr)


if __name__ == "__main__":
    main()

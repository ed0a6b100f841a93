"""The sweep: which sizes each family runs at, which kernels a run picks, and the loop over them."""

from __future__ import annotations

import importlib

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice
from bench.kernels.attention import attention_case
from bench.kernels.gelu import gelu_case
from bench.kernels.layer_norm import layer_norm_case
from bench.kernels.linear_relu import linear_relu_backward_case, linear_relu_forward_case
from bench.kernels.optim import OPTIMIZERS, optimizer_case
from bench.kernels.run import run_case
from bench.kernels.softmax_cross_entropy import cross_entropy_case
from bench.kernels.targets import LOW_PRECISION_EXTRA_CASES, add_ratios, add_targets

# Sizes swept, per (device, mode). Optimizers: parameter counts; cross-entropy: (N, C);
# linear_relu: (N, K, M) for x (N, K) and weight (M, K); layer_norm: (N, D); attention:
# (B, L, S, E, causal[, dtype]) with B = batch * heads flattened (the GPU target's B = 8, H = 16 is
# 128) and dtype float32 unless named (bfloat16 / float16: the tensor-core rows of issue 22);
# gelu: (N, D) of x, tanh form (the GPT's MLP activation is (batch * block, 4 d_model) = (1024, 512)).
# layer_norm and gelu take a dtype too ((N, D[, dtype])): the bfloat16 rows of issue 22's targets.
SWEEPS = {
    ("cuda", "full"): {
        "adam_step": [2**e for e in range(20, 28)],
        "optim": [2**20, 2**24, 2**27],
        "softmax_cross_entropy": [(8192, c) for c in (1024, 8192, 32768, 131072)],
        "linear_relu": [(1024, 1024, 1024), (4096, 4096, 4096), (8192, 4096, 4096)],
        "layer_norm": [(16384, 1024), (16384, 4096), (1024, 65536), (16384, 4096, "bfloat16")],
        "gelu": [(16384, 4096), (65536, 4096), (16384, 4096, "bfloat16")],
        # B*H=128 L=S=1024: issue 22's tensor-core rows (bf16 / fp16, D 64 and 128, causal and not;
        # float32 at D 64 and 128, where the `cupy precision=3xtf32` candidate runs forward and
        # backward on tensor cores); L=S=8192 (B*H=16) bf16: the O(L) memory point, where unfused
        # attention holds 4 GiB per score matrix.
        "attention": [(128, 1024, 1024, e, causal) for e in (64, 128) for causal in (False, True)]
        + [(16, 4096, 4096, 64, False)]
        + [(128, 1024, 1024, e, causal, dtype) for dtype in ("bfloat16", "float16") for e in (64, 128)
           for causal in (False, True)]
        + [(16, 8192, 8192, 64, False, "bfloat16")],
    },
    ("cuda", "quick"): {
        "adam_step": [2**20, 2**27],
        "optim": [2**24],
        "softmax_cross_entropy": [(8192, 1024), (8192, 32768)],
        "linear_relu": [(1024, 1024, 1024), (4096, 4096, 4096)],
        "layer_norm": [(16384, 4096), (16384, 4096, "bfloat16")],
        "gelu": [(16384, 4096), (16384, 4096, "bfloat16")],
        "attention": [(128, 1024, 1024, 64, False), (128, 1024, 1024, 128, True, "bfloat16")],
    },
    ("cpu", "full"): {
        "adam_step": [2**16, 2**20, 10_000_000],
        "optim": [2**20, 10_000_000],
        "softmax_cross_entropy": [(1024, 1024), (1024, 8192), (1024, 32768)],
        "linear_relu": [(512, 512, 512), (1024, 1024, 1024), (2048, 1024, 1024)],
        "layer_norm": [(1024, 1024), (1024, 4096), (64, 65536)],
        "gelu": [(1024, 512), (1024, 2048)],
        "attention": [(8, 512, 512, 64, False), (8, 512, 512, 64, True), (8, 1024, 1024, 64, False)],
    },
    ("cpu", "quick"): {
        "adam_step": [2**16, 2**20],
        "optim": [2**20],
        "softmax_cross_entropy": [(256, 1024), (256, 8192)],
        "linear_relu": [(256, 256, 256), (512, 512, 512)],
        "layer_norm": [(256, 1024), (256, 4096)],
        "gelu": [(1024, 512)],
        "attention": [(8, 512, 512, 64, False)],
    },
    # Smoke-test sizes (tests/test_bench.py): odd, tiny, meaningless as performance figures.
    ("cpu", "tiny"): {
        "adam_step": [1000],
        "optim": [1000],
        "softmax_cross_entropy": [(16, 100)],
        "linear_relu": [(16, 24, 8)],
        "layer_norm": [(15, 99), (15, 99, "bfloat16")],
        "gelu": [(7, 37), (7, 37, "bfloat16")],
        "attention": [(3, 37, 29, 12, True), (2, 37, 29, 64, False, "bfloat16")],
    },
}
SWEEPS[("cuda", "tiny")] = SWEEPS[("cpu", "tiny")]

FAMILIES = ("adam_step", "sgd_step", "adagrad_step", "rmsprop_step", "softmax_cross_entropy",
            "linear_relu_forward", "linear_relu_backward", "layer_norm", "attention", "gelu")

# Bench families whose one case times several registered kernels together (forward then backward,
# as training calls them): the sweep lists the family in place of its kernels.
COMBINED = {"layer_norm": ("layer_norm_forward", "layer_norm_backward"),
            "attention": ("attention_forward", "attention_backward"),
            "gelu": ("gelu_forward", "gelu_backward")}
_FAMILY_OF = {kernel: family for family, members in COMBINED.items() for kernel in members}


def _bench_names(registered: list[str]) -> list[str]:
    """Registered kernel names, each member of a COMBINED family replaced by the family (once)."""
    names: list[str] = []
    for kernel in registered:
        name = _FAMILY_OF.get(kernel, kernel)
        if name not in names:
            names.append(name)
    return names


def select_kernels(names: list[str] | None) -> list[str]:
    """Kernels to run: all, or those named (a prefix like 'linear_relu' picks fwd and bwd)."""
    # kernels.kernels() lists only what is registered so far; the declarations register them all.
    importlib.import_module("engine.kernels.declarations")
    registered = _bench_names(kernel_registry.kernels())
    known = [k for k in FAMILIES if k in registered] + [k for k in registered if k not in FAMILIES]
    if not names:
        return known
    names = list(dict.fromkeys(_FAMILY_OF.get(n, n) for n in names))  # layer_norm_forward -> layer_norm
    chosen = [k for k in known if any(k == n or k.startswith(n.rstrip("_") + "_") for n in names)]
    unknown = [n for n in names if not any(k == n or k.startswith(n.rstrip("_") + "_") for k in known)]
    if unknown:
        raise SystemExit(f"bench: unknown kernel(s) {unknown}; known: {known}")
    return chosen


def cases_for(kernel: str, bd: BenchDevice, mode: str):
    """Yield the cases of ``kernel`` (built lazily: each holds its inputs until the next)."""
    sweep = dict(SWEEPS[(bd.kind, mode)])
    if bd.low_precision:
        for family, extra in LOW_PRECISION_EXTRA_CASES.get((bd.kind, mode), {}).items():
            sweep[family] = sweep[family] + [case for case in extra if case not in sweep[family]]
    if kernel == "adam_step" or kernel in OPTIMIZERS:
        for n in sweep["adam_step" if kernel == "adam_step" else "optim"]:
            yield lambda n=n: optimizer_case(bd, kernel, n)
    elif kernel in _SHAPED_CASES:
        family, make_case = _SHAPED_CASES[kernel]
        for shape in sweep[family]:
            yield lambda shape=shape: make_case(bd, *shape)


# kernel -> (the sweep family whose sizes it runs, the case builder taking bd and one size's fields)
_SHAPED_CASES = {
    "softmax_cross_entropy": ("softmax_cross_entropy", cross_entropy_case),
    "linear_relu_forward": ("linear_relu", linear_relu_forward_case),
    "linear_relu_backward": ("linear_relu", linear_relu_backward_case),
    "layer_norm": ("layer_norm", layer_norm_case),
    "attention": ("attention", attention_case),
    "gelu": ("gelu", gelu_case),
}


def run_sweep(bd: BenchDevice, ceilings: roofline.Ceilings, kernel_names: list[str], mode: str,
              progress) -> list[dict]:
    """Every case of every kernel in ``kernel_names``; ``progress(row)`` is told of each row."""
    rows: list[dict] = []
    for kernel in kernel_names:
        builders = list(cases_for(kernel, bd, mode))
        if not builders:
            progress.note(f"{kernel}: no benchmark defined for this kernel; skipped")
            continue
        for build in builders:
            case_rows = run_case(build, kernel, bd, ceilings, progress)
            add_ratios(case_rows, kernel, bd.torch_reason)
            add_targets(case_rows, kernel, bd.kind, mode)
            for row in case_rows:
                progress.row_done(row)
            rows.extend(case_rows)
            bd.release()
    return rows

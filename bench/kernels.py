"""The kernel sweep: every impl of every fused kernel, against its unfused and torch peers.

For each kernel and size (a *case*) the sweep

1. makes random inputs (never zeros) on the device;
2. computes a reference with the ``numpy`` impl on the host, on sampled rows / columns /
   elements (every kernel here is separable along them, so a sample checks exactly what it
   covers while keeping 4 GB inputs cheap to check);
3. runs each *candidate* -- each registered impl usable on this device, then the peers: the
   unfused engine path, the engine's own fused path where it adds a wrapper (optimizers,
   ``F.cross_entropy``), a plain GEMM for linear_relu, torch eager -- and checks its output
   against the reference (max error relative to the reference's largest magnitude);
   then times the candidates: on the CPU side by side, in rounds (the shared machine drifts),
   on the GPU one after the other (see ``BenchDevice.rounds``);
4. adds the ratios (vs torch, vs unfused) and the targets (on the GPU only for the impl and size
   each target names: :data:`CUDA_TARGETS`).

A candidate that cannot run (its module is not written yet, numba or torch is missing, an impl
takes no bf16 inputs yet) becomes a row whose status says why; nothing in one row can stop the others.

``--dtype bf16``: every case's inputs are bf16 (float32 samples rounded once); the reference is the
numpy impl in float32 on those inputs upcast; the engine and torch peers run inside their
autocast(bfloat16) region, as a mixed-precision training step calls them (the optimizers outside
it); byte counts use 2-byte elements; the GPU targets are issue 21's bf16 ones
(:data:`CUDA_TARGETS_LOW_PRECISION`).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice, Unavailable
from bench.timing import Clock, measure_interleaved
from engine import dtypes

# The impls the design defines, by the device whose arrays they take.
IMPL_DEVICE = {"numpy": "cpu", "numba_cpu": "cpu", "cupy": "cuda", "numba_cuda": "cuda"}

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
        # B*H=128 L=S=1024: issue 22's tensor-core rows (bf16 / fp16, D 64 and 128, causal and not);
        # L=S=8192 (B*H=16) bf16: the O(L) memory point, where unfused attention holds 4 GiB per
        # score matrix.
        "attention": [(128, 1024, 1024, 64, False), (128, 1024, 1024, 64, True), (16, 4096, 4096, 64, False)]
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

# The numba_cpu Adam target is stated at 10M parameters; quick mode measures it at 1M.
CPU_ADAM_TARGET_SIZE = {"full": 10_000_000, "quick": 2**20, "tiny": 1000}

SAMPLE_ELEMENTS = 2**16  # optimizer elements checked against the reference
SAMPLE_ROWS = 64  # cross-entropy / linear rows (or columns) checked when there are more than 256


@dataclass
class Prepared:
    """A candidate ready to time: ``run`` does one call, ``sample`` returns host arrays to check."""

    run: Callable[[], object]
    sample: Callable[[], dict]
    clock: Clock
    extra: dict = field(default_factory=dict)  # more row fields, filled by ``sample`` (e.g. peak memory)


@dataclass
class Candidate:
    name: str
    role: str  # "impl", "engine", "unfused", "gemm" or "torch"
    prepare: Callable[[], Prepared]


@dataclass
class Case:
    """One kernel at one size: its work, reference and candidates."""

    kernel: str
    label: str
    params: dict
    size: int  # the x-axis of the plot: elements (optimizers), logits (CE), N*K*M (GEMMs)
    work: roofline.Work
    reference: dict | None
    reference_note: str
    candidates: list[Candidate]
    flush: bool  # time cold: memory-bound kernels, on the GPU (see bench/timing.py)
    extra: dict = field(default_factory=dict)
    # In a bf16 run the engine and torch peers run inside their autocast region, as a training step
    # would call them (not the optimizers: a step is taken outside the region).
    autocast: bool = True


# ---- helpers ----------------------------------------------------------------------------------

def sample_indices(n: int, limit: int) -> np.ndarray:
    """All of range(n) if n <= limit, else ``limit`` spread-out indices including the last ones."""
    if n <= limit:
        return np.arange(n)
    spread = np.linspace(0, n - 1, limit - 16).astype(np.int64)
    return np.unique(np.concatenate([spread, np.arange(n - 16, n)]))


def max_relative_error(got: dict, reference: dict) -> float:
    """max |got - ref| / max |ref| over every array the two share (float64 arithmetic)."""
    worst = 0.0
    shared = [key for key in reference if key in got]
    if not shared:
        raise ValueError(f"nothing to compare: candidate gave {sorted(got)}, reference has {sorted(reference)}")
    for key in shared:
        a = np.asarray(got[key], dtype=np.float64)
        r = np.asarray(reference[key], dtype=np.float64)
        if a.shape != r.shape:
            raise ValueError(f"{key}: shape {a.shape} differs from the reference's {r.shape}")
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-30)
        diff = float(np.max(np.abs(a - r))) if r.size else 0.0
        worst = max(worst, diff / scale if np.isfinite(diff) else math.inf)
    return worst


def impl_function(kernel: str, name: str, bd: BenchDevice, probe) -> Callable:
    """The function of impl ``name``, or :class:`Unavailable` saying why it cannot run here."""
    try:
        if bd.low_precision:  # the registry's dtype refusal, in the words every bf16 row without a path uses
            try:
                kernel_registry.registry.check_dtype(kernel, name, bd.dtype)
            except kernel_registry.KernelError as e:
                raise Unavailable(f"takes no {bd.dtype.name} inputs yet: {_first_line(e)}") from None
        kernel_registry.choose(kernel, [probe], impl=name)
        return kernel_registry.get(kernel, name)
    except ImportError as e:
        raise Unavailable(f"{type(e).__name__}: {e}") from None
    except AttributeError as e:
        raise Unavailable(f"impl function missing: {e}") from None
    except kernel_registry.KernelError as e:
        raise Unavailable(str(e)) from None


def impls_for(kernel: str, bd: BenchDevice) -> list[str]:
    """Registered impl names of ``kernel`` that take this device's arrays, in preference order."""
    names = kernel_registry.impls(kernel, available_only=False)
    return [n for n in names if IMPL_DEVICE.get(n, bd.kind) == bd.kind]


def torch_required(bd: BenchDevice):
    if bd.torch is None:
        raise Unavailable(bd.torch_reason)
    return bd.torch


def engine_optim():
    try:
        from engine import optim
    except ImportError as e:
        raise Unavailable(f"engine.optim not importable: {e}") from None
    return optim


def numpy_reference(kernel: str, compute: Callable[[Callable], dict]) -> tuple[dict | None, str]:
    """``compute(numpy_impl)`` or (None, why) when the numpy impl cannot run.

    The reference computes in float32 from the inputs as the candidates get them: in a bf16 run,
    from the bf16 inputs upcast (each case's ``reference`` reads them with ``bd.host32``), so a
    row's error is what computing in bf16 costs.
    """
    try:
        fn = kernel_registry.get(kernel, "numpy")
    except (ImportError, AttributeError, kernel_registry.KernelError) as e:
        return None, f"none: numpy impl unavailable ({type(e).__name__}: {e})"
    return compute(fn), "numpy impl"


# ---- optimizers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSpec:
    states: tuple[str, ...]  # state arrays, in the kernel's positional order after grad
    kernel_kwargs: Callable[[int], dict]  # step number (1-based) -> keyword arguments
    engine_class: str  # engine.optim / torch.optim class name
    engine_kwargs: dict
    torch_kwargs: dict


OPTIMIZERS = {
    "adam_step": OptimizerSpec(
        states=("exp_avg", "exp_avg_sq"),
        kernel_kwargs=lambda t: dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=t),
        engine_class="Adam", engine_kwargs=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
        torch_kwargs=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
    "sgd_step": OptimizerSpec(
        states=("momentum_buf",),
        kernel_kwargs=lambda t: dict(lr=1e-2, momentum=0.9, first_step=t == 1),
        engine_class="SGD", engine_kwargs=dict(lr=1e-2, momentum=0.9), torch_kwargs=dict(lr=1e-2, momentum=0.9)),
    "adagrad_step": OptimizerSpec(
        states=("state_sum",),
        kernel_kwargs=lambda t: dict(lr=1e-2, eps=1e-10, step=t),
        engine_class="Adagrad", engine_kwargs=dict(lr=1e-2, eps=1e-10), torch_kwargs=dict(lr=1e-2, eps=1e-10)),
    "rmsprop_step": OptimizerSpec(
        states=("square_avg",),
        kernel_kwargs=lambda t: dict(lr=1e-2, alpha=0.99, eps=1e-8),
        engine_class="RMSprop", engine_kwargs=dict(lr=1e-2, alpha=0.99, eps=1e-8),
        torch_kwargs=dict(lr=1e-2, alpha=0.99, eps=1e-8)),
}

TIMED_STEP = 3  # the step number of the timed calls (after the two checked steps)


def optimizer_case(bd: BenchDevice, kernel: str, n: int) -> Case:
    """Two checked steps from zero state (grads g1 then g2), then repeated timed steps."""
    spec = OPTIMIZERS[kernel]
    p0, g1, g2 = bd.random_input((n,)), bd.random_input((n,)), bd.random_input((n,), scale=0.5)
    idx = sample_indices(n, SAMPLE_ELEMENTS)
    idx_dev = bd.asarray(idx)

    def reference(fn):
        p = bd.host32(p0[idx_dev]).copy()
        states = [np.zeros_like(p) for _ in spec.states]
        for t, g in ((1, g1), (2, g2)):
            fn(p, bd.host32(g[idx_dev]), *states, **spec.kernel_kwargs(t))
        return {"param": p, **dict(zip(spec.states, states))}

    ref, note = numpy_reference(kernel, reference)
    candidates = [Candidate(name, "impl", _kernel_optimizer(bd, kernel, spec, name, p0, g1, g2, idx_dev))
                  for name in impls_for(kernel, bd)]
    for fused in (True, False):
        role = "engine" if fused else "unfused"
        candidates.append(Candidate(f"engine {spec.engine_class}(fused={fused})", role,
                                    _engine_optimizer(bd, spec, fused, p0, g1, g2, idx_dev)))
    for option in ("fused", "foreach"):
        candidates.append(Candidate(f"torch {spec.engine_class}({option}=True)", "torch",
                                    _torch_optimizer(bd, spec, option, p0, g1, g2, idx_dev)))
    return Case(kernel=kernel, label=f"n={n:,}", params={"n": n}, size=n,
                work=roofline.OPTIMIZER_WORK[kernel](n, bd.dtype.itemsize), reference=ref, reference_note=note,
                candidates=candidates, flush=bd.flushes_cache, autocast=False)


def _kernel_optimizer(bd, kernel, spec, name, p0, g1, g2, idx_dev):
    def prepare():
        fn = impl_function(kernel, name, bd, p0)
        p = p0.copy()
        states = [bd.xp.zeros_like(p0) for _ in spec.states]
        for t, g in ((1, g1), (2, g2)):
            fn(p, g, *states, **spec.kernel_kwargs(t))
        timed_kwargs = spec.kernel_kwargs(TIMED_STEP)

        def sample():
            arrays = {"param": p, **dict(zip(spec.states, states))}
            return {key: bd.to_host(a[idx_dev]) for key, a in arrays.items()}

        return Prepared(run=lambda: fn(p, g2, *states, **timed_kwargs), sample=sample, clock=bd.clock)

    return prepare


def _engine_optimizer(bd, spec, fused, p0, g1, g2, idx_dev):
    def prepare():
        from engine.tensor import Tensor

        optim = engine_optim()
        param = Tensor(p0.copy(), requires_grad=True)
        opt = getattr(optim, spec.engine_class)([param], fused=fused, **spec.engine_kwargs)
        for g in (g1, g2):
            param.grad = Tensor(g.copy())
            opt.step()
        checked = {"param": bd.to_host(param._data.reshape(-1)[idx_dev])}
        # Let backward-style grads live in the optimizer's flat grad buffer, as in training
        # with zero_grad(set_to_none=False): the timed step then copies no gradient.
        opt.zero_grad(set_to_none=False)
        param.grad._data[...] = g2
        return Prepared(run=opt.step, sample=lambda: checked, clock=bd.clock)

    return prepare


def _torch_optimizer(bd, spec, option, p0, g1, g2, idx_dev):
    def prepare():
        torch = torch_required(bd)
        param = torch.nn.Parameter(bd.to_torch(p0))
        try:
            opt = getattr(torch.optim, spec.engine_class)([param], **{option: True}, **spec.torch_kwargs)
            for g in (g1, g2):
                param.grad = bd.to_torch(g)
                opt.step()
        except (RuntimeError, ValueError, TypeError) as e:
            raise Unavailable(f"torch: {e}".splitlines()[0]) from None
        index = torch.from_numpy(bd.to_host(idx_dev)).to(param.device)
        checked = {"param": bd.torch_to_host(param.detach()[index])}
        return Prepared(run=opt.step, sample=lambda: checked, clock=bd.torch_clock)

    return prepare


# ---- softmax cross-entropy --------------------------------------------------------------------

def cross_entropy_case(bd: BenchDevice, n: int, classes: int) -> Case:
    """Forward + backward (loss and gradient, mean reduction) of (N, C) logits."""
    kernel = "softmax_cross_entropy"
    logits = bd.random_input((n, classes), scale=2.0)
    targets = bd.random_ints(classes, (n,))
    rows = sample_indices(n, 256 if n <= 256 else SAMPLE_ROWS)
    rows_dev = bd.asarray(rows)
    scale = 1.0 / n

    def reference(fn):
        loss, grad = fn(bd.host32(logits[rows_dev]), bd.to_host(targets[rows_dev]), None, grad_scale=scale)
        return {"loss": loss, "grad": grad}

    ref, note = numpy_reference(kernel, reference)
    candidates = [Candidate(name, "impl", _ce_kernel(bd, name, logits, targets, rows_dev, scale))
                  for name in impls_for(kernel, bd)]
    for fused in (True, False):
        candidates.append(Candidate(f"engine F.cross_entropy(fused={fused})", "engine" if fused else "unfused",
                                    _ce_engine(bd, fused, logits, targets, rows_dev)))
    candidates.append(Candidate("torch F.cross_entropy", "torch", _ce_torch(bd, logits, targets, rows_dev)))
    return Case(kernel=kernel, label=f"N={n} C={classes}", params={"N": n, "C": classes}, size=n * classes,
                work=roofline.cross_entropy_work(n, classes, bd.dtype.itemsize), reference=ref, reference_note=note,
                candidates=candidates, flush=bd.flushes_cache)


def _ce_kernel(bd, name, logits, targets, rows_dev, scale):
    def prepare():
        fn = impl_function("softmax_cross_entropy", name, bd, logits)

        def run():
            return fn(logits, targets, None, ignore_index=-100, label_smoothing=0.0, grad_scale=scale,
                      compute_grad=True)

        def sample():
            loss, grad = run()
            return {"loss": bd.to_host(loss[rows_dev]), "grad": bd.to_host(grad[rows_dev])}

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _ce_engine(bd, fused, logits, targets, rows_dev):
    def prepare():
        import engine.functional as F
        from engine.tensor import Tensor

        x = Tensor(logits, requires_grad=True)
        y = Tensor(targets)

        def run():
            x.grad = None
            F.cross_entropy(x, y, fused=fused).backward()

        def sample():
            run()
            return {"grad": bd.to_host(x.grad._data[rows_dev])}

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _ce_torch(bd, logits, targets, rows_dev):
    def prepare():
        torch = torch_required(bd)
        x = bd.to_torch(logits).requires_grad_(True)
        y = bd.to_torch(targets)
        rows = torch.from_numpy(bd.to_host(rows_dev)).to(x.device)

        def run():
            loss = torch.nn.functional.cross_entropy(x, y)
            return torch.autograd.grad(loss, x)[0]

        def sample():
            return {"grad": bd.torch_to_host(run()[rows])}

        return Prepared(run=run, sample=sample, clock=bd.torch_clock)

    return prepare


# ---- layer norm -------------------------------------------------------------------------------

LAYER_NORM_EPS = 1e-5


def layer_norm_case(bd: BenchDevice, n: int, d: int, dtype: str | None = None) -> Case:
    """Forward then backward (two calls, as in training) of layer norm over (N, D) with weight and bias.

    Checked on sampled rows (y, mean, rstd, dx: each row is separable) and sampled columns (dweight,
    dbias: the numpy backward on those columns of x and dy, with every row's mean and rstd, gives
    exactly those columns of the column sums). ``dtype`` "bfloat16" / "float16": every array
    rounded to it (a model cast with ``.to(bfloat16)``), torch in the same dtype, the numpy
    reference on the same 16-bit values.
    """
    dtype = dtype or bd.dtype.name  # the run's --dtype unless the sweep names one
    x = rounded_to(bd, bd.random_normal((n, d), scale=2.0), dtype)
    dy = rounded_to(bd, bd.random_normal((n, d)), dtype)
    weight = rounded_to(bd, bd.random_normal((d,), scale=0.5) + 1.0, dtype)
    bias = rounded_to(bd, bd.random_normal((d,), scale=0.5), dtype)
    rows_dev = bd.asarray(sample_indices(n, 256 if n <= 256 else SAMPLE_ROWS))
    cols_dev = bd.asarray(sample_indices(d, 256 if d <= 256 else SAMPLE_ROWS))
    pick = _ln_picker(bd, rows_dev, cols_dev)

    def reference(backward):
        forward = kernel_registry.get("layer_norm_forward", "numpy")
        w, b = bd.host32(weight), bd.host32(bias)
        xs, dys = bd.host32(x[rows_dev]), bd.host32(dy[rows_dev])
        y, mean, rstd = forward(xs, w, b, eps=LAYER_NORM_EPS)
        dx = backward(dys, xs, w, mean, rstd, compute_weight_grads=False)[0]
        _, mean_all, rstd_all = forward(bd.host32(x), None, None, eps=LAYER_NORM_EPS)
        cols = bd.to_host(cols_dev)
        _, dweight, dbias = backward(np.ascontiguousarray(bd.host32(dy[:, cols_dev])),
                                     np.ascontiguousarray(bd.host32(x[:, cols_dev])), w[cols], mean_all, rstd_all)
        return {"y": y, "mean": mean, "rstd": rstd, "dx": dx, "dweight": dweight, "dbias": dbias}

    ref, note = numpy_reference("layer_norm_backward", reference)
    candidates = [Candidate(name, "impl", _ln_kernel(bd, name, x, dy, weight, bias, pick))
                  for name in impls_for("layer_norm_forward", bd)]
    candidates.append(Candidate("engine F.layer_norm (unfused)", "unfused",
                                _ln_engine(bd, x, dy, weight, bias, pick)))
    candidates.append(Candidate("torch F.layer_norm", "torch", _ln_torch(bd, x, dy, weight, bias, rows_dev, cols_dev)))
    params = {"N": n, "D": d} if dtype == "float32" else {"N": n, "D": d, "dtype": dtype}
    return Case(kernel="layer_norm", label=f"N={n} D={d}{dtype_label(dtype)}", params=params, size=n * d,
                work=roofline.layer_norm_work(n, d, itemsize=np.dtype(x.dtype).itemsize), reference=ref,
                reference_note=note, candidates=candidates, flush=bd.flushes_cache)


def _ln_picker(bd, rows_dev, cols_dev):
    def pick(y, mean, rstd, dx, dweight, dbias) -> dict:
        picked = {"y": y[rows_dev], "dx": dx[rows_dev], "dweight": dweight[cols_dev], "dbias": dbias[cols_dev]}
        if mean is not None:
            picked.update(mean=mean[rows_dev], rstd=rstd[rows_dev])
        return {key: bd.to_host(a) for key, a in picked.items()}

    return pick


def _ln_kernel(bd, name, x, dy, weight, bias, pick):
    def prepare():
        forward = impl_function("layer_norm_forward", name, bd, x)
        backward = impl_function("layer_norm_backward", name, bd, x)

        def run():
            y, mean, rstd = forward(x, weight, bias, eps=LAYER_NORM_EPS)
            return (y, mean, rstd) + backward(dy, x, weight, mean, rstd)

        return Prepared(run=run, sample=lambda: pick(*run()), clock=bd.clock)

    return prepare


def _ln_engine(bd, x, dy, weight, bias, pick):
    def prepare():
        import engine.functional as F
        from engine.tensor import Tensor

        leaves = [Tensor(a, requires_grad=True) for a in (x, weight, bias)]
        grad = Tensor(dy)
        shape = (x.shape[1],)

        def run():
            for t in leaves:
                t.grad = None
            y = F.layer_norm(leaves[0], shape, leaves[1], leaves[2], eps=LAYER_NORM_EPS)
            y.backward(grad)
            return y

        def sample():
            y = run()
            return pick(y._data, None, None, *(t.grad._data for t in leaves))

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _ln_torch(bd, x, dy, weight, bias, rows_dev, cols_dev):
    def prepare():
        torch = torch_required(bd)
        leaves = [torch_in_dtype(bd, torch, a).requires_grad_(True) for a in (x, weight, bias)]
        grad = torch_in_dtype(bd, torch, dy)
        rows = torch.from_numpy(bd.to_host(rows_dev)).to(grad.device)
        cols = torch.from_numpy(bd.to_host(cols_dev)).to(grad.device)
        shape = (x.shape[1],)

        def run():
            y = torch.nn.functional.layer_norm(leaves[0], shape, leaves[1], leaves[2], eps=LAYER_NORM_EPS)
            return (y,) + torch.autograd.grad(y, leaves, grad)

        def sample():  # .float(): numpy takes no torch bfloat16
            y, dx, dweight, dbias = run()
            return {"y": bd.torch_to_host(y.detach()[rows].float()), "dx": bd.torch_to_host(dx[rows].float()),
                    "dweight": bd.torch_to_host(dweight[cols].float()),
                    "dbias": bd.torch_to_host(dbias[cols].float())}

        return Prepared(run=run, sample=sample, clock=bd.torch_clock)

    return prepare


# ---- gelu ---------------------------------------------------------------------------------------

GELU_APPROXIMATE = "tanh"  # the GPT's form; the exact one is checked by tests/kernels/test_gelu.py


def gelu_case(bd: BenchDevice, n: int, d: int, dtype: str | None = None) -> Case:
    """Forward then backward (two calls, as in training) of tanh-GELU over an (N, D) activation.

    Checked on sampled rows (elementwise: each row is separable) against the numpy impl; ``dtype``
    as in :func:`layer_norm_case`.
    """
    dtype = dtype or bd.dtype.name  # the run's --dtype unless the sweep names one
    x = rounded_to(bd, bd.random_normal((n, d), scale=2.0), dtype)
    dy = rounded_to(bd, bd.random_normal((n, d)), dtype)
    rows_dev = bd.asarray(sample_indices(n, 256 if n <= 256 else SAMPLE_ROWS))

    def pick(y, dx) -> dict:
        return {"y": bd.to_host(y[rows_dev]), "dx": bd.to_host(dx[rows_dev])}

    def reference(backward):
        forward = kernel_registry.get("gelu_forward", "numpy")
        xs, dys = bd.host32(x[rows_dev]), bd.host32(dy[rows_dev])
        return {"y": forward(xs, approximate=GELU_APPROXIMATE),
                "dx": backward(dys, xs, approximate=GELU_APPROXIMATE)}

    ref, note = numpy_reference("gelu_backward", reference)
    candidates = [Candidate(name, "impl", _gelu_kernel(bd, name, x, dy, pick)) for name in impls_for("gelu_forward", bd)]
    candidates.append(Candidate("engine F.gelu (unfused)", "unfused", _gelu_engine(bd, x, dy, pick)))
    candidates.append(Candidate("torch F.gelu", "torch", _gelu_torch(bd, x, dy, rows_dev)))
    params = {"N": n, "D": d} if dtype == "float32" else {"N": n, "D": d, "dtype": dtype}
    return Case(kernel="gelu", label=f"N={n} D={d} {GELU_APPROXIMATE}{dtype_label(dtype)}", params=params, size=n * d,
                work=roofline.gelu_work(n * d, itemsize=np.dtype(x.dtype).itemsize), reference=ref,
                reference_note=note, candidates=candidates, flush=bd.flushes_cache)


def _gelu_kernel(bd, name, x, dy, pick):
    def prepare():
        forward = impl_function("gelu_forward", name, bd, x)
        backward = impl_function("gelu_backward", name, bd, x)

        def run():
            return forward(x, approximate=GELU_APPROXIMATE), backward(dy, x, approximate=GELU_APPROXIMATE)

        return Prepared(run=run, sample=lambda: pick(*run()), clock=bd.clock)

    return prepare


def _gelu_engine(bd, x, dy, pick):
    def prepare():
        import engine.functional as F
        from engine.tensor import Tensor

        leaf = Tensor(x, requires_grad=True)
        grad = Tensor(dy)

        def run():
            leaf.grad = None
            with F.fused_kernels(False):  # the array-expression path the kernels replace
                y = F.gelu(leaf, approximate=GELU_APPROXIMATE)
                y.backward(grad)
            return y

        def sample():
            y = run()
            return pick(y._data, leaf.grad._data)

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _gelu_torch(bd, x, dy, rows_dev):
    def prepare():
        torch = torch_required(bd)
        leaf = torch_in_dtype(bd, torch, x).requires_grad_(True)
        grad = torch_in_dtype(bd, torch, dy)
        rows = torch.from_numpy(bd.to_host(rows_dev)).to(grad.device)

        def run():
            y = torch.nn.functional.gelu(leaf, approximate=GELU_APPROXIMATE)
            return y, torch.autograd.grad(y, leaf, grad)[0]

        def sample():  # .float(): numpy takes no torch bfloat16
            y, dx = run()
            return {"y": bd.torch_to_host(y.detach()[rows].float()), "dx": bd.torch_to_host(dx[rows].float())}

        return Prepared(run=run, sample=sample, clock=bd.torch_clock)

    return prepare


# ---- attention --------------------------------------------------------------------------------

ATTENTION_SAMPLE_BATCH_ROWS = 3  # batch rows (of B = batch * heads) checked against the numpy impl


def attention_case(bd: BenchDevice, b: int, l: int, s: int, e: int, causal: bool,  # noqa: E741
                   dtype: str | None = None) -> Case:
    """Forward then backward (two calls, as in training) of attention over (B, L, E) x (B, S, E), no mask.

    ``dtype`` "bfloat16" or "float16": the inputs rounded to it (on the host: every array module
    takes the ml_dtypes arrays), torch's peers in the same dtype, the numpy reference on the same
    16-bit values (computed in float32). float32 cases on the GPU add a ``cupy precision=3xtf32``
    candidate beside the default (CUDA-core) cupy one.

    Checked on sampled batch rows: each batch row (one head of one sequence) is independent, and
    the numpy impl on a few full rows checks out, lse, dq, dk and dv exactly where it looks. On the
    GPU each candidate's peak memory during one forward + backward is recorded beside its time
    (``peak_memory_bytes``: cupy's pool, or torch's allocator, above what the inputs hold).
    """
    dtype = dtype or bd.dtype.name  # the run's --dtype unless the sweep names one
    scale = 1.0 / math.sqrt(e)
    q, k, v, grad = (_attention_input(bd, shape, dtype) for shape in ((b, l, e), (b, s, e), (b, s, e), (b, l, e)))
    rows = np.unique(np.linspace(0, b - 1, min(b, ATTENTION_SAMPLE_BATCH_ROWS)).astype(np.int64))
    rows_dev = bd.asarray(rows)

    def pick(out, lse, dq, dk, dv) -> dict:
        picked = {"out": out, "dq": dq, "dk": dk, "dv": dv}
        if lse is not None:
            picked["lse"] = lse
        return {key: bd.to_host(a[rows_dev]) for key, a in picked.items()}

    def reference(backward):
        forward = kernel_registry.get("attention_forward", "numpy")
        qs, ks, vs, gs = (np.ascontiguousarray(bd.host32(a[rows_dev])) for a in (q, k, v, grad))
        out, lse = forward(qs, ks, vs, scale=scale, causal=causal)
        dq, dk, dv = backward(gs, qs, ks, vs, out, lse, scale=scale, causal=causal)
        return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}

    ref, note = numpy_reference("attention_backward", reference)
    inputs = (q, k, v, grad, scale, causal)
    candidates = [Candidate(name, "impl", _attn_kernel(bd, name, inputs, pick))
                  for name in impls_for("attention_forward", bd)]
    if bd.kind == "cuda" and dtype == "float32":
        candidates.append(Candidate(ATTENTION_3XTF32, "impl", _attn_kernel(bd, "cupy", inputs, pick, "3xtf32")))
    candidates.append(Candidate(ATTENTION_UNFUSED, "unfused", _attn_engine(bd, inputs, pick)))
    candidates.append(Candidate(ATTENTION_TORCH_UNFUSED, "torch", _attn_torch(bd, inputs, rows, sdpa=False)))
    candidates.append(Candidate(ATTENTION_TORCH_SDPA, "torch", _attn_torch(bd, inputs, rows, sdpa=True)))
    label = f"B*H={b} L={l} S={s} E={e}" + (" causal" if causal else "") + dtype_label(dtype)
    params = {"B": b, "L": l, "S": s, "E": e, "causal": causal}
    if dtype != "float32":  # float32 rows keep their params (the GPU target names them)
        params["dtype"] = dtype
    return Case(kernel="attention", label=label, params=params,
                size=b * roofline.attention_pairs(l, s, causal) * e,
                work=roofline.attention_work(b, l, s, e, e, causal, itemsize=np.dtype(q.dtype).itemsize),
                reference=ref, reference_note=note, candidates=candidates, flush=False)


ATTENTION_UNFUSED = "engine F.scaled_dot_product_attention (unfused)"
ATTENTION_3XTF32 = "cupy precision=3xtf32"


def _attention_input(bd: BenchDevice, shape, dtype: str):
    """N(0, 1) samples of ``shape`` on the device, rounded to ``dtype`` (on the host for 16-bit)."""
    return rounded_to(bd, bd.random_normal(shape), dtype)


def rounded_to(bd: BenchDevice, a, dtype: str):
    """Device array ``a`` rounded to ``dtype`` ("float32", "bfloat16", "float16"; on the host for
    16-bit: every array module takes the ml_dtypes arrays)."""
    if dtype == "float32":
        return a
    import ml_dtypes

    return bd.asarray(bd.to_host(a).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16))


def torch_in_dtype(bd: BenchDevice, torch, a):
    """``a`` as a torch tensor of its own dtype: a 16-bit array goes over in float32 (exact) and is
    cast there (torch takes no ml_dtypes arrays)."""
    if a.dtype == np.float32:
        return bd.to_torch(a)
    return bd.to_torch(bd.asarray(bd.to_host(a).astype(np.float32))).to(getattr(torch, np.dtype(a.dtype).name))


def dtype_label(dtype: str) -> str:
    """The suffix a row's label gets for a non-float32 dtype."""
    return "" if dtype == "float32" else f" {dtype}"
ATTENTION_TORCH_UNFUSED = "torch eager unfused (matmul, softmax, matmul)"
ATTENTION_TORCH_SDPA = "torch F.scaled_dot_product_attention"


def _peak_memory(bd: BenchDevice, run: Callable[[], object], torch=None) -> tuple[object, int | None]:
    """(run(), bytes allocated at the peak of the call above what was allocated before it).

    GPU only (None on the CPU, where numba's allocations are invisible to Python's tracers):
    cupy's default memory pool, whose used bytes are read after every allocation through a
    ``cupy.cuda.MemoryHook``, or torch's caching allocator's peak statistics.
    """
    if bd.kind != "cuda":
        return run(), None
    bd.synchronize()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        bd.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    pool = bd.xp.get_default_memory_pool()

    class PeakHook(bd.xp.cuda.MemoryHook):
        name = "bench_peak_memory"

        def __init__(self):
            super().__init__()
            self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, pool.used_bytes())

    before = pool.used_bytes()
    hook = PeakHook()
    with hook:
        result = run()
    bd.synchronize()
    return result, hook.peak - before


def _attn_kernel(bd, name, inputs, pick, precision=None):
    q, k, v, grad, scale, causal = inputs

    def prepare():
        forward = impl_function("attention_forward", name, bd, q)
        backward = impl_function("attention_backward", name, bd, q)
        kw = dict(scale=scale, causal=causal, precision=precision)

        def run():
            out, lse = forward(q, k, v, **kw)
            return (out, lse) + backward(grad, q, k, v, out, lse, **kw)

        def sample():
            results, prepared.extra["peak_memory_bytes"] = _peak_memory(bd, run)
            return pick(*results)

        prepared = Prepared(run=run, sample=sample, clock=bd.clock)
        return prepared

    return prepare


def _attn_engine(bd, inputs, pick):
    q, k, v, grad, scale, causal = inputs

    def prepare():
        import engine.functional as F
        from engine.tensor import Tensor

        if not hasattr(F, "scaled_dot_product_attention"):
            raise Unavailable("engine.functional has no scaled_dot_product_attention")
        leaves = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        grad_t = Tensor(grad)

        def run():
            for t in leaves:
                t.grad = None
            with F.fused_kernels(False):  # matmul, masked softmax, matmul: the L x S scores kept for backward
                out = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale)
                out.backward(grad_t)
            return out

        def sample():
            out, prepared.extra["peak_memory_bytes"] = _peak_memory(bd, run)
            return pick(out._data, None, *(t.grad._data for t in leaves))

        prepared = Prepared(run=run, sample=sample, clock=bd.clock)
        return prepared

    return prepare


def _attn_torch(bd, inputs, rows, sdpa: bool):
    q, k, v, grad, scale, causal = inputs

    def prepare():
        torch = torch_required(bd)
        leaves = [torch_in_dtype(bd, torch, a).requires_grad_(True) for a in (q, k, v)]
        grad_t = torch_in_dtype(bd, torch, grad)
        picked = torch.from_numpy(rows).to(grad_t.device)
        l, s = q.shape[1], k.shape[1]  # noqa: E741
        above = torch.ones(l, s, dtype=torch.bool, device=grad_t.device).triu(1) if causal else None

        def attention(qt, kt, vt):
            if sdpa:
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
            scores = torch.matmul(qt, kt.transpose(-2, -1)) * scale
            if above is not None:
                scores = scores.masked_fill(above, float("-inf"))
            return torch.matmul(torch.softmax(scores, dim=-1), vt)

        def run():
            out = attention(*leaves)
            return (out,) + torch.autograd.grad(out, leaves, grad_t)

        def sample():
            results, prepared.extra["peak_memory_bytes"] = _peak_memory(bd, run, torch)
            return {key: bd.torch_to_host(a.detach()[picked].float()) for key, a in zip(("out", "dq", "dk", "dv"),
                                                                                       results)}

        prepared = Prepared(run=run, sample=sample, clock=bd.torch_clock)
        return prepared

    return prepare


# ---- linear + ReLU ----------------------------------------------------------------------------

def _linear_inputs(bd: BenchDevice, n: int, k: int, m: int):
    x = bd.random_input((n, k))
    weight = bd.random_input((m, k), scale=1.0 / math.sqrt(k))
    bias = bd.random_input((m,), scale=0.1)
    return x, weight, bias


def linear_relu_forward_case(bd: BenchDevice, n: int, k: int, m: int) -> Case:
    kernel = "linear_relu_forward"
    x, weight, bias = _linear_inputs(bd, n, k, m)
    rows = sample_indices(n, 256 if n <= 256 else SAMPLE_ROWS)
    rows_dev = bd.asarray(rows)
    w_host, b_host = bd.host32(weight), bd.host32(bias)

    def reference(fn):
        return {"out": fn(bd.host32(x[rows_dev]), w_host, b_host)}

    ref, note = numpy_reference(kernel, reference)
    candidates = [Candidate(name, "impl", _lr_forward_kernel(bd, name, x, weight, bias, rows_dev))
                  for name in impls_for(kernel, bd)]
    candidates.append(Candidate("gemm x @ W.T", "gemm", _gemm(bd, x, weight, bias, rows_dev)))
    candidates.append(Candidate("engine F.linear_relu(fused=False)", "unfused",
                                _lr_forward_engine(bd, x, weight, bias, rows_dev)))
    candidates.append(Candidate("torch relu(linear)", "torch", _lr_forward_torch(bd, x, weight, bias, rows_dev)))
    return Case(kernel=kernel, label=f"N={n} K={k} M={m}", params={"N": n, "K": k, "M": m}, size=n * k * m,
                work=roofline.linear_relu_forward_work(n, k, m, bd.dtype.itemsize), reference=ref, reference_note=note,
                candidates=candidates, flush=False, extra={"gemm_work": roofline.gemm_work(n, k, m, bd.dtype.itemsize)})


def _lr_forward_kernel(bd, name, x, weight, bias, rows_dev):
    def prepare():
        fn = impl_function("linear_relu_forward", name, bd, x)
        return Prepared(run=lambda: fn(x, weight, bias),
                        sample=lambda: {"out": bd.to_host(fn(x, weight, bias)[rows_dev])}, clock=bd.clock)

    return prepare


def _gemm(bd, x, weight, bias, rows_dev):
    """The plain GEMM of the same shape: the speed a fused epilogue should cost almost nothing over."""
    def prepare():
        xp = bd.xp
        out = xp.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)

        def run():
            xp.matmul(x, weight.T, out=out)

        def sample():
            run()
            return {"out": np.maximum(bd.host32(out[rows_dev]) + bd.host32(bias), 0)}

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _lr_forward_engine(bd, x, weight, bias, rows_dev):
    def prepare():
        import engine.functional as F
        from engine.autograd import no_grad
        from engine.tensor import Tensor

        tx, tw, tb = Tensor(x), Tensor(weight), Tensor(bias)

        def run():
            with no_grad():
                return F.linear_relu(tx, tw, tb, fused=False)

        return Prepared(run=run, sample=lambda: {"out": bd.to_host(run()._data[rows_dev])}, clock=bd.clock)

    return prepare


def _lr_forward_torch(bd, x, weight, bias, rows_dev):
    def prepare():
        torch = torch_required(bd)
        F = torch.nn.functional
        tx, tw, tb = bd.to_torch(x), bd.to_torch(weight), bd.to_torch(bias)
        rows = torch.from_numpy(bd.to_host(rows_dev)).to(tx.device)

        def run():
            with torch.no_grad():
                return F.relu(F.linear(tx, tw, tb))

        return Prepared(run=run, sample=lambda: {"out": bd.torch_to_host(run()[rows])}, clock=bd.torch_clock)

    return prepare


def linear_relu_backward_case(bd: BenchDevice, n: int, k: int, m: int) -> Case:
    """Gradients of relu(x @ W.T + b) given dy; checked on sampled columns of x and W.

    With ``cols`` a subset of the K input features, the numpy impl run on ``x[:, cols]`` and
    ``W[:, cols]`` gives exactly ``dx[:, cols]``, ``dW[:, cols]`` and the whole ``db``.
    """
    kernel = "linear_relu_backward"
    x, weight, bias = _linear_inputs(bd, n, k, m)
    up = dtypes.upcast  # y in float32, rounded once to the run's dtype (bf16 GEMMs round differently per library)
    out = bd.xp.maximum(up(x) @ up(weight).T + up(bias), 0).astype(bd.dtype)
    grad_out = bd.random_input((n, m))
    cols = sample_indices(k, 256 if k <= 256 else SAMPLE_ROWS)
    cols_dev = bd.asarray(cols)

    def reference(fn):
        gx, gw, gb = fn(bd.host32(grad_out), np.ascontiguousarray(bd.host32(x[:, cols_dev])),
                        np.ascontiguousarray(bd.host32(weight[:, cols_dev])), bd.host32(out))
        return {"grad_x": gx, "grad_weight": gw, "grad_bias": gb}

    ref, note = numpy_reference(kernel, reference)

    def pick(gx, gw, gb) -> dict:
        return {"grad_x": bd.to_host(gx[:, cols_dev]), "grad_weight": bd.to_host(gw[:, cols_dev]),
                "grad_bias": bd.to_host(gb)}

    candidates = [Candidate(name, "impl", _lr_backward_kernel(bd, name, grad_out, x, weight, out, pick))
                  for name in impls_for(kernel, bd)]
    candidates.append(Candidate("engine autograd (unfused)", "unfused",
                                _lr_backward_engine(bd, x, weight, bias, grad_out, pick)))
    candidates.append(Candidate("torch autograd", "torch",
                                _lr_backward_torch(bd, x, weight, bias, grad_out, cols)))
    return Case(kernel=kernel, label=f"N={n} K={k} M={m}", params={"N": n, "K": k, "M": m}, size=n * k * m,
                work=roofline.linear_relu_backward_work(n, k, m, bd.dtype.itemsize), reference=ref, reference_note=note,
                candidates=candidates, flush=False)


def _lr_backward_kernel(bd, name, grad_out, x, weight, out, pick):
    def prepare():
        fn = impl_function("linear_relu_backward", name, bd, x)
        return Prepared(run=lambda: fn(grad_out, x, weight, out),
                        sample=lambda: pick(*fn(grad_out, x, weight, out)), clock=bd.clock)

    return prepare


def _lr_backward_engine(bd, x, weight, bias, grad_out, pick):
    def prepare():
        import engine.functional as F
        from engine.tensor import Tensor

        leaves = [Tensor(a, requires_grad=True) for a in (x, weight, bias)]
        out = F.linear_relu(*leaves, fused=False)
        dy = Tensor(grad_out)

        def run():
            for t in leaves:
                t.grad = None
            out.backward(dy, retain_graph=True)

        def sample():
            run()
            return pick(*(t.grad._data for t in leaves))

        return Prepared(run=run, sample=sample, clock=bd.clock)

    return prepare


def _lr_backward_torch(bd, x, weight, bias, grad_out, cols):
    def prepare():
        torch = torch_required(bd)
        F = torch.nn.functional
        leaves = [bd.to_torch(a).requires_grad_(True) for a in (x, weight, bias)]
        out = F.relu(F.linear(*leaves))
        dy = bd.to_torch(grad_out)
        index = torch.from_numpy(cols).to(dy.device)

        def run():
            return torch.autograd.grad(out, leaves, dy, retain_graph=True)

        def sample():
            gx, gw, gb = run()
            return {"grad_x": bd.torch_to_host(gx[:, index]), "grad_weight": bd.torch_to_host(gw[:, index]),
                    "grad_bias": bd.torch_to_host(gb)}

        return Prepared(run=run, sample=sample, clock=bd.torch_clock)

    return prepare


# ---- running a case ---------------------------------------------------------------------------

def check_candidate(case: Case, candidate: Candidate, bd: BenchDevice) -> tuple[dict, Prepared | None]:
    """Prepare one candidate and check it against the reference: (row, prepared or None). Never raises."""
    row = base_row(case, candidate, bd)
    region = _autocast_region(case, candidate, bd)
    try:
        with region():
            prepared = candidate.prepare()
            got = prepared.sample()
        if region is not contextlib.nullcontext:
            prepared.run = _inside(region, prepared.run)
        row.update(prepared.extra)
        if case.reference is not None:
            row["max_rel_err"] = max_relative_error(got, case.reference)
    except Unavailable as e:
        row["status"] = f"unavailable: {e}"
        return row, None
    except Exception as e:  # noqa: BLE001 - one broken candidate must not stop the sweep; the row says what broke
        if bd.low_precision and candidate.role == "impl" and isinstance(e, kernel_registry.KernelError):
            # An impl that does not take this dtype yet says so (its validator names the dtypes it takes).
            row["status"] = f"unavailable: takes no {bd.dtype.name} inputs yet: {_first_line(e)}"
            return row, None
        row["status"] = f"error: {type(e).__name__}: {_first_line(e)}"
        row["traceback"] = traceback.format_exc(limit=6)
        return row, None
    return row, prepared


def _autocast_region(case: Case, candidate: Candidate, bd: BenchDevice) -> Callable:
    """The region a candidate runs in: the engine's or torch's autocast for the peers of a case
    that asks for it in a bf16 run; no region for the kernel impls and plain GEMMs."""
    if bd.low_precision and case.autocast and candidate.role in ("engine", "unfused"):
        return bd.engine_autocast
    if bd.low_precision and case.autocast and candidate.role == "torch":
        return bd.torch_autocast
    return contextlib.nullcontext


def _inside(region: Callable, run: Callable) -> Callable:
    def run_inside():
        with region():
            return run()

    return run_inside


def time_candidates(case: Case, checked: list[tuple[dict, Prepared]], bd: BenchDevice,
                    ceilings: roofline.Ceilings) -> None:
    """Time the checked candidates side by side (``bd.rounds`` rounds) and fill their rows."""
    measurements = measure_interleaved([(prepared.clock, prepared.run) for _, prepared in checked],
                                       rounds=bd.rounds, flush=case.flush, before=bd.settle)
    for (row, _), m in zip(checked, measurements):
        if isinstance(m, Exception):
            row["status"] = f"error: {type(m).__name__}: {_first_line(m)}"
        else:
            row.update(status="ok", **m.to_dict(), **roofline.achieved(case.work, m.median_s, ceilings))


def base_row(case: Case, candidate: Candidate, bd: BenchDevice) -> dict:
    return {
        "kernel": case.kernel, "case": case.label, "params": case.params, "size": case.size,
        "impl": candidate.name, "role": candidate.role, "device": bd.kind,
        "dtype": case.params.get("dtype", bd.dtype.name), "status": "pending",
        "bytes": case.work.bytes, "flops": case.work.flops, "flushed_cache": case.flush,
        "reference": case.reference_note, "max_rel_err": None,
        "median_s": None, "spread": None, "min_s": None, "max_s": None, "q25_s": None, "q75_s": None,
        "repeats": 0, "host_median_s": None, "GBps": None, "TFLOPs": None, "fraction_of_copy_bw": None,
        "fraction_of_gemm": None, "roofline_fraction": None, "bound": None,
        "vs_torch": None, "vs_torch_peer": None, "vs_unfused": None, "vs_unfused_peer": None, "target": "",
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ---- ratios and targets -----------------------------------------------------------------------

# Peers for the ratio columns, first measured one wins (torch's fused optimizers do not exist
# for every optimizer on every device; foreach is torch's default on CUDA).
TORCH_PEER = {
    "adam_step": ["torch Adam(fused=True)", "torch Adam(foreach=True)"],
    "sgd_step": ["torch SGD(fused=True)", "torch SGD(foreach=True)"],
    "adagrad_step": ["torch Adagrad(fused=True)", "torch Adagrad(foreach=True)"],
    "rmsprop_step": ["torch RMSprop(fused=True)", "torch RMSprop(foreach=True)"],
    "softmax_cross_entropy": ["torch F.cross_entropy"],
    "layer_norm": ["torch F.layer_norm"],
    "attention": ["torch F.scaled_dot_product_attention"],
    "gelu": ["torch F.gelu"],
    "linear_relu_forward": ["torch relu(linear)"],
    "linear_relu_backward": ["torch autograd"],
}
UNFUSED_PEER = {
    "adam_step": ["engine Adam(fused=False)"], "sgd_step": ["engine SGD(fused=False)"],
    "adagrad_step": ["engine Adagrad(fused=False)"], "rmsprop_step": ["engine RMSprop(fused=False)"],
    "softmax_cross_entropy": ["engine F.cross_entropy(fused=False)"],
    "layer_norm": ["engine F.layer_norm (unfused)"],
    "attention": ["engine F.scaled_dot_product_attention (unfused)"],
    "gelu": ["engine F.gelu (unfused)"],
    "linear_relu_forward": ["engine F.linear_relu(fused=False)"],
    "linear_relu_backward": ["engine autograd (unfused)"],
}


def _first_measured(by_name: dict, names: list[str]):
    """The first peer row among ``names`` that ran, else the first that exists (to say why not)."""
    present = [by_name[n] for n in names if n in by_name]
    measured = [r for r in present if r["status"] == "ok"]
    return (measured or present or [None])[0]


def add_ratios(rows: list[dict], kernel: str, torch_reason: str) -> None:
    """vs_torch and vs_unfused (peer time / row time: > 1 means the row is faster)."""
    by_name = {r["impl"]: r for r in rows}
    for column, peers in (("vs_torch", TORCH_PEER.get(kernel, [])), ("vs_unfused", UNFUSED_PEER.get(kernel, []))):
        peer = _first_measured(by_name, peers)
        for row in rows:
            if row["status"] != "ok" or row is peer:
                continue
            if peer is not None and peer["status"] == "ok":
                row[column] = peer["median_s"] / row["median_s"]
                row[f"{column}_peer"] = peer["impl"]
            elif column == "vs_torch":
                row["vs_torch_peer"] = torch_reason or (peer["status"] if peer else "no torch peer")


@dataclass(frozen=True)
class GpuTarget:
    """Where a GPU target of the kernels issue applies: one impl, at one size (a case's params)."""

    impl: str
    params: dict


# On the GPU each target holds for the impl and size it names, and only there: smaller sizes are
# launch-bound (a few microseconds of work against the launch and the Python around it), larger
# ones are beyond what the target speaks of, and numba_cuda is the readable teaching impl, not held
# to performance targets. The checks themselves are in _target_checks. The CPU rows keep their
# verdicts at every size (see add_targets).
CUDA_TARGETS = {
    "adam_step": GpuTarget("cupy", {"n": 2**27}),
    "softmax_cross_entropy": GpuTarget("cupy", {"N": 8192, "C": 32768}),
    "layer_norm": GpuTarget("cupy", {"N": 16384, "D": 4096}),
    "attention": GpuTarget("cupy", {"B": 128, "L": 1024, "S": 1024, "E": 64, "causal": False}),
    "linear_relu_forward": GpuTarget("cupy", {"N": 4096, "K": 4096, "M": 4096}),
    "linear_relu_backward": GpuTarget("cupy", {"N": 4096, "K": 4096, "M": 4096}),
}
# Issue 21's GPU targets for the bf16 rows (--dtype bf16): linear forward >= 90 % of the plain bf16
# GEMM and >= 0.9x torch at 4096^3; softmax-CE with bf16 logits at GPT-2's vocabulary >= 80 % of copy
# bandwidth and >= 1.5x torch. Other kernels have no bf16 target.
CUDA_TARGETS_LOW_PRECISION = {
    "softmax_cross_entropy": GpuTarget("cupy", {"N": 8192, "C": 50304}),
    "linear_relu_forward": GpuTarget("cupy", {"N": 4096, "K": 4096, "M": 4096}),
}
# Cases a bf16 run adds to the sweep so that every bf16 target is measured.
LOW_PRECISION_EXTRA_CASES = {("cuda", "full"): {"softmax_cross_entropy": [(8192, 50304)]},
                             ("cuda", "quick"): {"softmax_cross_entropy": [(8192, 50304)]}}
NO_TARGET_AT_SIZE = "- (no target at this size)"
NO_TARGET_FOR_IMPL = "- (no target for this impl)"


def _needs_target(row: dict) -> bool:
    # Targets are for the fused impls; the numpy impl is the reference they are checked against.
    return row["role"] == "impl" and row["impl"] != "numpy"


def add_targets(rows: list[dict], kernel: str, device: str, mode: str) -> None:
    """Fill the ``target`` column of one case's rows (see :func:`target_status`)."""
    by_name = {r["impl"]: r for r in rows}
    for row in rows:
        row["target"] = target_status(row, kernel, device, mode, by_name)


def target_status(row: dict, kernel: str, device: str, mode: str, by_name: dict) -> str:
    """The ``target`` cell of one row, from its measured fields and its case's other rows
    (``by_name``: impl name -> row): 'met', 'missed: <what, by how much>', 'not measured',
    '- (why no target)' where the kernel has targets but not for this row, or '' (the peers,
    the numpy reference, and kernels without targets). Times nothing.

    On the CPU the fused impls get a verdict at every size: the GPU's bandwidth and vs-torch
    targets as a measure of distance, and the CPU Adam target (>= 3x numpy) at
    CPU_ADAM_TARGET_SIZE.
    """
    if not _needs_target(row):
        return ""
    if device == "cuda":
        where = (CUDA_TARGETS_LOW_PRECISION if _low_precision_row(row) else CUDA_TARGETS).get(kernel)
        if where is None:
            return ""
        if row.get("params") is not None:  # None: the case failed to build ("not measured")
            if row["impl"] != where.impl:
                return NO_TARGET_FOR_IMPL
            if row["params"] != where.params:
                return NO_TARGET_AT_SIZE
    if row["status"] != "ok":
        return "not measured"
    checks = _target_checks(row, kernel, device, mode, by_name)
    if not checks:
        return ""
    missed = [text for ok, text in checks if ok is False]
    unknown = [text for ok, text in checks if ok is None]
    status = ("missed: " + "; ".join(missed)) if missed else "met"
    if unknown:
        status += " (" + "; ".join(unknown) + ")"
    return status


def _low_precision_row(row: dict) -> bool:
    return row.get("dtype", "float32") in ("bfloat16", "float16")


def _target_checks(row, kernel, device, mode, by_name) -> list[tuple[bool | None, str]]:
    """(passed, text) pairs; passed None when the comparison could not be made."""
    checks = []
    if kernel == "adam_step":
        checks.append(_at_least(row["fraction_of_copy_bw"], 0.85, "of copy BW"))
        checks.append(_ratio_check(row, 1.0))
        if device == "cpu" and row["impl"] == "numba_cpu" and row["params"]["n"] == CPU_ADAM_TARGET_SIZE[mode]:
            numpy_row = by_name.get("numpy")
            where = "" if mode == "full" else f" (at {row['params']['n']:,}, not 10M: {mode} mode)"
            if numpy_row is None or numpy_row["status"] != "ok":
                checks.append((None, "numpy impl not measured"))
            else:
                speedup = numpy_row["median_s"] / row["median_s"]
                checks.append((speedup >= 3.0, f"{speedup:.2f}x numpy, target >= 3x{where}"))
    elif kernel == "softmax_cross_entropy":
        checks.append(_at_least(row["fraction_of_copy_bw"], 0.80, "of copy BW"))
        checks.append(_ratio_check(row, 1.5))
    elif kernel == "layer_norm":
        checks.append(_at_least(row["fraction_of_copy_bw"], 0.80, "of copy BW"))
    elif kernel == "attention":
        checks.extend(_attention_checks(row, device, by_name))
    elif kernel == "linear_relu_forward":
        gemm = by_name.get("gemm x @ W.T")
        if gemm is None or gemm["status"] != "ok":
            checks.append((None, "plain GEMM not measured"))
        else:
            fraction = row["TFLOPs"] / gemm["TFLOPs"]
            checks.append((fraction >= 0.90, f"{fraction:.0%} of plain-GEMM TFLOP/s, target >= 90%"))
        checks.append(_ratio_check(row, 0.9 if _low_precision_row(row) else 1.0))
    elif kernel == "linear_relu_backward":
        checks.append(_ratio_check(row, 1.0))
    return checks


CPU_ATTENTION_TARGET_L = 512  # the issue states the CPU attention target (numba_cpu >= 2x numpy) at L = 512


def _attention_checks(row, device, by_name) -> list[tuple[bool | None, str]]:
    """GPU: faster than torch's unfused eager attention, at least as fast as torch's SDPA (fp32),
    and O(L) memory (the peak above the inputs under one B x L x S float32 score matrix).
    CPU: numba_cpu >= 2x the numpy reference (stated at L = 512; elsewhere a measure of distance)."""
    def speedup(peer_name):
        peer = by_name.get(peer_name)
        if peer is None or peer["status"] != "ok":
            return None, (peer["status"] if peer else "not measured")
        return peer["median_s"] / row["median_s"], None

    checks: list[tuple[bool | None, str]] = []
    if device == "cpu":
        ratio, why = speedup("numpy")
        if ratio is None:
            return [(None, f"numpy impl {why}")]
        where = "" if row["params"]["L"] == CPU_ATTENTION_TARGET_L else f" (at L={row['params']['L']}, stated at 512)"
        return [(ratio >= 2.0, f"{ratio:.2f}x numpy, target >= 2x{where}")]
    for peer_name, goal, wanted in ((ATTENTION_TORCH_UNFUSED, 1.0, "> 1x"), (ATTENTION_TORCH_SDPA, 1.0, ">= 1x")):
        ratio, why = speedup(peer_name)
        if ratio is None:
            checks.append((None, f"vs {peer_name}: {why}"))
        else:
            ok = ratio > goal if wanted == "> 1x" else ratio >= goal
            checks.append((ok, f"{ratio:.2f}x {peer_name}, target {wanted}"))
    peak = row.get("peak_memory_bytes")
    p = row["params"]
    scores = p["B"] * p["L"] * p["S"] * roofline.F32
    if peak is None:
        checks.append((None, "peak memory not measured"))
    else:
        unfused = by_name.get(ATTENTION_UNFUSED, {}).get("peak_memory_bytes")
        versus = f", unfused {unfused / 2**20:.0f} MiB" if unfused is not None else ""
        checks.append((peak < scores, f"peak {peak / 2**20:.0f} MiB{versus}, target < one score matrix "
                                      f"({scores / 2**20:.0f} MiB: O(L) memory)"))
    return checks


def _at_least(value: float, goal: float, what: str) -> tuple[bool, str]:
    return value >= goal, f"{value:.0%} {what}, target >= {goal:.0%}"


def _ratio_check(row: dict, goal: float) -> tuple[bool | None, str]:
    """Is the row ``goal`` times as fast as its torch peer (strictly faster when goal is 1)?"""
    if row["vs_torch"] is None:
        return None, f"vs torch: {row['vs_torch_peer'] or 'not measured'}"
    faster = row["vs_torch"]
    wanted = f">= {goal:g}x" if goal != 1.0 else "> 1x"
    ok = faster >= goal if goal != 1.0 else faster > 1.0
    return ok, f"{faster:.2f}x {row['vs_torch_peer']}, target {wanted}"


# ---- the sweep --------------------------------------------------------------------------------

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
    elif kernel == "softmax_cross_entropy":
        for n, c in sweep["softmax_cross_entropy"]:
            yield lambda n=n, c=c: cross_entropy_case(bd, n, c)
    elif kernel == "linear_relu_forward":
        for shape in sweep["linear_relu"]:
            yield lambda shape=shape: linear_relu_forward_case(bd, *shape)
    elif kernel == "linear_relu_backward":
        for shape in sweep["linear_relu"]:
            yield lambda shape=shape: linear_relu_backward_case(bd, *shape)
    elif kernel == "layer_norm":
        for shape in sweep["layer_norm"]:
            yield lambda shape=shape: layer_norm_case(bd, *shape)
    elif kernel == "attention":
        for shape in sweep["attention"]:
            yield lambda shape=shape: attention_case(bd, *shape)
    elif kernel == "gelu":
        for shape in sweep["gelu"]:
            yield lambda shape=shape: gelu_case(bd, *shape)


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
            case_rows = _run_case(build, kernel, bd, ceilings, progress)
            add_ratios(case_rows, kernel, bd.torch_reason)
            add_targets(case_rows, kernel, bd.kind, mode)
            for row in case_rows:
                progress.row_done(row)
            rows.extend(case_rows)
            bd.release()
    return rows


def _run_case(build, kernel, bd, ceilings, progress) -> list[dict]:
    try:
        case = build()
    except Exception as e:  # noqa: BLE001 - input construction failed (e.g. out of memory): one error row
        progress.note(f"{kernel}: case setup failed: {type(e).__name__}: {_first_line(e)}")
        return [{"kernel": kernel, "case": "setup", "impl": "-", "role": "impl", "status":
                 f"error: {type(e).__name__}: {_first_line(e)}", "target": ""}]
    rows = []
    # Candidates are timed in groups side by side: all of them together on the CPU, one at a
    # time on the GPU (see BenchDevice.rounds); a group is dropped before the next is built.
    size = len(case.candidates) if bd.rounds > 1 else 1
    for start in range(0, len(case.candidates), size):
        checked = []
        for candidate in case.candidates[start:start + size]:
            progress.working(f"{case.kernel} {case.label} {candidate.name}")
            row, prepared = check_candidate(case, candidate, bd)
            rows.append(row)
            if prepared is not None:
                checked.append((row, prepared))
        progress.working(f"{case.kernel} {case.label}: timing {len(checked)} candidates")
        time_candidates(case, checked, bd, ceilings)
        del checked
        bd.synchronize()
    if "gemm_work" in case.extra:
        for row in rows:
            row["gemm_flops_same_shape"] = case.extra["gemm_work"].flops
    return rows

"""Bench cases of attention: attention_forward then attention_backward, timed together."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice, Unavailable
from bench.kernels.common import (
    Candidate, Case, Prepared, dtype_label, impl_function, impls_for, numpy_reference, rounded_to, torch_in_dtype,
    torch_required,
)

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

"""Bench cases of gelu: gelu_forward then gelu_backward, timed together."""

from __future__ import annotations

import numpy as np

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice
from bench.kernels.common import (
    SAMPLE_ROWS, Candidate, Case, Prepared, dtype_label, impl_function, impls_for, numpy_reference, rounded_to,
    sample_indices, torch_in_dtype, torch_required,
)

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

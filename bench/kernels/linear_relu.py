"""Bench cases of linear_relu_forward and linear_relu_backward (and the plain GEMM peer)."""

from __future__ import annotations

import math

import numpy as np

from bench import roofline
from bench.device import BenchDevice
from engine import dtypes
from bench.kernels.common import (
    SAMPLE_ROWS, Candidate, Case, Prepared, impl_function, impls_for, numpy_reference, sample_indices,
    torch_required,
)


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

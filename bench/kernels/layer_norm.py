"""Bench cases of layer_norm: layer_norm_forward then layer_norm_backward, timed together."""

from __future__ import annotations

import numpy as np

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice
from bench.kernels.common import (
    SAMPLE_ROWS, Candidate, Case, Prepared, dtype_label, impl_function, impls_for, numpy_reference, rounded_to,
    sample_indices, torch_in_dtype, torch_required,
)

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

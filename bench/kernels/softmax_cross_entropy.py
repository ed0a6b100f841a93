"""Bench cases of softmax_cross_entropy (the fused loss and its gradient)."""

from __future__ import annotations

from bench import roofline
from bench.device import BenchDevice
from bench.kernels.common import (
    SAMPLE_ROWS, Candidate, Case, Prepared, impl_function, impls_for, numpy_reference, sample_indices,
    torch_required,
)


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

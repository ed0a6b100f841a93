"""Bench cases of the optimizer-step kernels (adam_step, sgd_step, adagrad_step, rmsprop_step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench import roofline
from bench.device import BenchDevice, Unavailable
from bench.kernels.common import (
    SAMPLE_ELEMENTS, Candidate, Case, Prepared, engine_optim, impl_function, impls_for, numpy_reference,
    sample_indices, torch_required,
)


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

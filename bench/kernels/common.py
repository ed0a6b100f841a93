"""What every kernel family's bench shares: the case, its candidates, sampling and checking."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice, Unavailable
from bench.timing import Clock


# The impls the design defines, by the device whose arrays they take.
IMPL_DEVICE = {"numpy": "cpu", "numba_cpu": "cpu", "cupy": "cuda", "numba_cuda": "cuda"}

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
                raise Unavailable(f"takes no {bd.dtype.name} inputs yet: {first_line(e)}") from None
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


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""

"""Helpers shared by the kernel tests (tests/kernels and tests/cudasim): device moves and inputs."""

import ml_dtypes
import numpy as np
import pytest

GPU_IMPLS = ("cupy", "numba_cuda")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# Unit roundoff of each 16-bit dtype: one rounding to nearest moves a value by at most u |value|.
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11}
LOW_DTYPES = [pytest.param(BF16, id="bfloat16"), pytest.param(F16, id="float16")]


def low_precision_impls():
    """(impl, dtype) params for every impl and 16-bit dtype it takes; GPU impls carry the gpu mark.
    numba has no bfloat16: numba_cuda takes float16 only (the registry sends bfloat16 to cupy)."""
    return [pytest.param(impl, dtype, id=f"{impl}-{dtype.name}", marks=pytest.mark.gpu if impl in GPU_IMPLS else ())
            for impl in ("numpy", "numba_cpu", "cupy", "numba_cuda")
            for dtype in (BF16, F16) if not (impl == "numba_cuda" and dtype == BF16)]


def to_device(a, impl):
    """``a`` as the array kind ``impl`` takes (cupy for the GPU impls); None stays None."""
    if impl in GPU_IMPLS and a is not None:
        import cupy

        return cupy.asarray(a)
    return a


def to_host(a):
    """A numpy array (cupy arrays are copied back; anything else is returned as it is)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.asnumpy(a)
    return a


def make_cross_entropy_case(n, c, dtype, kind="hard", seed=0, scale=3.0, weighted=False, index_dtype=np.int64):
    """(logits (N, C), targets, weight or None): logits with spread rows and per-row offsets; hard
    targets as class indices of ``index_dtype``, soft ones as normalized probabilities."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * scale + rng.uniform(-2, 2, (n, 1))).astype(dtype)
    if kind == "soft":
        q = rng.uniform(0.05, 1.0, (n, c))
        targets = (q / q.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        targets = rng.integers(0, c, n).astype(index_dtype)
    weight = rng.uniform(0.5, 2.0, c).astype(dtype) if weighted else None
    return z, targets, weight

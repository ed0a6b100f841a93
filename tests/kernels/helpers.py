"""Helpers shared by the kernel tests (tests/kernels and tests/cudasim): device moves and inputs."""

import numpy as np

GPU_IMPLS = ("cupy", "numba_cuda")


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

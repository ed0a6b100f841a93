"""On a GPU: the cupy build flushes float32 subnormals to zero (cupy compiles with -ftz=true), the
numba_cuda build and numpy do not (docs/kernels.md, "Subnormals").

float32 subnormals are the magnitudes below 2**-126 (about 1.18e-38).
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels.cuda import module

SUBNORMALS = np.array([1e-40, -2e-40, 3e-39], np.float32)
TINY = np.finfo(np.float32).tiny  # the smallest normal float32

pytestmark = pytest.mark.gpu


def test_inputs_are_subnormal():
    assert np.all(SUBNORMALS != 0) and np.all(np.abs(SUBNORMALS) < TINY)


def test_a_kernel_built_like_ours_flushes_a_subnormal_times_one():
    """The bare mechanism: x * 1 of a subnormal x is 0 in a module built with our options by cupy."""
    import cupy

    code = ('extern "C" __global__ void times(const float* x, float* y, float one, int n) {\n'
            '    int i = blockIdx.x * blockDim.x + threadIdx.x;\n'
            '    if (i < n) y[i] = x[i] * one;\n'
            '}\n')
    kernel = cupy.RawModule(code=code, options=module.build_options()).get_function("times")
    x = cupy.asarray(np.concatenate([SUBNORMALS, [1.5]]).astype(np.float32))
    y = cupy.empty_like(x)
    kernel((1,), (32,), (x, y, np.float32(1.0), np.int32(x.size)))
    assert cupy.asnumpy(y).tolist() == [0.0, 0.0, 0.0, 1.5]


def _adam_first_step(impl):
    """exp_avg after one Adam step from zero state: (1 - beta1) * grad, subnormal for these grads."""
    grad = np.concatenate([SUBNORMALS, [1.0]]).astype(np.float32)
    arrays = [np.ones(4, np.float32), grad, np.zeros(4, np.float32), np.zeros(4, np.float32)]
    if impl != "numpy":
        import cupy

        arrays = [cupy.asarray(a) for a in arrays]
    kernels.adam_step(*arrays, lr=1e-3, step=1, impl=impl)
    exp_avg = arrays[2]
    return exp_avg if impl == "numpy" else exp_avg.get()


def test_cupy_adam_flushes_subnormal_moments_numpy_and_numba_cuda_keep_them():
    reference = _adam_first_step("numpy")
    assert np.all(reference[:3] != 0) and np.all(np.abs(reference[:3]) < TINY), reference  # subnormal moments

    flushed = _adam_first_step("cupy")
    assert flushed[:3].tolist() == [0.0, 0.0, 0.0], f"cupy kept subnormals: {flushed}"
    np.testing.assert_allclose(flushed[3], reference[3], rtol=1e-6)  # normal values are unchanged

    kept = _adam_first_step("numba_cuda")  # numba.cuda flushes only under fastmath
    np.testing.assert_allclose(kept, reference, rtol=1e-6, atol=0)

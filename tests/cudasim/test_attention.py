"""numba_cuda attention under the Numba CUDA simulator, against the numpy impl.

Small sizes (the simulator runs one Python thread per CUDA thread) with 8 threads per block, so
rows, keys and tiles that are not multiples of 8 make the shared-memory tiles run partly empty.
"""

import numpy as np
import pytest

from engine import kernels
from tests.kernels.test_attention import (NONFINITE_CASES, assert_close_to_numpy, assert_nonfinite_like_reference,
                                          make_case, make_mask, torch_like_reference)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full"])
@pytest.mark.parametrize("shape", [(2, 9, 13, 5, 3), (1, 1, 3, 1, 1), (1, 12, 5, 33, 7)])
def test_matches_numpy(causal, mask_kind, shape):
    b, l, s, e, ev = shape
    q, k, v = make_case(*shape, seed=sum(shape))
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    assert_close_to_numpy("numba_cuda", q, k, v, mask, scale=e ** -0.5, causal=causal)


def test_fully_masked_rows():
    q, k, v = make_case(2, 5, 6, 4, 3, seed=4)
    mask = make_mask("full", 2, 5, 6)
    mask[0, 1] = -np.inf
    mask[1] = -np.inf
    out, lse, (dq, dk, dv) = assert_close_to_numpy("numba_cuda", q, k, v, mask)
    assert not out[0, 1].any() and not out[1].any() and np.isneginf(lse[1]).all()
    assert not dq[1].any() and not dk[1].any() and not dv[1].any()


def test_head_dim_over_128_is_refused():
    q, k, v = make_case(1, 2, 2, 129, 3)
    with pytest.raises(kernels.KernelError, match="limit of 128"):
        kernels.attention_forward(q, k, v, impl="numba_cuda")


@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_nan_and_inf_propagate_as_in_torch(name):
    assert_nonfinite_like_reference("numba_cuda", name, torch_like_reference)


def test_zero_head_dims():
    from tests.kernels.test_attention import test_zero_head_dims as check

    check("numba_cuda")

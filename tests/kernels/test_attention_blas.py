"""The numba_cpu attention impl's BLAS-tile path (kernels/cpu/attention.py ``_forward_blas`` /
``_backward_blas``) against the float64 definition, the numpy impl and torch's SDPA on the CPU.

The numba_cpu impl takes this path from BLAS_MIN_PAIRS query-key pairs per batch row on; here the
threshold is forced to 0 (and the tile shrunk to 16) so that small shapes cover many tiles, partial
tiles, causal tile skipping and every mask kind, with the tolerances of tests/kernels/test_attention.py.
"""

import numpy as np
import pytest

import engine.kernels.cpu.attention as cpu
from engine import kernels
from tests.kernels.test_attention import (NONFINITE_CASES, assert_close_to_numpy, assert_nonfinite_like_reference,
                                          make_case, make_mask, reference, tol, torch_attention,
                                          torch_like_reference)


@pytest.fixture
def blas_tiles(monkeypatch):
    """numba_cpu on BLAS tiles of 16 for every size."""
    monkeypatch.setattr(cpu, "BLAS_MIN_PAIRS", 0)
    monkeypatch.setattr(cpu, "BLAS_TILE", 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full", "keys"])
@pytest.mark.parametrize("shape", [(2, 37, 70, 7, 5), (3, 70, 37, 33, 64), (1, 1, 9, 1, 1), (2, 9, 1, 64, 128),
                                   (2, 48, 48, 8, 8)])
def test_blas_tiles_match_the_definition_and_numpy(blas_tiles, dtype, causal, mask_kind, shape):
    b, l, s, e, ev = shape
    q, k, v = make_case(*shape, dtype=dtype, seed=sum(shape))
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s, dtype)
    out, lse, _ = assert_close_to_numpy("numba_cpu", q, k, v, mask, scale=e ** -0.5, causal=causal)
    want_out, want_lse = reference(q, k, v, mask, scale=e ** -0.5, causal=causal)
    np.testing.assert_allclose(out, want_out, **tol(dtype))
    np.testing.assert_allclose(lse, want_lse, **tol(dtype))


def test_blas_tiles_in_16_bit_round_once(blas_tiles):
    import ml_dtypes

    q, k, v = make_case(2, 40, 33, 8, 8)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        low = [a.astype(dtype) for a in (q, k, v)]
        out, lse = kernels.attention_forward(*low, causal=True, impl="numba_cpu")
        want, want_lse = kernels.attention_forward(*low, causal=True, impl="numpy")
        assert out.dtype == dtype and lse.dtype == np.float32
        np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_blas_tiles_propagate_nan_and_inf_as_torch(blas_tiles, name):
    assert_nonfinite_like_reference("numba_cpu", name, torch_like_reference)


def test_fully_masked_rows_on_blas_tiles(blas_tiles):
    b, l, s = 3, 20, 40
    q, k, v = make_case(b, l, s, 8, 4, seed=11)
    mask = make_mask("full", b, l, s)
    mask[0, 2, :] = -np.inf
    mask[2] = -np.inf
    out, lse, (dq, dk, dv) = assert_close_to_numpy("numba_cpu", q, k, v, mask)
    assert not out[0, 2].any() and not out[2].any() and np.isneginf(lse[2]).all()
    assert not dq[2].any() and not dk[2].any() and not dv[2].any() and np.isfinite(dq).all()


@pytest.mark.parametrize("causal", [False, True])
def test_blas_tiles_match_torch_sdpa(causal):
    """At a size the numba_cpu impl runs on BLAS tiles by itself (its default threshold and tile)."""
    b, l, e = 2, 520, 32  # over 512 x 512 pairs; 520 = 2 BLAS tiles and a partial one
    q, k, v = make_case(b, l, l, e, e, seed=7)
    assert cpu.use_blas_tiles(cpu.validate_forward(q, k, v, scale=None, causal=causal))
    grad_out = np.random.default_rng(8).standard_normal((b, l, e)).astype(np.float32)
    out, lse = kernels.attention_forward(q, k, v, causal=causal, impl="numba_cpu")
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, causal=causal, impl="numba_cpu")
    want = torch_attention(q, k, v, None, causal, grad_out)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * max(1.0, float(np.abs(expected).max())),
                                   err_msg=name)


def test_the_impl_chooses_by_size(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_forward_blas", lambda *a: calls.append("blas") or (None, None))
    monkeypatch.setattr(cpu, "_forward_numba", lambda *a: calls.append("numba") or (None, None))
    monkeypatch.setattr(cpu, "round_results", lambda spec, *r: r)
    for causal, pairs in ((False, cpu.BLAS_MIN_PAIRS), (True, cpu.BLAS_MIN_PAIRS * cpu.CAUSAL_PAIRS_FACTOR)):
        side = int(np.sqrt(pairs))
        for l in (side - 1, side):
            q, k, v = make_case(1, l, l, 4, 4)
            cpu.attention_forward_numba(q, k, v, causal=causal)
    assert calls == ["numba", "blas"] * 2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full", "keys"])
@pytest.mark.parametrize("shape", [(1, 130, 130, 128, 17), (3, 70, 37, 33, 64)])
def test_numba_tiles_past_the_threshold_still_match(monkeypatch, causal, mask_kind, shape):
    """The numba tile kernel keeps its coverage at the sizes the impl now sends to BLAS tiles."""
    monkeypatch.setattr(cpu, "BLAS_MIN_PAIRS", 1 << 62)
    b, l, s, e, ev = shape
    q, k, v = make_case(*shape, seed=sum(shape))
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    assert_close_to_numpy("numba_cpu", q, k, v, mask, scale=e ** -0.5, causal=causal)

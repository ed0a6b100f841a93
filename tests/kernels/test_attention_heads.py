"""kernels.attention_heads_forward / _backward (kernels/cpu/attention_heads.py): strided heads, weights kept.

Held to the numpy impl of attention_forward / attention_backward (itself checked against the
definition and finite differences in tests/kernels/test_attention.py) on every head layout the
kernel reads in place, every mask form, causal or not, and to PyTorch on non-finite inputs.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels.cpu import attention_heads
from engine.kernels.registry import KernelError
from tests.kernels.test_attention import (NONFINITE_CASES, _poison, assert_same_nonfinite, make_mask,
                                          torch_like_reference)


def heads(rng, n, h, rows, e, dtype, layout):
    """(N, H, rows, e) random heads: ``"bhtd"`` C-contiguous, ``"bthd"`` the transposed view of an
    (N, rows, H, e) array (a Transformer's head split), ``"broadcast"`` one head repeated by zero
    strides, ``"reversed"`` a view with a negative stride (copied by the kernel)."""
    if layout == "bthd":
        return rng.standard_normal((n, rows, h, e)).astype(dtype).transpose(0, 2, 1, 3)
    if layout == "broadcast":
        return np.broadcast_to(rng.standard_normal((n, 1, rows, e)).astype(dtype), (n, h, rows, e))
    if layout == "reversed":
        return rng.standard_normal((n, h, rows, e)).astype(dtype)[:, :, ::-1]
    return rng.standard_normal((n, h, rows, e)).astype(dtype)


def flat3(a):
    return np.ascontiguousarray(a).reshape((-1,) + a.shape[2:])


def check_against_numpy(n, h, l, s, e, ev, dtype=np.float32, causal=False, mask_kind=None,  # noqa: E741
                        layouts=("bthd",) * 4, scale=None, seed=0):
    """Forward and backward of the heads kernel against the numpy impl; returns its results."""
    rng = np.random.default_rng(seed)
    q, k, v = (heads(rng, n, h, rows, d, dtype, lay) for rows, d, lay in ((l, e, layouts[0]), (s, e, layouts[1]),
                                                                          (s, ev, layouts[2])))
    g = heads(rng, n, h, l, ev, dtype, layouts[3])
    mask = None if mask_kind is None else make_mask(mask_kind, n * h, l, s, dtype)
    out, p = kernels.attention_heads_forward(q, k, v, mask, scale=scale, causal=causal)
    dq, dk, dv = kernels.attention_heads_backward(g, q, k, v, out, p, scale=scale, causal=causal)
    kw = dict(scale=scale, causal=causal, impl="numpy")
    ref_out, ref_lse = kernels.attention_forward(flat3(q), flat3(k), flat3(v), mask, **kw)
    ref_grads = kernels.attention_backward(flat3(g), flat3(q), flat3(k), flat3(v), ref_out, ref_lse, mask, **kw)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out,) + tuple(ref_grads)):
        assert got.dtype == dtype and got.shape[:2] == (n, h), name
        size = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
        np.testing.assert_allclose(flat3(got), want, rtol=tol, atol=tol * size, err_msg=name)
    return (q, k, v, g), out, p, (dq, dk, dv)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full", "keys"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 29, 12, 7), (1, 2, 5, 70, 3, 5), (2, 4, 64, 64, 32, 32),
                                   (1, 1, 1, 1, 1, 1), (1, 3, 9, 6, 64, 64)])
def test_matches_numpy(dtype, causal, mask_kind, shape):
    check_against_numpy(*shape, dtype=dtype, causal=causal, mask_kind=mask_kind)


@pytest.mark.parametrize("layouts", [("bhtd",) * 4, ("bthd", "bhtd", "bthd", "bhtd"),
                                     ("bthd", "broadcast", "broadcast", "bthd"), ("reversed", "bthd", "reversed", "reversed")])
def test_head_layouts_read_in_place_and_outputs_follow_them(layouts):
    (q, k, v, g), out, p, grads = check_against_numpy(2, 3, 11, 13, 8, 8, causal=True, layouts=layouts, scale=0.3)
    assert out.shape == (2, 3, 11, 8) and p.shape == (6, 12, 16)
    if layouts[0] == "bthd":  # the head merge out.transpose(1, 2).reshape(N, L, H * Ev) is a view
        merged = out.transpose(0, 2, 1, 3).reshape(2, 11, 24)
        assert np.shares_memory(merged, out)
    for a, grad in zip((q, k, v), grads):
        if a.strides[1] and a.strides[2] > 0:  # not broadcast or reversed: the gradient keeps the input's layout
            assert np.argsort(grad.strides).tolist() == np.argsort(a.strides).tolist()


def test_specialised_and_run_time_head_dims_agree(monkeypatch):
    """E = Ev = 32 runs a build with the head dims compiled in; the build that reads them at run
    time gives the same results to float32 rounding."""
    fast = check_against_numpy(2, 4, 19, 23, 32, 32, causal=True, seed=3)
    monkeypatch.setattr(attention_heads, "COMPILED_HEAD_DIMS", ())
    slow = check_against_numpy(2, 4, 19, 23, 32, 32, causal=True, seed=3)
    for a, b in zip((fast[1],) + fast[3], (slow[1],) + slow[3]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_serial_and_parallel_builds_agree_bitwise(monkeypatch):
    runs = []
    for chunks in (1, 2, 5):  # the serial build; the parallel one, 5 chunks of uneven size of the 12 heads
        monkeypatch.setattr(attention_heads, "_chunks", lambda *a, chunks=chunks: chunks)
        runs.append(check_against_numpy(3, 4, 16, 16, 16, 16, causal=True, mask_kind="padding", seed=4))
    for run in runs[1:]:
        for a, b in zip((runs[0][1],) + runs[0][3], (run[1],) + run[3]):
            np.testing.assert_array_equal(a, b)


def test_empty_edges():
    rng = np.random.default_rng(0)
    for n, h, l, s, e, ev in [(0, 2, 3, 4, 5, 5), (2, 0, 3, 4, 5, 5), (1, 2, 0, 4, 5, 5), (1, 2, 3, 0, 5, 5),
                              (1, 2, 3, 4, 0, 5), (1, 2, 3, 4, 5, 0)]:
        q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((n, h, l, e), (n, h, s, e), (n, h, s, ev)))
        out, p = kernels.attention_heads_forward(q, k, v, causal=True)
        assert out.shape == (n, h, l, ev)
        if s == 0:  # no key: every row fully masked, out 0
            assert not out.any()
        grads = kernels.attention_heads_backward(np.ones_like(out), q, k, v, out, p, causal=True)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        if s == 0 or l == 0:
            assert not any(g.any() for g in grads)
        if e == 0 and s and l and n and h:  # every score 0: out is the running mean of v
            want = np.cumsum(v, axis=2)[:, :, :l] / np.arange(1, l + 1)[:, None]
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_nan_and_inf_propagate_as_in_torch(name):
    """As kernels/cpu/attention.py's impls (tests/kernels/test_attention.py): out with NaN and inf
    where PyTorch has them, dq too, and dk / dv where the causal mask hides no pair."""
    q, k, v, mask, causal = _poison(name)
    as4 = (lambda a: a[None])
    out, p = kernels.attention_heads_forward(as4(q), as4(k), as4(v), mask, scale=0.5, causal=causal)
    grad_out = np.random.default_rng(5).standard_normal(out.shape[1:]).astype(np.float32)
    grads = kernels.attention_heads_backward(as4(grad_out), as4(q), as4(k), as4(v), out, p, scale=0.5, causal=causal)
    want = torch_like_reference(q, k, v, mask, causal, grad_out)
    assert_same_nonfinite(out[0], want[0], f"{name} out")
    for what, got, expected in list(zip(("dq", "dk", "dv"), grads, want[1:]))[:1 if causal else 3]:
        if causal:
            assert np.isnan(got[0])[np.isnan(expected)].all(), f"{name} {what}: NaN turned into numbers"
        else:
            assert_same_nonfinite(got[0], expected, f"{name} {what}")


def test_takes_short_float_sequences_only():
    limit = attention_heads.HEADS_MAX_PAIRS
    assert attention_heads.takes(64, 64, np.float32) and attention_heads.takes(1, limit, np.float64)
    assert not attention_heads.takes(1, limit + 1, np.float32)
    assert not attention_heads.takes(4, 4, np.float16)  # 16-bit inputs are widened by the caller first


@pytest.mark.parametrize("over,message", [
    (dict(q=np.zeros((2, 3, 4), np.float32)), "q must be 4-D"),
    (dict(k=np.zeros((1, 2, 5, 4), np.float64)), "share one dtype"),
    (dict(v=np.zeros((1, 2, 6, 3), np.float32)), "shapes do not agree"),
    (dict(mask=np.zeros((3, 1, 5), np.float32)), r"mask must be .*\(1 or 2, 1 or 3, 5\)"),
    (dict(causal=1), "causal must be True or False"),
    (dict(scale=float("nan")), "scale"),
])
def test_bad_inputs_are_named(over, message):
    args = dict(q=np.zeros((1, 2, 3, 4), np.float32), k=np.zeros((1, 2, 5, 4), np.float32),
                v=np.zeros((1, 2, 5, 3), np.float32), mask=None, scale=None, causal=False)
    args.update(over)
    with pytest.raises(KernelError, match=message):
        kernels.attention_heads_forward(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"), **args)


def test_backward_checks_the_saved_weights():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)).astype(np.float32) for _ in range(3))
    out, p = kernels.attention_heads_forward(q, k, v)
    with pytest.raises(KernelError, match="forward's weights"):
        kernels.attention_heads_backward(out, q, k, v, out, p[:, :4])
    with pytest.raises(KernelError, match="forward output's shape"):
        kernels.attention_heads_backward(out[..., :2], q, k, v, out, p)


@pytest.mark.parametrize("free,want", [(1, 1), (2, 2)])
def test_the_heads_region_runs_in_parallel_only_when_region_threads_allows(monkeypatch, free, want):
    """The heads kernel asks kernels.threads.region_threads (the load rule of the mid-size numba
    regions, tested in tests/kernels/test_threads.py) and splits the heads into one chunk per thread
    it leaves (more than one: the parallel build), never below PARALLEL_MIN."""
    monkeypatch.setattr(attention_heads, "region_threads", lambda: free)
    assert attention_heads._chunks(64, 64, 64, 32) == want
    assert attention_heads._chunks(2, 4, 4, 4) == 1  # below PARALLEL_MIN: one thread whatever the load
    assert attention_heads._chunks(1, 64, 64, 32) == 1  # one head: nothing to split
    monkeypatch.setattr(attention_heads, "region_threads", lambda: 8)
    assert attention_heads._chunks(3, 256, 256, 32) == 3  # never more chunks than heads

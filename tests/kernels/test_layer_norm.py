"""layer_norm_forward / layer_norm_backward: every impl against an independent float64 formula.

The float64 reference below is written from PyTorch's definition (biased variance, eps inside the
square root) and its backward is checked against central differences of its forward, so the impls
are held to the definition and not only to each other. GPU impls (cupy, numba_cuda) run in the
cases marked ``gpu``, where a device answers; sizes cover every kernel the cupy planner picks.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels.registry import KernelError
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.helpers import BF16, F16, UNIT_ROUNDOFF, to_device, to_host

CPU_IMPLS = ["numpy", "numba_cpu"]
GPU_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cupy", "numba_cuda")]
IMPLS = CPU_IMPLS + GPU_IMPLS
CUDA_DIR = Path(__file__).resolve().parents[2] / "kernels" / "cuda"
LOW = [F16, BF16]
LOW_EPS = UNIT_ROUNDOFF  # one rounding to a 16-bit dtype is within this relative error


def make_case(n, d, dtype, seed=0, affine=(True, True), weight_dtype=None):
    """x with per-row offsets and spreads (never zeros), dy, and weight / bias (or None) of
    ``weight_dtype`` (default x's)."""
    rng = np.random.default_rng(seed)
    wdt = dtype if weight_dtype is None else weight_dtype
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3, (n, 1)) + rng.uniform(-2, 2, (n, 1))).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    weight = rng.uniform(0.5, 2.0, d).astype(wdt) if affine[0] else None
    bias = rng.standard_normal(d).astype(wdt) if affine[1] else None
    return x, dy, weight, bias


def stats_dtype(dtype):
    """mean and rstd come in float32 for a 16-bit x, in x's dtype otherwise."""
    return np.dtype(np.float32) if np.dtype(dtype) in LOW else np.dtype(dtype)


def reference(x, weight=None, bias=None, eps=1e-5, dy=None):
    """float64 (y, mean, rstd) and, given dy, (dx, dweight, dbias), straight from the definition
    (16-bit inputs are upcast exactly)."""
    x = x.astype(np.float64)
    d = x.shape[1]
    mean = x.sum(axis=1) / d
    var = ((x - mean[:, None]) ** 2).sum(axis=1) / d
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[:, None]) * rstd[:, None]
    w = np.ones(d) if weight is None else weight.astype(np.float64)
    b = np.zeros(d) if bias is None else bias.astype(np.float64)
    y = xhat * w + b
    if dy is None:
        return y, mean, rstd
    dy = dy.astype(np.float64)
    g = dy * w
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return (y, mean, rstd), (dx, (dy * xhat).sum(axis=0), dy.sum(axis=0))


def run_forward(impl, x, weight=None, bias=None, **kw):
    out = kernels.layer_norm_forward(*(to_device(a, impl) for a in (x, weight, bias)), impl=impl, **kw)
    return tuple(to_host(a) for a in out)


def run_backward(impl, dy, x, weight, mean, rstd, **kw):
    args = (to_device(a, impl) for a in (dy, x, weight, mean, rstd))
    out = kernels.layer_norm_backward(*args, impl=impl, **kw)
    return tuple(None if a is None else to_host(a) for a in out)


def tolerance(dtype, d=1):
    if np.dtype(dtype) == np.float32:
        return dict(rtol=2e-5, atol=2e-5 * max(1.0, np.sqrt(d) / 8))
    return dict(rtol=1e-10, atol=1e-11)


def assert_within_rounding(got, want, eps, name):
    """``got`` within one rounding of the float64 ``want`` (eps relative), plus a float32
    computation's error near zero (where y, dx or a column sum come from a cancellation), scaled by
    the largest value."""
    got, want = got.astype(np.float64), np.asarray(want, np.float64)
    bound = eps * np.abs(want) + (1e-3 * eps + 2e-6) * np.abs(want).max(initial=0) + 1e-30
    err = np.abs(got - want)
    assert np.all(err <= bound), f"{name}: worst {np.max(err / bound):.2f} x the bound at {np.argmax(err / bound)}"


def check(impl, x, dy, weight, bias, eps=1e-5):
    """Forward and backward of ``impl`` against the float64 reference."""
    if x.dtype in LOW:
        return check_low_precision(impl, x, dy, weight, bias, eps)
    n, d = x.shape
    (ry, rmean, rrstd), (rdx, rdw, rdb) = reference(x, weight, bias, eps, dy)
    y, mean, rstd = run_forward(impl, x, weight, bias, eps=eps)
    for got, want in ((y, ry), (mean, rmean), (rstd, rrstd)):
        assert got.dtype == x.dtype and got.shape == want.shape
    tol = tolerance(x.dtype, d)
    np.testing.assert_allclose(y, ry, **tol)
    np.testing.assert_allclose(mean, rmean, **tol)
    np.testing.assert_allclose(rstd, rrstd, rtol=tol["rtol"] * 5, atol=0)
    dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, rdx, rtol=tol["rtol"] * 5, atol=tol["atol"] * 10)
    if weight is None:
        assert dw is None and db is None
        return
    assert dw.dtype == db.dtype == x.dtype and dw.shape == db.shape == (d,)
    # column sums over N rows: the float32 error grows with sqrt(N)
    sums = dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * max(1.0, np.sqrt(n)))
    np.testing.assert_allclose(dw, rdw, **sums)
    np.testing.assert_allclose(db, rdb, **sums)


def check_low_precision(impl, x, dy, weight, bias, eps=1e-5):
    """A float16 / bfloat16 x (weight and bias of x's dtype or float32): float32 statistics within
    float32 rounding of the float64 reference on the same (exactly upcast) inputs, y, dx, dw and db
    within one rounding to their dtype."""
    n, d = x.shape
    low = LOW_EPS[x.dtype]
    (ry, rmean, rrstd), (rdx, rdw, rdb) = reference(x, weight, bias, eps, dy)
    y, mean, rstd = run_forward(impl, x, weight, bias, eps=eps)
    assert y.dtype == x.dtype and mean.dtype == rstd.dtype == np.float32
    assert y.shape == x.shape and mean.shape == rstd.shape == (n,)
    tol32 = tolerance(np.float32, d)
    np.testing.assert_allclose(mean, rmean, **tol32)
    np.testing.assert_allclose(rstd, rrstd, rtol=tol32["rtol"] * 5, atol=0)
    assert_within_rounding(y, ry, low, "y")
    dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_within_rounding(dx, rdx, low, "dx")
    if weight is None:
        assert dw is None and db is None
        return
    assert dw.dtype == db.dtype == weight.dtype and dw.shape == db.shape == (d,)
    w_eps = LOW_EPS.get(weight.dtype, 0.0) + 1e-5 * max(1.0, np.sqrt(n))  # float32 sums over N rows
    assert_within_rounding(dw, rdw, w_eps, "dweight")
    assert_within_rounding(db, rdb, w_eps, "dbias")


# ---- the reference itself and the numpy impl's gradient -----------------------------------------


def test_reference_backward_matches_finite_differences():
    x, dy, weight, bias = make_case(3, 5, np.float64, seed=1)
    _, (dx, dw, db) = reference(x, weight, bias, 1e-3, dy)

    def loss(x_, w_, b_):
        return float((reference(x_, w_, b_, 1e-3)[0] * dy).sum())

    h = 1e-6
    for arr, grad, at in ((x, dx, 0), (weight, dw, 1), (bias, db, 2)):
        for idx in np.ndindex(*arr.shape):
            args = [x.copy(), weight.copy(), bias.copy()]
            args[at][idx] += h
            plus = loss(*args)
            args[at][idx] -= 2 * h
            minus = loss(*args)
            assert grad[idx] == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=["affine", "plain"])
@pytest.mark.slow
def test_impl_backward_matches_finite_differences_of_its_forward(impl, affine):
    """float64: the impl's own backward against central differences of its own forward."""
    x, dy, weight, bias = make_case(2, 6, np.float64, seed=2, affine=affine)
    y, mean, rstd = run_forward(impl, x, weight, bias, eps=1e-3)
    dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd)

    def loss(x_, w_, b_):
        return float((run_forward(impl, x_, w_, b_, eps=1e-3)[0] * dy).sum())

    h = 1e-6
    leaves = [x, weight, bias]
    grads = [dx, dw, db]
    for at, (arr, grad) in enumerate(zip(leaves, grads)):
        if arr is None:
            continue
        for idx in np.ndindex(*arr.shape):
            args = [None if a is None else a.copy() for a in leaves]
            args[at][idx] += h
            plus = loss(*args)
            args[at][idx] -= 2 * h
            minus = loss(*args)
            assert grad[idx] == pytest.approx((plus - minus) / (2 * h), rel=1e-6, abs=1e-8)


def test_numpy_impl_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    x, dy, weight, bias = make_case(5, 9, np.float64, seed=3)
    y, mean, rstd = run_forward("numpy", x, weight, bias, eps=1e-4)
    dx, dw, db = run_backward("numpy", dy, x, weight, mean, rstd)
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    ty = torch.nn.functional.layer_norm(leaves[0], (9,), leaves[1], leaves[2], eps=1e-4)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    for ours, leaf in zip((dx, dw, db), leaves):
        np.testing.assert_allclose(ours, leaf.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---- every impl against the reference -----------------------------------------------------------

# D: 1, odd, a non-multiple of the 16-byte pack, the forward / backward on-chip limits of the cupy
# kernels and past them (streamed forward, tiled backward).
SHAPES = [(1, 1), (7, 1), (1, 13), (5, 37), (33, 1000), (3, 4096), (4, 4099), (3, 8192), (2, 16385), (2, 65536)]


DTYPES = [np.float32, np.float64, F16, BF16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]


def checked(impl, dtype, run):
    """``run()``, or, for numba_cuda with bfloat16 (numba.cuda has no bfloat16 type), the
    KernelError that names the kernel, the impl and the dtype."""
    if impl == "numba_cuda" and np.dtype(dtype) == BF16:
        with pytest.raises(KernelError, match=r"'layer_norm_\w+': impl 'numba_cuda' does not take bfloat16"):
            run()
        return
    run()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.slow
def test_affine(impl, dtype, shape):
    checked(impl, dtype, lambda: check(impl, *make_case(*shape, dtype, seed=sum(shape))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)],
                         ids=["no-affine", "weight-only", "bias-only"])
@pytest.mark.parametrize("shape", [(1, 1), (6, 37), (9, 1024)], ids=["1x1", "6x37", "9x1024"])
def test_without_weight_or_bias(impl, dtype, affine, shape):
    checked(impl, dtype, lambda: check(impl, *make_case(*shape, dtype, seed=5, affine=affine)))


# a 16-bit x with float32 weight and bias (PyTorch's mixed-dtype rule): on chip, streamed / tiled,
# scalar and packed rows
MIXED_SHAPES = [(5, 37), (33, 1000), (3, 4096), (4, 8200), (2, 65536)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", MIXED_SHAPES, ids=[f"{n}x{d}" for n, d in MIXED_SHAPES])
def test_low_precision_x_with_float32_weight_and_bias(impl, dtype, shape):
    case = make_case(*shape, dtype, seed=sum(shape) + 1, weight_dtype=np.float32)
    checked(impl, dtype, lambda: check(impl, *case))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
def test_low_precision_is_the_float32_computation_rounded_once(impl, dtype):
    """A 16-bit x gives the float32 kernel's y and dx on the upcast x, rounded once (mean and rstd
    are those float32 statistics): 16-bit storage changes nothing but the final rounding."""
    x, dy, weight, bias = make_case(20, 300, dtype, seed=3)
    up = [a.astype(np.float32) for a in (x, dy, weight, bias)]
    y32, mean32, rstd32 = run_forward(impl, up[0], up[2], up[3])
    y, mean, rstd = run_forward(impl, x, weight, bias)
    np.testing.assert_array_equal(mean, mean32)
    np.testing.assert_array_equal(rstd, rstd32)
    np.testing.assert_array_equal(y, y32.astype(dtype))
    dx32, dw32, db32 = run_backward(impl, up[1], up[0], up[2], mean32, rstd32)
    dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd)
    np.testing.assert_array_equal(dx, dx32.astype(dtype))
    np.testing.assert_allclose(dw.astype(np.float32), dw32, rtol=LOW_EPS[dtype], atol=0)
    np.testing.assert_allclose(db.astype(np.float32), db32, rtol=LOW_EPS[dtype], atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_rows_many_partials(impl):
    """More rows than any impl has row chunks / blocks: every partial row of dw, db holds several rows."""
    check(impl, *make_case(1500, 40, np.float32, seed=7))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch(impl, dtype):
    def run():
        x, dy, weight, bias = make_case(0, 5, dtype)
        y, mean, rstd = run_forward(impl, x, weight, bias)
        assert y.shape == (0, 5) and mean.shape == rstd.shape == (0,) and y.dtype == dtype
        assert mean.dtype == rstd.dtype == stats_dtype(dtype)
        dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd)
        assert dx.shape == (0, 5) and dw.shape == db.shape == (5,) and not dw.any() and not db.any()
        assert dx.dtype == dw.dtype == db.dtype == dtype

    checked(impl, dtype, run)


@pytest.mark.parametrize("impl", IMPLS)
def test_compute_weight_grads_false_gives_the_same_dx(impl):
    x, dy, weight, bias = make_case(9, 70, np.float32, seed=11)
    _, mean, rstd = run_forward(impl, x, weight, bias)
    full = run_backward(impl, dy, x, weight, mean, rstd)
    dx, dw, db = run_backward(impl, dy, x, weight, mean, rstd, compute_weight_grads=False)
    assert dw is None and db is None
    np.testing.assert_array_equal(dx, full[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_row_of_one_value_and_constant_rows(impl):
    """A constant row: xhat = 0, so y = bias, rstd = 1 / sqrt(eps), dw = 0 and dx = rstd (g - mean(g))."""
    x = np.array([[3.0, 3.0, 3.0], [-7.5, -7.5, -7.5]], np.float32)
    weight, bias = np.array([2.0, 3.0, 4.0], np.float32), np.array([0.5, -1.0, 2.0], np.float32)
    y, mean, rstd = run_forward(impl, x, weight, bias, eps=1e-2)
    np.testing.assert_allclose(y, np.broadcast_to(bias, x.shape), atol=0)
    np.testing.assert_allclose(rstd, 10.0, rtol=1e-6)
    dx, dw, db = run_backward(impl, np.ones_like(x), x, weight, mean, rstd)
    np.testing.assert_allclose(dx, np.broadcast_to(10.0 * (weight - 3.0), x.shape), rtol=1e-6)
    assert not dw.any() and np.array_equal(db, [2.0, 2.0, 2.0])
    # D = 1: every row is constant; y = bias and dx = 0 whatever dy
    y, mean, rstd = run_forward(impl, x[:, :1].copy(), weight[:1], bias[:1])
    assert np.array_equal(y, [[0.5], [0.5]])
    dx, _, _ = run_backward(impl, np.array([[2.0], [-3.0]], np.float32), x[:, :1].copy(), weight[:1], mean, rstd)
    assert not dx.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_large_offset_does_not_cancel(impl):
    """|mean| >> std: a one-pass E[x^2] - E[x]^2 in float32 would be off by percents; two-pass is not."""
    rng = np.random.default_rng(13)
    x = (300.0 + 0.5 * rng.standard_normal((4, 3000))).astype(np.float32)
    _, mean, rstd = run_forward(impl, x)
    _, ref_mean, ref_rstd = reference(x)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=2e-4)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(40, 300), (1024, 128), (5000, 9)], ids=["few-rows", "gpt", "max-chunks"])
def test_numba_cpu_parallel_and_serial_rows_agree(monkeypatch, shape):
    """The parallel build (run while CPUs are free) and the serial one give the same bits, the column
    sums dw / db included: the row chunks, whose float64 partials they add, depend on N alone, never
    on the thread count or the machine's load."""
    from engine.kernels.cpu import layer_norm as module

    x, dy, weight, bias = make_case(*shape, np.float32, seed=17)
    results = []
    for parallel in (True, False):
        monkeypatch.setattr(module, "PARALLEL_MIN", 0)
        monkeypatch.setattr(module._threads, "parallel_region", lambda size, least, parallel=parallel: parallel)
        y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, impl="numba_cpu")
        results.append((y, mean, rstd) + kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cpu"))
    assert module._chunks(shape[0]) == min(module.MAX_CHUNKS, -(-shape[0] // module.CHUNK_ROWS))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(1024, 128), (37, 300)], ids=["gpt", "odd"])
def test_numba_cpu_backward_dx_has_the_serial_sums_bits(shape):
    """float32 dx is bit for bit what serial float64 row sums of the float32 terms give: the kernel
    sums them in SIMD lanes (kernels/cpu/layer_norm.py, ``row_sums``), which must not move dx (a
    reassociated backward once moved a 200-step GPT's loss by 1 %)."""
    x, dy, weight, bias = make_case(*shape, np.float32, seed=23)
    x *= np.geomspace(1e-2, 1e2, shape[0], dtype=np.float32)[:, None]  # rows of many magnitudes
    dy *= np.geomspace(1e-4, 1e2, shape[0], dtype=np.float32)[::-1, None]
    _, mean, rstd = kernels.layer_norm_forward(x, weight, bias, impl="numba_cpu")
    dx, _, _ = kernels.layer_norm_backward(dy, x, weight, mean, rstd, impl="numba_cpu")
    xh = (x - mean[:, None]) * rstd[:, None]  # float32, in the kernel's order of operations
    g = dy * weight
    c_g, c_gx = (np.add.accumulate(t.astype(np.float64), axis=1)[:, -1] / shape[1] for t in (g, g * xh))
    want = rstd[:, None] * (g - c_g.astype(np.float32)[:, None] - xh * c_gx.astype(np.float32)[:, None])
    assert np.array_equal(dx, want)


# ---- errors -------------------------------------------------------------------------------------


def _bad_forward_calls():
    f32, f64 = np.float32, np.float64
    x = np.ones((3, 4), f32)
    return [
        ((np.ones(4, f32),), {}, "x must be 2-D"),
        ((np.ones((3, 4), np.int64),), {}, "only float32, float64, float16 and bfloat16"),
        ((np.ones((3, 4), np.complex64),), {}, "only float32, float64, float16 and bfloat16"),
        ((np.ones((3, 4), np.float16), np.ones(4, f64)), {}, "weight must have x's dtype float16 or float32, "
                                                               "got float64"),
        ((np.ones((3, 4), BF16), None, np.ones(4, np.float16)), {}, "bias must have x's dtype bfloat16 or float32"),
        ((x, np.ones(4, np.float16)), {}, "weight must have x's dtype float32, got float16"),
        ((np.ones((3, 0), f32),), {}, "D = 0 columns"),
        ((x, np.ones(4, f64)), {}, "weight must have x's dtype float32"),
        ((x, np.ones(5, f32)), {}, r"weight must have shape \(4,\)"),
        ((x, None, np.ones((1, 4), f32)), {}, r"bias must have shape \(4,\)"),
        ((np.ones((4, 3), f32).T,), {}, "x is not C-contiguous"),
        ((x,), {"eps": "small"}, "eps must be a real number"),
        ((x,), {"eps": 10**400}, "eps must be a real number in float range"),  # float() overflowed raw
        (([[1.0]],), {}, "x must be a numpy or cupy array"),
    ]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("args,kw,message", _bad_forward_calls())
def test_bad_forward_inputs_are_named(impl, args, kw, message):
    with pytest.raises(KernelError, match=message) as info:
        kernels.get("layer_norm_forward", impl)(*args, **kw)
    assert "layer_norm_forward" in str(info.value)


def _bad_backward_calls():
    f32 = np.float32
    x, dy, w, s = np.ones((3, 4), f32), np.ones((3, 4), f32), np.ones(4, f32), np.ones(3, f32)
    return [
        ((np.ones((3, 5), f32), x, w, s, s), {}, r"grad_y must have shape \(3, 4\)"),
        ((dy.astype(np.float64), x, w, s, s), {}, "grad_y must have x's dtype float32"),
        ((dy, x, w, np.ones(4, f32), s), {}, r"mean must have shape \(3,\)"),
        ((dy, x, w, s, s.astype(np.float64)), {}, "rstd must have x's dtype"),
        ((dy, x, np.ones(3, f32), s, s), {}, r"weight must have shape \(4,\)"),
        ((dy, x, w, s, s), {"compute_weight_grads": "yes"}, "compute_weight_grads must be True or False"),
        # a 16-bit x: mean and rstd in float32 (as forward returns them), dy in x's dtype
        ((dy.astype(BF16), x.astype(BF16), w, s.astype(BF16), s), {}, "mean must be float32, got bfloat16"),
        ((dy.astype(BF16), x.astype(BF16), w, s, s.astype(np.float64)), {}, "rstd must be float32, got float64"),
        ((dy, x.astype(F16), w, s, s), {}, "grad_y must have x's dtype float16, got float32"),
    ]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("args,kw,message", _bad_backward_calls())
def test_bad_backward_inputs_are_named(impl, args, kw, message):
    with pytest.raises(KernelError, match=message) as info:
        kernels.get("layer_norm_backward", impl)(*args, **kw)
    assert "layer_norm_backward" in str(info.value)


def test_error_lists_shapes_and_dtypes():
    with pytest.raises(KernelError) as info:
        kernels.layer_norm_forward(np.ones((3, 4), np.float32), np.ones(4, np.float64), impl="numpy")
    text = str(info.value)
    assert "x=numpy.ndarray(3, 4) float32" in text and "weight=numpy.ndarray(4,) float64" in text


def test_mixing_devices_is_refused_by_name(fake_cupy):
    x = np.ones((3, 4), np.float32)
    gpu_weight = fake_cupy.on(0, np.ones(4, np.float32))
    with pytest.raises(KernelError, match="different devices"):
        kernels.get("layer_norm_forward", "numpy")(x, gpu_weight)


# ---- the CUDA C++ launch plan and host code (no GPU needed) -------------------------------------


VARIANTS = ("plain", "weight", "wgrad")


def _instantiated_kernels() -> set[tuple[str, str]]:
    """(module, extern "C" name) of every kernel the two .cu files instantiate, expanded from their
    macro lines (the macros are in layer_norm.cuh)."""
    names = set()
    for module in ("layer_norm", "layer_norm_lowp"):
        text = (CUDA_DIR / f"{module}.cu").read_text()
        found = set()
        for dt, k in re.findall(r"^LN_FWD_BLOCK\([\w ,]+, (\w+), (\d+)\)", text, re.M):
            found |= {f"ln_fwd_block_{dt}_k{k}_{p}" for p in "vs"}
        for w32, dt, k in re.findall(r"^LN_BWD_BLOCK(_W32)?\([\w ,]+, (\w+), (\d+), \d+\)", text, re.M):
            found |= {f"ln_bwd_block_{dt}_k{k}_{p}_{v}" for p in "vs" for v in VARIANTS[bool(w32):]}
        for dt in re.findall(r"^LN_FWD_STREAM\([\w ,]+, (\w+)\)", text, re.M):
            found |= {f"ln_fwd_stream_{dt}_{p}" for p in "vs"}
        for w32, dt in re.findall(r"^LN_BWD_STREAM(_W32)?\([\w ,]+, (\w+)\)", text, re.M):
            # the w32 instances (a 16-bit x with float weight) have no plain variant
            found |= {f"ln_bwd_rowsums_{dt}_{p}_{v}" for p in "vs" for v in ("plain", "weight")[bool(w32):]}
            found |= {f"ln_bwd_tile_{dt}_{p}_{v}" for p in "vs" for v in VARIANTS[bool(w32):]}
        for dw in re.findall(r"^LN_COL_REDUCE\([\w ,]+, (\w+)\)", text, re.M):
            found.add(f"ln_col_reduce_{dw}")
        names |= {(module, name) for name in found}
    return names


def test_launch_plan_uses_instantiated_kernels_and_covers_the_row():
    from engine.kernels.cuda import layer_norm as cu

    available = _instantiated_kernels()
    assert len(available) > 100
    used = set()
    weight_dtypes = {"float32": [np.float32], "float64": [np.float64], "float16": [F16, np.float32],
                     "bfloat16": [BF16, np.float32]}
    for name, cfg in cu.CONFIGS.items():
        dtype = np.dtype(name)
        module, pack = cfg["module"], cfg["pack"]
        for wdt in weight_dtypes[name]:
            used.add((module, cu.col_reduce_name(wdt)))
            for d in [1, 2, 5, 31, 32, 33, 100, 768, 1024, 1025, 2048, 4096, 4099, 8192, 8193, 16384, 16385,
                      65536, 2**20]:
                for vec in (False, True):
                    if vec and d % pack:
                        continue
                    name, threads = cu.plan_forward(dtype, d, vec, wdt)
                    assert (module, name) in available, name
                    used.add((module, name))
                    assert threads % 32 == 0 and 32 <= threads <= (1024 if "block" in name else 512)
                    if "block" in name:
                        assert threads * int(re.search(r"_k(\d+)", name).group(1)) >= d
                    for has_weight, wgrad in ((False, False), (True, False), (True, True)):
                        variant = cu.backward_variant(has_weight, wgrad)
                        plan = cu.plan_backward(dtype, d, vec, variant, wdt if has_weight else None)
                        if plan[0] == "block":
                            _, name, threads = plan
                            assert threads % 32 == 0 and threads <= 512
                            assert threads * int(re.search(r"_k(\d+)", name).group(1)) >= d
                        assert all((module, p) in available for p in plan[1:] if isinstance(p, str)), plan
                        used |= {(module, p) for p in plan[1:] if isinstance(p, str)}
    assert used == available, sorted(available - used)  # no instantiation is dead code
    # the GPU target size runs on chip in both directions, in 16-byte packs
    assert cu.plan_forward(np.float32, 4096, True) == ("ln_fwd_block_f32_k16_v", 256)
    assert cu.plan_backward(np.float32, 4096, True) == ("block", "ln_bwd_block_f32_k8_v_wgrad", 512)
    assert cu.plan_forward(BF16, 4096, True, BF16) == ("ln_fwd_block_bf16_k16_v", 256)
    assert cu.plan_backward(BF16, 4096, True, "wgrad", BF16) == ("block", "ln_bwd_block_bf16_k8_v_wgrad", 512)
    assert cu.plan_backward(BF16, 768, True, "weight", np.float32) == ("block", "ln_bwd_block_bf16w32_k8_v_weight",
                                                                      96)


@pytest.fixture
def fake_layer_norm_cupy(fake_cupy):
    """fake_cupy, with kernels/cuda/layer_norm.py's device caches emptied before and after."""
    from engine.kernels.cuda import layer_norm as cu

    def clear():
        cu._sm_count.cache_clear()
        cu._resident_blocks.cache_clear()

    clear()
    yield fake_cupy
    clear()


@pytest.mark.parametrize("d,tiled", [(4096, False), (65536, True)])
@pytest.mark.slow
def test_cupy_backward_writes_one_partial_row_per_block(fake_layer_norm_cupy, d, tiled):
    """The column sums: P partial rows (P <= N, one wave) then one small reduction; never atomics."""
    from engine.kernels.cuda import layer_norm as cu

    fake = fake_layer_norm_cupy
    n = 5000
    x, dy = (fake.on(1, np.ones((n, d), np.float32)) for _ in range(2))
    w, mean, rstd = fake.on(1, np.ones(d, np.float32)), fake.on(1, np.ones(n, np.float32)), \
        fake.on(1, np.ones(n, np.float32))
    cu.layer_norm_backward(dy, x, w, mean, rstd)
    names = [launch.name for launch in fake.launches]
    main = fake.launches[-2]
    reduce = fake.launches[-1]
    assert all(launch.device == 1 for launch in fake.launches)  # x's GPU, not the current one
    parts = int(reduce.args[4])
    assert reduce.name == "ln_col_reduce_f32" and reduce.args[0].shape == (parts, d) and 1 <= parts <= n
    if tiled:
        assert names == ["ln_bwd_rowsums_f32_v_weight", "ln_bwd_tile_f32_v_wgrad", "ln_col_reduce_f32"]
        assert main.grid == (-(-d // (256 * 4)), parts)
    else:
        assert names == ["ln_bwd_block_f32_k8_v_wgrad", "ln_col_reduce_f32"]
        # one wave: the fake's occupancy query says 4 blocks per SM
        assert main.grid == (parts,) and parts == min(n, 4 * 132)
    fake.launches.clear()
    _, dw, db = cu.layer_norm_backward(dy, x, w, mean, rstd, compute_weight_grads=False)
    assert dw is None and db is None
    assert [launch.name for launch in fake.launches] == [names[0].replace("wgrad", "weight")] if not tiled else \
        ["ln_bwd_rowsums_f32_v_weight", "ln_bwd_tile_f32_v_weight"]
    fake.launches.clear()
    cu.layer_norm_backward(dy, x, None, mean, rstd)
    assert all(launch.name.endswith("_plain") for launch in fake.launches)


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("weight_dtype", ["x", "float32"])
def test_cupy_low_precision_launches(fake_layer_norm_cupy, dtype, weight_dtype):
    """A 16-bit x: the lowp module's kernels for its types (w32 with float32 weight and bias),
    float32 statistics and partial rows, dw / db in weight's dtype, 8 values per 16-byte pack."""
    from engine.kernels.cuda import layer_norm as cu

    fake = fake_layer_norm_cupy
    wdt = dtype if weight_dtype == "x" else np.dtype(np.float32)
    types = cu.config(dtype)["suffix"] + ("" if weight_dtype == "x" else "w32")
    n, d = 300, 768
    x = fake.on(0, np.ones((n, d), dtype))
    w, b = fake.on(0, np.ones(d, wdt)), fake.on(0, np.zeros(d, wdt))
    y, mean, rstd = cu.layer_norm_forward(x, w, b, eps=1e-5)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == np.float32
    (forward,) = fake.launches
    assert forward.name == f"ln_fwd_block_{types}_k8_v" and forward.block == (96,) and forward.grid == (n,)
    assert forward.args[7].dtype == np.float32  # eps in the compute dtype
    fake.launches.clear()
    dx, dw, db = cu.layer_norm_backward(fake.on(0, np.ones((n, d), dtype)), x, w, mean, rstd)
    main, reduce = fake.launches
    assert main.name == f"ln_bwd_block_{types}_k8_v_wgrad" and main.block == (96,)
    assert main.args[6].dtype == main.args[7].dtype == np.float32  # partial rows
    assert reduce.name == cu.col_reduce_name(wdt)
    assert dx.dtype == dtype and dw.dtype == db.dtype == wdt
    lookups = {name for name, _ in fake.lookups}
    assert {forward.name, main.name, reduce.name} <= lookups
    assert all("-I" in " ".join(options) for options in fake.modules)


def test_cupy_occupancy_query_failure_is_an_error(fake_layer_norm_cupy, monkeypatch):
    """The backward's grid is one wave by design: a failed occupancy query raises (naming the
    kernel) rather than guessing a figure."""
    from engine.kernels.cuda import layer_norm as cu

    fake = fake_layer_norm_cupy

    def broken(*args):
        raise RuntimeError("cuOccupancyMaxActiveBlocksPerMultiprocessor: CUDA_ERROR_NOT_SUPPORTED")

    monkeypatch.setattr(fake.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor", broken)
    x = fake.on(0, np.ones((8, 64), np.float32))
    s = fake.on(0, np.ones(8, np.float32))
    with pytest.raises(KernelError, match=r"occupancy query for ln_bwd_block_f32_k4_v_wgrad.*CUDA_ERROR_NOT_SUPPORTED"):
        cu.layer_norm_backward(x, x, fake.on(0, np.ones(64, np.float32)), s, s)
    monkeypatch.setattr(fake.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor", lambda *a: 0)
    cu._resident_blocks.cache_clear()
    with pytest.raises(KernelError, match="0 blocks per SM"):
        cu.layer_norm_backward(x, x, fake.on(0, np.ones(64, np.float32)), s, s)


def eps_edge_cases():
    """(x, eps) where var + eps <= 0, plus a negative eps below the variance: PyTorch's results."""
    x = np.array([[2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    return [(x[:1], 0.0), (x, -1.0), (x, -1.25), (x, -2.0)]


def assert_eps_edges_like_torch(run_impl):
    """``run_impl(x, dy, weight, bias, eps) -> (y, dx, dweight, dbias)`` against torch: NaN where
    PyTorch gives NaN (eps = 0 on a constant row: 1 / sqrt(0) = inf, 0 * inf = NaN), the same
    numbers elsewhere (a negative eps is used as given, as PyTorch does)."""
    torch = pytest.importorskip("torch")
    for x, eps in eps_edge_cases():
        rng = np.random.default_rng(3)
        dy, weight, bias = (rng.standard_normal(s).astype(np.float32) for s in (x.shape, x.shape[1:], x.shape[1:]))
        leaves = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
        ty = torch.nn.functional.layer_norm(leaves[0], x.shape[1:], leaves[1], leaves[2], eps=eps)
        ty.backward(torch.tensor(dy))
        want = [ty.detach().numpy()] + [t.grad.numpy() for t in leaves]
        for name, got, expected in zip(("y", "dx", "dweight", "dbias"), run_impl(x, dy, weight, bias, eps), want):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"eps={eps} {name}: NaN")
            finite = ~np.isnan(expected)
            np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-5, err_msg=f"eps={eps} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_eps_zero_and_negative_eps_as_torch(impl):
    def run_impl(x, dy, weight, bias, eps):
        arrays = [to_device(a, impl) for a in (x, weight, bias, dy)]
        y, mean, rstd = kernels.layer_norm_forward(*arrays[:3], eps=eps, impl=impl)
        grads = kernels.layer_norm_backward(arrays[3], arrays[0], arrays[1], mean, rstd, impl=impl)
        return [to_host(a) for a in (y, *grads)]

    assert_eps_edges_like_torch(run_impl)

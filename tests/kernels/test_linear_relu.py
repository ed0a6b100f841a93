"""linear_relu_forward / linear_relu_backward: every impl against float64 formulas and the numpy impl.

CPU impls run here; the cupy and numba_cuda cases carry the gpu mark (the numba_cuda kernels
also run under the simulator in tests/cudasim/test_linear_relu.py).
"""

import re
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.helpers import BF16, F16, LOW_DTYPES, UNIT_ROUNDOFF, low_precision_impls, to_device, to_host

LOW_IMPLS = low_precision_impls()

IMPLS = ["numpy", "numba_cpu",
         pytest.param("cupy", marks=pytest.mark.gpu), pytest.param("numba_cuda", marks=pytest.mark.gpu)]

# (N, K, M): size-1 and empty edges, odd sizes, sizes that are not multiples of 16 (the numba_cuda
# tile), of 4 (the float4 path) or of 32 x 8 (the backward prologue block), several tiles.
SHAPES = [(1, 1, 1), (0, 5, 3), (3, 0, 4), (4, 6, 0), (1, 7, 5), (6, 1, 9), (8, 5, 1),
          (37, 29, 53), (17, 33, 15), (64, 48, 80), (129, 20, 36)]


def tolerance(dtype, k):
    """Relative (to the norm) error bound for a K-term dot product in ``dtype``."""
    eps = 1e-5 if dtype == np.float32 else 1e-13
    return eps * np.sqrt(max(k, 1))


def assert_close(actual, expected, dtype, k):
    actual = to_host(actual)
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert actual.flags.c_contiguous
    err = np.linalg.norm(actual.astype(np.float64) - expected)
    scale = max(np.linalg.norm(expected), 1e-30)
    assert err <= tolerance(dtype, k) * scale, f"relative error {err / scale:.3g} (K={k}, {dtype.__name__})"


def make_inputs(rng, n, k, m, dtype, bias=True):
    """Random nonzero inputs whose pre-activations are about half positive, half negative."""
    x = rng.uniform(0.5, 1.5, (n, k)) * rng.choice([-1.0, 1.0], (n, k))
    w = rng.uniform(0.5, 1.5, (m, k)) * rng.choice([-1.0, 1.0], (m, k)) / np.sqrt(max(k, 1))
    b = rng.uniform(0.1, 1.0, m) * rng.choice([-1.0, 1.0], m) if bias else None
    cast = (lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype))
    return cast(x), cast(w), cast(b)


def forward64(x, w, b):
    z = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        z = z + b.astype(np.float64)
    return np.maximum(z, 0.0)


def backward64(dy, x, w, y):
    g = dy.astype(np.float64) * (y > 0)
    return g @ w.astype(np.float64), g.T @ x.astype(np.float64), g.sum(axis=0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_float64_formula_and_numpy_impl(impl, dtype, bias, shape, rng):
    n, k, m = shape
    x, w, b = make_inputs(rng, n, k, m, dtype, bias)
    y = kernels.linear_relu_forward(to_device(x, impl), to_device(w, impl), to_device(b, impl), impl=impl)
    assert_close(y, forward64(x, w, b), dtype, k)
    assert_close(y, kernels.linear_relu_forward(x, w, b, impl="numpy").astype(np.float64), dtype, k)


def test_forward_inputs_exercise_both_sides_of_the_relu(rng):
    x, w, b = make_inputs(rng, 37, 29, 53, np.float32)
    z = forward64(x, w, None) + b
    assert 0.3 < (z > 0).mean() < 0.7


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_forward_returns_a_new_array_and_leaves_inputs_alone(impl, rng):
    x, w, b = make_inputs(rng, 9, 7, 5, np.float32)
    copies = [a.copy() for a in (x, w, b)]
    y = kernels.linear_relu_forward(x, w, b, impl=impl)
    for a in (x, w, b):
        assert not np.shares_memory(y, a)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_forward_propagates_nan_like_np_maximum(impl):
    x = np.array([[np.nan, 1.0], [1.0, 1.0]], np.float32)
    w = np.array([[1.0, 1.0], [-1.0, -1.0]], np.float32)
    y = kernels.linear_relu_forward(x, w, None, impl=impl)
    assert np.isnan(y[0]).all()
    np.testing.assert_array_equal(y[1], [2.0, 0.0])


def test_default_dispatch_on_numpy_arrays(rng):
    x, w, b = make_inputs(rng, 5, 4, 3, np.float32)
    assert kernels.choose("linear_relu_forward", [x, w, b]).array_kind == "numpy"
    y = kernels.linear_relu_forward(x, w, b)
    assert_close(y, forward64(x, w, b), np.float32, 4)
    dx, dw, db = kernels.linear_relu_backward(np.ones_like(y), x, w, y)
    assert (dx.shape, dw.shape, db.shape) == ((5, 4), (3, 4), (3,))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.slow
def test_backward_matches_float64_formula_and_numpy_impl(impl, dtype, shape, rng):
    n, k, m = shape
    x, w, b = make_inputs(rng, n, k, m, dtype)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, n, m, 1, dtype)[0]  # (N, M) random nonzero
    dev = [to_device(a, impl) for a in (dy, x, w, y)]
    grads = kernels.linear_relu_backward(*dev, impl=impl)
    reference = kernels.linear_relu_backward(dy, x, w, y, impl="numpy")
    # dx sums over M terms, dW and db over N terms.
    for got, exact, ref, terms in zip(grads, backward64(dy, x, w, y), reference, (m, n, n)):
        assert_close(got, exact, dtype, terms)
        assert_close(got, ref.astype(np.float64), dtype, terms)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(37, 29, 53), (3, 0, 4), (0, 5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_backward_without_grad_x_skips_it_and_keeps_the_rest(impl, shape, rng):
    n, k, m = shape
    x, w, b = make_inputs(rng, n, k, m, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, n, m, 1, np.float32)[0]
    dev = [to_device(a, impl) for a in (dy, x, w, y)]
    grad_x, grad_w, grad_b = kernels.linear_relu_backward(*dev, compute_grad_x=False, impl=impl)
    assert grad_x is None
    _, ref_w, ref_b = kernels.linear_relu_backward(dy, x, w, y, impl="numpy")
    assert_close(grad_w, ref_w.astype(np.float64), np.float32, n)
    assert_close(grad_b, ref_b.astype(np.float64), np.float32, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_matches_finite_differences(impl):
    """Gradients of L = sum(dy * relu(x @ W.T + b)) against central differences, float64."""
    rng = np.random.default_rng(7)
    n, k, m = 3, 4, 5
    x, w, b = make_inputs(rng, n, k, m, np.float64)
    z = x @ w.T + b
    assert np.abs(z).min() > 1e-3, "a pre-activation sits on the ReLU kink: pick another seed"
    assert 0 < (z > 0).sum() < z.size
    dy = make_inputs(rng, n, m, 1, np.float64)[0]

    def loss(x_, w_, b_):
        return float(np.sum(dy * np.maximum(x_ @ w_.T + b_, 0.0)))

    def numeric(arg):
        params = [x.copy(), w.copy(), b.copy()]
        grad = np.zeros_like(params[arg])
        h = 1e-6
        for idx in np.ndindex(grad.shape):
            plus = [p.copy() for p in params]
            minus = [p.copy() for p in params]
            plus[arg][idx] += h
            minus[arg][idx] -= h
            grad[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        return grad

    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dev = [to_device(a, impl) for a in (dy, x, w, y)]
    grads = [to_host(g) for g in kernels.linear_relu_backward(*dev, impl=impl)]
    for arg, got in enumerate(grads):
        np.testing.assert_allclose(got, numeric(arg), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("impl", ["numba_cpu"])
def test_backward_is_deterministic(impl, rng):
    x, w, b = make_inputs(rng, 300, 17, 70, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, 300, 70, 1, np.float32)[0]
    first = kernels.linear_relu_backward(dy, x, w, y, impl=impl)
    for _ in range(3):
        again = kernels.linear_relu_backward(dy, x, w, y, impl=impl)
        for a, b_ in zip(first, again):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_backward_leaves_inputs_alone(impl, rng):
    x, w, b = make_inputs(rng, 11, 6, 7, np.float32)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, 11, 7, 1, np.float32)[0]
    args = (dy, x, w, y)
    copies = [a.copy() for a in args]
    grads = kernels.linear_relu_backward(*args, impl=impl)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    for g in grads:
        assert not any(np.shares_memory(g, a) for a in args)


# --------------------------------------------------------------------------------------------
# float16 / bfloat16: float32 accumulation, one rounding at the store
# --------------------------------------------------------------------------------------------


def assert_within_rounding(actual, exact, magnitude, dtype, roundings=1):
    """``actual`` (16-bit) against the float64 value ``exact`` of the same 16-bit inputs: one
    rounding, ``u |exact|``, plus float32 accumulation error; ``roundings=2`` allows a second
    rounding of a partial result (the cupy epilogue's), bounded by ``u * magnitude``, where
    ``magnitude`` bounds every partial sum (|x| @ |W|.T + |b| for the forward)."""
    actual = to_host(actual)
    assert actual.dtype == dtype and actual.shape == exact.shape and actual.flags.c_contiguous
    u = UNIT_ROUNDOFF[dtype]
    bound = u * np.abs(exact) + (roundings - 1) * u * magnitude + 1e-5 * magnitude
    err = np.abs(actual.astype(np.float64) - exact)
    if err.size:
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), (f"{dtype}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
                                      f"(value {exact[worst]:.4g}, magnitude {magnitude[worst]:.4g})")


def wide(a):
    return None if a is None else a.astype(np.float64)


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_low_precision_forward_is_float32_rounded_once(impl, dtype, bias, shape, rng):
    n, k, m = shape
    x, w, b = make_inputs(rng, n, k, m, dtype, bias)
    y = kernels.linear_relu_forward(to_device(x, impl), to_device(w, impl), to_device(b, impl), impl=impl)
    magnitude = np.abs(wide(x)) @ np.abs(wide(w)).T + (0 if b is None else np.abs(wide(b)))
    # cupy rounds cuBLAS's output to the dtype before its bias + ReLU pass: a second rounding.
    assert_within_rounding(y, forward64(x, w, b), magnitude, dtype, roundings=2 if impl == "cupy" and bias else 1)
    reference = kernels.linear_relu_forward(*(None if a is None else a.astype(np.float32) for a in (x, w, b)),
                                            impl="numpy")
    assert_within_rounding(y, reference.astype(np.float64), magnitude, dtype, roundings=2 if impl == "cupy" else 1)


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_low_precision_backward_is_float32_rounded_once(impl, dtype, shape, rng):
    n, k, m = shape
    x, w, b = make_inputs(rng, n, k, m, dtype)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, n, m, 1, dtype)[0]
    grads = kernels.linear_relu_backward(*(to_device(a, impl) for a in (dy, x, w, y)), impl=impl)
    g = np.abs(wide(dy)) * (wide(y) > 0)
    magnitudes = (g @ np.abs(wide(w)), g.T @ np.abs(wide(x)), g.sum(axis=0))
    for got, exact, magnitude in zip(grads, backward64(dy, x, w, y), magnitudes):
        assert_within_rounding(got, exact, magnitude, dtype)


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
def test_low_precision_backward_without_grad_x(impl, dtype, rng):
    x, w, b = make_inputs(rng, 37, 29, 53, dtype)
    y = kernels.linear_relu_forward(x, w, b, impl="numpy")
    dy = make_inputs(rng, 37, 53, 1, dtype)[0]
    grad_x, grad_w, grad_b = kernels.linear_relu_backward(*(to_device(a, impl) for a in (dy, x, w, y)),
                                                          compute_grad_x=False, impl=impl)
    assert grad_x is None
    _, exact_w, exact_b = backward64(dy, x, w, y)
    g = np.abs(wide(dy)) * (wide(y) > 0)
    assert_within_rounding(grad_w, exact_w, g.T @ np.abs(wide(x)), dtype)
    assert_within_rounding(grad_b, exact_b, g.sum(axis=0), dtype)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_cpu_low_precision_equals_the_float32_impl_rounded_once(impl, dtype, rng):
    """The CPU impls are the float32 kernel on widened copies, each result rounded once: equal bits."""
    x, w, b = make_inputs(rng, 37, 29, 53, dtype)
    y = kernels.linear_relu_forward(x, w, b, impl=impl)
    wide32 = [a.astype(np.float32) for a in (x, w, b)]
    np.testing.assert_array_equal(y.view(np.uint16), kernels.linear_relu_forward(*wide32, impl=impl)
                                  .astype(dtype).view(np.uint16))
    dy = make_inputs(rng, 37, 53, 1, dtype)[0]
    grads = kernels.linear_relu_backward(dy, x, w, y, impl=impl)
    wide_grads = kernels.linear_relu_backward(dy.astype(np.float32), wide32[0], wide32[1], y.astype(np.float32),
                                              impl=impl)
    for got, expected in zip(grads, wide_grads):
        np.testing.assert_array_equal(got.view(np.uint16), expected.astype(dtype).view(np.uint16))


def test_bfloat16_sums_are_accumulated_in_float32():
    """2048 ones sum to 2048 (exact in bfloat16); a bfloat16 accumulator would stop at 256, where
    256 + 1 rounds back to 256. Checks the GEMM and the bias-gradient sum of every CPU impl."""
    ones = np.ones((1, 2048), BF16)
    for impl in ("numpy", "numba_cpu"):
        assert kernels.linear_relu_forward(ones, ones, None, impl=impl)[0, 0] == 2048
        dy = np.ones((2048, 1), BF16)
        x = np.ones((2048, 1), BF16)
        _, dw, db = kernels.linear_relu_backward(dy, x, np.ones((1, 1), BF16), np.ones((2048, 1), BF16), impl=impl)
        assert dw[0, 0] == 2048 and db[0] == 2048


@pytest.mark.gpu
@pytest.mark.parametrize("impl,dtype", [("cupy", BF16), ("cupy", F16), ("numba_cuda", F16)])
def test_gpu_sums_are_accumulated_in_float32(impl, dtype):
    """cuBLAS's GEMM (cupy: CUBLAS_COMPUTE_32F for 16-bit) and the db reduction accumulate in
    float32: 2048 ones give 2048, where a 16-bit accumulator stops at 256 (bf16) / 2048 (fp16:
    so fp16 uses 4096 ones, 2048 + 1 rounding back to 2048)."""
    import cupy

    count = 4096 if dtype == F16 else 2048
    ones = cupy.ones((1, count), dtype)
    assert float(kernels.linear_relu_forward(ones, ones, None, impl=impl)[0, 0]) == count
    column = cupy.ones((count, 1), dtype)
    _, dw, db = kernels.linear_relu_backward(column, column, cupy.ones((1, 1), dtype), column, impl=impl)
    assert float(dw[0, 0]) == count and float(db[0]) == count


def test_low_precision_matches_torch_linear_relu_on_the_cpu(rng):
    """F.linear + relu in torch's own bfloat16 / float16 on the CPU, forward and backward: within
    one unit in the last place (each side rounds its float32 result once; the float32 sums differ
    in order)."""
    torch = pytest.importorskip("torch")
    for dtype, torch_dtype in ((BF16, torch.bfloat16), (F16, torch.float16)):
        x, w, b = make_inputs(rng, 37, 29, 53, dtype)
        dy = make_inputs(rng, 37, 53, 1, dtype)[0]
        tx, tw, tb = (torch.tensor(a.astype(np.float32)).to(torch_dtype).requires_grad_() for a in (x, w, b))
        ty = torch.relu(torch.nn.functional.linear(tx, tw, tb))
        ty.backward(torch.tensor(dy.astype(np.float32)).to(torch_dtype))
        u = UNIT_ROUNDOFF[dtype]
        for impl in ("numpy", "numba_cpu"):
            y = kernels.linear_relu_forward(x, w, b, impl=impl)
            ours = [y, *kernels.linear_relu_backward(dy, x, w, y, impl=impl)]
            theirs = [ty, tx.grad, tw.grad, tb.grad]
            for name, a, t in zip(("y", "dx", "dw", "db"), ours, theirs):
                t = t.detach().float().numpy().astype(np.float64)
                assert a.dtype == dtype
                err = np.abs(a.astype(np.float64) - t)
                assert (err <= 2 * u * np.abs(t) + 1e-6 * np.abs(t).max()).all(), (impl, dtype, name, err.max())


CU_FILE = Path(__file__).resolve().parents[2] / "kernels" / "cuda" / "linear_relu.cu"


def _instantiated_kernels() -> set[str]:
    """extern "C" names of linear_relu.cu: every name of the macro body for every instantiation."""
    text = CU_FILE.read_text()
    body = text[text.index("#define LINEAR_RELU_KERNELS"):]
    stems = set(re.findall(r"(linear_relu_\w+?)_##SUFFIX", body))
    suffixes = re.findall(r"^LINEAR_RELU_KERNELS\([^,]+, (\w+)\)", text, re.M)
    return {f"{stem}_{suffix}" for stem in stems for suffix in suffixes}


def test_every_dtype_has_every_entry_point():
    from engine.kernels.cuda.linear_relu import SUFFIXES

    names = _instantiated_kernels()
    assert len(names) == 8 * 4 and set(re.findall(r"^LINEAR_RELU_KERNELS\([^,]+, (\w+)\)", CU_FILE.read_text(),
                                                   re.M)) == set(SUFFIXES.values())


@pytest.mark.parametrize("dtype", [np.dtype(np.float32)] + LOW_DTYPES)
@pytest.mark.parametrize("n,m", [(5, 24), (5, 20), (3000, 40)], ids=["vec", "scalar", "rows"])
def test_launch_plan_on_a_fake_gpu(fake_cupy, dtype, n, m):
    """The host side with a fake cupy: the dtype's instances, 16-byte packs when M is a multiple of
    the pack (8 for 16-bit), float32 partial column sums for 16-bit (then always the reduction
    kernel, which rounds db once), the partials as db itself for float32 when one block row suffices."""
    from engine.kernels.cuda.linear_relu import _suffix

    rng = np.random.default_rng(0)
    x, w, b = (fake_cupy.on(0, a) for a in make_inputs(rng, n, 16, m, dtype))
    kernels.get("linear_relu_forward", "cupy")(x, w, b)
    lanes = 16 // dtype.itemsize
    suffix = _suffix(dtype)
    (epilogue,) = fake_cupy.launches
    vec = m % lanes == 0
    assert epilogue.name == f"linear_relu_fwd_epilogue_{'biasvec' if vec else 'bias'}_{suffix}"
    assert len(fake_cupy.gemms) == 1
    fake_cupy.launches.clear()
    dy = fake_cupy.on(0, make_inputs(rng, n, m, 1, dtype)[0])
    kernels.get("linear_relu_backward", "cupy")(dy, x, w, fake_cupy.on(0, dy.host), compute_grad_x=True)
    names = [launch.name for launch in fake_cupy.launches]
    assert set(names) <= _instantiated_kernels(), names
    mask = fake_cupy.launches[0]
    assert mask.name == f"linear_relu_bwd_mask_db_{'vec_' if vec else ''}{suffix}"
    partial = mask.args[3]
    one_block_row = mask.grid[1] == 1
    if dtype == np.float32 and one_block_row:
        assert names == [mask.name] and partial.dtype == np.float32 and partial.shape == (m,)
    else:
        assert partial.dtype == np.float32 and partial.shape == (mask.grid[1], m)
        assert names == [mask.name, f"linear_relu_bwd_db_reduce_{suffix}"]
        assert fake_cupy.launches[1].args[1].dtype == dtype  # db, rounded once
    assert len(fake_cupy.gemms) == 3  # forward, dx, dW


# --------------------------------------------------------------------------------------------
# Bad inputs: every impl runs the same validator first
# --------------------------------------------------------------------------------------------


def _good(dtype=np.float32):
    x = np.ones((4, 3), dtype)
    w = np.ones((5, 3), dtype)
    b = np.ones(5, dtype)
    return x, w, b


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_forward_rejects_non_contiguous_input_naming_the_fix(impl):
    x, w, b = _good()
    wide = np.ones((4, 6), np.float32)
    with pytest.raises(KernelError, match=r"linear_relu_forward.*x is not C-contiguous.*np\.ascontiguousarray"):
        kernels.linear_relu_forward(wide[:, ::2], w, b, impl=impl)
    with pytest.raises(KernelError, match=r"weight is not C-contiguous"):
        kernels.linear_relu_forward(x, np.ones((3, 5), np.float32).T, b, impl=impl)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_forward_rejects_mixed_and_unsupported_dtypes(impl):
    x, w, b = _good()
    with pytest.raises(KernelError, match=r"one float dtype.*nothing is promoted") as info:
        kernels.linear_relu_forward(x, w.astype(np.float64), b, impl=impl)
    assert "weight=numpy.ndarray(5, 3) float64" in str(info.value)
    assert "x=numpy.ndarray(4, 3) float32" in str(info.value)
    with pytest.raises(KernelError, match=r"one float dtype"):
        kernels.linear_relu_forward(x, w, b.astype(np.float64), impl=impl)
    with pytest.raises(KernelError, match=r"one float dtype \(float32, float64, float16 or bfloat16\)"):
        kernels.linear_relu_forward(x.astype(np.float16), w.astype(np.float16), b, impl=impl)
    with pytest.raises(KernelError, match=r"dtype int64 is not supported; use float32, float64, float16 or bfloat16"):
        kernels.linear_relu_forward(*(a.astype(np.int64) for a in (x, w, b)), impl=impl)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_forward_rejects_bad_shapes(impl):
    x, w, b = _good()
    with pytest.raises(KernelError, match=r"shapes do not agree: need x \(N, K\), weight \(M, K\)"):
        kernels.linear_relu_forward(x, np.ones((5, 4), np.float32), b, impl=impl)
    with pytest.raises(KernelError, match=r"shapes do not agree"):
        kernels.linear_relu_forward(x, w, np.ones(4, np.float32), impl=impl)
    with pytest.raises(KernelError, match=r"x must be 2-D, got 1-D"):
        kernels.linear_relu_forward(np.ones(3, np.float32), w, b, impl=impl)
    with pytest.raises(KernelError, match=r"bias must be 1-D, got 2-D"):
        kernels.linear_relu_forward(x, w, b.reshape(1, 5), impl=impl)
    with pytest.raises(KernelError, match=r"weight must be a numpy or cupy array"):
        kernels.linear_relu_forward(x, [[1.0, 2.0, 3.0]], b, impl=impl)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_backward_rejects_bad_inputs(impl):
    x, w, b = _good()
    y = np.ones((4, 5), np.float32)
    dy = np.ones((4, 5), np.float32)
    with pytest.raises(KernelError, match=r"linear_relu_backward.*shapes do not agree.*grad_out \(N, M\)"):
        kernels.linear_relu_backward(np.ones((4, 6), np.float32), x, w, y, impl=impl)
    with pytest.raises(KernelError, match=r"shapes do not agree"):
        kernels.linear_relu_backward(dy, x, w, np.ones((5, 4), np.float32), impl=impl)
    with pytest.raises(KernelError, match=r"shapes do not agree"):
        kernels.linear_relu_backward(dy, np.ones((4, 2), np.float32), w, y, impl=impl)
    with pytest.raises(KernelError, match=r"grad_out is not C-contiguous.*np\.ascontiguousarray"):
        kernels.linear_relu_backward(np.ones((5, 4), np.float32).T, x, w, y, impl=impl)
    with pytest.raises(KernelError, match=r"out=numpy.ndarray\(4, 5\) float64.*one float dtype"):
        kernels.linear_relu_backward(dy, x, w, y.astype(np.float64), impl=impl)
    with pytest.raises(KernelError, match=r"out is None"):
        kernels.linear_relu_backward(dy, x, w, None, impl=impl)

"""gelu_forward / gelu_backward: every impl against an independent float64 reference.

The reference below is PyTorch's definition computed per element with the standard library's
math.erfc and numpy's exp (not the numpy impl's own erfc), checked against the textbook formulas
and its derivative against central differences of itself, so the impls are held to the
definition and not only to each other. GPU impls (cupy, numba_cuda) run in the cases marked ``gpu``, where a device answers.

Float32 accuracy: forward within 1e-6 relative for |x| <= 3; beyond, the float32 rounding of the
argument (x / sqrt 2, or z) is amplified by the tails' steepness, so the bound is
2 eps (1 + x^2) relative (measured 1.4 eps (1 + x^2)). Backward within 3e-7 absolute for unit dy:
gelu'(x) crosses zero near x = -0.75, where no relative bound can hold (measured 1.9e-7).
"""

import math

import ml_dtypes
import numpy as np
import pytest

from engine import kernels
from engine.kernels.cpu.gelu import erfc
from engine.kernels.registry import KernelError
from tests.kernels.helpers import BF16, F16, UNIT_ROUNDOFF, to_device, to_host

CPU_IMPLS = ["numpy", "numba_cpu"]
GPU_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cupy", "numba_cuda")]
IMPLS = CPU_IMPLS + GPU_IMPLS
APPROX = ["none", "tanh"]
EPS32 = float(np.finfo(np.float32).eps)
LOW = [F16, BF16]
LOW_EPS = UNIT_ROUNDOFF  # one rounding to a 16-bit dtype is within this relative error
DTYPES = [np.float32, np.float64, F16, BF16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]
_erf = np.vectorize(math.erf, otypes=[np.float64])
_tanh = np.vectorize(math.tanh, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def reference(x, approximate, dy=None):
    """float64 y and, given dy, dx, per element with the standard library's math.erfc / exp.

    Phi(x) = erfc(-x / sqrt 2) / 2 and (1 + tanh z) / 2 = 1 / (1 + exp(-2z)) are the textbook
    1 + erf / 1 + tanh without their cancellation for negative x (which would make a float64
    reference lose the digits the impls keep); test_reference_equals_the_textbook_forms checks
    the identities where the textbook forms are exact.
    """
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        if approximate == "tanh":
            k = math.sqrt(2 / math.pi)
            z = k * (x + 0.044715 * x ** 3)
            s, s_minus = 1 / (1 + np.exp(-2 * z)), 1 / (1 + np.exp(2 * z))
            y = x * s
            slope = s + x * s * s_minus * 2 * k * (1 + 3 * 0.044715 * x * x)
        else:
            cdf = 0.5 * _erfc(-x / math.sqrt(2))
            y = x * cdf
            slope = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return y if dy is None else (y, np.asarray(dy, np.float64) * slope)


def textbook(x, approximate):
    """PyTorch's formulas as written (they cancel for negative x: used only where they do not)."""
    if approximate == "tanh":
        return 0.5 * x * (1 + _tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def make_case(shape, dtype, seed=0, scale=2.5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def run(impl, fn, *arrays, **kw):
    return to_host(getattr(kernels, fn)(*(to_device(a, impl) for a in arrays), impl=impl, **kw))


def checked(impl, dtype, run_check):
    """``run_check()``, or, for numba_cuda with bfloat16 (numba.cuda has no bfloat16 type), the
    KernelError that names the kernel, the impl and the dtype."""
    if impl == "numba_cuda" and np.dtype(dtype) == BF16:
        with pytest.raises(KernelError, match=r"'gelu_\w+': impl 'numba_cuda' does not take bfloat16"):
            run_check()
        return
    run_check()


def check(impl, x, dy, approximate):
    ry, rdx = reference(x, approximate, dy)
    y = run(impl, "gelu_forward", x, approximate=approximate)
    dx = run(impl, "gelu_backward", dy, x, approximate=approximate)
    for got in (y, dx):
        assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype in LOW:
        # float32 math on the (exactly upcast) 16-bit x and dy, rounded once: within one rounding of
        # the float64 reference, plus the float32 error (the bounds below for float32, tiny next to it)
        eps = LOW_EPS[x.dtype]
        # float16's spacing below 6e-5 is 6e-8; float32 results under 1e-36 may flush (as above)
        tiny = max(float(ml_dtypes.finfo(x.dtype).smallest_subnormal), 1e-36)
        x64 = x.astype(np.float64)
        dx_floor = tiny + 3e-7 * np.abs(dy.astype(np.float64)).max()
        for name, got, want, floor in (("y", y, ry, tiny), ("dx", dx, rdx, dx_floor)):
            err = np.abs(got.astype(np.float64) - want)
            bound = eps * np.abs(want) + 2 * EPS32 * (1 + x64 * x64) * np.abs(want) + floor
            assert np.all(err <= bound), f"{name}: worst at x = {x.flat[np.argmax(err / bound)]}"
        return
    if x.dtype == np.float64:
        np.testing.assert_allclose(y, ry, rtol=3e-12, atol=1e-300)  # numpy erfc: <= 2e-12
        np.testing.assert_allclose(dx, rdx, rtol=1e-11, atol=1e-13)
        return
    x64 = x.astype(np.float64)
    # + 1e-36: results that small (float32's normal floor is 1.2e-38) come through subnormal steps
    bound = 2 * EPS32 * (1 + x64 * x64) * np.abs(ry) + 1e-36
    bound = np.where(np.abs(x64) <= 3, np.minimum(bound, 1e-6 * np.abs(ry) + 1e-36), bound)
    err = np.abs(y.astype(np.float64) - ry)
    assert np.all(err <= bound), f"worst at x = {x.flat[np.argmax(err / bound)]}: {np.max(err / bound)} x bound"
    np.testing.assert_allclose(dx, rdx, rtol=1e-6, atol=3e-7 * np.abs(dy).max())


# ---- the reference and the numpy impl's erfc ----------------------------------------------------


@pytest.mark.parametrize("approximate", APPROX)
def test_reference_derivative_matches_finite_differences(approximate):
    x = np.linspace(-6, 6, 97)
    _, dx = reference(x, approximate, np.ones_like(x))
    h = 1e-6
    fd = (reference(x + h, approximate) - reference(x - h, approximate)) / (2 * h)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("approximate", APPROX)
def test_reference_equals_the_textbook_forms(approximate):
    x = np.linspace(-1.5, 4, 301)
    np.testing.assert_allclose(reference(x, approximate), textbook(x, approximate), rtol=1e-14, atol=1e-15)


def test_numpy_erfc_matches_math_erfc():
    u = np.concatenate([np.linspace(-26, 26, 4001), [0.0, 2.5, -2.5, 2.4999999, 1e-300]])
    want = np.array([math.erfc(v) for v in u])
    np.testing.assert_allclose(erfc(u), want, rtol=2e-12, atol=0)


def test_numba_cpu_float32_erfc_fits():
    """The fitted polynomials behind numba_cpu's float32 exact form, in float64: erf(a) / a in a^2
    below ERF_SPLIT and erfc(a) exp(a^2) in t = 1 / (1 + a / 2) from there to ERF_TAIL_MAX."""
    from engine.kernels.cpu import gelu as cpu_gelu

    a = np.linspace(1e-6, cpu_gelu.ERF_SPLIT, 4001)
    small = np.polynomial.polynomial.polyval(a * a, cpu_gelu.ERF_SMALL) * a
    np.testing.assert_allclose(small, [math.erf(v) for v in a], rtol=1e-10, atol=0)
    a = np.linspace(cpu_gelu.ERF_SPLIT, cpu_gelu.ERF_TAIL_MAX, 4001)
    tail = np.polynomial.polynomial.polyval(1 / (1 + a / 2), cpu_gelu.ERFC_TAIL)
    np.testing.assert_allclose(tail, [math.erfc(v) * math.exp(v * v) for v in a], rtol=2e-9, atol=0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, F16, BF16], ids=["float32", "float16", "bfloat16"])
def test_exact_form_on_a_dense_grid(impl, dtype):
    """The exact form within the float32 bounds of check() on every float32 step around the points
    where numba_cpu's erfc changes formula (|x| = sqrt 2 ERF_SPLIT) and on a dense grid elsewhere."""
    from engine.kernels.cpu import gelu as cpu_gelu

    edge = np.float32(math.sqrt(2) * cpu_gelu.ERF_SPLIT)
    near = edge + np.arange(-2000, 2000, dtype=np.float32) * np.spacing(edge)
    x = np.concatenate([np.linspace(-15, 15, 300001), near, -near]).astype(dtype)
    dy = np.random.default_rng(2).uniform(0.5, 1.5, x.shape).astype(dtype)
    check(impl, x, dy, "none")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.slow
def test_impl_backward_matches_finite_differences_of_its_forward(impl, approximate):
    """float64: the impl's own backward against central differences of its own forward."""
    x, dy = make_case((5, 7), np.float64, seed=3)
    dx = run(impl, "gelu_backward", dy, x, approximate=approximate)
    h = 1e-6
    plus = run(impl, "gelu_forward", x + h, approximate=approximate)
    minus = run(impl, "gelu_forward", x - h, approximate=approximate)
    np.testing.assert_allclose(dx, dy * (plus - minus) / (2 * h), rtol=1e-6, atol=1e-9)


# ---- every impl against the reference ------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 37), (1000, 67)], ids=str)
@pytest.mark.slow
def test_matches_reference(impl, approximate, dtype, shape):
    x, dy = make_case(shape, dtype, seed=sum(shape))
    checked(impl, dtype, lambda: check(impl, x, dy, approximate))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tails_and_special_values(impl, approximate, dtype):
    """The left tail (where 1 + erf / 1 + tanh cancel), large x, zeros and tiny values."""
    x = np.concatenate([np.linspace(-14, 14, 20001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4]])
    x = x.astype(dtype)
    dy = np.random.default_rng(1).uniform(0.5, 1.5, x.shape).astype(dtype)
    checked(impl, dtype, lambda: check(impl, x, dy, approximate))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("offset", [0, 1, 3], ids=["aligned", "offset1", "offset3"])
def test_low_precision_packs_and_misaligned_views(impl, dtype, offset):
    """8 values per 16-byte pack: sizes around the pack and views that start off a pack boundary
    (the cupy wrapper peels a head off or falls back to scalars) give the same as the reference."""
    base_x, base_dy = make_case((offset + 8 * 37 + 5,), dtype, seed=offset + 11)
    x, dy = base_x[offset:], base_dy[offset:]
    checked(impl, dtype, lambda: [check(impl, x, dy, approximate) for approximate in APPROX])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("approximate", APPROX)
def test_numba_cpu_low_precision_is_its_float32_result_rounded_once(impl, dtype, approximate):
    """numba_cpu (and numpy, from float64) on a 16-bit x: the float32 (float64) kernel on the upcast
    x, rounded once; the numba_cpu float32 and 16-bit loops share their arithmetic bit for bit."""
    x, dy = make_case((4097,), dtype, seed=2)
    y32 = run(impl, "gelu_forward", x.astype(np.float32), approximate=approximate)
    dx32 = run(impl, "gelu_backward", dy.astype(np.float32), x.astype(np.float32), approximate=approximate)
    y = run(impl, "gelu_forward", x, approximate=approximate)
    dx = run(impl, "gelu_backward", dy, x, approximate=approximate)
    if impl == "numba_cpu":
        np.testing.assert_array_equal(y, y32.astype(dtype))
        np.testing.assert_array_equal(dx, dx32.astype(dtype))
    else:  # float64 rounded once to the 16-bit dtype: within half a unit of the float32 result's rounding
        eps, tiny = LOW_EPS[np.dtype(dtype)], float(ml_dtypes.finfo(dtype).smallest_subnormal)
        np.testing.assert_allclose(y.astype(np.float32), y32, rtol=eps, atol=tiny)
        np.testing.assert_allclose(dx.astype(np.float32), dx32, rtol=eps, atol=tiny)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_parallel_path_matches_serial(impl, monkeypatch):
    """A buffer over numba_cpu's parallel threshold (chunks not a multiple of the size) gives the
    same values as the serial loop on each element."""
    from engine.kernels import threads
    from engine.kernels.cpu import gelu as cpu_gelu

    monkeypatch.setattr(threads, "REGION_ALWAYS_MIN", cpu_gelu.PARALLEL_MIN)  # parallel whatever the load
    x, dy = make_case((cpu_gelu.PARALLEL_MIN + 12345,), np.float32, seed=7)
    for approximate in APPROX:
        y = run(impl, "gelu_forward", x, approximate=approximate)
        dx = run(impl, "gelu_backward", dy, x, approximate=approximate)
        np.testing.assert_array_equal(y[-100:], run(impl, "gelu_forward", x[-100:], approximate=approximate))
        np.testing.assert_array_equal(dx[:100], run(impl, "gelu_backward", dy[:100], x[:100], approximate=approximate))
        check(impl, x, dy, approximate)


def test_parallel_plan_follows_size_and_spare_cpus(monkeypatch):
    """numba_cpu splits a mid-size buffer only while the machine has CPUs to spare (the run
    queue's answer, threads.region_threads); small ones never, large ones always."""
    from engine.kernels import threads
    from engine.kernels.cpu import gelu as cpu_gelu

    spare = [2]
    monkeypatch.setattr(threads, "region_threads", lambda: spare[0])
    mid, large = cpu_gelu.PARALLEL_MIN * 8, threads.REGION_ALWAYS_MIN
    assert cpu_gelu._plan(cpu_gelu.PARALLEL_MIN - 1) == (False, 1)
    assert cpu_gelu._plan(mid)[0] is True
    spare[0] = 1  # a busy neighbour: the mid-size buffer runs on the calling thread
    assert cpu_gelu._plan(mid) == (False, 1)
    assert cpu_gelu._plan(large)[0] is True


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty(impl, dtype):
    def run_check():
        for shape in ((0,), (3, 0, 2)):
            x = np.empty(shape, dtype)
            y = run(impl, "gelu_forward", x, approximate="tanh")
            dx = run(impl, "gelu_backward", x, x, approximate="none")
            assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype

    checked(impl, dtype, run_check)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_refuses_bad_input_by_name(impl):
    x = np.ones((4, 6), np.float32)
    with pytest.raises(KernelError, match=r"gelu_forward.*not C-contiguous"):
        kernels.gelu_forward(x[:, ::2], impl=impl)
    with pytest.raises(KernelError, match=r"gelu_forward.*int32"):
        kernels.gelu_forward(x.astype(np.int32), impl=impl)
    with pytest.raises(KernelError, match="approximate must be 'none' or 'tanh'"):
        kernels.gelu_forward(x, approximate="erf", impl=impl)
    with pytest.raises(KernelError, match=r"gelu_backward.*grad_y must have x's dtype float32, got float64"):
        kernels.gelu_backward(x.astype(np.float64), x, impl=impl)
    with pytest.raises(KernelError, match=r"gelu_backward.*grad_y must have x's shape \(4, 6\)"):
        kernels.gelu_backward(x[:2], x, impl=impl)
    with pytest.raises(KernelError, match=r"gelu_backward.*grad_y is not C-contiguous"):
        kernels.gelu_backward(np.ones((6, 4), np.float32).T, x, impl=impl)


def test_registered_impls():
    assert kernels.impls("gelu_forward", available_only=False) == ["numba_cpu", "numpy", "cupy", "numba_cuda"]
    assert kernels.impls("gelu_backward", available_only=False) == ["numba_cpu", "numpy", "cupy", "numba_cuda"]


def test_cupy_kernel_names_exist_in_the_cu_file():
    import re

    from engine.kernels.cuda.gelu import kernel_name
    from engine.kernels.cuda.module import source

    text = source("gelu")
    instantiated = dict(re.findall(r"^GELU_KERNELS\((\w+), (\w+),", text, re.M))  # C type -> suffix
    assert instantiated == {"float": "f32", "double": "f64", "__half": "f16", "__nv_bfloat16": "bf16"}
    for approximate in APPROX:
        for direction in ("fwd", "bwd"):
            for dtype in DTYPES:
                name = kernel_name(approximate, direction, dtype)
                prefix, suffix = name.rsplit("_", 1)  # instantiated by macro: gelu_tanh_fwd_##DT
                assert f"{prefix}_##DT" in text and suffix in instantiated.values()


@pytest.mark.parametrize("itemsize,width", [(4, 4), (8, 2), (2, 8)])
def test_cupy_launch_plan_moves_16_byte_packs(itemsize, width):
    """One thread per 16-byte pack over the aligned middle; a shared misalignment peels a head off,
    different misalignments fall back to scalars, and the grid covers the larger of the two loops."""
    from engine.kernels.cuda.gelu import MAX_BLOCKS, THREADS, launch_plan

    n = 10_000
    assert launch_plan([0x1000, 0x2000], n, itemsize) == (-(-(n // width) // THREADS), THREADS, 0, n // width)
    blocks, threads, head, n_vec = launch_plan([0x1000 + itemsize, 0x2000 + itemsize], n, itemsize)
    assert head == width - 1 and n_vec == (n - head) // width and (0x1000 + itemsize * (1 + head)) % 16 == 0
    assert launch_plan([0x1000, 0x2000 + itemsize], n, itemsize) == (-(-n // THREADS), THREADS, 0, 0)
    assert launch_plan([0x1000], 3, itemsize)[:1] == (1,)
    assert launch_plan([0x1000], 2**40, itemsize)[0] == MAX_BLOCKS


# Extreme inputs: GELU(x) -> x as x -> inf and -> -0 as x -> -inf, the slope -> 1 and 0. PyTorch
# agrees for finite x except where its own formula overflows (exact form: inf at x = 3e38; tanh
# backward: NaN from 0 * inf beyond |x| ~ 1.8e19). Infinite x: +inf -> +inf, -inf -> NaN
# (-inf * 0, as PyTorch), and NaN gradients, as PyTorch.
EXTREME_X = np.array([3e38, -3e38, 1e20, -1e20, 7e12, -7e12, 20, -20, np.inf, -np.inf, np.nan], np.float32)
EXTREME_Y = np.array([3e38, -0.0, 1e20, -0.0, 7e12, -0.0, 20, -0.0, np.inf, np.nan, np.nan], np.float32)
EXTREME_SLOPE = np.array([1, 0, 1, 0, 1, 0, 1, 0, np.nan, np.nan, np.nan], np.float32)


def assert_extremes(forward, backward, approximate, dtype=np.float32):
    """``forward(x)`` and ``backward(dy, x)`` at EXTREME_X: the limits above (y within 1e-6
    relative, -20 gives a tiny negative or -0.0)."""
    x = EXTREME_X.astype(dtype)
    y, slope = forward(x), backward(np.ones_like(x), x)
    y, slope = y.astype(np.float32) if dtype == BF16 else y, slope.astype(np.float32) if dtype == BF16 else slope
    want_y = EXTREME_Y.astype(dtype).astype(np.float32) if dtype == BF16 else EXTREME_Y
    for name, got, want in (("y", y, want_y), ("slope", slope, EXTREME_SLOPE)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{approximate} {name}: NaN at {x}")
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-20, err_msg=f"{approximate} {name}")
    assert (np.signbit(y[1:8:2]) | (y[1:8:2] == 0)).all() and (y[1:8:2] <= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=["float32", "float64", "bfloat16"])
def test_extreme_inputs_give_the_limits(impl, approximate, dtype):
    """bfloat16 has float32's range: the same limits (its y is x rounded, as x itself is)."""
    if dtype == np.float64 and impl != "numpy" and impl != "numba_cpu":
        pytest.skip("float64 on the CPU impls")
    checked(impl, dtype, lambda: assert_extremes(
        lambda x: run(impl, "gelu_forward", x, approximate=approximate),
        lambda g, x: run(impl, "gelu_backward", g, x, approximate=approximate), approximate, dtype))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("fused", [True, False])
def test_engine_gelu_extreme_inputs_on_both_paths(approximate, fused):
    import engine
    import engine.functional as F

    def forward(x):
        with F.fused_kernels(fused):
            return F.gelu(engine.tensor(x), approximate=approximate).numpy()

    def backward(g, x):
        t = engine.tensor(x, requires_grad=True)
        with F.fused_kernels(fused):
            F.gelu(t, approximate=approximate).backward(engine.tensor(g))
        return t.grad.numpy()

    with np.errstate(all="ignore"):
        assert_extremes(forward, backward, approximate)

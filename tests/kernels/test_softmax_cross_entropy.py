"""softmax_cross_entropy: every impl against an independent float64 formula and the numpy impl.

The float64 reference below is written from PyTorch's definition (log_softmax, then the weighted,
smoothed negative log-likelihood), and its gradient is checked against central differences, so
the impls are held to the definition and not only to each other. GPU impls (cupy, numba_cuda) run
in the cases marked ``gpu``, where a device answers.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels.registry import KernelError
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.helpers import BF16, F16, LOW_DTYPES, UNIT_ROUNDOFF, low_precision_impls
from tests.kernels.helpers import make_cross_entropy_case as make_case

CPU_IMPLS = ["numpy", "numba_cpu"]
GPU_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cupy", "numba_cuda")]
IMPLS = CPU_IMPLS + GPU_IMPLS
CU_FILE = Path(__file__).resolve().parents[2] / "kernels" / "cuda" / "softmax_cross_entropy.cu"


def run(impl, logits, targets, weight=None, **kw):
    """Call one impl on numpy inputs (moved to the GPU for GPU impls); numpy results back."""
    if impl in ("cupy", "numba_cuda"):
        import cupy

        move = (lambda a: None if a is None else cupy.asarray(a))
        if "grad_scale" in kw and isinstance(kw["grad_scale"], np.ndarray):
            kw["grad_scale"] = cupy.asarray(kw["grad_scale"])
        loss, grad = kernels.softmax_cross_entropy(move(logits), move(targets), move(weight), impl=impl, **kw)
        kernels.raise_deferred_errors()  # the sync point at which GPU target checks are read
        return cupy.asnumpy(loss), None if grad is None else cupy.asnumpy(grad)
    return kernels.softmax_cross_entropy(logits, targets, weight, impl=impl, **kw)


def reference(z, targets, weight=None, ignore_index=-100, eps=0.0, grad_scale=1.0):
    """float64 (loss, grad) from the definition, with the target as a dense distribution u.

    hard t: u_c = (1 - eps) w_t [c == t] + eps / C w_c (rows with t == ignore_index: u = 0)
    soft q: u_c = w_c ((1 - eps) q_c + eps / C)
    loss = -sum_c u_c logp_c; grad = grad_scale * (sum_c u_c * softmax - u).
    """
    z = z.astype(np.float64)
    n, c = z.shape
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if targets.ndim == 2:
        u = w * ((1 - eps) * targets.astype(np.float64) + eps / c)
        loss = -(u * logp).sum(axis=1)
    else:
        u = np.zeros((n, c))
        loss = np.zeros(n)
        for i, t in enumerate(targets):
            if t == ignore_index:
                continue
            u[i] = eps / c * w
            u[i, t] += (1 - eps) * w[t]
            # the hard part straight from logp_t: -inf logits elsewhere give a finite loss, as in torch
            loss[i] = -(1 - eps) * w[t] * logp[i, t] + (eps / c * -(w * logp[i]).sum() if eps else 0.0)
    grad = grad_scale * (u.sum(axis=1, keepdims=True) * np.exp(logp) - u)
    return loss, grad


def tolerances(dtype, c=1):
    if np.dtype(dtype) == np.float32:
        return dict(rtol=2e-5 * max(1.0, np.log(c)), atol=2e-5 * max(1.0, np.log(c))), dict(rtol=1e-4, atol=2e-6)
    return dict(rtol=1e-11, atol=1e-11), dict(rtol=1e-9, atol=1e-13)


def check(impl, z, targets, weight=None, **kw):
    """impl against the float64 reference and against the numpy impl."""
    loss, grad = run(impl, z, targets, weight, **kw)
    ref_loss, ref_grad = reference(z, targets, weight, kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0),
                                   kw.get("grad_scale", 1.0))
    assert loss.dtype == z.dtype and loss.shape == (z.shape[0],)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    loss_tol, grad_tol = tolerances(z.dtype, z.shape[1])
    np.testing.assert_allclose(loss, ref_loss, **loss_tol)
    np.testing.assert_allclose(grad, ref_grad, **grad_tol)
    np_loss, np_grad = run("numpy", z, targets, weight, **kw)
    np.testing.assert_allclose(loss, np_loss, **loss_tol)
    np.testing.assert_allclose(grad, np_grad, **grad_tol)
    return loss, grad


# ---- the reference itself ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,weighted,eps", [("hard", False, 0.0), ("hard", True, 0.2), ("soft", True, 0.1),
                                               ("soft", False, 0.0)])
def test_reference_gradient_matches_finite_differences(kind, weighted, eps):
    z, targets, weight = make_case(3, 5, np.float64, kind, seed=3, weighted=weighted)
    if kind == "hard":
        targets[1] = -100
    _, grad = reference(z, targets, weight, eps=eps, grad_scale=0.5)
    h = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        plus, minus = z.copy(), z.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (reference(plus, targets, weight, eps=eps)[0].sum()
                        - reference(minus, targets, weight, eps=eps)[0].sum()) / (2 * h)
    np.testing.assert_allclose(grad, 0.5 * numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.slow
def test_impl_gradient_matches_finite_differences(impl):
    """The impl's own loss, differentiated numerically, gives the impl's gradient (float64)."""
    z, targets, weight = make_case(2, 4, np.float64, "hard", seed=5, weighted=True)
    kw = dict(label_smoothing=0.3, grad_scale=1.5)
    _, grad = run(impl, z, targets, weight, **kw)
    h = 1e-6
    for idx in np.ndindex(*z.shape):
        plus, minus = z.copy(), z.copy()
        plus[idx] += h
        minus[idx] -= h
        slope = (run(impl, plus, targets, weight, **kw)[0].sum() - run(impl, minus, targets, weight, **kw)[0].sum())
        assert grad[idx] == pytest.approx(1.5 * slope / (2 * h), rel=1e-6, abs=1e-8)


def test_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    z, targets, weight = make_case(6, 11, np.float64, "hard", seed=7, weighted=True)
    targets[2] = 4
    ours, grad = run("numpy", z, targets, weight, ignore_index=4, label_smoothing=0.1)
    zt = torch.tensor(z, requires_grad=True)
    theirs = torch.nn.functional.cross_entropy(zt, torch.tensor(targets), torch.tensor(weight), ignore_index=4,
                                               reduction="none", label_smoothing=0.1)
    theirs.sum().backward()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-12)
    q = make_case(6, 11, np.float64, "soft", seed=8)[1]
    ours, grad = run("numpy", z, q, weight, label_smoothing=0.2)
    zt.grad = None
    theirs = torch.nn.functional.cross_entropy(zt, torch.tensor(q), torch.tensor(weight), reduction="none",
                                               label_smoothing=0.2)
    theirs.sum().backward()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---- every impl against the reference ---------------------------------------------------------

SHAPES = [(1, 1), (7, 1), (1, 13), (5, 37), (33, 1000), (4, 4099)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
@pytest.mark.slow
def test_hard_targets(impl, dtype, shape):
    z, targets, _ = make_case(*shape, dtype, seed=sum(shape))
    check(impl, z, targets)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (9, 1030)], ids=["1x1", "5x37", "9x1030"])
def test_weights_smoothing_ignore_and_scale(impl, dtype, shape):
    z, targets, weight = make_case(*shape, dtype, seed=11, weighted=True)
    targets[0] = -100
    check(impl, z, targets, weight, label_smoothing=0.15, grad_scale=0.25)
    check(impl, z, targets, weight, grad_scale=-2.0)
    check(impl, z, targets, None, label_smoothing=1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 517)], ids=["1x1", "3x5", "6x517"])
@pytest.mark.slow
def test_soft_targets(impl, dtype, shape):
    z, q, weight = make_case(*shape, dtype, kind="soft", seed=13, weighted=True)
    check(impl, z, q)
    check(impl, z, q, weight, label_smoothing=0.3, grad_scale=0.5)
    # unnormalized and zero probabilities are allowed, as in torch
    q2 = q * 3
    q2[:, 0] = 0
    check(impl, z, q2, ignore_index=0)  # ignore_index does not apply to soft targets


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_targets_and_custom_ignore_index(impl):
    z, targets, weight = make_case(8, 6, np.float32, seed=17, weighted=True, index_dtype=np.int32)
    targets[[1, 4]] = 2
    loss, grad = check(impl, z, targets, weight, ignore_index=2, label_smoothing=0.05)
    assert loss[1] == 0 and loss[4] == 0 and not grad[[1, 4]].any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_large_class_count(impl):
    """C = 130000: past every on-chip path of the GPU kernels; rows that are long sums on the CPU."""
    z, targets, weight = make_case(3, 130000, np.float32, seed=19, weighted=True)
    targets[1] = -100
    check(impl, z, targets)
    check(impl, z, targets, weight, label_smoothing=0.1, grad_scale=1 / 3)
    q = make_case(3, 130000, np.float32, kind="soft", seed=20)[1]
    check(impl, z, q, label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_numba_cpu_serial_and_parallel_rows_agree_bitwise(kind, monkeypatch):
    """Small calls run the rows on the calling thread, large ones in parallel: same bits either way."""
    from engine.kernels.cpu import softmax_cross_entropy as module

    z, targets, weight = make_case(40, 300, np.float32, kind=kind, seed=23, weighted=True)
    results = []
    for threshold in (0, 1 << 62):  # parallel always, then never
        monkeypatch.setattr(module, "PARALLEL_MIN", threshold)
        results.append(kernels.softmax_cross_entropy(z, targets, weight, label_smoothing=0.1, impl="numba_cpu"))
    (loss_p, grad_p), (loss_s, grad_s) = results
    assert np.array_equal(loss_p, loss_s) and np.array_equal(grad_p, grad_s)


SMALL_CALLS = {  # (N, C, kwargs) of calls the numba_cpu small path takes (float32 / float64, class indices)
    "mean": (8, 10, {"denominator_out": True}),
    "mean, smoothing": (33, 7, {"denominator_out": True, "label_smoothing": 0.1}),
    "scale, no grad": (16, 5, {"grad_scale": 0.37, "compute_grad": False}),
    "ignore_index 2": (12, 9, {"ignore_index": 2}),
    "no rows, mean": (0, 4, {"denominator_out": True}),
    "one class": (5, 1, {"denominator_out": True}),
    "every row ignored": (6, 3, {"denominator_out": True, "ignore_index": -7}),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(SMALL_CALLS))
def test_numba_cpu_small_path_agrees_bitwise_with_the_general_path(case, dtype, monkeypatch):
    """A small common call runs the target check, the 'mean' count and the rows in one jitted call
    (_small_hard_call); the general path (_cpu_call) must give the same bits, count and errors."""
    from engine.kernels.cpu import softmax_cross_entropy as module

    n, c, kw = SMALL_CALLS[case]
    z = (np.random.default_rng(n + c).standard_normal((n, c)) * 3).astype(dtype)
    targets = np.random.default_rng(c).integers(0, c, n)
    targets[::3] = kw.get("ignore_index", -100)
    if case == "every row ignored":
        targets[:] = -7
    taken, small_call = [], module._small_hard_call
    monkeypatch.setattr(module, "_small_hard_call", lambda *args: taken.append(1) or small_call(*args))
    results = []
    for small in (True, False):
        if not small:
            assert taken, "the small path was not taken"
            monkeypatch.setattr(module, "_plain_count_out", lambda *args: False)  # the general path
        call = dict(kw, denominator_out=np.full(1, -1, dtype) if kw.get("denominator_out") else None)
        loss, grad = kernels.softmax_cross_entropy(z, targets, **call, impl="numba_cpu")
        arrays = [a for a in (loss, grad, call["denominator_out"]) if a is not None]
        outcome = [(a.dtype, a.shape, a.tobytes()) for a in arrays] + [grad is None]
        if n:  # a bad class index: the same error, naming the same row
            bad = targets.copy()
            bad[n // 2] = c + 4
            with pytest.raises(KernelError) as error:
                kernels.softmax_cross_entropy(z, bad, **call, impl="numba_cpu")
            outcome.append(str(error.value))
        results.append(outcome)
    assert results[0] == results[1]


def test_numba_cpu_small_path_leaves_a_read_only_count_to_the_general_path():
    z, targets = np.ones((4, 3), np.float32), np.arange(4) % 3
    read_only = np.zeros(1, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.softmax_cross_entropy(z, targets, denominator_out=read_only, impl="numba_cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_class_count_one(impl, dtype):
    """One class: log_softmax is 0, so the loss and the gradient are 0 whatever the logits."""
    z = np.array([[3.0], [-1e4], [0.5]], dtype)
    for targets in (np.zeros(3, np.int64), np.array([[0.7], [1.0], [2.0]], dtype)):
        loss, grad = run(impl, z, targets, np.array([2.0], dtype), label_smoothing=0.2)
        assert not loss.any() and not grad.any()
        assert loss.dtype == dtype and grad.shape == (3, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch(impl, dtype):
    z = np.zeros((0, 5), dtype)
    for targets in (np.zeros(0, np.int64), np.zeros((0, 5), dtype)):
        loss, grad = run(impl, z, targets)
        assert loss.shape == (0,) and grad.shape == (0, 5) and loss.dtype == grad.dtype == dtype
        loss, grad = run(impl, z, targets, compute_grad=False)
        assert loss.shape == (0,) and grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_compute_grad_false_returns_the_same_loss(impl):
    for kind, eps in (("hard", 0.0), ("hard", 0.1), ("soft", 0.0)):
        z, targets, weight = make_case(5, 300, np.float32, kind=kind, seed=23, weighted=True)
        with_grad, _ = run(impl, z, targets, weight, label_smoothing=eps)
        loss, grad = run(impl, z, targets, weight, label_smoothing=eps, compute_grad=False)
        assert grad is None
        np.testing.assert_allclose(loss, with_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_row_ignored(impl):
    z, targets, weight = make_case(4, 9, np.float32, seed=29, weighted=True)
    targets[:] = -1
    loss, grad = run(impl, z, targets, weight, ignore_index=-1, label_smoothing=0.1)
    assert not loss.any() and not grad.any()


# ---- float16 / bfloat16 logits: float32 math, float32 loss, gradient rounded once -----------------


def low_case(n, c, dtype, kind="hard", seed=0, weighted=False):
    """A case whose logits (and soft targets, weights) are 16-bit; targets as make_case."""
    z, targets, weight = make_case(n, c, np.float32, kind, seed=seed, weighted=weighted)
    return (z.astype(dtype), targets.astype(dtype) if kind == "soft" else targets,
            None if weight is None else weight.astype(dtype))


def check_low(impl, z, targets, weight=None, **kw):
    """16-bit logits: the loss (float32) as the float32 tolerance of the float64 reference of the same
    16-bit values; each gradient element within one rounding of it."""
    loss, grad = run(impl, z, targets, weight, **kw)
    wide = (lambda a: None if a is None else a.astype(np.float64))
    scale = kw.get("grad_scale", 1.0)
    ref_loss, ref_grad = reference(wide(z), wide(targets) if targets.ndim == 2 else targets, wide(weight),
                                   kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0),
                                   float(np.asarray(scale).reshape(-1)[0]))
    assert loss.dtype == np.float32 and loss.shape == (z.shape[0],)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    np.testing.assert_allclose(loss, ref_loss, **tolerances(np.float32, z.shape[1])[0])
    u = UNIT_ROUNDOFF[z.dtype]
    bound = u * np.abs(ref_grad) + 1e-4 * np.abs(ref_grad) + 2e-6 * max(abs(float(np.asarray(scale).reshape(-1)[0])), 1)
    err = np.abs(grad.astype(np.float64) - ref_grad)
    assert (err <= bound).all(), f"gradient error {(err / bound).max():.3g} x the bound of one rounding"
    return loss, grad


LOW_IMPLS = low_precision_impls()


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
def test_low_precision_hard_targets(impl, dtype, shape):
    z, targets, _ = low_case(*shape, dtype, seed=sum(shape))
    check_low(impl, z, targets)


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (9, 1030), (3, 40000)], ids=["1x1", "5x37", "9x1030", "3x40000"])
def test_low_precision_weights_smoothing_soft_targets_and_scale(impl, dtype, shape):
    """Every feature of the full kernels, a float32 grad_scale array, and C = 40000 past the
    on-chip GPU paths (the streaming kernel)."""
    z, targets, weight = low_case(*shape, dtype, seed=11, weighted=True)
    targets[0] = -100
    check_low(impl, z, targets, weight, label_smoothing=0.15, grad_scale=np.array([0.25], np.float32))
    check_low(impl, z, targets, weight, grad_scale=-2.0)
    check_low(impl, z, targets, None, label_smoothing=1.0, compute_grad=True)
    z, q, weight = low_case(*shape, dtype, kind="soft", seed=13, weighted=True)
    check_low(impl, z, q)
    check_low(impl, z, q, weight, label_smoothing=0.3, grad_scale=0.5)


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
def test_low_precision_loss_only_and_empty_batch(impl, dtype):
    z, targets, weight = low_case(5, 300, dtype, seed=23, weighted=True)
    with_grad, _ = run(impl, z, targets, weight, label_smoothing=0.1)
    loss, grad = run(impl, z, targets, weight, label_smoothing=0.1, compute_grad=False)
    assert grad is None and loss.dtype == np.float32
    np.testing.assert_allclose(loss, with_grad, rtol=1e-6, atol=1e-6)
    loss, grad = run(impl, np.zeros((0, 5), dtype), np.zeros(0, np.int64))
    assert loss.shape == (0,) and loss.dtype == np.float32 and grad.shape == (0, 5) and grad.dtype == dtype


@pytest.mark.parametrize("impl,dtype", LOW_IMPLS)
def test_low_precision_masked_and_nan_logits(impl, dtype):
    z, targets, weight = low_case(3, 40, dtype, seed=37, weighted=True)
    targets[:] = [0, 5, 39]
    z[:, 10:20] = -np.inf
    loss, grad = check_low(impl, z, targets, weight)
    assert np.isfinite(loss).all() and not grad[:, 10:20].astype(np.float32).any()
    z[1, 3] = np.nan
    loss, grad = run(impl, z, targets)
    assert np.isfinite(loss[[0, 2]]).all() and np.isnan(loss[1]) and np.isnan(grad[1].astype(np.float32)).all()


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_cpu_low_precision_is_the_float32_impl_rounded_once(impl, dtype):
    """The CPU impls run the float32 kernel on widened copies: the same loss, the gradient's bits
    those of the float32 gradient rounded once."""
    for kind in ("hard", "soft"):
        z, targets, weight = low_case(9, 517, dtype, kind, seed=5, weighted=True)
        kw = dict(label_smoothing=0.1, grad_scale=np.array([0.5], np.float32))
        loss, grad = run(impl, z, targets, weight, **kw)
        wide_targets = targets.astype(np.float32) if kind == "soft" else targets
        loss32, grad32 = run(impl, z.astype(np.float32), wide_targets, weight.astype(np.float32), **kw)
        np.testing.assert_array_equal(loss, loss32)
        np.testing.assert_array_equal(grad.view(np.uint16), grad32.astype(dtype).view(np.uint16))


def test_low_precision_matches_torch_cross_entropy_on_the_cpu():
    """torch's F.cross_entropy on bfloat16 / float16 logits (reduction='none'): its loss comes back
    in the low dtype, ours in float32 (the engine rounds after reducing). Against torch in float32
    on the same 16-bit values: the loss to float32 rounding, the gradient within one rounding.
    Against torch's own 16-bit result: within the error of torch's 16-bit log-softmax (it rounds
    log-probabilities to the low dtype before the loss and the gradient use them): 3 u relative on
    the loss, 3 u of the largest gradient element of the row."""
    torch = pytest.importorskip("torch")
    for dtype, torch_dtype in ((BF16, torch.bfloat16), (F16, torch.float16)):
        z, targets, weight = low_case(16, 300, dtype, seed=3, weighted=True)
        targets[4] = -100
        u = UNIT_ROUNDOFF[dtype]

        def torch_run(tdtype):
            zt = torch.tensor(z.astype(np.float32)).to(tdtype).requires_grad_()
            wt = torch.tensor(weight.astype(np.float32)).to(tdtype)
            loss = torch.nn.functional.cross_entropy(zt, torch.tensor(targets), wt, reduction="none",
                                                     label_smoothing=0.1)
            loss.sum().backward()
            assert loss.dtype == tdtype
            return loss.detach().float().numpy().astype(np.float64), zt.grad.float().numpy().astype(np.float64)

        exact_loss, exact_grad = torch_run(torch.float32)
        low_loss, low_grad = torch_run(torch_dtype)
        for impl in CPU_IMPLS:
            loss, grad = run(impl, z, targets, weight, label_smoothing=0.1)
            np.testing.assert_allclose(loss, exact_loss, rtol=2e-6, atol=2e-6)
            assert (np.abs(grad.astype(np.float64) - exact_grad) <= u * np.abs(exact_grad) + 1e-7).all()
            assert (np.abs(loss - low_loss) <= 3 * u * np.abs(low_loss)).all()
            row_max = np.abs(low_grad).max(axis=1, keepdims=True)
            assert (np.abs(grad.astype(np.float64) - low_grad) <= 3 * u * row_max).all()


def test_low_precision_grad_scale_array_must_be_float32():
    z, targets, _ = low_case(3, 4, BF16, seed=47)
    for impl in CPU_IMPLS:
        with pytest.raises(KernelError, match=r"grad_scale .* accumulation dtype \(float32 for bfloat16 logits\)"):
            run(impl, z, targets, grad_scale=np.array([0.5], BF16))


# ---- numerical range --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(impl, dtype):
    rng = np.random.default_rng(31)
    c = 70
    rows = [
        rng.uniform(-1e4, 1e4, c),  # exp would overflow without the max shift
        rng.uniform(1e38, 3e38, c),  # near float32's top: differences still representable
        -rng.uniform(1e38, 3e38, c),
        rng.uniform(-1e-30, 1e-30, c),  # tiny: softmax is uniform
        np.full(c, 5e-39),  # float32 denormals
        np.full(c, 1e4),  # all equal: uniform
    ]
    z = np.array(rows).astype(dtype)
    targets = rng.integers(0, c, len(rows))
    for kw in ({}, dict(label_smoothing=0.1)):
        loss, grad = check(impl, z, targets, **kw)
        assert np.isfinite(loss).all() and np.isfinite(grad).all()
    q = make_case(len(rows), c, dtype, kind="soft", seed=32)[1]
    loss, grad = check(impl, z, q)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_logits_give_a_finite_loss(impl):
    """-inf logits (masked classes) away from the target: finite loss, zero gradient there (as torch)."""
    z, targets, weight = make_case(3, 40, np.float32, seed=37, weighted=True)
    targets[:] = [0, 5, 39]
    z[:, 10:20] = -np.inf
    loss, grad = run(impl, z, targets, weight)
    ref_loss, ref_grad = reference(z, targets, weight)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert not grad[:, 10:20].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_logits_propagate(impl):
    z, targets, _ = make_case(2, 9, np.float32, seed=41)
    z[1, 3] = np.nan
    loss, grad = run(impl, z, targets)
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(grad[1]).all() and np.isfinite(grad[0]).all()


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [5, -3, 1000])
def test_target_out_of_range_names_the_value(impl, bad):
    z, targets, _ = make_case(4, 5, np.float32, seed=43)
    targets[2] = bad
    with pytest.raises(KernelError, match=rf"{bad}\b.*outside the classes \[0, C\) = \[0, 5\)"):
        run(impl, z, targets)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_target_check_waits_for_a_sync_and_keeps_the_gradient_finite(impl):
    import cupy

    z, targets, _ = make_case(6, 5, np.float32, seed=44)
    targets[2] = 9
    with cupyx_no_sync():
        loss, grad = kernels.softmax_cross_entropy(cupy.asarray(z), cupy.asarray(targets), impl=impl)
    assert kernels.deferred.pending() >= 1
    with pytest.raises(KernelError, match=r"9\b.*outside the classes.*found on the GPU"):
        kernels.raise_deferred_errors()
    assert kernels.deferred.pending() == 0
    loss, grad = cupy.asnumpy(loss), cupy.asnumpy(grad)
    assert np.isnan(loss[2]) and np.all(grad[2] == 0)
    good = np.arange(6) != 2
    np_loss, np_grad = run("numpy", z[good], targets[good])
    np.testing.assert_allclose(loss[good], np_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[good], np_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_eager_checks_raise_at_the_call(impl):
    import cupy

    z, targets, _ = make_case(4, 5, np.float32, seed=45)
    targets[1] = -2
    previous = kernels.eager_checks()
    kernels.eager_checks(True)
    try:
        with pytest.raises(KernelError, match=r"-2\b.*outside the classes"):
            kernels.softmax_cross_entropy(cupy.asarray(z), cupy.asarray(targets), impl=impl)
    finally:
        kernels.eager_checks(previous)
    assert kernels.deferred.pending() == 0


def cupyx_no_sync():
    """cupy raises if anything inside waits for the device (a host sync)."""
    import cupyx

    return cupyx.allow_synchronize(False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_grad_scale_as_a_one_element_array_equals_the_number(impl, soft):
    z, targets, _ = make_case(9, 37, np.float64, kind="soft" if soft else "hard", seed=46)
    _, by_number = run(impl, z, targets, grad_scale=0.125)
    _, by_array = run(impl, z, targets, grad_scale=np.array([0.125]))
    np.testing.assert_array_equal(by_array, by_number)


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0], np.float32), np.array([1.0], np.float64),
                                 np.array([np.inf], np.float32)], ids=["two-elements", "wrong-dtype", "inf"])
def test_bad_grad_scale_array_is_refused(bad):
    z, targets, _ = make_case(3, 4, np.float32, seed=47)
    for impl in CPU_IMPLS:
        with pytest.raises(KernelError, match="grad_scale"):
            run(impl, z, targets, grad_scale=bad)


def test_host_check_names_the_row():
    z, targets, _ = make_case(4, 5, np.float32, seed=43)
    targets[3] = 7
    for impl in CPU_IMPLS:
        with pytest.raises(KernelError, match=r"targets\[3\] = 7 is outside"):
            run(impl, z, targets)


def _bad_calls():
    f32, f64 = np.float32, np.float64
    z = np.ones((3, 4), f32)
    t = np.zeros(3, np.int64)
    return [
        ((np.ones(4, f32), t[:1]), {}, "logits must be 2-D"),
        ((np.ones((3, 4), np.int64), t), {}, "only float32, float64, float16, bfloat16"),
        ((np.ones((3, 4), np.int8), t), {}, "only float32, float64, float16, bfloat16"),
        ((np.ones((3, 4), np.float16), np.ones((3, 4), f32)), {}, "must have the logits' dtype float16"),
        ((np.ones((3, 0), f32), t), {}, "at least one class"),
        ((z, np.zeros(3, np.uint8)), {}, "int32 or int64"),
        ((z, np.zeros(2, np.int64)), {}, r"shape \(N,\) = \(3,\)"),
        ((z, np.ones((3, 4), f64)), {}, "must have the logits' dtype float32"),
        ((z, np.ones((3, 5), f32)), {}, r"must have the logits' shape \(3, 4\)"),
        ((z, t, np.ones(4, f64)), {}, "weight must have the logits' dtype"),
        ((z, t, np.ones(5, f32)), {}, r"weight must have shape \(C,\) = \(4,\)"),
        ((np.ones((4, 3), f32).T, t), {}, "logits is not C-contiguous"),
        ((z, t), {"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\]"),
        ((z, t), {"grad_scale": float("nan")}, "grad_scale must be finite"),
        ((z, t), {"ignore_index": 1.5}, "ignore_index must be an int"),
        # beyond int64 (numba_cpu raised a raw OverflowError, numpy took it; PyTorch raises)
        ((z, t), {"ignore_index": 2**70}, r"ignore_index must be an int in the int64 range .* got 1180591620717411"),
        ((z, t), {"ignore_index": -2**63 - 1}, "ignore_index must be an int in the int64 range"),
        ((z, t), {"ignore_index": np.uint64(2**64 - 1)}, "ignore_index must be an int in the int64 range"),
        ((z, t), {"label_smoothing": 10**400}, "label_smoothing must be finite"),  # float() overflowed raw
        ((z, t), {"grad_scale": -10**400}, "grad_scale must be finite"),
        ((z, t), {"compute_grad": "yes"}, "compute_grad must be True or False"),
        ((z, [0, 1, 2]), {}, "targets must be a numpy or cupy array"),
    ]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("args,kw,message", _bad_calls())
def test_bad_inputs_are_named(impl, args, kw, message):
    fn = kernels.get("softmax_cross_entropy", impl)
    with pytest.raises(KernelError, match=message) as info:
        fn(*args, **kw)
    assert "softmax_cross_entropy" in str(info.value)


def test_error_lists_shapes_and_dtypes():
    z = np.ones((3, 4), np.float32)
    with pytest.raises(KernelError) as info:
        kernels.softmax_cross_entropy(z, np.zeros(3, np.int64), np.ones(4, np.float64), impl="numpy")
    text = str(info.value)
    assert "logits=numpy.ndarray(3, 4) float32" in text and "weight=numpy.ndarray(4,) float64" in text


# ---- the CUDA C++ launch plan (host side, no GPU needed) --------------------------------------


def _instantiated_kernels() -> set[str]:
    """extern "C" names the .cu file instantiates, expanded from its macro lines."""
    text = CU_FILE.read_text()
    names = set()
    for dt, g, k in re.findall(r"^SCE_WARP\(\w+, (\w+), (\d+), (\d+)\)", text, re.M):
        names.add(f"sce_warp_{dt}_g{g}_k{k}")
    for dt, k in re.findall(r"^SCE_BLOCK_LEAN\(\w+, (\w+), (\d+)\)", text, re.M):
        names |= {f"sce_block_lean_{dt}_k{k}_v", f"sce_block_lean_{dt}_k{k}_s"}
    for pack, dt, k in re.findall(r"^SCE_BLOCK_FULL_([VS])\(\w+, (\w+), (\d+)\)", text, re.M):
        names.add(f"sce_block_full_{dt}_k{k}_{pack.lower()}")
    for dt in re.findall(r"^SCE_STREAM\(\w+, (\w+)\)", text, re.M):
        names |= {f"sce_stream_{dt}_v", f"sce_stream_{dt}_s"}
    return names


def test_launch_plan_uses_instantiated_kernels_and_covers_the_row():
    from engine.kernels.cuda import softmax_cross_entropy as cu

    available = _instantiated_kernels()
    assert len(available) > 20
    used = set()
    for dtype in (np.float32, np.float64, F16, BF16):
        for c in [1, 2, 5, 31, 32, 33, 63, 100, 255, 256, 257, 511, 512, 513, 1000, 1024, 1025, 4096, 4099, 8191,
                  8192, 8193, 16383, 16384, 16385, 32767, 32768, 32769, 50257, 130000, 2**20]:
            for full in (False, True):
                for vec in (False, True):
                    if vec and c % cu.CONFIGS[np.dtype(dtype).name]["pack"]:
                        continue
                    name, threads, rows = cu.plan(dtype, c, full, vec)
                    assert name in available, name
                    used.add(name)
                    assert threads % 32 == 0 and 32 <= threads <= 1024
                    k = re.search(r"_k(\d+)", name)
                    if name.startswith("sce_warp"):
                        g = int(re.search(r"_g(\d+)", name).group(1))
                        assert g * int(k.group(1)) >= c and rows == threads // g
                    elif name.startswith("sce_block"):
                        assert threads * int(k.group(1)) >= c and rows == 1
                        assert threads <= (512 if "full" in name else 1024)
                    else:
                        assert threads <= 512 and rows == 1
    assert used == available  # no instantiation is dead code


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("c,vec", [(40, True), (37, False), (3000, True), (40000, True)])
def test_low_precision_launch_passes_float32_loss_scalars_and_scale(fake_cupy, dtype, c, vec):
    """The host side with a fake cupy: a 16-bit instance of the planned kernel, a float32 loss, float32
    1 - eps, eps / C and grad_scale, the gradient in the logits' dtype."""
    from engine.kernels.cuda import softmax_cross_entropy as cu

    z, q, weight = low_case(5, c, dtype, kind="soft", seed=1, weighted=True)
    args = [fake_cupy.on(0, a) for a in (z, q, weight)]
    loss, grad = cu.softmax_cross_entropy(*args, label_smoothing=0.1, grad_scale=0.5)
    (launch,) = fake_cupy.launches
    name, threads, rows = cu.plan(dtype, c, True, vec)
    assert launch.name == name and name in _instantiated_kernels() and f"_{cu.CONFIGS[dtype.name]['suffix']}_" in name
    assert launch.block == (threads,) and launch.grid == (-(-5 // rows),)
    assert loss.dtype == np.float32 and grad.dtype == dtype
    _, _, _, loss_arg, grad_arg, _, c_arg, _, one_minus_eps, eps_over_c, scale, flags = launch.args
    assert loss_arg is loss and grad_arg is grad and int(c_arg) == c
    assert type(one_minus_eps) is np.float32 and type(eps_over_c) is np.float32
    assert scale.dtype == np.float32 and float(scale.host[0]) == 0.5
    assert bool(flags & cu.SCE_VEC) == vec
    fake_cupy.launches.clear()
    with pytest.raises(KernelError, match=r"grad_scale .* accumulation dtype \(float32"):
        cu.softmax_cross_entropy(*args, grad_scale=fake_cupy.on(0, np.array([0.5], dtype)))


@pytest.mark.parametrize("dtype,acc_name", [(np.float32, "f32"), (np.float64, "f64"), (F16, "f32")])
def test_the_mean_denominator_is_counted_by_the_target_check_launch(fake_cupy, dtype, acc_name, monkeypatch):
    """denominator_out on the GPU: no launch of its own. The target-range pass counts the non-ignored
    rows into it and its last block writes the reciprocal to the array the row kernel reads as
    grad_scale (kernel names and argument order as in the .cu file)."""
    from engine.kernels.cuda import softmax_cross_entropy as cu

    monkeypatch.setattr(kernels.deferred, "_pending", [])  # the fake's target checks never reach a later test

    acc = np.float64 if dtype == np.float64 else np.float32
    z = fake_cupy.on(0, np.ones((6, 40), dtype))
    t = fake_cupy.on(0, np.array([1, -100, 3, 0, -100, 2], np.int64))
    denominator = fake_cupy.on(0, np.full(1, 7.0, acc))
    cu.softmax_cross_entropy(z, t, denominator_out=denominator)
    check, row = fake_cupy.launches
    assert check.name == f"sce_target_range_i64_{acc_name}" and check.name in _target_range_kernels()
    targets, n, ignore, bounds, count_into, scale, count = check.args
    assert targets is t and int(n) == 6 and int(ignore) == -100 and bounds.host.tolist()[2] == 0
    assert count_into is denominator and float(denominator.host[0]) == 0.0  # zeroed for the atomics
    assert int(count) == 1 and scale.dtype == acc and scale.shape == (1,)
    assert row.args[10] is scale  # the row kernel's grad_scale
    fake_cupy.launches.clear()
    cu.softmax_cross_entropy(z, t)  # without: the count flag is off
    assert int(fake_cupy.launches[0].args[-1]) == 0
    with pytest.raises(KernelError, match="denominator_out must be a one-element"):
        cu.softmax_cross_entropy(z, t, denominator_out=fake_cupy.on(0, np.zeros(1, np.int64)))


def _target_range_kernels() -> set[str]:
    return {f"sce_target_range_{i}_{a}" for i, a in re.findall(r"^SCE_TARGET_RANGE\([\w ]+, (\w+), \w+, (\w+)\)",
                                                                CU_FILE.read_text(), re.M)}


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu", pytest.param("cupy", marks=pytest.mark.gpu),
                                  pytest.param("numba_cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, F16])
def test_denominator_out_counts_the_rows_and_scales_the_gradient(impl, dtype):
    from tests.kernels.helpers import to_device, to_host

    rng = np.random.default_rng(2)
    acc = np.float64 if dtype == np.float64 else np.float32
    z = to_device(rng.standard_normal((9, 13)).astype(dtype), impl)
    targets = np.array([1, -100, 3, 0, 12, -100, 2, 5, -100], np.int64)
    t = to_device(targets, impl)
    denominator = to_device(np.full(1, np.nan, acc), impl)
    loss, grad = kernels.softmax_cross_entropy(z, t, denominator_out=denominator, impl=impl)
    ref_loss, ref_grad = kernels.softmax_cross_entropy(z, t, grad_scale=float(acc(1) / acc(6)), impl=impl)
    assert to_host(denominator).tolist() == [6.0]
    np.testing.assert_array_equal(to_host(loss), to_host(ref_loss))
    np.testing.assert_array_equal(to_host(grad), to_host(ref_grad))
    every = to_device(np.full(9, -100, np.int64), impl)  # every row ignored: 0, and a zero gradient
    _, grad = kernels.softmax_cross_entropy(z, every, denominator_out=denominator, impl=impl)
    assert to_host(denominator).tolist() == [0.0] and not to_host(grad).astype(np.float64).any()


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_denominator_out_is_for_unweighted_class_indices_only(impl):
    z = np.ones((3, 4), np.float32)
    t, den = np.array([0, 1, 2]), np.zeros(1, np.float32)
    with pytest.raises(KernelError, match="with class weights compute the 'mean' denominator outside"):
        kernels.softmax_cross_entropy(z, t, np.ones(4, np.float32), denominator_out=den, impl=impl)
    with pytest.raises(KernelError, match="with soft targets"):
        kernels.softmax_cross_entropy(z, np.full((3, 4), 0.25, np.float32), denominator_out=den, impl=impl)
    with pytest.raises(KernelError, match="grad_scale must then be 1, got 0.5"):
        kernels.softmax_cross_entropy(z, t, grad_scale=0.5, denominator_out=den, impl=impl)
    with pytest.raises(KernelError, match=r"denominator_out must be a one-element float32 array"):
        kernels.softmax_cross_entropy(z, t, denominator_out=np.zeros(1, np.float64), impl=impl)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("ignore_index", [2**70, -2**63 - 1])
def test_engine_cross_entropy_refuses_ignore_index_beyond_int64_on_both_paths(fused, ignore_index):
    """As the kernels (and PyTorch, which raises ValueError: KernelError is one)."""
    import engine
    import engine.functional as F

    logits, targets = engine.tensor(np.ones((3, 4), np.float32)), engine.tensor(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="ignore_index must be an int in the int64 range"):
        F.cross_entropy(logits, targets, ignore_index=ignore_index, fused=fused)

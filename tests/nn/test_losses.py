"""Losses: functional forms and modules vs NumPy float64 formulas written here, plus gradcheck."""

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import nn
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES

REDUCTIONS = ["mean", "sum", "none"]


def _reduce(values, reduction):
    return values.mean() if reduction == "mean" else values.sum() if reduction == "sum" else values


def _t(array, device="cpu", dtype=None, **kw):
    """float64 NumPy data as a float32 tensor (the engine's default), integers unchanged."""
    array = np.asarray(array)
    if dtype is None and array.dtype == np.float64:
        dtype = np.float32
    return engine.tensor(array, device=device, dtype=dtype, **kw)


def _log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# ---- regression losses -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_and_l1_match_numpy(rng, device, reduction):
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    mse = F.mse_loss(_t(x, device), _t(y, device), reduction=reduction)
    l1 = F.l1_loss(_t(x, device), _t(y, device), reduction=reduction)
    assert mse.dtype == np.float32 and mse.device == engine.device(device)
    np.testing.assert_allclose(mse.numpy(), _reduce((x - y) ** 2, reduction), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1.numpy(), _reduce(np.abs(x - y), reduction), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_and_l1_gradcheck(rng, reduction):
    x, y = engine.tensor(rng.standard_normal((4, 3))), engine.tensor(rng.standard_normal((4, 3)))
    assert engine.gradcheck(lambda a, b: F.mse_loss(a, b, reduction=reduction), [x, y])
    assert engine.gradcheck(lambda a, b: F.l1_loss(a, b, reduction=reduction), [x, y])


def test_mse_gradient_closed_form(rng):
    x = _t(rng.standard_normal(6), requires_grad=True)
    y = rng.standard_normal(6)
    F.mse_loss(x, _t(y)).backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * (x.numpy() - y) / 6, rtol=1e-5)


def test_elementwise_losses_refuse_shape_dtype_mismatch():
    with pytest.raises(ShapeError, match=r"mse_loss.*\(4, 1\).*\(4,\).*reshape"):
        F.mse_loss(engine.zeros(4, 1), engine.zeros(4))
    with pytest.raises(DTypeError, match="l1_loss"):
        F.l1_loss(engine.zeros(4), engine.zeros(4, dtype=engine.float64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.mse_loss(engine.zeros(4), engine.zeros(4), reduction="avg")


# ---- binary cross-entropy --------------------------------------------------------------------

def _bce_reference(p, y, w=None):
    values = -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))
    return values if w is None else values * w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_matches_numpy(rng, device, reduction, weighted):
    p = rng.uniform(0.05, 0.95, (6, 4))
    y = rng.uniform(0, 1, (6, 4))
    w = rng.uniform(0.5, 2, (4,)) if weighted else None
    out = F.binary_cross_entropy(_t(p, device), _t(y, device), None if w is None else _t(w, device), reduction)
    np.testing.assert_allclose(out.numpy(), _reduce(_bce_reference(p, y, w), reduction), rtol=1e-5, atol=1e-6)


def test_bce_gradcheck_input_target_weight(rng):
    p = engine.tensor(rng.uniform(0.1, 0.9, (3, 4)))
    y = engine.tensor(rng.uniform(0, 1, (3, 4)))
    w = engine.tensor(rng.uniform(0.5, 2, (3, 1)))
    for reduction in REDUCTIONS:
        assert engine.gradcheck(lambda a, b, c: F.binary_cross_entropy(a, b, c, reduction), [p, y, w])


def test_bce_saturated_probabilities_stay_finite():
    p = _t([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    y = _t([1.0, 0.0, 0.0, 1.0])
    loss = F.binary_cross_entropy(p, y, reduction="none")
    np.testing.assert_allclose(loss.numpy(), [100, 100, 0, 0])
    loss.sum().backward()
    assert np.isfinite(p.grad.numpy()).all()


def test_bce_rejects_values_outside_unit_interval():
    with pytest.raises(EngineError, match=r"binary_cross_entropy.*\[0, 1\].*with_logits"):
        F.binary_cross_entropy(_t([0.5, 1.5]), _t([0.0, 1.0]))


def _bce_logits_reference(x, y, w=None, pos_weight=None):
    log_sig = -np.logaddexp(0, -x)       # log sigmoid(x)
    log_one_minus = -np.logaddexp(0, x)  # log(1 - sigmoid(x))
    pw = 1.0 if pos_weight is None else pos_weight
    values = -(pw * y * log_sig + (1 - y) * log_one_minus)
    return values if w is None else values * w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_with_logits_matches_numpy(rng, device, reduction, pos_weighted):
    x = rng.standard_normal((5, 3)) * 4
    y = (rng.uniform(size=(5, 3)) > 0.5).astype(np.float64)
    w = rng.uniform(0.5, 2, (5, 1))
    pw = rng.uniform(0.5, 3, (3,)) if pos_weighted else None
    out = F.binary_cross_entropy_with_logits(_t(x, device), _t(y, device), _t(w, device), reduction,
                                             None if pw is None else _t(pw, device))
    expected = _reduce(_bce_logits_reference(x, y, w, pw), reduction)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bce_with_logits_gradcheck_all_inputs(rng):
    x = engine.tensor(rng.standard_normal((4, 3)) * 3)
    y = engine.tensor(rng.uniform(0, 1, (4, 3)))
    pw = engine.tensor(rng.uniform(0.5, 3, (3,)))
    w = engine.tensor(rng.uniform(0.5, 2, (4, 3)))
    for reduction in REDUCTIONS:
        assert engine.gradcheck(
            lambda a, b, c, d: F.binary_cross_entropy_with_logits(a, b, c, reduction, pos_weight=d), [x, y, w, pw])
    assert engine.gradcheck(lambda a, b: F.binary_cross_entropy_with_logits(a, b), [x, y])


def test_bce_with_logits_is_stable_for_huge_logits():
    x = _t([-200.0, -30.0, 30.0, 200.0, -10.0], requires_grad=True)
    y = _t([0.0, 0.0, 1.0, 1.0, 0.0])
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    expected = _bce_logits_reference(np.array([-200.0, -30, 30, 200, -10]), np.array([0.0, 0, 1, 1, 0]))
    # relative accuracy even where the loss is tiny (no cancellation)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-30)
    loss.sum().backward()
    assert np.isfinite(x.grad.numpy()).all()


def test_bce_with_logits_equals_bce_of_sigmoid(rng):
    x = rng.standard_normal(20)
    y = rng.uniform(0, 1, 20)
    a = F.binary_cross_entropy_with_logits(_t(x), _t(y)).item()
    b = F.binary_cross_entropy(engine.sigmoid(_t(x)), _t(y)).item()
    assert a == pytest.approx(b, rel=1e-5)


# ---- nll_loss and cross_entropy --------------------------------------------------------------

def _nll_reference(logp, target, weight=None, ignore_index=-100, reduction="mean"):
    """logp (N, C), target (N,)."""
    n, classes = logp.shape
    w = np.ones(classes) if weight is None else weight
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    row_w = w[safe] * valid
    values = -logp[np.arange(n), safe] * row_w
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.sum() / row_w.sum()


def _ce_reference(logits, target, weight=None, ignore_index=-100, reduction="mean", smoothing=0.0):
    """Cross-entropy for (N, C) logits with hard (N,) or soft (N, C) targets, float64."""
    n, classes = logits.shape
    logp = _log_softmax(logits.astype(np.float64))
    w = np.ones(classes) if weight is None else weight
    if target.ndim == 2:
        q = target * (1 - smoothing) + smoothing / classes
        values = -(logp * q * w).sum(axis=1)
        return values if reduction == "none" else values.sum() if reduction == "sum" else values.sum() / n
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    row_w = w[safe] * valid
    values = -(1 - smoothing) * logp[np.arange(n), safe] * row_w
    values -= smoothing / classes * (logp * w).sum(axis=1) * valid
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.sum() / row_w.sum()


def _hard_targets(rng, n, classes, ignore=True):
    target = rng.integers(0, classes, n)
    if ignore:
        target[[1, n - 2]] = -100
    return target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_matches_numpy(rng, device, reduction, weighted):
    logp = _log_softmax(rng.standard_normal((7, 5)))
    target = _hard_targets(rng, 7, 5)
    w = rng.uniform(0.2, 2, 5) if weighted else None
    out = F.nll_loss(_t(logp, device), _t(target, device), None if w is None else _t(w, device),
                     reduction=reduction)
    np.testing.assert_allclose(out.numpy(), _nll_reference(logp, target, w, -100, reduction), rtol=1e-5, atol=1e-6)


def test_nll_loss_spatial_and_unbatched_shapes(rng):
    logp = _log_softmax(rng.standard_normal((2, 4, 3, 5)), axis=1)  # (N, C, H, W)
    target = rng.integers(0, 4, (2, 3, 5))
    out = F.nll_loss(_t(logp), _t(target), reduction="none")
    expected = -np.take_along_axis(logp, target[:, None], axis=1)[:, 0]
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    single = F.nll_loss(_t(logp[0, :, 0, 0]), _t(np.int64(2)))
    assert single.item() == pytest.approx(-logp[0, 2, 0, 0], rel=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_gradcheck(rng, reduction):
    logp = engine.tensor(rng.standard_normal((6, 4)))
    target = engine.tensor(_hard_targets(rng, 6, 4))
    weight = engine.tensor(rng.uniform(0.5, 2, 4), dtype=engine.float64)
    assert engine.gradcheck(lambda x: F.nll_loss(x, target, weight, reduction=reduction), [logp])


def test_nll_loss_all_ignored_mean_is_nan_and_errors_name_the_problem():
    out = F.nll_loss(engine.zeros(3, 4), _t(np.full(3, -100)))
    assert np.isnan(out.item())
    with pytest.raises(EngineError, match=r"nll_loss: target 7 is out of range for 4 classes"):
        F.nll_loss(engine.zeros(3, 4), _t(np.array([0, 7, 1])))
    with pytest.raises(DTypeError, match=r"nll_loss: target must hold integer"):
        F.nll_loss(engine.zeros(3, 4), engine.zeros(3))
    with pytest.raises(ShapeError, match=r"nll_loss: target .* expected target shape \(3,\)"):
        F.nll_loss(engine.zeros(3, 4), _t(np.zeros(4, np.int64)))


def test_cross_entropy_equals_nll_of_log_softmax(rng):
    x = rng.standard_normal((6, 5))
    target = _hard_targets(rng, 6, 5)
    ce = F.cross_entropy(_t(x), _t(target), fused=False).item()
    nll = F.nll_loss(F.log_softmax(_t(x), 1), _t(target)).item()
    assert ce == pytest.approx(nll, rel=1e-6)


CE_CASES = [
    dict(),
    dict(weighted=True),
    dict(ignore=True),
    dict(weighted=True, ignore=True, smoothing=0.1),
    dict(smoothing=0.25),
    dict(soft=True),
    dict(soft=True, weighted=True, smoothing=0.2),
]


def _ce_case(rng, n=9, classes=7, weighted=False, ignore=False, smoothing=0.0, soft=False):
    logits = rng.standard_normal((n, classes)) * 3
    if soft:
        target = np.exp(_log_softmax(rng.standard_normal((n, classes))))
    else:
        target = _hard_targets(rng, n, classes, ignore)
    weight = rng.uniform(0.3, 2.0, classes) if weighted else None
    return logits, target, weight, smoothing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(sorted(c)) or "plain")
@pytest.mark.slow
def test_cross_entropy_fused_unfused_and_numpy_agree(rng, device, reduction, case):
    logits, target, weight, smoothing = _ce_case(rng, **case)
    expected = _ce_reference(logits, target, weight, -100, reduction, smoothing)
    results = {}
    for fused in (True, False):
        x = _t(logits, device, requires_grad=True)
        tgt = _t(target, device)
        w = None if weight is None else _t(weight, device)
        loss = F.cross_entropy(x, tgt, w, reduction=reduction, label_smoothing=smoothing, fused=fused)
        np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-5, atol=2e-6, err_msg=f"fused={fused}")
        loss.sum().backward()
        results[fused] = x.grad.numpy()
    np.testing.assert_allclose(results[True], results[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(sorted(c)) or "plain")
def test_cross_entropy_gradient_matches_numpy_closed_form(rng, case):
    """d(mean CE)/d logits = sum_c w_c q_c (softmax - onehot_c) / denominator, in float64."""
    logits, target, weight, eps = _ce_case(rng, **case)
    n, classes = logits.shape
    w = np.ones(classes) if weight is None else weight
    p = np.exp(_log_softmax(logits))
    if target.ndim == 2:
        q = target * (1 - eps) + eps / classes
        denominator = n
    else:
        valid = target != -100
        q = np.zeros((n, classes))
        q[np.arange(n)[valid], target[valid]] = 1 - eps
        q += (eps / classes) * valid[:, None]
        denominator = (w[np.where(valid, target, 0)] * valid).sum()
    weighted_q = q * w
    expected = (p * weighted_q.sum(axis=1, keepdims=True) - weighted_q) / denominator
    for fused in (True, False):
        x = _t(logits, requires_grad=True)
        tgt = _t(target)
        F.cross_entropy(x, tgt, None if weight is None else _t(weight), label_smoothing=eps, fused=fused).backward()
        np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=f"fused={fused}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.slow
def test_cross_entropy_gradcheck_float64(rng, reduction):
    logits = engine.tensor(rng.standard_normal((5, 4)))
    hard = engine.tensor(_hard_targets(rng, 5, 4))
    soft = engine.tensor(np.exp(_log_softmax(rng.standard_normal((5, 4)))), dtype=engine.float64)
    weight = engine.tensor(rng.uniform(0.5, 2, 4), dtype=engine.float64)
    for fused in (True, False):
        assert engine.gradcheck(lambda x: F.cross_entropy(x, hard, weight, reduction=reduction,
                                                          label_smoothing=0.1, fused=fused), [logits])
        assert engine.gradcheck(lambda x: F.cross_entropy(x, soft, reduction=reduction, fused=fused), [logits])


def test_cross_entropy_spatial_input_matches_numpy(rng):
    logits = rng.standard_normal((2, 5, 3))  # (N, C, L)
    target = rng.integers(0, 5, (2, 3))
    rows = logits.transpose(0, 2, 1).reshape(-1, 5)
    expected = _ce_reference(rows, target.reshape(-1), reduction="none").reshape(2, 3)
    for fused in (True, False):
        out = F.cross_entropy(_t(logits), _t(target), reduction="none", fused=fused)
        assert out.shape == (2, 3)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)


def test_cross_entropy_follows_the_global_fused_switch(rng):
    x = _t(rng.standard_normal((4, 3)), requires_grad=True)
    target = _t(np.array([0, 2, 1, 2]))
    assert type(F.cross_entropy(x, target).grad_fn).op_name() == "cross_entropy"
    with F.fused_kernels(False):
        assert type(F.cross_entropy(x, target).grad_fn).op_name() != "cross_entropy"


# ---- KL divergence ---------------------------------------------------------------------------

def _kl_reference(logq, target, reduction, log_target=False):
    if log_target:
        values = np.exp(target) * (target - logq)
    else:
        values = np.where(target > 0, target * np.log(np.where(target > 0, target, 1)), 0.0) - target * logq
    if reduction == "batchmean":
        return values.sum() / logq.shape[0]
    return _reduce(values, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS + ["batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_numpy(rng, device, reduction, log_target):
    logq = _log_softmax(rng.standard_normal((4, 6)))
    p = np.exp(_log_softmax(rng.standard_normal((4, 6))))
    p[0, 0] = 0.0  # a zero probability contributes exactly 0
    target = np.log(p + 1e-12) if log_target else p
    out = F.kl_div(_t(logq, device), _t(target, device), reduction=reduction, log_target=log_target)
    expected = _kl_reference(logq, target, reduction, log_target)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_kl_div_batchmean_is_the_mathematical_kl(rng):
    q = np.exp(_log_softmax(rng.standard_normal((3, 5))))
    p = np.exp(_log_softmax(rng.standard_normal((3, 5))))
    kl_per_row = (p * np.log(p / q)).sum(axis=1)
    out = F.kl_div(_t(np.log(q)), _t(p), reduction="batchmean")
    assert out.item() == pytest.approx(kl_per_row.mean(), rel=1e-5)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_gradcheck_input_and_target(rng, log_target):
    logq = engine.tensor(_log_softmax(rng.standard_normal((3, 4))))
    p = np.exp(_log_softmax(rng.standard_normal((3, 4))))
    target = engine.tensor(np.log(p) if log_target else p, dtype=engine.float64)
    for reduction in REDUCTIONS + ["batchmean"]:
        assert engine.gradcheck(lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target),
                                [logq, target])


def test_kl_div_zero_target_gives_finite_gradients():
    logq = _t([-1.0, -0.5], requires_grad=True)
    target = _t([0.0, 1.0], requires_grad=True)
    F.kl_div(logq, target, reduction="sum").backward()
    np.testing.assert_allclose(logq.grad.numpy(), [0.0, -1.0])
    assert np.isfinite(target.grad.numpy()).all()


# ---- loss modules ----------------------------------------------------------------------------

def test_loss_modules_equal_their_functional_forms(rng):
    x = _t(rng.standard_normal((6, 4)))
    y = _t(rng.standard_normal((6, 4)))
    probs = _t(rng.uniform(0.1, 0.9, (6, 4)))
    labels01 = _t((rng.uniform(size=(6, 4)) > 0.5).astype(np.float32))
    classes = _t(_hard_targets(rng, 6, 4))
    w = _t(rng.uniform(0.5, 2, 4))
    logp = F.log_softmax(x, 1)
    p = F.softmax(y, 1)
    pairs = [
        (nn.MSELoss(reduction="sum")(x, y), F.mse_loss(x, y, "sum")),
        (nn.L1Loss()(x, y), F.l1_loss(x, y)),
        (nn.BCELoss(weight=w)(probs, labels01), F.binary_cross_entropy(probs, labels01, w)),
        (nn.BCEWithLogitsLoss(pos_weight=w)(x, labels01),
         F.binary_cross_entropy_with_logits(x, labels01, pos_weight=w)),
        (nn.NLLLoss(weight=w, reduction="none")(logp, classes), F.nll_loss(logp, classes, w, reduction="none")),
        (nn.KLDivLoss(reduction="batchmean")(logp, p), F.kl_div(logp, p, "batchmean")),
        (nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, classes),
         F.cross_entropy(x, classes, w, label_smoothing=0.1)),
    ]
    for module_value, functional_value in pairs:
        np.testing.assert_array_equal(module_value.numpy(), functional_value.numpy())


def test_cross_entropy_loss_module_trains_logits(rng):
    logits = _t(rng.standard_normal((8, 3)), requires_grad=True)
    target = _t(rng.integers(0, 3, 8))
    loss = nn.CrossEntropyLoss()(logits, target)
    loss.backward()
    p = np.exp(_log_softmax(logits.numpy().astype(np.float64)))
    onehot = np.eye(3)[target.numpy()]
    np.testing.assert_allclose(logits.grad.numpy(), (p - onehot) / 8, rtol=1e-4, atol=1e-7)


def test_loss_module_weights_are_buffers_and_options_validated():
    criterion = nn.CrossEntropyLoss(weight=engine.ones(3))
    assert list(criterion.state_dict()) == ["weight"]
    assert repr(nn.MSELoss(reduction="sum")) == "MSELoss(reduction='sum')"
    with pytest.raises(ValueError, match="KLDivLoss: reduction"):
        nn.KLDivLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=1.5)


def _cross_entropy_cases():
    """(input, target, keyword arguments) for cross_entropy's input checks: common calls and edges."""
    rng = np.random.default_rng(0)
    z = engine.tensor(rng.standard_normal((6, 4)).astype(np.float32), requires_grad=True)
    t = engine.tensor(np.array([0, 3, 1, -100, 2, 2]))
    return {
        "common": (z, t, {}),
        "float64": (z.double(), t, {}),
        "bfloat16": (z.to(engine.bfloat16), t, {}),
        "smoothing, sum": (z, t, {"label_smoothing": 0.2, "reduction": "sum"}),
        "ignore 3": (z, engine.tensor(np.array([0, 3, 1, 1, 2, 2])), {"ignore_index": 3}),
        "bad index": (z, engine.tensor(np.array([0, 4, 1, 1, 2, 2])), {}),
        "negative index": (z, engine.tensor(np.array([0, -1, 1, 1, 2, 2])), {}),
        "int32 target": (z, engine.tensor(np.array([0, 3, 1, 1, 2, 2], np.int32)), {}),
        "short target": (z, t[:5], {}),
        "strided logits": (engine.tensor(rng.standard_normal((6, 8)).astype(np.float32))[:, ::2], t, {}),
        "weight": (z, t, {"weight": engine.ones(4)}),
        "bad reduction": (z, t, {"reduction": "average"}),
        "NaN smoothing": (z, t, {"label_smoothing": float("nan")}),
        "bool ignore_index": (z, t, {"ignore_index": True}),
        "huge ignore_index": (z, t, {"ignore_index": 2**63}),
        "soft target": (z, engine.full((6, 4), 0.25), {}),
    }


@pytest.mark.parametrize("case", list(_cross_entropy_cases()))
def test_cross_entropy_common_call_checks_agree_with_the_full_checks(case, monkeypatch):
    """_common_rows (one pass for the common call) returns what the full checks return, or steps aside."""
    import importlib

    losses = importlib.import_module("engine.functional.losses")
    z, t, kw = _cross_entropy_cases()[case]
    args = (z, t, kw.get("weight"), kw.get("reduction", "mean"), kw.get("label_smoothing", 0.0),
            kw.get("ignore_index", -100))

    def outcome():
        try:
            logits, targets, weight = losses._cross_entropy_inputs(*args)
        except Exception as error:  # noqa: BLE001 - the error itself is what is compared
            return type(error), str(error)
        return logits, targets.dtype, targets.tobytes(), weight

    def same(a, b):  # the logits: the input itself, or equal copies (a strided input is cloned)
        if not isinstance(a[0], engine.Tensor):
            return a[0] == b[0]
        return a[0] is b[0] or (a[0] is not z and b[0] is not z and a[0].numpy().tobytes() == b[0].numpy().tobytes())

    fast = outcome()
    monkeypatch.setattr(losses, "_common_rows", lambda *a: None)
    full = outcome()
    assert same(fast, full) and fast[1:] == full[1:], (fast, full)
    if case in ("common", "float64", "bfloat16", "smoothing, sum", "ignore 3"):  # not a timing: taken at all
        monkeypatch.undo()
        assert losses._common_rows(*args) is not None, case

"""Gradient clipping, L1/L2 penalties and parameter vectors vs NumPy formulas."""

import math

import numpy as np
import pytest

import engine
from engine import nn
from engine.errors import GradError, ShapeError
from tests.conftest import DEVICES


def _params_with_grads(rng, device, shapes=((3, 4), (5,), (2, 2, 2))):
    params = []
    for shape in shapes:
        p = nn.Parameter(engine.tensor(rng.standard_normal(shape).astype(np.float32), device=device))
        p.grad = engine.tensor(rng.standard_normal(shape).astype(np.float32) * 3, device=device)
        params.append(p)
    return params


def _p_norm(values, p):
    return np.abs(values).max() if math.isinf(p) else (np.abs(values) ** p).sum() ** (1 / p)


def _flat_grads(params):
    return np.concatenate([p.grad.numpy().astype(np.float64).ravel() for p in params])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_clip_grad_norm_matches_numpy(rng, device, norm_type):
    params = _params_with_grads(rng, device)
    flat = _flat_grads(params)
    expected_norm = _p_norm(flat, norm_type)
    max_norm = expected_norm / 4
    total = nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    assert isinstance(total, engine.Tensor) and total.shape == () and total.device == engine.device(device)
    assert total.item() == pytest.approx(expected_norm, rel=1e-5)
    scale = max_norm / (expected_norm + 1e-6)
    np.testing.assert_allclose(_flat_grads(params), flat * scale, rtol=1e-5)
    assert _p_norm(_flat_grads(params), norm_type) == pytest.approx(max_norm, rel=1e-4)


def test_clip_grad_norm_leaves_small_gradients_alone(rng):
    params = _params_with_grads(rng, "cpu")
    before = _flat_grads(params)
    total = nn.utils.clip_grad_norm_(params, max_norm=1e6)
    assert total.item() == pytest.approx(np.linalg.norm(before), rel=1e-5)
    np.testing.assert_array_equal(_flat_grads(params), before)


def test_clip_grad_norm_skips_missing_grads_accepts_one_tensor_and_dedups(rng):
    a, b = _params_with_grads(rng, "cpu", ((4,), (3,)))
    frozen = nn.Parameter(engine.ones(2))
    expected = np.linalg.norm(_flat_grads([a, b]))
    total = nn.utils.clip_grad_norm_([a, b, a, frozen], max_norm=expected / 2)  # `a` twice: clipped once
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert np.linalg.norm(_flat_grads([a, b])) == pytest.approx(expected / 2, rel=1e-4)
    single = nn.utils.clip_grad_norm_(a, max_norm=1e6)
    assert single.item() == pytest.approx(np.linalg.norm(a.grad.numpy()), rel=1e-5)
    assert nn.utils.clip_grad_norm_([frozen], 1.0).item() == 0.0


def test_clip_grad_norm_nonfinite_and_bad_norm_type():
    p = nn.Parameter(engine.ones(3))
    p.grad = engine.tensor([1.0, np.inf, 0.0])
    with pytest.raises(GradError, match="clip_grad_norm_: the total 2.0-norm of the gradients is inf"):
        nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="norm_type must be a real number or"):
        nn.utils.clip_grad_norm_([p], 1.0, norm_type=float("nan"))


def test_clip_grad_norm_after_backward_on_a_model(rng):
    model = nn.Linear(3, 2)
    x = engine.tensor(rng.standard_normal((16, 3)).astype(np.float32)) * 100.0
    model(x).sum().backward()
    total = nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert total.item() > 0.5
    assert np.linalg.norm(_flat_grads(list(model.parameters()))) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_value(rng, device):
    params = _params_with_grads(rng, device)
    flat = _flat_grads(params)
    assert nn.utils.clip_grad_value_(params, 0.5) is None
    np.testing.assert_allclose(_flat_grads(params), np.clip(flat, -0.5, 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        nn.utils.clip_grad_value_(params, -1.0)


def test_penalties_values_and_gradients(rng):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    w_np = [w.numpy().astype(np.float64) for w in weights]
    l1 = nn.utils.l1_penalty(weights)
    l2 = nn.utils.l2_penalty(weights)
    assert l1.shape == () and l1.item() == pytest.approx(sum(np.abs(w).sum() for w in w_np), rel=1e-5)
    assert l2.item() == pytest.approx(sum((w ** 2).sum() for w in w_np), rel=1e-5)
    (0.5 * l1 + 0.25 * l2).backward()
    for w, ref in zip(weights, w_np):
        np.testing.assert_allclose(w.grad.numpy(), 0.5 * np.sign(ref) + 0.5 * ref, rtol=1e-5)
    assert all(p.grad is None for name, p in model.named_parameters() if name.endswith("bias"))


def test_half_lambda_l2_penalty_gradient_is_sgd_weight_decay(rng):
    """d/dp [lam / 2 * sum p^2] = lam * p: the term SGD's weight_decay=lam adds to the gradient."""
    lam = 0.01
    p = nn.Parameter(engine.tensor(rng.standard_normal(5).astype(np.float32)))
    (lam / 2 * nn.utils.l2_penalty([p])).backward()
    np.testing.assert_allclose(p.grad.numpy(), lam * p.numpy(), rtol=1e-6)


def test_penalty_of_no_parameters_is_zero_and_shared_counted_once():
    assert nn.utils.l2_penalty([]).item() == 0.0
    p = nn.Parameter(engine.tensor([1.0, -2.0]))
    assert nn.utils.l1_penalty([p, p]).item() == 3.0


def test_parameters_to_vector_round_trip(rng):
    model = nn.Linear(3, 2)
    vec = nn.utils.parameters_to_vector(model.parameters())
    expected = np.concatenate([model.weight.numpy().ravel(), model.bias.numpy()])
    np.testing.assert_array_equal(vec.numpy(), expected)
    new = engine.tensor(np.arange(8, dtype=np.float32))
    nn.utils.vector_to_parameters(new, model.parameters())
    np.testing.assert_array_equal(model.weight.numpy(), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(model.bias.numpy(), [6, 7])
    with pytest.raises(ShapeError, match="8 elements"):
        nn.utils.vector_to_parameters(engine.zeros(5), model.parameters())

"""Optimizers against textbook NumPy float64 formulas, and their flat-buffer machinery.

Each reference below is written from the update rule (PyTorch's documented semantics), in
float64, one parameter at a time, with its own step count; the engine runs with both the fused
(flat buffers, one kernel launch per bucket) and the unfused path.
"""

import numpy as np
import pytest

import engine
from engine import kernels
from engine.errors import EngineError, GradError
from engine.io import load, save
from engine.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from tests.conftest import DEVICES

STEPS = 50
SHAPES = [(3, 4), (5,), (), (0,), (2, 1, 3)]


# ---- textbook references (float64) ------------------------------------------------------------

class SGDRef:
    def __init__(self, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
        self.lr, self.mu, self.tau, self.wd, self.nesterov, self.maximize = (lr, momentum, dampening, weight_decay,
                                                                              nesterov, maximize)

    def init(self, p):
        return {"b": None}

    def update(self, p, g, s, t):
        g = -g if self.maximize else g
        g = g + self.wd * p
        if self.mu:
            s["b"] = g.copy() if s["b"] is None else self.mu * s["b"] + (1 - self.tau) * g
            g = g + self.mu * s["b"] if self.nesterov else s["b"]
        return p - self.lr * g


class AdamRef:
    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                 decoupled=False):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.maximize, self.decoupled = amsgrad, maximize, decoupled

    def init(self, p):
        return {"m": np.zeros_like(p), "v": np.zeros_like(p), "vmax": np.zeros_like(p)}

    def update(self, p, g, s, t):
        g = -g if self.maximize else g
        if self.decoupled:
            p = p * (1 - self.lr * self.wd)
        else:
            g = g + self.wd * p
        s["m"] = self.b1 * s["m"] + (1 - self.b1) * g
        s["v"] = self.b2 * s["v"] + (1 - self.b2) * g * g
        s["vmax"] = np.maximum(s["vmax"], s["v"])
        m_hat = s["m"] / (1 - self.b1 ** t)
        v_hat = (s["vmax"] if self.amsgrad else s["v"]) / (1 - self.b2 ** t)
        return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class AdagradRef:
    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 maximize=False):
        self.lr, self.decay, self.wd, self.s0, self.eps, self.maximize = (lr, lr_decay, weight_decay,
                                                                           initial_accumulator_value, eps, maximize)

    def init(self, p):
        return {"sum": np.full_like(p, self.s0)}

    def update(self, p, g, s, t):
        g = -g if self.maximize else g
        g = g + self.wd * p
        s["sum"] = s["sum"] + g * g
        return p - self.lr / (1 + (t - 1) * self.decay) * g / (np.sqrt(s["sum"]) + self.eps)


class RMSpropRef:
    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False):
        self.lr, self.alpha, self.eps, self.wd, self.mu, self.centered, self.maximize = (
            lr, alpha, eps, weight_decay, momentum, centered, maximize)

    def init(self, p):
        return {"v": np.zeros_like(p), "gbar": np.zeros_like(p), "b": np.zeros_like(p)}

    def update(self, p, g, s, t):
        g = -g if self.maximize else g
        g = g + self.wd * p
        s["v"] = self.alpha * s["v"] + (1 - self.alpha) * g * g
        s["gbar"] = self.alpha * s["gbar"] + (1 - self.alpha) * g
        denom = np.sqrt(s["v"] - s["gbar"] ** 2 if self.centered else s["v"]) + self.eps
        if self.mu:
            s["b"] = self.mu * s["b"] + g / denom
            return p - self.lr * s["b"]
        return p - self.lr * g / denom


CASES = [
    pytest.param(SGD, dict(lr=0.05), SGDRef(0.05), id="sgd"),
    pytest.param(SGD, dict(lr=0.05, weight_decay=0.1), SGDRef(0.05, weight_decay=0.1), id="sgd-wd"),
    pytest.param(SGD, dict(lr=0.05, momentum=0.9), SGDRef(0.05, momentum=0.9), id="sgd-momentum"),
    pytest.param(SGD, dict(lr=0.05, momentum=0.8, dampening=0.3), SGDRef(0.05, 0.8, 0.3), id="sgd-dampening"),
    pytest.param(SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                 SGDRef(0.05, 0.9, weight_decay=0.01, nesterov=True), id="sgd-nesterov-wd"),
    pytest.param(SGD, dict(lr=0.02, momentum=0.5, maximize=True), SGDRef(0.02, 0.5, maximize=True),
                 id="sgd-maximize"),
    pytest.param(Adam, dict(lr=0.01), AdamRef(0.01), id="adam"),
    pytest.param(Adam, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                 AdamRef(0.01, (0.8, 0.95), 1e-6, weight_decay=0.1), id="adam-wd"),
    pytest.param(Adam, dict(lr=0.01, amsgrad=True), AdamRef(0.01, amsgrad=True), id="adam-amsgrad"),
    pytest.param(Adam, dict(lr=0.01, maximize=True), AdamRef(0.01, maximize=True), id="adam-maximize"),
    pytest.param(AdamW, dict(lr=0.01, weight_decay=0.1), AdamRef(0.01, weight_decay=0.1, decoupled=True),
                 id="adamw"),
    pytest.param(AdamW, dict(lr=0.01, amsgrad=True), AdamRef(0.01, weight_decay=1e-2, amsgrad=True, decoupled=True),
                 id="adamw-amsgrad-default-wd"),
    pytest.param(Adagrad, dict(lr=0.1), AdagradRef(0.1), id="adagrad"),
    pytest.param(Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1), AdagradRef(0.1, 0.05, 0.1),
                 id="adagrad-lr_decay-wd"),
    pytest.param(Adagrad, dict(lr=0.1, initial_accumulator_value=0.5, maximize=True),
                 AdagradRef(0.1, initial_accumulator_value=0.5, maximize=True), id="adagrad-init-maximize"),
    pytest.param(RMSprop, dict(lr=0.01), RMSpropRef(0.01), id="rmsprop"),
    pytest.param(RMSprop, dict(lr=0.01, centered=True), RMSpropRef(0.01, centered=True), id="rmsprop-centered"),
    pytest.param(RMSprop, dict(lr=0.01, momentum=0.9, alpha=0.9), RMSpropRef(0.01, 0.9, momentum=0.9),
                 id="rmsprop-momentum"),
    pytest.param(RMSprop, dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1, maximize=True),
                 RMSpropRef(0.01, centered=True, momentum=0.5, weight_decay=0.1, maximize=True),
                 id="rmsprop-centered-momentum-wd-maximize"),
]


# ---- drivers ----------------------------------------------------------------------------------

def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in SHAPES]


def grad_fn_for(seed=1, steps=STEPS, shapes=SHAPES):
    """g = 0.5 p + noise_t: depends on the parameter, so any error in an update compounds."""
    rng = np.random.default_rng(seed)
    noise = [[rng.standard_normal(shape) for shape in shapes] for _ in range(steps)]
    return lambda t, i, p: np.asarray(0.5 * p + noise[t][i])


def always(t, i):
    return True


def reference_run(ref, params, grad_fn, steps=STEPS, active=always):
    params = [np.array(p, dtype=np.float64) for p in params]
    states, counts = [ref.init(p) for p in params], [0] * len(params)
    for t in range(steps):
        for i, p in enumerate(params):
            if active(t, i):
                counts[i] += 1
                params[i] = ref.update(p, grad_fn(t, i, p), states[i], counts[i])
    return params, counts


def make_tensors(params, dtype, device):
    return [engine.tensor(np.asarray(p, dtype=dtype), device=device, requires_grad=True) for p in params]


def set_grads(tensors, grad_fn, t, active=always):
    for i, x in enumerate(tensors):
        if active(t, i):
            x.grad = engine.tensor(grad_fn(t, i, x.numpy().astype(np.float64)), dtype=x.dtype, device=x.device)
        else:
            x.grad = None


def engine_run(opt, tensors, grad_fn, steps=STEPS, active=always, start=0):
    for t in range(start, start + steps):
        set_grads(tensors, grad_fn, t, active)
        opt.step()
    return [x.numpy() for x in tensors]


def assert_params_close(got, want, rtol, atol):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"param {i}"
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=rtol, atol=atol, err_msg=f"param {i}")


# ---- the update rules -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("opt_cls, kwargs, ref", CASES)
def test_update_matches_textbook_formula_float64(opt_cls, kwargs, ref, fused, device):
    params, grad_fn = initial_params(), grad_fn_for()
    want, _ = reference_run(ref, params, grad_fn)
    tensors = make_tensors(params, np.float64, device)
    got = engine_run(opt_cls(tensors, fused=fused, **kwargs), tensors, grad_fn)
    assert_params_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(x.dtype == np.float64 for x in tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls, kwargs, ref", CASES)
def test_update_matches_textbook_formula_float32(opt_cls, kwargs, ref, device):
    params, grad_fn = initial_params(), grad_fn_for()
    want, _ = reference_run(ref, params, grad_fn)
    tensors = make_tensors(params, np.float32, device)
    opt = opt_cls(tensors, **kwargs)
    got = engine_run(opt, tensors, grad_fn)
    assert_params_close(got, want, rtol=2e-4, atol=2e-5)
    assert all(x.dtype == np.float32 for x in tensors)  # no promotion of params ...
    for entry in opt.state.values():  # ... nor of the state
        assert all(v.dtype == np.float32 for k, v in entry.items() if k != "step")


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("opt_cls, kwargs, ref", CASES)
def test_fused_matches_unfused_float32(opt_cls, kwargs, ref, impl, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNEL_IMPL", impl)
    params, grad_fn = initial_params(3), grad_fn_for(4)
    runs = []
    for fused in (True, False):
        tensors = make_tensors(params, np.float32, "cpu")
        runs.append(engine_run(opt_cls(tensors, fused=fused, **kwargs), tensors, grad_fn))
    for fused_p, unfused_p in zip(*runs):
        np.testing.assert_allclose(fused_p, unfused_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_param_groups_use_their_own_hyperparameters(fused, device):
    params, grad_fn = initial_params(), grad_fn_for()
    tensors = make_tensors(params, np.float64, device)
    opt = SGD([{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.01, "momentum": 0.5}], lr=0.1, momentum=0.9,
              fused=fused)
    got = engine_run(opt, tensors, grad_fn)
    want_a, _ = reference_run(SGDRef(0.1, 0.9), params, grad_fn)
    want_b, _ = reference_run(SGDRef(0.01, 0.5), params, grad_fn)
    assert_params_close(got[:2], want_a[:2], rtol=1e-10, atol=1e-12)
    assert_params_close(got[2:], want_b[2:], rtol=1e-10, atol=1e-12)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("opt_cls, kwargs, ref", [CASES[4], CASES[8], CASES[13], CASES[18]])
def test_none_grads_are_skipped_and_their_state_does_not_advance(opt_cls, kwargs, ref, fused, device):
    params, grad_fn = initial_params(), grad_fn_for()

    def active(t, i):  # param 1 gets a grad every third step, param 2 never after step 10
        return (i != 1 or t % 3 == 0) and (i != 2 or t < 10)

    want, counts = reference_run(ref, params, grad_fn, active=active)
    tensors = make_tensors(params, np.float64, device)
    opt = opt_cls(tensors, fused=fused, **kwargs)
    got = engine_run(opt, tensors, grad_fn, active=active)
    assert_params_close(got, want, rtol=1e-10, atol=1e-12)
    if opt_cls is not SGD:
        assert [opt.state[x]["step"] for x in tensors] == counts


def test_a_parameter_never_given_a_grad_has_no_state_and_does_not_move():
    a, b = make_tensors([np.ones(3), np.arange(4.0)], np.float32, "cpu")
    opt = Adam([a, b], lr=0.1)
    for _ in range(3):
        a.grad, b.grad = engine.ones(3), None
        opt.step()
    np.testing.assert_array_equal(b.numpy(), np.arange(4.0, dtype=np.float32))
    assert b not in opt.state and opt.state[a]["step"] == 3
    assert list(opt.state_dict()["state"]) == [0]


# ---- one launch per group, device and dtype ---------------------------------------------------

def count_calls(monkeypatch, kernel):
    calls = []
    original = getattr(kernels, kernel)

    def counting(*args, **kw):
        calls.append(args[0].size)
        return original(*args, **kw)

    monkeypatch.setattr(kernels, kernel, counting)
    return calls


def aligned_span(sizes, itemsize):
    """Elements one launch covers: params each start 256 bytes aligned, padding between them."""
    step, end = 256 // itemsize, 0
    for n in sizes:
        end = -(-end // step) * step + n
    return end


def test_one_kernel_launch_per_group_and_dtype(monkeypatch):
    calls = count_calls(monkeypatch, "adam_step")
    p32 = make_tensors(initial_params(), np.float32, "cpu")
    p64 = make_tensors(initial_params(), np.float64, "cpu")
    head = make_tensors([np.ones(7)], np.float32, "cpu")
    opt = Adam([{"params": p32 + p64}, {"params": head, "lr": 0.1}])
    grad_fn = grad_fn_for(shapes=SHAPES * 2 + [(7,)])
    for t in range(3):
        set_grads(p32 + p64 + head, grad_fn, t)
        opt.step()
    sizes = [int(np.prod(s)) for s in SHAPES]
    # group 0: a float32 and a float64 bucket; group 1: one
    assert calls == [aligned_span(sizes, 4), aligned_span(sizes, 8), 7] * 3


def test_none_grads_split_the_launch_into_runs(monkeypatch):
    calls = count_calls(monkeypatch, "adam_step")
    tensors = make_tensors([np.ones(2), np.ones(3), np.ones(4)], np.float32, "cpu")
    opt = Adam(tensors)
    grad_fn = grad_fn_for(shapes=[(2,), (3,), (4,)])
    set_grads(tensors, grad_fn, 0)
    opt.step()
    set_grads(tensors, grad_fn, 1, active=lambda t, i: i != 1)
    opt.step()  # params 0 and 2 are not adjacent: two launches
    set_grads(tensors, grad_fn, 2)
    opt.step()  # step counts now 3, 2, 3: three runs
    assert calls == [aligned_span([2, 3, 4], 4), 2, 4, 2, 3, 4]


# ---- gradients: zero_grad, in-place accumulation, closures --------------------------------------

def quadratic_loss(tensors, targets):
    loss = None
    for x, target in zip(tensors, targets):
        term = ((x - target) * (x - target)).sum()
        loss = term if loss is None else loss + term
    return loss


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_in_place_accumulates_into_the_flat_buffer_and_matches_set_to_none(device):
    params = initial_params()
    targets = [engine.tensor(np.full(s, 0.5), dtype=np.float32, device=device) for s in SHAPES]
    results = []
    for set_to_none in (True, False):
        tensors = make_tensors(params, np.float32, device)
        opt = Adam(tensors, lr=0.05)
        for _ in range(5):
            opt.zero_grad(set_to_none=set_to_none)
            quadratic_loss(tensors, targets).backward()
            quadratic_loss(tensors, targets).backward()  # accumulates: grads are doubled
            opt.step()
        results.append([x.numpy() for x in tensors])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_zero_grad_keeps_grad_objects_zeroes_them_and_leaves_none_alone():
    a, b = make_tensors([np.ones(3), np.ones(2)], np.float32, "cpu")
    opt = SGD([a, b], lr=0.1)
    a.grad = engine.ones(3)
    held = a.grad
    opt.zero_grad(set_to_none=False)
    assert a.grad is held and b.grad is None
    np.testing.assert_array_equal(held.numpy(), np.zeros(3, np.float32))
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_a_held_old_grad_is_not_overwritten_by_later_steps():
    (a,) = make_tensors([np.ones(3)], np.float32, "cpu")
    opt = SGD([a], lr=0.1)
    a.grad = engine.tensor([1.0, 2.0, 3.0])
    opt.step()
    old = a.grad
    opt.zero_grad()
    a.grad = engine.tensor([7.0, 8.0, 9.0])
    opt.step()
    np.testing.assert_array_equal(old.numpy(), np.array([1, 2, 3], np.float32))


def test_step_runs_the_closure_with_grad_enabled_and_returns_its_loss():
    (x,) = make_tensors([np.array([3.0, -1.0])], np.float32, "cpu")
    opt = SGD([x], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    with engine.no_grad():
        loss = opt.step(closure)
    assert float(loss) == pytest.approx(10.0)
    np.testing.assert_allclose(x.numpy(), [1.5, -0.5])  # x - 0.25 * 2x


# ---- parameters whose ._data gets rebound (Module.to(), p._data = ...) -----------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_rebinding_param_data_keeps_training_identical(fused):
    params, grad_fn = initial_params(), grad_fn_for()
    straight = make_tensors(params, np.float32, "cpu")
    want = engine_run(Adam(straight, lr=0.01, amsgrad=True, fused=fused), straight, grad_fn)
    tensors = make_tensors(params, np.float32, "cpu")
    opt = Adam(tensors, lr=0.01, amsgrad=True, fused=fused)
    engine_run(opt, tensors, grad_fn, steps=20)
    for x in tensors:
        x._data = x._data.copy()  # what a Module.to() or a model load that assigns arrays does
    got = engine_run(opt, tensors, grad_fn, steps=STEPS - 20, start=20)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_dtype_change_of_the_params_carries_the_state_over():
    params, grad_fn = initial_params(), grad_fn_for()
    tensors = make_tensors(params, np.float32, "cpu")
    opt = Adam(tensors, lr=0.01)
    engine_run(opt, tensors, grad_fn, steps=10)
    before = {i: opt.state[x]["exp_avg"].numpy().copy() for i, x in enumerate(tensors)}
    for x in tensors:
        x._data = x._data.astype(np.float64)  # model.double()
    for i, x in enumerate(tensors):
        state = opt.state[x]
        assert state["exp_avg"].dtype == np.float64 and state["step"] == 10
        np.testing.assert_array_equal(state["exp_avg"].numpy(), before[i])
    got = engine_run(opt, tensors, grad_fn, steps=STEPS - 10, start=10)
    want, _ = reference_run(AdamRef(0.01), params, grad_fn)
    assert_params_close(got, want, rtol=2e-4, atol=2e-5)
    assert all(x.dtype == np.float64 for x in tensors)


def test_a_param_rebound_to_another_shape_is_a_clear_error():
    (x,) = make_tensors([np.ones((2, 3))], np.float32, "cpu")
    opt = Adam([x])
    x.grad = engine.ones(2, 3)
    opt.step()
    x._data = np.ones((3, 3), np.float32)
    x.grad = engine.ones(3, 3)
    with pytest.raises(EngineError, match=r"changed shape.*exp_avg.*\(2, 3\)"):
        opt.step()


def test_params_are_views_of_one_flat_buffer_per_bucket():
    tensors = make_tensors(initial_params(), np.float32, "cpu")
    Adam(tensors)
    flat = tensors[0]._data.base
    assert flat is not None and flat.ndim == 1 and flat.size >= sum(x.numel() for x in tensors)
    assert all(x._data.base is flat for x in tensors)  # padding between them: see test_flat_alignment.py
    for x, p in zip(tensors, initial_params()):
        np.testing.assert_array_equal(x.numpy(), p.astype(np.float32))


# ---- state_dict / load_state_dict ---------------------------------------------------------------

ROUND_TRIP_CASES = [CASES[4], CASES[9], CASES[11], CASES[14], CASES[18]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls, kwargs, ref", ROUND_TRIP_CASES)
def test_state_dict_round_trip_mid_training_continues_identically(opt_cls, kwargs, ref, device, tmp_path):
    params, grad_fn = initial_params(), grad_fn_for()

    def active(t, i):
        return i != 1 or t % 2 == 0  # uneven step counts must survive the round trip too

    tensors = make_tensors(params, np.float32, device)
    opt = opt_cls([{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.003}], **kwargs)
    engine_run(opt, tensors, grad_fn, steps=20, active=active)
    opt.param_groups[0]["lr"] *= 0.5  # as a scheduler would
    save({"optim": opt.state_dict(), "params": [x.detach() for x in tensors]}, tmp_path / "ckpt.npz")
    want = engine_run(opt, tensors, grad_fn, steps=20, active=active, start=20)

    ckpt = load(tmp_path / "ckpt.npz")
    restored = [engine.tensor(p, requires_grad=True) for p in ckpt["params"]]
    opt2 = opt_cls([{"params": restored[:2]}, {"params": restored[2:], "lr": 0.5}], **kwargs)
    opt2.load_state_dict(ckpt["optim"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    got = engine_run(opt2, restored, grad_fn, steps=20, active=active, start=20)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_state_dict_structure_is_pytorch_like_and_a_snapshot():
    tensors = make_tensors([np.ones((2, 2)), np.ones(3)], np.float32, "cpu")
    opt = Adam(tensors, lr=0.1, amsgrad=True)
    engine_run(opt, tensors, grad_fn_for(shapes=[(2, 2), (3,)]), steps=2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                   "amsgrad": True, "maximize": False, "capturable": False, "master_weights": None, "params": [0, 1]}]
    assert set(sd["state"]) == {0, 1}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 2 and sd["state"][1]["exp_avg"].shape == (3,)
    snapshot = sd["state"][0]["exp_avg"].numpy().copy()
    engine_run(opt, tensors, grad_fn_for(seed=9, shapes=[(2, 2), (3,)]), steps=2)
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"].numpy(), snapshot)


def test_sgd_state_is_only_the_momentum_buffer():
    tensors = make_tensors([np.ones(3)], np.float32, "cpu")
    plain = SGD(tensors, lr=0.1)
    engine_run(plain, tensors, grad_fn_for(shapes=[(3,)]), steps=2)
    assert plain.state_dict()["state"] == {}
    tensors = make_tensors([np.ones(3)], np.float32, "cpu")
    momentum = SGD(tensors, lr=0.1, momentum=0.9)
    engine_run(momentum, tensors, grad_fn_for(shapes=[(3,)]), steps=2)
    assert set(momentum.state_dict()["state"][0]) == {"momentum_buffer"}


def test_adagrad_state_exists_from_construction():
    tensors = make_tensors([np.ones(3)], np.float32, "cpu")
    sd = Adagrad(tensors, initial_accumulator_value=0.25).state_dict()
    assert sd["state"][0]["step"] == 0
    np.testing.assert_array_equal(sd["state"][0]["sum"].numpy(), np.full(3, 0.25, np.float32))


def corrupted_state_dicts():
    def build():
        tensors = make_tensors(initial_params(), np.float32, "cpu")
        opt = Adam([{"params": tensors[:2]}, {"params": tensors[2:]}], lr=0.01)
        engine_run(opt, tensors, grad_fn_for(), steps=3)
        return opt.state_dict()

    def drop_group(sd):
        sd["param_groups"].pop()

    def shrink_group(sd):
        sd["param_groups"][1]["params"].pop()

    def wrong_shape(sd):
        sd["state"][0]["exp_avg"] = engine.zeros(4, 3)

    def unknown_entry(sd):
        sd["state"][1]["velocity"] = engine.zeros(5)

    def bad_step(sd):
        sd["state"][1]["step"] = -2

    def bad_hyperparameter(sd):
        sd["param_groups"][0]["betas"] = (1.5, 0.9)

    def stray_index(sd):
        sd["state"][99] = {"step": 1}

    def not_a_state_dict(sd):
        sd.pop("state")

    for corrupt in (drop_group, shrink_group, wrong_shape, unknown_entry, bad_step, bad_hyperparameter,
                    stray_index, not_a_state_dict):
        sd = build()
        corrupt(sd)
        yield pytest.param(sd, id=corrupt.__name__)


@pytest.mark.parametrize("bad", list(corrupted_state_dicts()))
def test_load_state_dict_rejects_a_mismatch_and_changes_nothing(bad):
    params, grad_fn = initial_params(), grad_fn_for()
    twins = []
    for _ in range(2):
        tensors = make_tensors(params, np.float32, "cpu")
        opt = Adam([{"params": tensors[:2]}, {"params": tensors[2:]}], lr=0.02)
        engine_run(opt, tensors, grad_fn, steps=5)
        twins.append((opt, tensors))
    (opt, tensors), (twin, twin_tensors) = twins
    with pytest.raises(EngineError, match="Adam"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.02 and len(opt.param_groups) == 2
    got = engine_run(opt, tensors, grad_fn, steps=5, start=5)
    want = engine_run(twin, twin_tensors, grad_fn, steps=5, start=5)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_load_state_dict_error_names_the_problem():
    tensors = make_tensors([np.ones((2, 3))], np.float32, "cpu")
    opt = Adam(tensors)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    sd = {"state": {0: {"step": 1, "exp_avg": engine.zeros(3, 2), "exp_avg_sq": engine.zeros(2, 3)}},
          "param_groups": [dict(group, params=[0])]}
    with pytest.raises(EngineError, match=r"exp_avg.*\(3, 2\).*shape=\(2, 3\)"):
        opt.load_state_dict(sd)


def test_load_state_dict_refuses_an_index_listed_twice():
    # two same-shape parameters, state for index 0 only: [0, 0] would give both one state
    tensors = make_tensors([np.ones(3), np.ones(3)], np.float32, "cpu")
    opt = Adam(tensors)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    sd = {"state": {0: {"step": 1, "exp_avg": engine.zeros(3), "exp_avg_sq": engine.zeros(3)}},
          "param_groups": [dict(group, params=[0, 0])]}
    with pytest.raises(EngineError, match=r"parameter indices \[0\] more than once"):
        opt.load_state_dict(sd)
    assert opt.state_dict()["state"] == {}


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda x: SGD(x, lr=-0.1), "lr"),
    (lambda x: SGD(x, lr=0.1, nesterov=True), "nesterov"),
    (lambda x: SGD(x, lr=0.1, momentum=-1), "momentum"),
    (lambda x: Adam(x, betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda x: Adam(x, betas=(0.9,)), "betas"),
    (lambda x: Adam(x, eps=-1e-8), "eps"),
    (lambda x: AdamW(x, weight_decay=float("nan")), "weight_decay"),
    (lambda x: Adagrad(x, lr_decay=-1), "lr_decay"),
    (lambda x: RMSprop(x, alpha=-0.5), "alpha"),
    (lambda x: SGD(x[0], lr=0.1), "iterable"),
    (lambda x: SGD([], lr=0.1), "empty"),
    (lambda x: SGD([x[0], x[0]], lr=0.1), "more than once"),
    (lambda x: SGD([{"params": [x[0]]}, {"params": [x[0]]}], lr=0.1), "another group"),
    (lambda x: SGD([x[0] * 2], lr=0.1), "non-leaf"),
    (lambda x: SGD([engine.tensor([1, 2])], lr=0.1), "floating"),
    (lambda x: SGD([np.ones(3)], lr=0.1), "Tensors"),
])
def test_bad_construction_raises_a_clear_error(make, match):
    with pytest.raises(EngineError, match=match):
        make(make_tensors([np.ones(3)], np.float32, "cpu"))


def test_a_bad_grad_raises_before_any_parameter_changes():
    a, b = make_tensors([np.ones(3), np.ones(2)], np.float32, "cpu")
    opt = Adam([{"params": [a]}, {"params": [b]}])
    with pytest.raises(GradError, match=r"gradient.*shape=\(3,\).*shape=\(2,\)"):
        b.grad = engine.ones(3)  # refused at the assignment, as in PyTorch
    a.grad, b.grad = engine.ones(3), engine.ones(2)
    b.grad._data = np.ones(3, np.float32)  # behind the setter's back: the step still checks
    with pytest.raises(EngineError, match=r"gradient.*shape=\(3,\).*shape=\(2,\)"):
        opt.step()
    np.testing.assert_array_equal(a.numpy(), np.ones(3, np.float32))
    assert opt.state == {}


def test_an_invalid_lr_set_on_a_group_raises_before_any_update():
    a, b = make_tensors([np.ones(3), np.ones(2)], np.float32, "cpu")
    opt = SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.param_groups[1]["lr"] = -1.0
    a.grad, b.grad = engine.ones(3), engine.ones(2)
    with pytest.raises(EngineError, match="lr"):
        opt.step()
    np.testing.assert_array_equal(a.numpy(), np.ones(3, np.float32))


def test_add_param_group_adds_a_trained_group():
    a, b = make_tensors([np.ones(3), np.ones(2)], np.float32, "cpu")
    opt = SGD([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.5})
    a.grad, b.grad = engine.ones(3), engine.ones(2)
    opt.step()
    np.testing.assert_allclose(a.numpy(), 0.9)
    np.testing.assert_allclose(b.numpy(), 0.5)
    assert opt.param_groups[1]["momentum"] == 0.0  # defaults fill what the group leaves out

"""optim.Adadelta and lr_scheduler.OneCycleLR against PyTorch 2.13: the same parameters, gradients
and hyperparameters give the same parameters, states and learning rates step after step."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import nn, optim
from engine.errors import EngineError
from engine.optim.lr_scheduler import OneCycleLR

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(5)
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _params(lib, dtype):
    values = [RNG.standard_normal(s) for s in SHAPES]
    return [lib.tensor(v.astype(dtype), requires_grad=True) for v in values]


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.5, rho=0.8, eps=1e-5), dict(weight_decay=0.1),
                                    dict(maximize=True, lr=2.0)], ids=["defaults", "lr-rho-eps", "wd", "maximize"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.slow
def test_adadelta_matches_pytorch(kwargs, fused):
    ours_p, theirs_p = _params(engine, np.float64), None
    theirs_p = [torch.tensor(p.numpy(), requires_grad=True) for p in ours_p]
    ours = optim.Adadelta(ours_p, fused=fused, **kwargs)
    theirs = torch.optim.Adadelta(theirs_p, **kwargs)
    for _ in range(6):
        grads = [RNG.standard_normal(s) for s in SHAPES]
        for p, g in zip(ours_p, grads):
            p.grad = engine.tensor(g)
        for p, g in zip(theirs_p, grads):
            p.grad = torch.tensor(g)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-14)
    for i in range(len(theirs_p)):
        mine, reference = ours.state_dict()["state"][i], theirs.state_dict()["state"][i]
        assert set(mine) == set(reference) == {"step", "square_avg", "acc_delta"}
        for key in ("square_avg", "acc_delta"):
            np.testing.assert_allclose(np.asarray(mine[key]), reference[key].numpy(), rtol=1e-12, atol=1e-14)
        assert int(mine["step"]) == int(reference["step"])


def test_adadelta_trains_a_float32_model_and_round_trips_its_state():
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = engine.randn(64, 4)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    opt = optim.Adadelta(model.parameters())
    first = None
    for _ in range(100):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    again = optim.Adadelta(model.parameters())
    again.load_state_dict(opt.state_dict())
    for k, v in opt.state_dict()["state"][0].items():
        np.testing.assert_array_equal(np.asarray(again.state_dict()["state"][0][k]), np.asarray(v))


def test_adadelta_refuses_bad_hyperparameters():
    p = [engine.zeros(2, requires_grad=True)]
    for bad in (dict(lr=-1.0), dict(rho=1.5), dict(eps=-1e-6), dict(weight_decay=-0.1)):
        with pytest.raises(EngineError):
            optim.Adadelta(p, **bad)
    with pytest.raises(EngineError, match="differentiable"):
        optim.Adadelta(p, differentiable=True)


ONE_CYCLE = [
    ("SGD", dict(momentum=0.9), dict(max_lr=0.1, total_steps=20)),
    ("SGD", dict(momentum=0.9), dict(max_lr=[0.1, 0.5], epochs=3, steps_per_epoch=5, anneal_strategy="linear")),
    ("Adam", dict(), dict(max_lr=0.01, total_steps=17, pct_start=0.25, div_factor=10, final_div_factor=100)),
    ("AdamW", dict(), dict(max_lr=0.01, total_steps=30, three_phase=True)),
    ("SGD", dict(), dict(max_lr=0.1, total_steps=12, cycle_momentum=False)),
]


@pytest.mark.parametrize("opt_name, opt_kwargs, kwargs", ONE_CYCLE, ids=[f"{o}-{i}" for i, (o, _, _) in
                                                                         enumerate(ONE_CYCLE)])
def test_one_cycle_lr_and_momentum_match_pytorch(opt_name, opt_kwargs, kwargs):
    def build(lib):
        groups = [{"params": [lib.zeros(2, requires_grad=True)]}, {"params": [lib.zeros(2, requires_grad=True)]}]
        opt = getattr(lib.optim, opt_name)(groups, lr=0.05, **opt_kwargs)
        scheduler_cls = OneCycleLR if lib is engine else torch.optim.lr_scheduler.OneCycleLR
        return opt, scheduler_cls(opt, **kwargs)

    (ours, our_sched), (theirs, their_sched) = build(engine), build(torch)
    total = kwargs.get("total_steps") or kwargs["epochs"] * kwargs["steps_per_epoch"]
    for _ in range(total - 1):
        ours.step()
        theirs.step()
        our_sched.step()
        their_sched.step()
        assert our_sched.get_last_lr() == pytest.approx(their_sched.get_last_lr(), rel=1e-12)
        for mine, reference in zip(ours.param_groups, theirs.param_groups):
            assert mine["lr"] == pytest.approx(reference["lr"], rel=1e-12)
            for key in ("momentum", "betas"):
                if key in reference:
                    assert np.allclose(mine[key], reference[key], rtol=1e-12)
    with pytest.raises(EngineError, match="total steps"):
        our_sched.step()
        our_sched.step()


def test_one_cycle_lr_argument_checks():
    opt = optim.SGD([engine.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(EngineError, match="total_steps"):
        OneCycleLR(opt, max_lr=0.1)
    with pytest.raises(EngineError, match="anneal_strategy"):
        OneCycleLR(opt, max_lr=0.1, total_steps=10, anneal_strategy="exp")
    OneCycleLR(opt, max_lr=0.1, total_steps=10)  # SGD's defaults hold momentum, even at 0
    adagrad = optim.Adagrad([engine.zeros(1, requires_grad=True)])
    with pytest.raises(EngineError, match="cycle_momentum"):
        OneCycleLR(adagrad, max_lr=0.1, total_steps=10)

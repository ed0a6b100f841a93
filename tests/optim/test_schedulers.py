"""Learning-rate schedulers: the lr sequence of each against its closed form (PyTorch semantics)."""

import math

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.io import load, save
from engine.optim import SGD
from engine.optim.lr_scheduler import (ChainedScheduler, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR,
                                       MultiStepLR, ReduceLROnPlateau, SequentialLR, StepLR)

BASE_LRS = (0.1, 0.03)  # two param groups, so per-group bookkeeping is exercised


def make_optimizer(base_lrs=BASE_LRS):
    groups = [{"params": [engine.zeros(2, requires_grad=True)], "lr": lr} for lr in base_lrs]
    return SGD(groups, lr=1.0)


def lr_sequence(optimizer, scheduler, epochs):
    """lrs at epoch 0 (after construction), 1, ..., epochs - 1: one row per epoch."""
    rows = []
    for epoch in range(epochs):
        if epoch:
            scheduler.step()
        # A ChainedScheduler has no epoch of its own; each scheduler it steps counts them.
        counters = scheduler._schedulers if isinstance(scheduler, ChainedScheduler) else [scheduler]
        assert all(counter.last_epoch == epoch for counter in counters)
        assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
        rows.append([g["lr"] for g in optimizer.param_groups])
    return np.array(rows)


def closed_form(factor, epochs, base_lrs=BASE_LRS):
    return np.array([[lr * factor(e) for lr in base_lrs] for e in range(epochs)])


def cosine(e, T, base, eta_min=0.0):  # noqa: N803
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * e / T)) / 2


CLOSED_FORMS = [
    pytest.param(lambda opt: StepLR(opt, step_size=3, gamma=0.5), lambda e: 0.5 ** (e // 3), id="step"),
    pytest.param(lambda opt: MultiStepLR(opt, milestones=[12, 3, 7, 7], gamma=0.1),
                 lambda e: 0.1 ** ((e >= 3) + 2 * (e >= 7) + (e >= 12)), id="multistep-repeated-milestone"),
    pytest.param(lambda opt: ExponentialLR(opt, gamma=0.9), lambda e: 0.9 ** e, id="exponential"),
    pytest.param(lambda opt: LinearLR(opt, start_factor=0.25, total_iters=8),
                 lambda e: 0.25 + 0.75 * min(e, 8) / 8, id="linear-warmup"),
    pytest.param(lambda opt: LinearLR(opt, start_factor=1.0, end_factor=0.2, total_iters=10),
                 lambda e: 1.0 - 0.8 * min(e, 10) / 10, id="linear-decay"),
    pytest.param(lambda opt: LambdaLR(opt, lambda e: 1 / (1 + e) ** 0.5), lambda e: 1 / (1 + e) ** 0.5, id="lambda"),
    pytest.param(lambda opt: CosineAnnealingLR(opt, T_max=10), lambda e: (1 + math.cos(math.pi * e / 10)) / 2,
                 id="cosine-past-T_max"),
]


@pytest.mark.parametrize("make, factor", CLOSED_FORMS)
def test_lr_sequence_matches_closed_form(make, factor):
    opt = make_optimizer()
    got = lr_sequence(opt, make(opt), 30)
    np.testing.assert_allclose(got, closed_form(factor, 30), rtol=1e-12, atol=1e-15)


def test_cosine_with_eta_min_matches_closed_form_over_two_periods():
    opt = make_optimizer()
    got = lr_sequence(opt, CosineAnnealingLR(opt, T_max=7, eta_min=0.001), 29)
    want = np.array([[cosine(e, 7, base, 0.001) for base in BASE_LRS] for e in range(29)])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
    assert got[7] == pytest.approx([0.001, 0.001])  # the minimum sits at T_max


def test_lambda_lr_takes_one_function_per_group():
    opt = make_optimizer()
    sched = LambdaLR(opt, [lambda e: 0.5 ** e, lambda e: e + 1])
    got = lr_sequence(opt, sched, 6)
    want = np.array([[0.1 * 0.5 ** e, 0.03 * (e + 1)] for e in range(6)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_sequential_warmup_then_cosine():
    opt = make_optimizer()
    warmup = LinearLR(opt, start_factor=0.1, total_iters=5)
    anneal = CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)
    sched = SequentialLR(opt, [warmup, anneal], milestones=[5])
    got = lr_sequence(opt, sched, 40)
    want = np.array([[base * (0.1 + 0.9 * e / 5) if e < 5 else cosine(e - 5, 20, base, 1e-4) for base in BASE_LRS]
                     for e in range(40)])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def test_sequential_with_three_phases():
    opt = make_optimizer()
    phases = [LinearLR(opt, start_factor=0.5, total_iters=2), ExponentialLR(opt, gamma=0.8),
              StepLR(opt, step_size=2, gamma=0.1)]
    sched = SequentialLR(opt, phases, milestones=[3, 6])
    got = lr_sequence(opt, sched, 10)
    factors = [0.5, 0.75, 1.0, 1.0, 0.8, 0.64, 1.0, 1.0, 0.1, 0.1]
    np.testing.assert_allclose(got, closed_form(lambda e: factors[e], 10), rtol=1e-12)


def test_chained_schedulers_compose_multiplicatively():
    opt = make_optimizer()
    sched = ChainedScheduler([ExponentialLR(opt, gamma=0.9), StepLR(opt, step_size=3, gamma=0.5)])
    got = lr_sequence(opt, sched, 12)
    np.testing.assert_allclose(got, closed_form(lambda e: 0.9 ** e * 0.5 ** (e // 3), 12), rtol=1e-12)


def test_chained_warmup_and_cosine():
    opt = make_optimizer()
    sched = ChainedScheduler([LinearLR(opt, start_factor=0.1, total_iters=5), CosineAnnealingLR(opt, T_max=20)])
    got = lr_sequence(opt, sched, 20)
    want = closed_form(lambda e: (0.1 + 0.9 * min(e, 5) / 5) * (1 + math.cos(math.pi * e / 20)) / 2, 20)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_resuming_with_last_epoch_uses_the_closed_form():
    opt = make_optimizer()
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = 123.0  # whatever the optimizer holds, resuming recomputes from initial_lr
    sched = CosineAnnealingLR(opt, T_max=10, last_epoch=4)
    assert sched.last_epoch == 5
    assert sched.get_last_lr() == pytest.approx([cosine(5, 10, base) for base in BASE_LRS])
    sched.step()
    assert sched.get_last_lr() == pytest.approx([cosine(6, 10, base) for base in BASE_LRS])


def test_resuming_without_initial_lr_is_an_error():
    with pytest.raises(EngineError, match="initial_lr"):
        StepLR(make_optimizer(), step_size=2, last_epoch=3)


# ---- ReduceLROnPlateau ---------------------------------------------------------------------------

def test_reduce_on_plateau_min_rel_with_cooldown_and_min_lr():
    opt = make_optimizer(base_lrs=(1.0,))
    sched = ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2, threshold=0.1, threshold_mode="rel",
                              cooldown=1, min_lr=0.2)
    metrics = [10, 9.5, 9.2, 9.1, 9.0, 9.0, 8.95, 8.0, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5]
    # Traced by hand: improving means < 0.9 * best; the 4th bad epoch in a row (patience 2) halves
    # the lr; the epoch after a cut is cooldown (its bad count is reset); lr never goes below 0.2.
    want = [1, 1, 1, .5, .5, .5, .5, .5, .5, .5, .25, .25, .25, .25, .2, .2, .2, .2, .2]
    got = []
    for m in metrics:
        sched.step(m)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(want)
    assert sched.get_last_lr() == pytest.approx([0.2]) and sched.last_epoch == len(metrics)


def test_reduce_on_plateau_max_abs_and_tensor_metric():
    opt = make_optimizer(base_lrs=(0.1, 1.0))
    sched = ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=0, threshold=0.5, threshold_mode="abs",
                              min_lr=[0.0, 0.5])
    got = []
    for m in [1.0, 1.5, 2.0, 2.5, 3.0]:  # exactly best + threshold is not an improvement
        sched.step(engine.tensor(m))
        got.append([g["lr"] for g in opt.param_groups])
    np.testing.assert_allclose(got, [[.1, 1], [.01, .5], [.01, .5], [.001, .5], [.001, .5]], rtol=1e-12)


def test_reduce_on_plateau_never_raises_an_lr_and_skips_cuts_smaller_than_eps():
    opt = make_optimizer(base_lrs=(0.01, 1e-9, 1.0))
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=[0.05, 0.0, 0.0])
    for m in [1.0, 1.0, 1.0]:
        sched.step(m)
    # group 0 starts below its min_lr and stays; group 1's cut (5e-10) is below eps=1e-8.
    assert sched.get_last_lr() == [0.01, 1e-9, 0.25]


# ---- state dicts -------------------------------------------------------------------------------

def schedulers_to_round_trip():
    return [
        pytest.param(lambda opt: StepLR(opt, step_size=3, gamma=0.5), id="step"),
        pytest.param(lambda opt: MultiStepLR(opt, milestones=[2, 9], gamma=0.3), id="multistep"),
        pytest.param(lambda opt: CosineAnnealingLR(opt, T_max=6, eta_min=0.001), id="cosine"),
        pytest.param(lambda opt: LambdaLR(opt, lambda e: 0.95 ** e), id="lambda"),
        pytest.param(lambda opt: SequentialLR(opt, [LinearLR(opt, 0.2, total_iters=4), CosineAnnealingLR(opt, 8)],
                                              milestones=[4]), id="sequential"),
        pytest.param(lambda opt: ChainedScheduler([ExponentialLR(opt, 0.9), StepLR(opt, 4, 0.5)]), id="chained"),
    ]


@pytest.mark.parametrize("make", schedulers_to_round_trip())
def test_state_dict_round_trip_through_a_checkpoint_continues_identically(make, tmp_path):
    opt = make_optimizer()
    sched = make(opt)
    for _ in range(7):
        sched.step()
    saved_state = sched.state_dict()
    save({"optim": opt.state_dict(), "sched": saved_state}, tmp_path / "ckpt.npz")
    want = lr_sequence_after(opt, sched, 12)

    opt2 = make_optimizer(base_lrs=(5.0, 5.0))
    sched2 = make(opt2)
    ckpt = load(tmp_path / "ckpt.npz")
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.state_dict() == saved_state
    np.testing.assert_array_equal(lr_sequence_after(opt2, sched2, 12), want)


def lr_sequence_after(optimizer, scheduler, steps):
    rows = []
    for _ in range(steps):
        scheduler.step()
        rows.append([g["lr"] for g in optimizer.param_groups])
    return np.array(rows)


def test_reduce_on_plateau_state_round_trip(tmp_path):
    opt = make_optimizer()
    sched = ReduceLROnPlateau(opt, patience=1, cooldown=2)
    metrics = [5, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3]
    for m in metrics[:5]:
        sched.step(m)
    save({"optim": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "plateau.npz")
    want = []
    for m in metrics[5:]:
        sched.step(m)
        want.append(sched.get_last_lr())
    opt2 = make_optimizer()
    sched2 = ReduceLROnPlateau(opt2, patience=1, cooldown=2)
    ckpt = load(tmp_path / "plateau.npz")
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    got = []
    for m in metrics[5:]:
        sched2.step(m)
        got.append(sched2.get_last_lr())
    assert got == want and want[0] != want[-1]  # the continuation did reduce the lr


def test_lambda_state_dict_holds_no_callable():
    opt = make_optimizer()
    state = LambdaLR(opt, lambda e: 1.0).state_dict()
    assert not any(callable(v) for v in state.values()) and "lr_lambdas" not in state


def test_loading_another_schedulers_state_is_rejected_and_changes_nothing():
    opt = make_optimizer()
    sched = CosineAnnealingLR(opt, T_max=10)
    sched.step()
    before = sched.state_dict()
    with pytest.raises(EngineError, match="missing keys.*T_max"):
        sched.load_state_dict(StepLR(make_optimizer(), step_size=2).state_dict())
    assert sched.state_dict() == before


def test_sequential_rejects_a_bad_child_state_and_changes_nothing():
    opt = make_optimizer()
    sched = SequentialLR(opt, [LinearLR(opt, 0.5, total_iters=2), ExponentialLR(opt, 0.9)], milestones=[2])
    sched.step()
    before = sched.state_dict()
    bad = dict(before, _schedulers=[before["_schedulers"][0], {"gamma": 0.5}])
    with pytest.raises(EngineError, match="ExponentialLR"):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before


@pytest.mark.parametrize("make, match", [
    (lambda opt: StepLR(opt, step_size=0), "step_size"),
    (lambda opt: LinearLR(opt, start_factor=0.0), "start_factor"),
    (lambda opt: LinearLR(opt, end_factor=1.5), "end_factor"),
    (lambda opt: CosineAnnealingLR(opt, T_max=0), "T_max"),
    (lambda opt: LambdaLR(opt, [lambda e: 1.0]), "lr_lambda"),
    (lambda opt: ReduceLROnPlateau(opt, factor=1.0), "factor"),
    (lambda opt: ReduceLROnPlateau(opt, mode="up"), "mode"),
    (lambda opt: ReduceLROnPlateau(opt, min_lr=[0.1]), "min_lr"),
    (lambda opt: SequentialLR(opt, [StepLR(opt, 2), StepLR(opt, 3)], milestones=[]), "milestone"),
    (lambda opt: SequentialLR(opt, [ReduceLROnPlateau(opt)], milestones=[]), "ReduceLROnPlateau"),
    (lambda opt: ChainedScheduler([StepLR(opt, 2), StepLR(make_optimizer(), 2)]), "different optimizer"),
    (lambda opt: StepLR(object(), 2), "optimizer"),
])
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(EngineError, match=match):
        make(make_optimizer())

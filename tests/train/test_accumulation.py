"""Gradient accumulation: k micro-batches step as one batch k times as large (plain loop and Trainer)."""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn, optim
from engine.data import DataLoader, TensorDataset
from engine.train import Callback, Trainer


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 2)) + 0.1 * rng.normal(size=(n, 2))).astype(np.float32)
    return x, y


def _model(seed=3):
    engine.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


def _params(model):
    return [p.numpy().copy() for p in model.parameters()]


def test_plain_loop_k_micro_batches_give_the_big_batch_gradient_of_a_float64_reference():
    x, y = _data(24)
    engine.manual_seed(0)
    lin = nn.Linear(5, 2)
    w, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)
    for xs, ys in zip(np.split(x, 4), np.split(y, 4)):  # 4 micro-batches of 6
        loss = F.mse_loss(lin(engine.tensor(xs)), engine.tensor(ys)) / 4
        loss.backward()  # accumulates into .grad
    residual = x.astype(np.float64) @ w.T + b - y  # the whole batch of 24, in float64
    grad_w = 2 * residual.T @ x / residual.size
    np.testing.assert_allclose(lin.weight.grad.numpy(), grad_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.bias.grad.numpy(), 2 * residual.sum(0) / residual.size, rtol=1e-5, atol=1e-6)


def _fit(batch_size, accumulate_steps, n, epochs=2, sync_every=None, callbacks=()):
    x, y = _data(n)
    model = _model()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    steps = []
    step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]  # count optimizer steps
    trainer = Trainer(model, opt, loss_fn=F.mse_loss, metrics=["mse"], verbose=0, sync_every=sync_every,
                      accumulate_steps=accumulate_steps, callbacks=list(callbacks))
    loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=batch_size, shuffle=False)
    trainer.fit(loader, epochs=epochs)
    return trainer, len(steps)


@pytest.mark.parametrize("n, sync_every", [(96, None), (80, 3)])  # 80: the last group is 2 batches of 8
@pytest.mark.slow
def test_trainer_accumulating_4_batches_of_8_equals_batches_of_32(n, sync_every):
    big, big_steps = _fit(32, 1, n)
    small, small_steps = _fit(8, 4, n, sync_every=sync_every)
    assert small_steps == big_steps == 2 * -(-n // 32)
    for a, b in zip(_params(big.model), _params(small.model)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    # The epoch loss averages every micro-batch's (unscaled) loss, as logged without accumulation.
    assert small.history["loss"][0] == pytest.approx(big.history["loss"][0], rel=1e-5)
    # Without accumulation the small batches step 4 times as often and end elsewhere.
    plain, plain_steps = _fit(8, 1, n)
    assert plain_steps == 2 * -(-n // 8)
    assert not np.allclose(_params(plain.model)[0], _params(big.model)[0], rtol=1e-3)


def test_accumulate_steps_1_is_the_loop_as_before_and_bad_values_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="accumulate_steps"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.1), accumulate_steps=0)
    with pytest.raises(ValueError, match="accumulate_steps"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.1), accumulate_steps=2.0)


def test_no_sync_is_used_on_the_batches_that_do_not_step():
    entered = []

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = _model()

        def forward(self, x):
            return self.module(x)

        def no_sync(self):  # DistributedDataParallel's context, recorded here
            import contextlib

            entered.append(1)
            return contextlib.nullcontext()

    x, y = _data(40)
    model = Wrapped()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), loss_fn=F.mse_loss, metrics=[], verbose=0,
                      accumulate_steps=3)
    trainer.fit((x, y), epochs=1, batch_size=8, shuffle=False)  # 5 batches: groups of 3 and 2
    assert len(entered) == 2 + 1


class _Interrupt(Callback):
    def __init__(self, active=True):
        self.active = active

    def on_batch_end(self, trainer, batch, logs):
        if self.active and trainer.epoch == 1 and batch == 5:  # the second batch of the group 4..7
            raise KeyboardInterrupt


def test_an_interrupt_mid_group_resumes_from_the_group_start(tmp_path):
    straight, _ = _fit(8, 4, 96, epochs=2)
    x, y = _data(96)
    model = _model()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, opt, loss_fn=F.mse_loss, metrics=["mse"], verbose=0, accumulate_steps=4,
                      callbacks=[_Interrupt()])
    loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=8, shuffle=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(loader, epochs=2)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    other = _model(seed=99)  # nothing carries over but the checkpoint
    resumed = Trainer(other, optim.Adam(other.parameters(), lr=1e-2), loss_fn=F.mse_loss, metrics=["mse"], verbose=0,
                      accumulate_steps=4, callbacks=[_Interrupt(active=False)])
    resumed.load_checkpoint(tmp_path / "mid.ckpt")
    resumed.fit(DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=8, shuffle=False), epochs=2)
    for a, b in zip(_params(straight.model), _params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert resumed.history["loss"] == straight.history["loss"]

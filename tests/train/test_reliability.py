"""The training loop tells the truth and resumes exactly.

1. The NaN guard checks the gradients too (a finite loss can have NaN or inf gradients), before
   the step with sync_every=1 and at the next read otherwise; no checkpoint ever holds
   non-finite weights.
2. An interrupt (KeyboardInterrupt) in forward, backward or a callback, a checkpoint taken in the
   except handler and a resume give exactly the parameters and logged losses of an
   uninterrupted run.
3. Every callback's state survives a resume (EarlyStopping's best weights and decision).
4. ModelCheckpoint says when its monitored figure never appears.
"""

import warnings

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import backend, io, nn, optim
from engine.autograd import Function
from engine.data import DataLoader, TensorDataset
from engine.train import Callback, EarlyStopping, LRSchedulerCallback, ModelCheckpoint, Trainer, TrainingDiverged

N, BATCH = 80, 16  # 5 batches an epoch


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(3, 4))
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.normal(0, 1, size=(n, 4))).astype(np.float32)
    return x, y.astype(np.int64)


def _model(dropout=0.0):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _params(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _finite(model):
    return all(np.isfinite(v).all() for v in _params(model).values())


class _Poison(Function):
    """Identity forward; backward returns ``value`` (NaN or inf) everywhere: a finite loss, bad grads."""

    def forward(self, a, value=np.nan):
        self.value = value
        return a

    def backward(self, grad):
        return grad * 0 + grad.dtype.type(self.value)


class _Counter:
    """A loss that counts its calls (one per training batch) and misbehaves at chosen ones."""

    def __init__(self, poison=(), value=np.nan, sqrt_at=(), interrupt=(), interrupt_backward=()):
        self.calls, self.poison, self.value, self.sqrt_at = 0, set(poison), value, set(sqrt_at)
        self.interrupt, self.interrupt_backward = set(interrupt), set(interrupt_backward)

    def __call__(self, output, y):
        call, self.calls = self.calls, self.calls + 1
        if call in self.interrupt:
            self.interrupt.discard(call)  # once: the resumed run passes
            raise KeyboardInterrupt
        if call in self.poison:
            output = _Poison.apply(output, value=self.value)
        loss = F.cross_entropy(output, y)
        if call in self.sqrt_at:  # sqrt at 0: adds 0 to the loss, NaN to every gradient
            loss = loss + ((output - output.detach()) ** 2).sum().sqrt()
        if call in self.interrupt_backward:
            self.interrupt_backward.discard(call)
            loss = _InterruptInBackward.apply(loss)
        return loss


class _InterruptInBackward(Function):
    def forward(self, a):
        return a

    def backward(self, grad):
        raise KeyboardInterrupt


def _trainer(loss=None, sync_every=None, callbacks=(), lr=0.1, dropout=0.0, optimizer="sgd", seed=0, **kwargs):
    engine.manual_seed(seed)
    model = _model(dropout)
    opt = optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else optim.Adam(model.parameters(), lr=lr)
    return Trainer(model, opt, loss_fn=loss or F.cross_entropy, callbacks=list(callbacks), verbose=0,
                   sync_every=sync_every, **kwargs)


class _Snapshots(Callback):
    """Parameters after each batch's step, keyed (epoch, batch)."""

    def __init__(self):
        self.after = {}

    def on_batch_end(self, trainer, batch, logs):
        self.after[(trainer.epoch, batch)] = _params(trainer.model)


# ---- 1. the NaN guard checks the gradients ----------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan", "inf", "sqrt_at_0"])
def test_finite_loss_with_non_finite_grads_is_not_stepped_with_sync_every_1(tmp_path, kind):
    x, y = _data()
    poison = 5 + 2  # epoch 2, batch 3
    loss = _Counter(sqrt_at=[poison]) if kind == "sqrt_at_0" else \
        _Counter(poison=[poison], value=np.nan if kind == "nan" else np.inf)
    snaps, ckpt = _Snapshots(), ModelCheckpoint(tmp_path, monitor="loss")
    trainer = _trainer(loss, sync_every=1, callbacks=[snaps, ckpt], optimizer="adam", lr=1e-2)
    trainer.fit((x, y), epochs=1, batch_size=BATCH, shuffle=False)
    saved = ckpt.last_path.read_bytes()
    steps_before = [s["step"] for s in trainer.optimizer.state_dict()["state"].values()]
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit((x, y), epochs=2, batch_size=BATCH, shuffle=False)
    message = str(err.value)
    assert "the gradients became non-finite at epoch 2, batch 3 (its loss," in message
    assert "NaN or inf in the gradients of '0.weight', '0.bias', '3.weight', '3.bias'" in message
    assert "the step was not taken" in message
    _assert_same(_params(trainer.model), snaps.after[(1, 1)])  # as after batch 2: the bad step was not taken
    assert [s["step"] for s in trainer.optimizer.state_dict()["state"].values()] == [n + 2 for n in steps_before]
    assert ckpt.last_path.read_bytes() == saved
    assert _finite(io.load(ckpt.last_path)["model"] and trainer.model)


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_non_finite_grads_between_reads_are_reported_as_stepped(tmp_path, with_checkpoint):
    x, y = _data()
    ckpt = ModelCheckpoint(tmp_path, monitor="loss")
    trainer = _trainer(_Counter(poison=[5 + 1]), sync_every=4, callbacks=[ckpt] if with_checkpoint else [])
    trainer.fit((x, y), epochs=1, batch_size=BATCH, shuffle=False)
    saved = ckpt.last_path.read_bytes() if with_checkpoint else None
    with pytest.raises(TrainingDiverged, match=r"the gradients became non-finite at epoch 2, batch 2 \(its loss, "
                                               r"[0-9.]+, is finite\) \(read after batch 4.*stepped on batches 2\.\.4, "
                                               r"so the parameters may no longer be finite"):
        trainer.fit((x, y), epochs=2, batch_size=BATCH, shuffle=False)
    assert not _finite(trainer.model)  # what the message says may have happened did
    if with_checkpoint:
        assert ckpt.last_path.read_bytes() == saved
    with pytest.raises(TrainingDiverged, match="diverged"):  # nor can the user write one by hand
        trainer.save_checkpoint(tmp_path / "by_hand.ckpt")
    assert not (tmp_path / "by_hand.ckpt").exists()


@pytest.mark.parametrize("sync_every", [1, 3, 20])
@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_non_finite_grads_at_the_last_batch_of_an_epoch_stop_before_its_checkpoint(tmp_path, sync_every,
                                                                                  with_checkpoint):
    x, y = _data()
    ckpt = ModelCheckpoint(tmp_path, monitor="loss")
    trainer = _trainer(_Counter(poison=[5 + 4]), sync_every=sync_every, callbacks=[ckpt] if with_checkpoint else [])
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 5") as err:
        trainer.fit((x, y), epochs=3, batch_size=BATCH, shuffle=False)
    assert trainer.epoch == 1 and len(trainer.history) == 1  # epoch 2 never ended
    if sync_every == 1:
        assert "the step was not taken" in str(err.value) and _finite(trainer.model)
    else:
        assert "stepped on batches 5..5" in str(err.value)
    if with_checkpoint:
        saved = io.load(ckpt.last_path)
        assert saved["epoch"] == 1
        assert all(np.isfinite(v.numpy()).all() for v in saved["model"].values())


def test_a_save_refuses_non_finite_weights_and_names_the_parameter(tmp_path):
    x, y = _data()
    trainer = _trainer()
    trainer.fit((x, y), epochs=1, batch_size=BATCH)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    before = (tmp_path / "good.ckpt").read_bytes()
    trainer.model[3].bias._data[1] = np.inf
    trainer.model[3].bias._data[2] = np.nan
    with pytest.raises(TrainingDiverged, match=r"save_checkpoint\(.*good.ckpt'\): parameter '3.bias' holds non-finite "
                                               r"values \(1 NaN and 1 inf of 3\); a checkpoint never holds"):
        trainer.save_checkpoint(tmp_path / "good.ckpt")
    assert (tmp_path / "good.ckpt").read_bytes() == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_model_checkpoint_refuses_weights_a_finite_step_overflowed(tmp_path):
    """Finite loss and gradients, but a huge lr at the epoch's last step overflows the weights."""

    class HugeLrAtTheEnd(Callback):
        def on_batch_end(self, trainer, batch, logs):
            if trainer.epoch == 1 and batch == 3:
                trainer.optimizer.param_groups[0]["lr"] = 1e300

    x, y = _data()
    ckpt = ModelCheckpoint(tmp_path, monitor="loss")
    trainer = _trainer(sync_every=1, callbacks=[HugeLrAtTheEnd(), ckpt])
    trainer.fit((x, y), epochs=1, batch_size=BATCH, shuffle=False)
    saved = ckpt.last_path.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"last.ckpt'\): parameter '\d.(weight|bias)' holds non-finite"):
        trainer.fit((x, y), epochs=2, batch_size=BATCH, shuffle=False)
    assert ckpt.last_path.read_bytes() == saved


def test_grad_check_works_with_clipping_frozen_params_and_any_optimizer():
    x, y = _data()
    trainer = _trainer(_Counter(poison=[2]), sync_every=1, grad_clip_norm=1.0)
    trainer.model[0].weight.requires_grad = False  # a frozen layer: its grad stays None
    with pytest.raises(TrainingDiverged, match=r"batch 3 .*gradients of '0.bias', '3.weight', '3.bias'\)"):
        trainer.fit((x, y), epochs=1, batch_size=BATCH, shuffle=False)

    class PlainSGD:  # not an engine Optimizer: the Trainer checks the grads itself
        def __init__(self, params):
            self.params = list(params)

        def zero_grad(self):
            for p in self.params:
                p.grad = None

        def step(self):
            with engine.no_grad():
                for p in self.params:
                    p.sub_(p.grad * 0.1)

        def state_dict(self):
            return {}

    engine.manual_seed(0)
    model = _model()
    trainer = Trainer(model, PlainSGD(model.parameters()), loss_fn=_Counter(poison=[1]), verbose=0, sync_every=1)
    with pytest.raises(TrainingDiverged, match="batch 2 .*the step was not taken"):
        trainer.fit((x, y), epochs=1, batch_size=BATCH, shuffle=False)
    assert _finite(model)


def test_optimizer_grads_finite_flag():
    engine.manual_seed(0)
    model = _model()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    assert opt.grads_finite() is None  # no grads yet
    x, y = _data(8)
    F.cross_entropy(model(engine.tensor(x)), engine.tensor(y)).backward()
    flag = opt.grads_finite()
    assert flag.shape == (1,) and flag.dtype == np.bool_ and bool(flag[0])
    reference = _params(model)
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    opt.step()  # the grads became views of the flat buffer: the step is the same
    engine.manual_seed(0)
    model2 = _model()
    opt2 = optim.Adam(model2.parameters(), lr=1e-2)
    F.cross_entropy(model2(engine.tensor(x)), engine.tensor(y)).backward()
    opt2.step()
    _assert_same(_params(model), _params(model2))
    assert reference.keys() == grads.keys()
    for bad in (np.nan, np.inf, -np.inf):
        model[3].bias.grad._data[0] = bad
        assert not bool(opt.grads_finite()[0])
        model[3].bias.grad._data[0] = 0.0
        assert bool(opt.grads_finite()[0])
    model[0].weight.grad = None  # an inactive param's stale slice does not count
    assert bool(opt.grads_finite()[0])


# ---- 2. interrupt, checkpoint, resume: exactly an uninterrupted run ---------------------------

EPOCHS = 3


def _run(tmp_path, sync_every, interrupt=None, where="forward", resume=None, save=None, checkpoint_every_epoch=False,
         early=None, scheduler=True, loader_kind="dataloader", precision="32-true"):
    """Train EPOCHS epochs of 5 batches with dropout, Adam, shuffling and a scheduler.

    ``interrupt``: the global batch number (0-based) at which a KeyboardInterrupt is raised
    (``where``: forward = in the loss, backward = in backward, callback = in on_batch_end after
    the step); the except handler saves a checkpoint to ``save``. ``resume``: a checkpoint
    loaded into a fresh trainer (built from another seed, so nothing carries over by chance).
    """
    x, y = _data()
    loss = _Counter(interrupt=[interrupt] if interrupt is not None and where == "forward" else [],
                    interrupt_backward=[interrupt] if interrupt is not None and where == "backward" else [])

    class InterruptAfterStep(Callback):
        def __init__(self):
            self.count = 0

        def on_batch_end(self, trainer, batch, logs):
            self.count += 1
            if interrupt is not None and where == "callback" and self.count == interrupt + 1:
                raise KeyboardInterrupt

    engine.manual_seed(123 if resume else 5)
    model = _model(dropout=0.3)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    callbacks = [InterruptAfterStep()]
    if early is not None:
        callbacks.append(early)
    if checkpoint_every_epoch:
        callbacks.insert(0, ModelCheckpoint(tmp_path / "ckpt", monitor="loss"))  # listed first, runs last
    trainer = Trainer(model, opt, loss_fn=loss, metrics=["accuracy"], callbacks=callbacks, verbose=0,
                      sync_every=sync_every, precision=precision,
                      scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if scheduler else None)
    if loader_kind == "dataloader":
        data = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=BATCH, shuffle=True,
                          generator=7)
    elif loader_kind == "arrays":
        data = (x, y)
    else:  # a plain iterable of batches: no state of its own
        data = _Batches([(engine.tensor(x[i:i + BATCH]), engine.tensor(y[i:i + BATCH])) for i in range(0, N, BATCH)])
    if resume:
        trainer.load_checkpoint(resume)
    try:
        trainer.fit(data, epochs=EPOCHS, batch_size=BATCH)
    except KeyboardInterrupt:
        trainer.save_checkpoint(save)
        return None
    return trainer


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _assert_same_run(a, b):
    _assert_same(_params(a.model), _params(b.model))
    assert a.history.history.keys() == b.history.history.keys()
    for key in ("loss", "accuracy", "lr"):
        assert a.history[key] == b.history[key], key  # bit for bit
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for index in sa:
        assert sa[index]["step"] == sb[index]["step"]
        np.testing.assert_array_equal(sa[index]["exp_avg"].numpy(), sb[index]["exp_avg"].numpy())


@pytest.mark.parametrize("sync_every", [1, 3])
@pytest.mark.parametrize("where", ["forward", "backward", "callback"])
@pytest.mark.parametrize("interrupt", [0, 7, 9, 14])  # first batch, mid-epoch, last of epoch 2, last of the run
def test_interrupt_checkpoint_resume_is_exactly_an_uninterrupted_run(tmp_path, sync_every, where, interrupt):
    straight = _run(tmp_path, sync_every)
    ckpt = tmp_path / "interrupted.ckpt"
    assert _run(tmp_path, sync_every, interrupt=interrupt, where=where, save=ckpt) is None
    state = io.load(ckpt)
    done = interrupt + (where == "callback")  # a batch counts once its step is done
    if done % 5 or where != "callback":
        assert state["epoch"] == done // 5 and state["progress"]["batches_done"] == done % 5
        assert state["loader"]["batches_done"] == done % 5
    resumed = _run(tmp_path, sync_every, resume=ckpt)
    _assert_same_run(straight, resumed)


@pytest.mark.parametrize("where", ["forward", "backward", "callback"])
def test_a_bf16_mixed_run_resumes_exactly_too(tmp_path, where):
    straight = _run(tmp_path, 3, precision="bf16-mixed")
    ckpt = tmp_path / "interrupted.ckpt"
    assert _run(tmp_path, 3, interrupt=7, where=where, save=ckpt, precision="bf16-mixed") is None
    assert io.load(ckpt)["precision"] == "bf16-mixed"
    _assert_same_run(straight, _run(tmp_path, 3, resume=ckpt, precision="bf16-mixed"))


@pytest.mark.parametrize("loader_kind", ["arrays", "iterable"])
def test_resume_mid_epoch_with_arrays_or_a_plain_iterable_of_batches(tmp_path, loader_kind):
    straight = _run(tmp_path, 1, loader_kind=loader_kind)
    ckpt = tmp_path / "interrupted.ckpt"
    _run(tmp_path, 1, interrupt=8, save=ckpt, loader_kind=loader_kind)
    _assert_same_run(straight, _run(tmp_path, 1, resume=ckpt, loader_kind=loader_kind))


def test_fit_again_after_an_interrupt_continues_the_epoch_exactly(tmp_path):
    straight = _run(tmp_path, 3)
    x, y = _data()
    engine.manual_seed(5)
    model = _model(dropout=0.3)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    loss = _Counter(interrupt=[6])
    trainer = Trainer(model, opt, loss_fn=loss, metrics=["accuracy"], callbacks=[Callback()], verbose=0, sync_every=3,
                      scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7))
    loader = DataLoader(TensorDataset(engine.tensor(x), engine.tensor(y)), batch_size=BATCH, shuffle=True, generator=7)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(loader, epochs=EPOCHS)
    trainer.fit(loader, epochs=EPOCHS)  # as a notebook user would: run the cell again
    _assert_same_run(straight, trainer)


def test_the_epoch_loss_averages_all_its_batches_after_a_resume(tmp_path):
    straight = _run(tmp_path, 3, scheduler=False)
    ckpt = tmp_path / "interrupted.ckpt"
    _run(tmp_path, 3, interrupt=12, save=ckpt, scheduler=False)
    progress = io.load(ckpt)["progress"]
    assert progress["batches_done"] == 2 and progress["samples"] == 2 * BATCH
    resumed = _run(tmp_path, 3, resume=ckpt, scheduler=False)
    assert resumed.history["loss"][-1] == straight.history["loss"][-1]
    assert resumed.history["accuracy"][-1] == straight.history["accuracy"][-1]


def test_a_checkpoint_from_another_loader_position_is_refused(tmp_path):
    ckpt = tmp_path / "interrupted.ckpt"
    _run(tmp_path, 1, interrupt=7, save=ckpt)
    state = io.load(ckpt)
    state["loader"]["batches_done"] = 1  # not what the trainer recorded
    io.save(state, ckpt)
    with pytest.raises(ValueError, match="2 batches done but the loader skips 1"):
        _run(tmp_path, 1, resume=ckpt)


# ---- 3. every callback's state survives a resume ----------------------------------------------

class _WrongLabelsFrom(_Counter):
    """From epoch ``epoch`` on, train on shifted labels: val_loss gets worse, so EarlyStopping stops
    and the best weights differ from the last ones."""

    def __init__(self, epoch, **kwargs):
        super().__init__(**kwargs)
        self.epoch, self.trainer = epoch, None

    def __call__(self, output, y):
        if self.trainer.epoch >= self.epoch:
            y = engine.tensor((y.numpy() + 1) % 3)
        return super().__call__(output, y)


def _stopping_run(tmp_path, epochs=30, resume=None, interrupt=None, save=None):
    """Wrong labels from epoch 3 on: val_loss rises, so EarlyStopping(patience=2) stops at epoch 4."""
    x, y = _data(120)
    engine.manual_seed(11 if resume else 3)
    model = _model(dropout=0.2)
    opt = optim.SGD(model.parameters(), lr=0.05)
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    scheduler = optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9 ** epoch)
    ckpt = ModelCheckpoint(tmp_path / "ckpt", monitor="val_loss")
    loss = _WrongLabelsFrom(2, interrupt=[] if interrupt is None else [interrupt])
    trainer = Trainer(model, opt, callbacks=[ckpt, stopper, LRSchedulerCallback(scheduler)], verbose=0, loss_fn=loss)
    loss.trainer = trainer
    if resume:
        trainer.load_checkpoint(resume)
    try:
        trainer.fit((x[:80], y[:80]), epochs=epochs, val_data=(x[80:], y[80:]), batch_size=BATCH)
    except KeyboardInterrupt:
        trainer.save_checkpoint(save)
    return trainer, stopper, ckpt


def test_a_stopped_run_stays_stopped_after_resume_and_restores_the_best_weights(tmp_path):
    trainer, stopper, ckpt = _stopping_run(tmp_path)
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1 and len(trainer.history) == 4
    final = _params(trainer.model)  # the best epoch's weights, restored at the end
    assert any((final[k] != v.numpy()).any() for k, v in io.load(ckpt.last_path)["model"].items())
    last = io.load(ckpt.last_path)  # written at the stopping epoch, after EarlyStopping decided
    assert last["epoch"] == len(trainer.history)
    resumed, stopper2, _ = _stopping_run(tmp_path / "again", resume=ckpt.last_path)
    assert stopper2.stopped_epoch == stopper.stopped_epoch and stopper2.best_epoch == stopper.best_epoch
    assert len(resumed.history) == len(trainer.history)  # no epoch trained
    _assert_same(_params(resumed.model), final)
    resumed.fit(([[0.0] * 4], [0]), epochs=50)  # and fit again in the same process: still stopped
    assert len(resumed.history) == len(trainer.history)


@pytest.mark.parametrize("interrupt", [1 * 5 + 2, 2 * 5 + 3, 3 * 5 + 1])  # epochs 2 (best), 3 and 4 (stops)
def test_early_stopping_resumed_mid_run_is_the_uninterrupted_run(tmp_path, interrupt):
    straight, stopper, _ = _stopping_run(tmp_path / "a")
    ckpt = tmp_path / "interrupted.ckpt"
    _stopping_run(tmp_path / "b", interrupt=interrupt, save=ckpt)
    resumed, stopper2, _ = _stopping_run(tmp_path / "c", resume=ckpt)
    assert (stopper2.stopped_epoch, stopper2.best_epoch, stopper2.wait) == \
           (stopper.stopped_epoch, stopper.best_epoch, stopper.wait)
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    assert resumed.history["val_loss"] == straight.history["val_loss"]
    _assert_same(_params(resumed.model), _params(straight.model))  # the best weights, restored


def test_callback_states_round_trip_and_match_by_type(tmp_path):
    trainer, stopper, ckpt = _stopping_run(tmp_path)
    state = io.load(ckpt.last_path)
    assert state["callback_types"] == ["ModelCheckpoint", "EarlyStopping", "LRSchedulerCallback"]
    es = state["callbacks"][1]
    assert set(es) == {"best", "wait", "best_epoch", "stopped_epoch", "best_state"}
    assert es["stopped_epoch"] == stopper.stopped_epoch and set(es["best_state"]) == set(trainer.model.state_dict())
    assert state["callbacks"][2]["last_epoch"] == len(trainer.history)  # stepped before ModelCheckpoint saved
    # Callbacks listed in another order, and one fewer: each gets its own type's state; the rest warns.
    fresh_stopper = EarlyStopping(monitor="val_loss", patience=2)
    engine.manual_seed(0)
    model = _model(dropout=0.2)
    other = Trainer(model, optim.SGD(model.parameters(), lr=0.05), callbacks=[fresh_stopper], verbose=0)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint x1, LRSchedulerCallback x1"):
        other.load_state_dict(state)
    assert fresh_stopper.state_dict()["stopped_epoch"] == stopper.stopped_epoch
    assert fresh_stopper.best == stopper.best and fresh_stopper.wait == stopper.wait


def test_a_checkpoint_of_every_epoch_resumes_exactly(tmp_path):
    """ModelCheckpoint's last.ckpt holds the scheduler and callbacks as they are after the epoch."""
    straight = _run(tmp_path, 1)
    ckpt = tmp_path / "interrupted.ckpt"
    _run(tmp_path, 1, interrupt=7, save=ckpt, checkpoint_every_epoch=True)  # last.ckpt is epoch 1's
    last = tmp_path / "epoch1.ckpt"
    (tmp_path / "ckpt" / "last.ckpt").rename(last)
    assert io.load(last)["epoch"] == 1 and len(io.load(last)["history"]["loss"]) == 1
    _assert_same_run(straight, _run(tmp_path, 1, resume=last, checkpoint_every_epoch=True))


def test_loading_warns_nothing_for_a_matching_trainer(tmp_path):
    trainer, _, ckpt = _stopping_run(tmp_path)
    again, _, _ = _stopping_run(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_checkpoint(ckpt.last_path)
    assert backend.get_rng_state()["cpu"] == io.load(ckpt.last_path)["rng"]["cpu"]


# ---- 4. ModelCheckpoint on a figure that never appears ----------------------------------------

def test_model_checkpoint_says_when_its_monitor_is_not_logged(tmp_path):
    x, y = _data()
    ckpt = ModelCheckpoint(tmp_path, monitor="val_acc")  # a typo of val_accuracy
    trainer = _trainer(callbacks=[ckpt])
    with pytest.raises(KeyError, match=r"ModelCheckpoint: monitored metric 'val_acc' is not in the logs \[.*"
                                       r"'val_accuracy'.*monitor=None to write only last.ckpt"):
        trainer.fit((x, y), epochs=2, val_data=(x, y), batch_size=BATCH)
    assert ckpt.last_path.exists() and not ckpt.best_path.exists()
    with pytest.raises(KeyError, match="'val_loss' is not in the logs"):  # the default, without validation data
        _trainer(callbacks=[ModelCheckpoint(tmp_path / "b")]).fit((x, y), epochs=1, batch_size=BATCH)
    only_last = ModelCheckpoint(tmp_path / "c", monitor=None)
    _trainer(callbacks=[only_last]).fit((x, y), epochs=1, batch_size=BATCH)
    assert only_last.last_path.exists() and not only_last.best_path.exists()
    with pytest.raises(ValueError, match="write nothing"):
        ModelCheckpoint(tmp_path, monitor=None, save_last=False)
    with pytest.raises(ValueError, match="monitor must be the name"):
        EarlyStopping(monitor="")


# ---- a bad checkpoint changes nothing ----------------------------------------------------------------

def _full_state(trainer):
    """Everything load_checkpoint may change, as plain host values."""
    opt = trainer.optimizer.state_dict()
    return {"params": _params(trainer.model),
            "optimizer": (repr(opt["param_groups"]),
                          {i: {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in entry.items()}
                           for i, entry in opt["state"].items()}),
            "callbacks": repr([cb.state_dict() for cb in trainer.callbacks]),
            "rng": repr(backend.get_rng_state()), "epoch": trainer.epoch, "history": repr(trainer.history.history),
            "pending": (repr(trainer._pending_rng), repr(trainer._pending_loader_state),
                        repr(trainer._resume_progress))}


def _assert_same_state(a, b):
    _assert_same(a["params"], b["params"])
    assert a["optimizer"][0] == b["optimizer"][0]
    assert a["optimizer"][1].keys() == b["optimizer"][1].keys()
    for index, entry in a["optimizer"][1].items():
        _assert_same(entry, b["optimizer"][1][index])
    for key in ("callbacks", "rng", "epoch", "history", "pending"):
        assert a[key] == b[key], key


def _trainer_with_everything():
    engine.manual_seed(0)
    model = _model()
    opt = optim.Adam(model.parameters(), lr=0.01)
    return Trainer(model, opt, metrics=["accuracy"], verbose=0,
                   scheduler=optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                   callbacks=[EarlyStopping(monitor="loss", patience=3)])


def _corrupt(entry, state):
    if entry == "missing optimizer":
        del state["optimizer"]
    elif entry == "garbage rng":
        state["rng"] = {"seed": 0, "cpu": {"bit_generator": "PCG64", "state": "garbage"}}
    elif entry == "string lr":
        state["optimizer"]["param_groups"][0]["lr"] = "0.01"
    elif entry == "third tensor's shape":
        state["model"]["3.weight"] = np.zeros((5, 5), np.float32)
    elif entry == "negative epoch":
        state["epoch"] = -1
    elif entry == "history":
        state["history"] = {"loss": ["low"]}
    elif entry == "early stopping state":
        state["callbacks"][1]["wait"] = "x"  # [0] is the scheduler's, [1] EarlyStopping's
    elif entry == "scheduler state":
        state["callbacks"][0] = {"last_epoch": 1}
    elif entry == "progress counters":
        state["progress"] = {"epoch": state["epoch"], "batches_done": -2, "loss_sum": 0.0, "samples": 0}
    return state


BAD_ENTRIES = {"missing optimizer": "optimizer", "garbage rng": "rng", "string lr": "optimizer",
               "third tensor's shape": "model", "negative epoch": "epoch", "history": "history",
               "early stopping state": "callbacks", "scheduler state": "callbacks",
               "progress counters": "progress"}


@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
def test_a_bad_checkpoint_raises_naming_file_and_entry_and_changes_nothing(bad, tmp_path):
    x, y = _data()
    trainer = _trainer_with_everything()
    trainer.fit((x, y), epochs=1, batch_size=BATCH)
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    trainer.fit((x, y), epochs=2, batch_size=BATCH)  # the trainer moves on: the checkpoint differs from it
    path = tmp_path / "bad.ckpt"
    io.save(_corrupt(bad, io.load(good)), path)
    before = _full_state(trainer)
    with pytest.raises(io.CheckpointError, match=rf"(?s)Trainer\.load_checkpoint\('.*bad\.ckpt'\): the entry "
                                                 rf"'{BAD_ENTRIES[bad]}' does not fit.*nothing was restored"):
        trainer.load_checkpoint(path)
    _assert_same_state(before, _full_state(trainer))
    trainer.load_checkpoint(good)  # and the good one still loads, changing everything
    after = _full_state(trainer)
    assert after["epoch"] == 1 and not np.array_equal(after["params"]["0.weight"], before["params"]["0.weight"])


@pytest.mark.parametrize("strict", [True, False])
def test_module_load_state_dict_with_a_bad_third_tensor_loads_none(strict):
    """PyTorch copies the tensors that fit before raising; the engine checks all first, so an error
    leaves the module as it was."""
    model = _model()
    before = _params(model)
    state = {k: np.full(v.shape, 9.0, np.float32) for k, v in before.items()}
    state["3.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(engine.ShapeError, match="size mismatch for '3.weight'"):
        model.load_state_dict(state, strict=strict)
    _assert_same(before, _params(model))

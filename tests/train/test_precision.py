"""Trainer(precision=...): Lightning's names, autocast around forward and loss, a GradScaler for
"16-mixed", and checkpoints that carry the precision and the scaler's state.

"16-mixed" runs with ``engine.amp.GradScaler``; the Trainer's calls into a scaler (scale,
unscale_ before clipping, step, update, state_dict) are checked against :class:`RecordingScaler`, a small stand-in with torch's API.
"""

import warnings

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import amp, io, nn, optim
from engine.train import Callback, Trainer, TrainingDiverged
from engine.train.trainer import precision_flag

# float16 overflows while a scaler finds its scale (the point of scaling): numpy says so when the
# gradients are rounded to float16; the scaler, not the warning, is what these tests check.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]



def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(3, 4))
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 1, size=(n, 4))).astype(np.float32), y.astype(np.int64)


def _model():
    engine.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _params(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


# ---- the names: Lightning's ------------------------------------------------------------------

@pytest.mark.parametrize("given, flag", [("32-true", "32-true"), ("bf16-mixed", "bf16-mixed"),
                                         ("16-mixed", "16-mixed"), ("32", "32-true"), (32, "32-true")])
def test_lightnings_names_and_the_32_aliases_need_no_warning(given, flag):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision_flag(given) == flag


@pytest.mark.parametrize("given, flag", [("16", "16-mixed"), (16, "16-mixed"), ("bf16", "bf16-mixed")])
def test_the_historical_aliases_warn_as_in_lightning(given, flag):
    with pytest.warns(UserWarning, match=f"supported for historical reasons.*set your precision to {flag}"):
        assert precision_flag(given) == flag


@pytest.mark.parametrize("given, message", [
    ("64-true", "float64 training"), (64, "float64 training"), ("bf16-true", "bfloat16 parameters"),
    ("16-true", "float16 parameters"), ("transformer-engine", "Transformer Engine")])
def test_lightnings_other_precisions_are_refused_by_name(given, message):
    with pytest.raises(ValueError, match=f"{message}.*does not run; it takes '32-true', 'bf16-mixed'"):
        precision_flag(given)


@pytest.mark.parametrize("given", ["bf16-true-ish", "fp16", "32-mixed", True, 32.0, None, ["32"]])
def test_anything_else_is_not_a_precision(given):
    with pytest.raises(ValueError, match="is not a precision; use one of '32-true', 'bf16-mixed', '16-mixed'"):
        model = _model()
        Trainer(model, optim.SGD(model.parameters(), lr=0.1), precision=given)


# ---- bf16-mixed: autocast around forward and loss ---------------------------------------------

class _Probe(nn.Module):
    """A Linear that records, per call, whether a CPU autocast region is on and its output dtype."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        out = self.linear(x)
        self.seen.append((engine.is_autocast_enabled("cpu"), out.dtype))
        return out


@pytest.mark.parametrize("precision, dtype", [("32-true", engine.float32), ("bf16-mixed", engine.bfloat16),
                                              ("16-mixed", engine.float16)])
def test_forward_runs_in_the_precisions_dtype_in_fit_evaluate_and_predict(precision, dtype, monkeypatch):
    x, y = _data(32)
    engine.manual_seed(0)
    model = _Probe()
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), metrics=["accuracy"], verbose=0,
                      precision=precision)
    history = trainer.fit((x, y), epochs=1, batch_size=16, val_data=(x, y))
    logits = trainer.predict(x)
    mixed = precision != "32-true"
    assert model.seen == [(mixed, dtype)] * (2 + 2 + 1)  # 2 training batches, 2 for validation (batch 16), predict
    assert logits.dtype == dtype  # outputs as the model gives them, as Lightning's predict
    assert np.isfinite(history["loss"][0]) and np.isfinite(history["val_loss"][0])
    assert isinstance(history["val_accuracy"][0], float)
    for p in model.parameters():  # autocast style: parameters, gradients and Adam's state stay float32
        assert p.dtype == engine.float32 and p.grad.dtype == engine.float32
    assert all(s.dtype == engine.float32 for state in trainer.optimizer.state.values()
               for s in state.values() if isinstance(s, engine.Tensor) and s.ndim)
    assert not engine.is_autocast_enabled("cpu")  # no region left open


def test_bf16_mixed_is_the_autocast_recipe_written_by_hand():
    x, y = _data(48)
    model = _model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), verbose=0, precision="bf16-mixed",
                      grad_clip_norm=1.0, metrics=())
    trainer.fit((x, y), epochs=2, batch_size=16, shuffle=False)

    by_hand = _model()
    opt = optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9)
    from engine.nn.utils import clip_grad_norm_

    for _ in range(2):
        for i in range(0, 48, 16):
            opt.zero_grad()
            with engine.autocast("cpu", dtype=engine.bfloat16):
                loss = F.cross_entropy(by_hand(engine.tensor(x[i:i + 16])), engine.tensor(y[i:i + 16]))
            loss.backward()
            clip_grad_norm_(by_hand.parameters(), 1.0)
            opt.step()
    for (name, a), b in zip(_params(model).items(), _params(by_hand).values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.slow
def test_bf16_mixed_training_follows_torch_autocast():
    torch = pytest.importorskip("torch")
    x, y = _data(48)
    model = _model()
    start = _params(model)
    Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0, precision="bf16-mixed",
            metrics=()).fit((x, y), epochs=1, batch_size=16, shuffle=False)

    twin = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()})
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for i in range(0, 48, 16):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x[i:i + 16])), torch.from_numpy(y[i:i + 16]))
        loss.backward()
        opt.step()
    for name, theirs in twin.state_dict().items():
        mine = _params(model)[name]
        # three steps whose matmuls ran in bfloat16 on both sides: agreement to bf16 rounding
        np.testing.assert_allclose(mine, theirs.numpy(), atol=2 ** -8 * np.abs(theirs.numpy()).max(), err_msg=name)
        assert not np.array_equal(mine, start[name]), name  # and training did move them


# ---- 16-mixed: the scaler's protocol --------------------------------------------------------------

class RecordingScaler:
    """A stand-in with torch's GradScaler API and semantics (dynamic loss scaling: skip the step and
    halve the scale on inf/NaN gradients, double it after ``growth_interval`` good steps) that
    records every call, so the tests can check what the Trainer asks of a scaler."""

    instances = []

    def __init__(self, device="cuda", init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        self.device, self._scale, self._growth_tracker = device, float(init_scale), 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.calls, self._found_inf, self._unscaled = [], None, False
        RecordingScaler.instances.append(self)

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self._scale

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        self._unscale(optimizer)

    def _unscale(self, optimizer):
        assert not self._unscaled, "unscale_() called twice before update()"
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad._data *= np.float32(1.0 / self._scale)
                    found |= not np.isfinite(p.grad._data).all()
        self._found_inf, self._unscaled = found, True

    def step(self, optimizer):
        self.calls.append("step")
        if not self._unscaled:
            self._unscale(optimizer)
        if not self._found_inf:
            optimizer.step()

    def update(self):
        self.calls.append("update")
        if self._found_inf:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0
        self._found_inf, self._unscaled = None, False

    def get_scale(self):
        return self._scale

    def state_dict(self):
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state):
        if not state:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of GradScaler.")
        self._scale, self._growth_tracker = float(state["scale"]), int(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = float(state["growth_factor"]), float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])


@pytest.fixture
def recording_scaler(monkeypatch):
    RecordingScaler.instances.clear()
    monkeypatch.setattr(amp, "GradScaler", RecordingScaler, raising=False)
    return RecordingScaler


def test_16_mixed_makes_a_scaler_for_the_models_device(recording_scaler):
    model = _model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), precision="16-mixed")
    assert isinstance(trainer.scaler, recording_scaler) and trainer.scaler.device == "cpu"
    for precision in ("32-true", "bf16-mixed"):
        assert Trainer(model, optim.SGD(model.parameters(), lr=0.1), precision=precision).scaler is None



def test_the_scaler_scales_each_loss_unscales_before_clipping_and_steps_once_per_group(recording_scaler):
    x, y = _data(64)
    model = _model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0, precision="16-mixed",
                      grad_clip_norm=1.0, accumulate_steps=2, metrics=())
    trainer.fit((x, y), epochs=1, batch_size=16, shuffle=False)  # 4 batches: 2 groups of 2
    group = ["scale", "scale", "unscale_", "step", "update"]
    assert trainer.scaler.calls == group * 2
    trainer.grad_clip_norm = None
    trainer.scaler.calls.clear()
    trainer.fit((x, y), epochs=2, batch_size=16, shuffle=False)
    assert trainer.scaler.calls == ["scale", "scale", "step", "update"] * 2  # no clipping: step unscales


def test_16_mixed_is_the_scaler_recipe_written_by_hand(recording_scaler):
    x, y = _data(48)
    model = _model()
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), verbose=0, precision="16-mixed",
                      grad_clip_norm=0.5, metrics=())
    trainer.fit((x, y), epochs=2, batch_size=16, shuffle=False)

    by_hand = _model()
    opt = optim.Adam(by_hand.parameters(), lr=1e-2)
    scaler = recording_scaler(device="cpu")
    from engine.nn.utils import clip_grad_norm_

    for _ in range(2):
        for i in range(0, 48, 16):
            opt.zero_grad()
            with engine.autocast("cpu", dtype=engine.float16):
                loss = F.cross_entropy(by_hand(engine.tensor(x[i:i + 16])), engine.tensor(y[i:i + 16]))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            clip_grad_norm_(by_hand.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    for (name, a), b in zip(_params(model).items(), _params(by_hand).values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert trainer.scaler.state_dict() == scaler.state_dict()


def test_with_a_scaler_an_overflowing_step_is_skipped_not_a_divergence(recording_scaler):
    x, y = _data(48)
    model = _model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0, precision="16-mixed", sync_every=1,
                      metrics=())
    trainer.scaler._scale = 1e38  # the scaled loss overflows: the first gradients are inf
    before = _params(model)
    trainer.fit((x[:16], y[:16]), epochs=1, batch_size=16)
    assert trainer.scaler.get_scale() == 5e37  # backed off
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)  # the step was skipped
    trainer.scaler._scale = 1024.0
    trainer.fit((x, y), epochs=2, batch_size=16)  # and training goes on from there
    assert all(np.isfinite(v).all() for v in _params(model).values())
    assert not all(np.array_equal(v, before[k]) for k, v in _params(model).items())


def test_a_non_finite_loss_is_still_a_divergence_with_a_scaler(recording_scaler):
    x, y = _data(32)
    x[3] = np.nan
    model = _model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), verbose=0, precision="16-mixed", sync_every=1)
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        trainer.fit((x, y), epochs=1, batch_size=16, shuffle=False)


# ---- checkpoints: the precision and the scaler's state ---------------------------------------------

def _trainer(precision, callbacks=()):
    model = _model()
    return Trainer(model, optim.Adam(model.parameters(), lr=1e-2), verbose=0, precision=precision,
                   callbacks=list(callbacks), metrics=())


def test_a_checkpoint_holds_the_precision_and_the_scalers_state(tmp_path, recording_scaler):
    x, y = _data(32)
    trainer = _trainer("16-mixed")
    trainer.fit((x, y), epochs=1, batch_size=16)
    trainer.scaler._growth_tracker, trainer.scaler._scale = 7, 512.0
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = io.load(tmp_path / "a.ckpt")
    assert state["precision"] == "16-mixed" and state["scaler"]["scale"] == 512.0
    assert state["scaler"]["_growth_tracker"] == 7
    other = _trainer("16-mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same precision: nothing to say
        other.load_checkpoint(tmp_path / "a.ckpt")
    assert other.scaler.state_dict() == trainer.scaler.state_dict()
    plain = _trainer("bf16-mixed")
    plain.fit((x, y), epochs=1, batch_size=16)
    plain.save_checkpoint(tmp_path / "b.ckpt")
    state = io.load(tmp_path / "b.ckpt")
    assert state["precision"] == "bf16-mixed" and "scaler" not in state


@pytest.mark.parametrize("saved, loading, says", [
    ("bf16-mixed", "32-true", "trained with precision='bf16-mixed'; this Trainer continues with precision='32-true'"),
    ("32-true", "16-mixed", "continues with precision='16-mixed' and a fresh GradScaler"),
    ("16-mixed", "bf16-mixed", "trained with precision='16-mixed'; this Trainer continues with precision='bf16-mixed'"),
])
def test_a_checkpoint_of_another_precision_loads_with_a_warning(tmp_path, recording_scaler, saved, loading, says):
    x, y = _data(32)
    first = _trainer(saved)
    first.fit((x, y), epochs=1, batch_size=16)
    first.save_checkpoint(tmp_path / "c.ckpt")
    second = _trainer(loading)
    fresh = second.scaler.state_dict() if second.scaler is not None else None
    with pytest.warns(UserWarning, match=says):
        second.load_checkpoint(tmp_path / "c.ckpt")
    assert second.epoch == 1 and second.precision == loading
    for (name, a), b in zip(_params(first.model).items(), _params(second.model).values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    if fresh is not None:
        assert second.scaler.state_dict() == fresh


def test_a_checkpoint_without_a_precision_is_float32(tmp_path):
    x, y = _data(32)
    first = _trainer("32-true")
    first.fit((x, y), epochs=1, batch_size=16)
    state = first.state_dict()
    del state["precision"]  # as written before precisions were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer("32-true").load_state_dict(state)
    with pytest.warns(UserWarning, match="trained with precision='32-true'"):
        _trainer("bf16-mixed").load_state_dict(state)


class _Counted(Callback):
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.mark.parametrize("entry, value, message", [
    ("precision", "64-true", "'precision' does not fit.*expected one of '32-true', 'bf16-mixed', '16-mixed'"),
    ("precision", 16, "'precision' does not fit"),
    ("scaler", [1.0], "'scaler' does not fit.*expected the GradScaler's state dict, got list"),
    ("scaler", None, "'scaler' does not fit.*missing: a '16-mixed' checkpoint holds its GradScaler's state"),
    ("scaler", {}, "'scaler' does not fit.*RuntimeError: The source state dict is empty"),
    ("optimizer", {"state": {}, "param_groups": []}, "'optimizer' does not fit"),
])
def test_a_bad_precision_or_scaler_entry_changes_nothing(tmp_path, recording_scaler, entry, value, message):
    x, y = _data(32)
    first = _trainer("16-mixed", [_Counted()])
    first.callbacks[0].value = 5
    first.fit((x, y), epochs=1, batch_size=16)
    first.scaler._scale = 8.0
    state = first.state_dict()
    state[entry] = value
    second = _trainer("16-mixed", [_Counted()])
    before = (_params(second.model), second.scaler.state_dict(), second.callbacks[0].value, second.epoch)
    with pytest.raises(io.CheckpointError, match=message):
        second.load_state_dict(state)
    after = (_params(second.model), second.scaler.state_dict(), second.callbacks[0].value, second.epoch)
    assert after[1:] == before[1:]
    for name in before[0]:
        np.testing.assert_array_equal(after[0][name], before[0][name])


# ---- resume: exact in every precision ---------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_resume_mid_epoch_is_exactly_the_uninterrupted_run(tmp_path, precision):
    x, y = _data(80)

    class Stop(Callback):
        def __init__(self, at=None):
            self.at, self.count = at, 0

        def on_batch_end(self, trainer, batch, logs):
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt

    def run(at=None, resume=None):
        engine.manual_seed(3 if resume else 1)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), verbose=0, precision=precision,
                          callbacks=[Stop(at)], grad_clip_norm=1.0, sync_every=2)
        if resume:
            trainer.load_checkpoint(resume)
        try:
            trainer.fit((x, y), epochs=3, batch_size=16)
        except KeyboardInterrupt:
            trainer.save_checkpoint(tmp_path / "cut.ckpt")
            return None
        return trainer

    straight = run()
    assert run(at=7) is None
    resumed = run(resume=tmp_path / "cut.ckpt")
    for (name, a), b in zip(_params(straight.model).items(), _params(resumed.model).values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert resumed.history["loss"] == straight.history["loss"]
    if precision == "16-mixed":
        assert resumed.scaler.state_dict() == straight.scaler.state_dict()


def test_16_mixed_with_the_engines_grad_scaler_learns():
    x, y = _data(96)
    model = _model()
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), verbose=0, precision="16-mixed",
                      grad_clip_norm=1.0)
    history = trainer.fit((x[:80], y[:80]), epochs=6, batch_size=16, val_data=(x[80:], y[80:]))
    assert history["loss"][-1] < history["loss"][0] / 2 and history["val_accuracy"][-1] >= 0.9
    assert trainer.scaler.get_scale() > 0

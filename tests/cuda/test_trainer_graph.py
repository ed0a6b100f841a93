"""Trainer(cuda_graph=True) on the fake stream-capture layer (tests/cuda/fake_capture.py): the captured
step trains exactly as the eager step does (same losses, same parameters), the epoch's short last
batch runs eagerly, a shape change elsewhere raises naming both shapes, and the setups that
cannot be captured are refused by name (the CPU among them).
"""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn, optim
from engine.backend import CaptureError
from engine.optim.lr_scheduler import StepLR
from engine.train import Trainer
from tests.cuda import fake_optim_kernels
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)


def _data(n=37, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return x, np.tanh(x @ rng.standard_normal((4, 3))).astype(np.float32)


def _model():
    engine.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _trainer(model, cuda_graph, fused=True, **kw):
    opt = optim.Adam(model.parameters(), lr=0.05, capturable=True, fused=fused)
    return Trainer(model, opt, loss_fn=F.mse_loss, metrics=("mse",), scheduler=StepLR(opt, 1, gamma=0.5),
                   grad_clip_norm=0.5, verbose=0, cuda_graph=cuda_graph, cuda_graph_warmup=2, **kw)


class _Batches:
    """An iterable of (x, y) batches with a length, as a loader of uneven batches would be."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _host(t):
    return t._data.host.copy()


@pytest.mark.parametrize("fused,precision", [(True, "32-true"), (False, "32-true"), (True, "16-mixed")],
                         ids=["fused", "reference", "fused-16-mixed"])
def test_the_captured_step_trains_as_the_eager_step(fake_gpu, monkeypatch, fused, precision):
    fake_optim_kernels.install(monkeypatch, fake_gpu)
    model, eager_model = _model().to("cuda"), _model().to("cuda")  # the same seed: the same weights
    graphed = _trainer(model, True, fused, precision=precision)
    eager = _trainer(eager_model, False, fused, precision=precision)
    if precision == "16-mixed":  # a scale that grows every 2 steps: the replays must update it on the device
        graphed.scaler, eager.scaler = (engine.amp.GradScaler("cuda", init_scale=2.0 ** 4, growth_interval=2)
                                        for _ in range(2))
    data = _data()
    history = graphed.fit(data, epochs=3, batch_size=8, shuffle=False)
    launches = fake_gpu.launches
    eager_history = eager.fit(data, epochs=3, batch_size=8, shuffle=False)
    # 5 batches an epoch (4 of 8, the last of 5, eager); 2 warm-up batches; every other full batch replays
    assert graphed._graphed.graph is not None and launches == 3 * 4 - 2
    assert fake_gpu.launches == launches, "the eager Trainer replays nothing"
    for key in ("loss", "mse"):
        np.testing.assert_allclose(history[key], eager_history[key], rtol=1e-6, err_msg=key)
    assert history["loss"][2] < history["loss"][0]
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        np.testing.assert_allclose(_host(p), _host(q), rtol=1e-6, atol=1e-7, err_msg=name)
    state, eager_state = graphed.optimizer.state_dict(), eager.optimizer.state_dict()
    assert state["state"][0]["step"] == eager_state["state"][0]["step"] == 15  # replays advanced the count
    assert state["param_groups"][0]["lr"] == eager_state["param_groups"][0]["lr"] == 0.05 * 0.5 ** 3
    if precision == "16-mixed":
        assert graphed.scaler.get_scale() == eager.scaler.get_scale() > 2.0 ** 4


def test_a_shape_change_other_than_the_last_batch_raises_naming_both_shapes(fake_gpu):
    model = _model().to("cuda")
    trainer = _trainer(model, True, fused=False)
    x, y = _data(38)
    sizes = [8, 8, 8, 6, 8]
    starts = np.cumsum([0] + sizes)
    batches = _Batches([(engine.tensor(x[a:b]), engine.tensor(y[a:b])) for a, b in zip(starts, starts[1:])])
    with pytest.raises(CaptureError, match=r"batch 4 has inputs \(6, 4\) float32 and targets \(6, 3\) float32, but the "
                                           r"step was captured for inputs \(8, 4\) float32 and targets \(8, 3\) float32"
                                           r".*drop_last=True"):
        trainer.fit(batches, epochs=1)


def test_on_the_cpu_cuda_graph_raises_naming_the_device():
    model = _model()
    opt = optim.Adam(model.parameters(), capturable=True)
    with pytest.raises(engine.DeviceError, match=r"Trainer\(cuda_graph=True\): a CUDA graph captures GPU work, but the "
                                                 r"model is on cpu"):
        Trainer(model, opt, cuda_graph=True)


def test_what_cannot_be_captured_is_refused_when_the_trainer_is_built(fake_gpu):
    model = _model().to("cuda")
    with pytest.raises(ValueError, match=r"optimizer must be an engine optimizer built with capturable=True .* got Adam"):
        Trainer(model, optim.Adam(model.parameters()), cuda_graph=True)
    with pytest.raises(ValueError, match=r"got RMSprop"):
        Trainer(model, optim.RMSprop(model.parameters()), cuda_graph=True)
    capturable = optim.SGD(model.parameters(), lr=0.1, capturable=True)
    with pytest.raises(ValueError, match=r"gradient accumulation \(accumulate_steps=2\) is not captured"):
        Trainer(model, capturable, cuda_graph=True, accumulate_steps=2)
    with pytest.raises(ValueError, match="cuda_graph_warmup must be a positive int, got 0"):
        Trainer(model, capturable, cuda_graph=True, cuda_graph_warmup=0)

"""capturable=True optimizers: a step captured in a CUDA graph reads the learning rate and the step
count from device memory at every replay (tests/cuda/fake_capture.py runs the capture logic on
the CPU; tests/cuda/fake_optim_kernels.py stands in for the fused optim.cu kernels there).

Each test steps a capturable optimizer on the fake GPU by graph replays, and the same optimizer
(not capturable) on the CPU eagerly, with the same gradients and the same scheduler, and compares
the parameters, the states and the step counts after every replay.
"""

import numpy as np
import pytest

import engine
from engine import optim
from engine.backend import CaptureError
from engine.optim.lr_scheduler import StepLR
from tests.cuda import fake_optim_kernels
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)

OPTIMIZERS = {
    "adam": lambda params, **kw: optim.Adam(params, lr=0.05, **kw),
    "adamw-amsgrad": lambda params, **kw: optim.AdamW(params, lr=0.05, weight_decay=0.1, amsgrad=True, **kw),
    "sgd-nesterov": lambda params, **kw: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                    **kw),
}
SHAPES = [(3, 4), (5,), (2, 3)]


def _params(device):
    rng = np.random.default_rng(0)
    return [engine.tensor(rng.standard_normal(shape).astype(np.float32), device=device, requires_grad=True)
            for shape in SHAPES]


def _grads(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def _host(t):
    return t._data.host.copy() if hasattr(t._data, "host") else np.asarray(t._data)


def _set_grads(params, grads):
    with engine.no_grad():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = engine.tensor(g, device=p.device)
            else:
                p.grad.copy_(engine.tensor(g, device=p.device))  # in place: the graph reads this memory


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_captured_step_rereads_lr_and_step_count_at_every_replay(fake_gpu, monkeypatch, name, fused):
    launched = fake_optim_kernels.install(monkeypatch, fake_gpu)
    gpu, cpu = _params("cuda"), _params("cpu")
    opt = OPTIMIZERS[name](gpu, capturable=True, fused=fused)
    ref = OPTIMIZERS[name](cpu)
    sched, ref_sched = StepLR(opt, step_size=1, gamma=0.5), StepLR(ref, step_size=1, gamma=0.5)

    for params, o in ((gpu, opt), (cpu, ref)):  # warm-up: one eager step creates the states
        _set_grads(params, _grads(0))
        o.step()
    assert bool(launched) == fused
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        opt.step()
    for p, p_ref in zip(gpu, cpu):  # the capture changed nothing
        np.testing.assert_allclose(_host(p), _host(p_ref), rtol=1e-6, atol=1e-7)

    for step in range(1, 5):
        sched.step(), ref_sched.step()  # a new lr on the host: the group's device lr is filled with it
        _set_grads(gpu, _grads(step))
        _set_grads(cpu, _grads(step))
        g.replay()
        ref.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.5 ** step * ref_sched.base_lrs[0]
        for i, (p, p_ref) in enumerate(zip(gpu, cpu)):
            np.testing.assert_allclose(_host(p), _host(p_ref), rtol=2e-5, atol=1e-6, err_msg=f"{name} replay {step} p{i}")
        state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
        for i in ref_state:
            for key, value in ref_state[i].items():
                if key == "step":
                    assert state[i]["step"] == value == step + 1, f"{name} replay {step}: the step count advanced"
                else:
                    np.testing.assert_allclose(_host(state[i][key]), _host(value), rtol=2e-5, atol=1e-6)


def test_the_device_step_count_is_shared_read_by_state_dict_and_kept_on_the_device(fake_gpu):
    params = _params("cuda")
    opt = optim.Adam(params, capturable=True, fused=False)
    _set_grads(params, _grads(0))
    opt.step()
    bucket = opt._buckets[0][0]
    counts = {id(c) for c in bucket.steps}
    assert len(counts) == 1 and hasattr(next(iter(bucket.steps)).array, "host"), "one device count for the bucket"
    assert opt.state_dict()["state"][0]["step"] == 1
    assert len({id(c) for c in bucket.steps}) == 1, "reading it keeps it on the device (a graph increments it)"


def test_a_param_without_gradient_keeps_its_count_and_a_capture_refuses_to_split_one(fake_gpu):
    params = _params("cuda")
    opt = optim.Adam(params, capturable=True, fused=False)
    _set_grads(params, _grads(0))
    opt.step()
    params[1].grad = None  # its count must stay at 1 while the others advance
    with pytest.raises(CaptureError, match=r"step count shared with a parameter that has no gradient.*warm-up"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            opt.step()
    opt.step()  # eagerly the shared count is split
    assert [e["step"] for e in opt.state_dict()["state"].values()] == [2, 1, 2]


def test_lr_assigned_between_replays_by_hand_is_seen(fake_gpu, monkeypatch):
    fake_optim_kernels.install(monkeypatch, fake_gpu)
    p = engine.tensor(np.ones(4, np.float32), device="cuda", requires_grad=True)
    opt = optim.SGD([p], lr=0.5, capturable=True)
    _set_grads([p], [np.ones(4, np.float32)])
    opt.step()
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        opt.step()
    opt.param_groups[0]["lr"] = 0.25
    g.replay()
    np.testing.assert_allclose(_host(p), 1.0 - 0.5 - 0.25)
    opt.param_groups[0].update(lr=0.125)  # load_state_dict's path
    g.replay()
    np.testing.assert_allclose(_host(p), 1.0 - 0.5 - 0.25 - 0.125)


def test_a_step_in_a_capture_needs_capturable(fake_gpu):
    params = _params("cuda")
    opt = optim.Adam(params, fused=False)
    _set_grads(params, _grads(0))
    opt.step()
    with pytest.raises(CaptureError, match=r"^Adam\.step inside an engine\.cuda\.graph capture: its learning rate and "
                                           r"step counts are host numbers.*capturable=True"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            opt.step()
    assert opt.state_dict()["state"][0]["step"] == 1  # refused before anything changed
    rms = optim.RMSprop(params)
    with pytest.raises(CaptureError, match=r"RMSprop\.step inside .*step it outside the captured region"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            rms.step()


def test_a_capture_before_the_first_eager_step_is_refused(fake_gpu):
    params = _params("cuda")
    opt = optim.Adam(params, capturable=True)
    _set_grads(params, _grads(0))
    with pytest.raises(CaptureError, match=r"state buffers \(exp_avg, exp_avg_sq\) would be created in the capture.*"
                                           r"take one eager step before capturing"):
        with engine.cuda.graph(engine.cuda.CUDAGraph()):
            opt.step()


def test_capturable_on_the_cpu_raises_naming_the_device_as_pytorch_refuses_it():
    params = _params("cpu")
    for opt in (optim.Adam(params, capturable=True), optim.AdamW(params, capturable=True),
                optim.SGD(params, lr=0.1, capturable=True)):
        _set_grads(params, _grads(0))
        with pytest.raises(engine.EngineError, match=r"\.step: capturable=True needs the parameters and step counts "
                                                      r"on a CUDA device .* got Tensor\(shape=\(3, 4\).*device=cpu"):
            opt.step()
    np.testing.assert_array_equal(_host(params[0]), _params("cpu")[0].detach().numpy())
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported devices"):
        torch.optim.Adam([p], capturable=True).step()


def test_capturable_must_be_a_bool():
    with pytest.raises(engine.EngineError, match="Adam: capturable must be True or False, got 'yes'"):
        optim.Adam(_params("cpu"), capturable="yes")

"""float16 / bfloat16 parameters: float32 master weights and states, checked against torch.

The issue's check: ``model.to(bfloat16)`` with an engine optimizer equals torch's optimizer on
float32 parameters fed the same gradients, followed by rounding to bfloat16. Also: the master in
the state dict (an exact resume), ``master_weights=False``, a parameter written outside the
optimizer, and float16 parameters with a GradScaler.
"""

import numpy as np
import pytest

import engine
from engine import nn, optim

torch = pytest.importorskip("torch")

LOW = [(engine.bfloat16, torch.bfloat16), (np.float16, torch.float16)]
LOW_IDS = ["bf16", "fp16"]
OPTIMIZERS = [("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("Adam", dict(lr=1e-2, amsgrad=True)),
              ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("Adagrad", dict(lr=0.05)),
              ("RMSprop", dict(lr=1e-3, momentum=0.5))]
OPT_IDS = ["adamw", "adam-amsgrad", "sgd-nesterov", "adagrad", "rmsprop"]


def mlp():
    engine.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(rng):
    return (engine.tensor(rng.standard_normal((10, 6)).astype(np.float32)),
            engine.tensor(rng.standard_normal((10, 3)).astype(np.float32)))


def low_step_loss(model, x, y, low):
    return ((model(x.to(low)) - y.to(low)).float() ** 2).mean()


def torch_twins(model):
    """float32 torch tensors holding the low-precision parameters' values."""
    return [torch.tensor(p.float().numpy(), requires_grad=True) for p in model.parameters()]


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "reference"])
@pytest.mark.parametrize("low,torch_low", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("opt_name,kwargs", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.slow
def test_low_precision_model_equals_torch_on_float32_then_rounded(opt_name, kwargs, low, torch_low, fused):
    model = mlp().to(low)
    params = list(model.parameters())
    twins = torch_twins(model)
    opt = getattr(optim, opt_name)(params, fused=fused, **kwargs)
    topt = getattr(torch.optim, opt_name)(twins, **kwargs)
    rng = np.random.default_rng(1)
    for _ in range(12):
        opt.zero_grad()
        low_step_loss(model, *batch(rng), low).backward()
        for p, t in zip(params, twins):  # the same gradients, as float32
            assert p.grad.dtype == np.dtype(low)
            t.grad = torch.tensor(p.grad.float().numpy())
        opt.step()
        topt.step()
    state = opt.state
    for i, (p, t) in enumerate(zip(params, twins)):
        master = state[p]["master_param"].numpy()
        reference = t.detach().numpy()
        assert master.dtype == np.float32 and p.dtype == np.dtype(low)
        np.testing.assert_allclose(master, reference, rtol=2e-6, atol=2e-6 * np.max(np.abs(reference)),
                                   err_msg=f"param {i} master")
        rounded = t.detach().to(torch_low).float().numpy()
        ours = p.float().numpy()
        # torch's float32 trajectory rounded: equal, but where torch's value sits within float32
        # rounding of a 16-bit rounding boundary (one 16-bit ulp apart, at most a few elements)
        spacing = np.abs(np.nextafter(rounded.astype(low), np.inf).astype(np.float32) - rounded)
        assert np.all(np.abs(ours - rounded) <= spacing), f"param {i}"
        assert np.mean(ours == rounded) > 0.98, f"param {i}: {np.mean(ours == rounded)}"
        np.testing.assert_array_equal(ours, master.astype(low).astype(np.float32))  # the master, rounded
        for name, value in state[p].items():
            if name not in ("step", "master_param"):
                assert value.dtype == np.float32, (name, value.dtype)


@pytest.mark.parametrize("opt_name,kwargs", OPTIMIZERS[:3], ids=OPT_IDS[:3])
def test_fused_and_reference_master_paths_agree(opt_name, kwargs):
    runs = []
    for fused in (True, False):
        model = mlp().bfloat16()
        opt = getattr(optim, opt_name)(model.parameters(), fused=fused, **kwargs)
        rng = np.random.default_rng(2)
        for _ in range(6):
            opt.zero_grad()
            low_step_loss(model, *batch(rng), engine.bfloat16).backward()
            opt.step()
        runs.append([opt.state[p]["master_param"].numpy() for p in model.parameters()])
    for fused_master, reference_master in zip(*runs):
        np.testing.assert_allclose(fused_master, reference_master, rtol=1e-6, atol=1e-7)


def _train(model, opt, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.zero_grad()
        low_step_loss(model, *batch(rng), engine.bfloat16).backward()
        opt.step()


def test_the_state_dict_saves_the_master_and_a_resumed_run_is_exact(tmp_path):
    model = mlp().bfloat16()
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 5, seed=3)
    sd = opt.state_dict()
    assert all(entry["master_param"].dtype == np.float32 for entry in sd["state"].values())
    engine.save({"model": model.state_dict(), "optim": sd}, tmp_path / "ckpt")
    _train(model, opt, 4, seed=4)
    want = [p.float().numpy() for p in model.parameters()]

    resumed = mlp().bfloat16()
    ckpt = engine.load(tmp_path / "ckpt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["optim"])
    _train(resumed, opt2, 4, seed=4)
    for w, p in zip(want, resumed.parameters()):
        np.testing.assert_array_equal(p.float().numpy(), w)

    # Without the master (rounded bfloat16 values only) the continuation differs: the master matters.
    lossy = mlp().bfloat16()
    lossy.load_state_dict(ckpt["model"])
    opt3 = optim.AdamW(lossy.parameters(), lr=1e-2)
    opt3.load_state_dict({**ckpt["optim"], "state": {i: {k: v for k, v in e.items() if k != "master_param"}
                                                     for i, e in ckpt["optim"]["state"].items()}})
    _train(lossy, opt3, 4, seed=4)
    assert any(not np.array_equal(p.float().numpy(), w) for w, p in zip(want, lossy.parameters()))


def test_a_float32_model_loads_a_master_checkpoint_and_drops_the_master():
    model = mlp().bfloat16()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2, seed=5)
    fp32 = mlp()
    opt32 = optim.Adam(fp32.parameters(), lr=1e-2)
    opt32.load_state_dict(opt.state_dict())
    assert all("master_param" not in entry for entry in opt32.state_dict()["state"].values())
    assert all(v.dtype == np.float32 for e in opt32.state.values() for k, v in e.items() if k != "step")


def test_master_weights_false_keeps_16_bit_states_without_a_master():
    model = mlp().bfloat16()
    opt = optim.Adam(model.parameters(), lr=1e-2, master_weights=False)
    _train(model, opt, 2, seed=6)
    for entry in opt.state.values():
        assert "master_param" not in entry and entry["exp_avg"].dtype == np.dtype(engine.bfloat16)
    with pytest.raises(engine.EngineError, match=r"master_weights must be None, True or False, got 'yes'"):
        optim.Adam(model.parameters(), master_weights="yes")


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "reference"])
def test_a_parameter_written_outside_the_optimizer_restarts_its_master(fused):
    """A write through .data (not seen by any version counter) is not undone by the next step."""
    model = mlp().bfloat16()
    opt = optim.SGD(model.parameters(), lr=0.1, fused=fused)
    _train(model, opt, 3, seed=7)
    weight = model[0].weight
    weight.data.fill_(0.5)
    opt.zero_grad()
    weight.grad = engine.zeros_like(weight)
    opt.step()
    np.testing.assert_array_equal(weight.float().numpy(), 0.5)
    np.testing.assert_array_equal(opt.state[weight]["master_param"].numpy(), 0.5)


def test_rebinding_the_parameters_keeps_the_masters_low_bits():
    """A rebuild of the flat buffers (the parameters' arrays rebound) carries the master over."""
    runs = []
    for rebind in (False, True):
        model = mlp().bfloat16()
        opt = optim.Adam(model.parameters(), lr=1e-3)
        _train(model, opt, 3, seed=8)
        if rebind:
            for p in model.parameters():
                p.data = p.data.clone()
        _train(model, opt, 3, seed=9)
        runs.append([opt.state[p]["master_param"].numpy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "reference"])
def test_float16_parameters_with_a_grad_scaler_equal_torch_float32_with_its_scaler(fused):
    """fp16 parameters, fp16 (scaled) gradients unscaled in float32 inside the step, injected
    overflows: the master follows torch's float32 parameters given the same scaled gradients."""
    model = mlp().half()
    params = list(model.parameters())
    twins = torch_twins(model)
    opt = optim.Adam(params, lr=1e-2, fused=fused)
    topt = torch.optim.Adam(twins, lr=1e-2)
    scaler = engine.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    rng = np.random.default_rng(10)
    for t in range(10):
        opt.zero_grad()
        topt.zero_grad()
        loss = low_step_loss(model, *batch(rng), np.float16)
        tscaler.scale(torch.tensor(0.0, requires_grad=True))  # the same lazy init of the scale
        scaler.scale(loss).backward()
        if t in (0, 5):
            params[0].grad._data[0, 0] = np.inf
        for p, tw in zip(params, twins):
            tw.grad = torch.tensor(p.grad.float().numpy())
        with np.errstate(invalid="ignore", over="ignore"):
            scaler.step(opt)
        tscaler.step(topt)
        scaler.update()
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale(), t
    for p, tw in zip(params, twins):
        reference = tw.detach().numpy()
        np.testing.assert_allclose(opt.state[p]["master_param"].numpy(), reference, rtol=2e-6,
                                   atol=2e-6 * np.max(np.abs(reference)))
        assert opt.state[p]["step"] == topt.state[tw]["step"].item() == 8
        np.testing.assert_allclose(p.grad.float().numpy(), tw.grad.numpy().astype(np.float16).astype(np.float32),
                                   rtol=1e-3)  # unscaled in the step, written back as float16

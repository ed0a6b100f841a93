"""engine.amp.GradScaler against torch.amp.GradScaler("cpu") as the oracle.

Each trajectory runs the same model, data and injected infs through both, and checks the scale and
growth tracker after every update, then the parameters, every optimizer state and the step counts.
Engine optimizers take the device-side path (the step is always called, the kernels skip on
found_inf); torch's CPU optimizers take its host path (optimizer.step() is not called at all on a
skipped step): the observable results must agree.
"""

import pickle
import warnings

import numpy as np
import pytest

import engine
from engine import backend, optim
from engine.amp.grad_scaler import GradScalerError

torch = pytest.importorskip("torch")

OPTIMIZERS = [("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
              ("SGD", dict(lr=1e-2, momentum=0.9)), ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.3)),
              ("Adagrad", dict(lr=1e-2, lr_decay=0.1)), ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True))]
OPT_IDS = ["adam", "adamw", "sgd-momentum", "sgd-dampening", "adagrad", "rmsprop"]


def close(ours, theirs, what="", rtol=2e-6):
    """Equal to float32 rounding, relative to the array's largest value (differences of rounding in
    a trajectory, or in a backward's sums, scale with it)."""
    largest = np.max(np.abs(theirs[np.isfinite(theirs)]), initial=0.0)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * largest, err_msg=what)


class Pair:
    """One small two-layer problem, built identically in the engine and in torch."""

    def __init__(self, opt_name, kwargs, fused=None, seed=0, scaler_kwargs=None, opt_factory=None):
        rng = np.random.default_rng(seed)
        self.rng = rng
        starts = [rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32),
                  rng.standard_normal((6, 3)).astype(np.float32)]
        self.params = [engine.tensor(a, requires_grad=True) for a in starts]
        self.tparams = [torch.tensor(a, requires_grad=True) for a in starts]
        make = opt_factory or (lambda params, **kw: getattr(optim, opt_name)(params, fused=fused, **kw))
        self.opt = make(self.params, **kwargs)
        self.topt = getattr(torch.optim, opt_name)(self.tparams, **kwargs)
        scaler_kwargs = dict(init_scale=2.0 ** 10, growth_interval=3) | (scaler_kwargs or {})
        self.scaler = engine.amp.GradScaler("cpu", **scaler_kwargs)
        self.tscaler = torch.amp.GradScaler("cpu", **scaler_kwargs)

    def backward(self, inject=False):
        x = self.rng.standard_normal((8, 4)).astype(np.float32)
        for lib, params, scaler in ((engine, self.params, self.scaler), (torch, self.tparams, self.tscaler)):
            w1, b1, w2 = params
            loss = ((lib.tensor(x) @ w1 + b1).tanh() @ w2).pow(2).mean()
            scaler.scale(loss).backward()
        if inject:  # one non-finite gradient element, as an fp16 overflow gives
            self.params[2].grad._data[1, 2] = np.inf
            self.tparams[2].grad[1, 2] = float("inf")

    def zero_grad(self):
        self.opt.zero_grad()
        self.topt.zero_grad()

    def step_and_update(self):
        ours = self.scaler.step(self.opt)
        theirs = self.tscaler.step(self.topt)
        assert ours is None and theirs is None
        self.scaler.update()
        self.tscaler.update()

    def check_scaler(self, where):
        assert self.scaler.get_scale() == self.tscaler.get_scale(), where
        assert self.scaler._get_growth_tracker() == self.tscaler._get_growth_tracker(), where

    def check_state(self, rtol=2e-6):
        """Parameters and every state equal torch's to float32 rounding (relative to each array's
        largest value: a trajectory's rounding differences grow with it); step counts exactly."""
        for i, (p, tp) in enumerate(zip(self.params, self.tparams)):
            close(p.detach().numpy(), tp.detach().numpy(), f"param {i}", rtol)
        ours, theirs = self.opt.state_dict()["state"], self.topt.state_dict()["state"]
        assert sorted(ours) == sorted(theirs)
        for index, entry in theirs.items():
            for name, value in entry.items():
                if value is None:
                    assert name not in ours[index]
                elif name == "step":
                    assert ours[index]["step"] == int(value), (index, ours[index]["step"], value)
                else:
                    close(ours[index][name].numpy(), value.numpy(), f"state {index} {name}", rtol)


def run(pair, steps, injected):
    for t in range(steps):
        pair.zero_grad()
        pair.backward(inject=t in injected)
        pair.step_and_update()
        pair.check_scaler(f"after step {t}")


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "reference"])
@pytest.mark.parametrize("opt_name,kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_trajectory_with_injected_infs_equals_torch(opt_name, kwargs, fused):
    """Skips at the very first step (SGD's momentum buffer must then start at the next taken
    step), back to back, and after growth; the scale must grow, back off and grow again."""
    pair = Pair(opt_name, kwargs, fused)
    scales = []
    for t in range(14):
        pair.zero_grad()
        pair.backward(inject=t in (0, 4, 5, 11))
        pair.step_and_update()
        pair.check_scaler(f"after step {t}")
        scales.append(pair.scaler.get_scale())
    changes = [b / a for a, b in zip(scales, scales[1:])]
    assert 2.0 in changes and 0.5 in changes  # it grew and it backed off
    pair.check_state()


def test_growth_and_backoff_factors_that_are_not_powers_of_two_round_as_torch():
    """The products are computed in float64 and rounded to float32, as torch's kernels do."""
    pair = Pair("Adam", dict(lr=1e-3), scaler_kwargs=dict(init_scale=1000.0, growth_factor=1.37,
                                                           backoff_factor=0.71, growth_interval=2))
    run(pair, 12, injected={1, 2, 7})
    pair.check_state()


def test_unscale_then_clip_grad_norm_recipe_equals_torch():
    from engine.nn.utils import clip_grad_norm_

    pair = Pair("AdamW", dict(lr=1e-2, weight_decay=0.01))
    for t in range(8):
        pair.zero_grad()
        pair.backward(inject=t == 3)
        pair.scaler.unscale_(pair.opt)
        pair.tscaler.unscale_(pair.topt)
        for p, tp in zip(pair.params, pair.tparams):  # unscaled in place, as torch does
            close(p.grad.numpy(), tp.grad.numpy(), "unscaled grad")
        with np.errstate(invalid="ignore"):
            norm = clip_grad_norm_(pair.params, 0.5)
        tnorm = torch.nn.utils.clip_grad_norm_(pair.tparams, 0.5)
        np.testing.assert_allclose(norm.item(), tnorm.item(), rtol=1e-6)
        pair.step_and_update()
        pair.check_scaler(f"after step {t}")
    pair.check_state()


def test_gradients_after_step_are_unscaled_as_torch_leaves_them():
    pair = Pair("Adam", dict(lr=1e-2))
    pair.zero_grad()
    pair.backward()
    pair.step_and_update()
    for p, tp in zip(pair.params, pair.tparams):
        close(p.grad.numpy(), tp.grad.numpy(), "grad after step")


def test_state_dict_round_trip_and_resume_equal_torch(tmp_path):
    pair = Pair("Adam", dict(lr=1e-2))
    run(pair, 5, injected={1})
    sd = pair.scaler.state_dict()
    assert sd == pair.tscaler.state_dict()
    assert set(sd) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    engine.save({"scaler": sd}, tmp_path / "scaler.ckpt")
    restored = engine.amp.GradScaler("cpu")
    restored.load_state_dict(engine.load(tmp_path / "scaler.ckpt")["scaler"])
    assert restored.state_dict() == sd
    pair.scaler = restored  # continue with the restored scaler: same trajectory as torch's
    run(pair, 6, injected={2})
    pair.check_state()
    clone = pickle.loads(pickle.dumps(pair.scaler))  # pickling at an iteration boundary, as torch allows
    assert clone.state_dict() == pair.scaler.state_dict()


def test_a_disabled_scaler_is_a_pass_through():
    p = engine.tensor([1.0, -2.0], requires_grad=True)
    opt = optim.SGD([p], lr=0.5)
    scaler = engine.amp.GradScaler("cpu", enabled=False)
    loss = (p * p).sum()
    assert scaler.scale(loss) is loss and not scaler.is_enabled()
    loss.backward()
    scaler.unscale_(opt)
    assert scaler.step(opt) is None
    scaler.update()
    np.testing.assert_allclose(p.detach().numpy(), [0.0, 0.0])  # p - 0.5 * 2p: a plain step
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {} and scaler._get_growth_tracker() == 0
    scaler.load_state_dict({})  # a no-op when disabled, as torch


@pytest.mark.skipif(backend.cuda_available(), reason="needs a machine without CUDA")
def test_a_cuda_scaler_without_cuda_warns_and_disables_itself_as_torch():
    with pytest.warns(UserWarning, match="CUDA is not available.  Disabling."):
        scaler = engine.amp.GradScaler()
    assert not scaler.is_enabled()
    with pytest.warns(FutureWarning, match=r"engine.cuda.amp.GradScaler\(args...\)` is deprecated"), \
            pytest.warns(UserWarning, match="Disabling"):
        assert not engine.cuda.amp.GradScaler(init_scale=8.0).is_enabled()
    with pytest.warns(FutureWarning, match=r"engine.cpu.amp.GradScaler\(args...\)` is deprecated"):
        legacy = engine.cpu.amp.GradScaler(init_scale=8.0)
    assert legacy.is_enabled() and legacy.get_scale() == 8.0 and isinstance(legacy, engine.amp.GradScaler)


def test_scale_keeps_the_structure_of_its_outputs_and_torch_promotion():
    scaler = engine.amp.GradScaler("cpu", init_scale=4.0)
    a, b = engine.tensor([1.0, 2.0]), engine.tensor(3.0)
    out = scaler.scale([a, (b, [a])])
    assert isinstance(out, list) and isinstance(out[1], tuple) and isinstance(out[1][1], list)
    np.testing.assert_allclose(out[1][1][0].numpy(), [4.0, 8.0])
    assert list(map(lambda t: t.item(), scaler.scale(iter([b])))) == [12.0]
    tscaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for value, tvalue in [(engine.tensor(2.0).half(), torch.tensor(2.0).half()),
                          (engine.ones(3).half(), torch.ones(3).half()),
                          (engine.ones(3).bfloat16(), torch.ones(3).bfloat16())]:
        assert str(scaler.scale(value).dtype) == str(tscaler.scale(tvalue).dtype).replace("torch.", "")
    with pytest.raises(engine.EngineError, match=r"outputs must be a Tensor or an iterable of Tensors"):
        scaler.scale([a, 3.0])


def test_update_with_a_new_scale_as_torch():
    pair = Pair("Adam", dict(lr=1e-2))
    run(pair, 2, injected=set())
    for new in (256.0, engine.tensor(32.0)):
        pair.zero_grad()
        pair.backward()
        pair.scaler.step(pair.opt)
        pair.tscaler.step(pair.topt)
        pair.scaler.update(new)
        pair.tscaler.update(new if isinstance(new, float) else torch.tensor(32.0))
        pair.check_scaler(f"update({new})")
    with pytest.raises(engine.EngineError, match=r"new_scale should be a float or a 1-element"):
        pair.scaler.update(engine.tensor([1.0, 2.0]))


def test_misuse_raises_as_torch_does():
    p = engine.tensor([1.0, 2.0], requires_grad=True)
    opt = optim.Adam([p], lr=0.1)
    scaler = engine.amp.GradScaler("cpu")
    with pytest.raises(engine.EngineError, match=r"Attempted step but _scale is None"):
        scaler.step(opt)
    with pytest.raises(engine.EngineError, match=r"Attempted update but _scale is None"):
        scaler.update()
    scaler.scale((p * p).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer since the last "
                                           r"update\(\)"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(GradScalerError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)
    with pytest.raises(GradScalerError, match=r"step\(\) has already been called since the last update\(\)"):
        scaler.step(opt)
    with pytest.raises(GradScalerError, match=r"Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: None)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # never left behind
    scaler.update()
    with pytest.raises(engine.EngineError, match=r"No inf checks were recorded prior to update"):
        scaler.update()
    with pytest.raises(engine.EngineError, match=r"The growth factor must be > 1.0"):
        engine.amp.GradScaler("cpu", growth_factor=1.0)
    with pytest.raises(engine.EngineError, match=r"The backoff factor must be < 1.0"):
        engine.amp.GradScaler("cpu", backoff_factor=1.0)
    with pytest.raises(RuntimeError, match=r"The source state dict is empty"):
        scaler.load_state_dict({})
    with pytest.raises(engine.EngineError, match=r"the state dict lacks \['_growth_tracker'\]"):
        scaler.load_state_dict({"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3})


def test_unscale_refuses_float16_gradients_but_step_unscales_them_in_float32():
    p = engine.tensor(np.linspace(-1, 1, 6).astype(np.float32)).half().requires_grad_()
    opt = optim.Adam([p], lr=0.1)
    scaler = engine.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p.float() ** 2).sum()).backward()
    assert p.grad.dtype == np.float16
    with pytest.raises(ValueError, match=r"Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    torch_p = torch.tensor(np.linspace(-1, 1, 6).astype(np.float32)).half().requires_grad_()
    torch_opt = torch.optim.Adam([torch_p], lr=0.1)
    tscaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tscaler.scale((torch_p.float() ** 2).sum()).backward()
    with pytest.raises(ValueError, match=r"Attempting to unscale FP16 gradients"):
        tscaler.unscale_(torch_opt)


def test_a_step_with_the_scaler_reads_nothing_from_the_device():
    pair = Pair("AdamW", dict(lr=1e-2, weight_decay=0.1))
    run(pair, 2, injected={0})  # warm-up; counts already on the device
    with backend.count_host_reads() as reads:
        for _ in range(3):
            pair.opt.zero_grad()
            loss = pair.params[0].sum() * 0 + (pair.params[2] ** 2).sum()
            pair.scaler.scale(loss).backward()
            pair.scaler.unscale_(pair.opt)
            pair.scaler.step(pair.opt)
            pair.scaler.update()
    assert reads.count == 0, reads


class _Plain:
    """A minimal optimizer without device-side scaling support (PyTorch's generic path)."""

    def __init__(self, params, lr):
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.steps = 0

    def step(self):
        self.steps += 1
        with engine.no_grad():
            for p in self.param_groups[0]["params"]:
                p.sub_(p.grad * self.param_groups[0]["lr"])


def test_an_optimizer_without_device_scaling_takes_torchs_host_path():
    p = engine.tensor([1.0, 2.0], requires_grad=True)
    opt = _Plain([p], lr=0.5)
    scaler = engine.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale((p * p).sum()).backward()
    scaler.step(opt)
    np.testing.assert_allclose(p.grad.numpy(), [2.0, 4.0])  # unscaled by unscale_
    np.testing.assert_allclose(p.detach().numpy(), [0.0, 0.0])
    scaler.update()
    p.grad = None
    with np.errstate(invalid="ignore"):
        scaler.scale((p * float("inf")).sum()).backward()
        assert scaler.step(opt) is None
    assert opt.steps == 1  # skipped on the host, as torch's _maybe_opt_step
    scaler.update()
    assert scaler.get_scale() == 4.0


@pytest.mark.slow
def test_zero_redundancy_optimizer_in_a_world_of_one_steps_with_the_scaler_as_adam():
    import subprocess
    import sys

    from tests.distributed.launch import ROOT, mpi_env

    code = """
import numpy as np, engine, engine.distributed as dist
from engine import optim
from engine.distributed.optim import ZeroRedundancyOptimizer
dist.init_process_group(world_size=1, rank=0)
runs = []
for zero in (True, False):
    p = engine.tensor(np.linspace(-1, 1, 12).astype(np.float32), requires_grad=True)
    opt = ZeroRedundancyOptimizer([p], optim.Adam, lr=0.1) if zero else optim.Adam([p], lr=0.1)
    scaler = engine.amp.GradScaler("cpu", init_scale=64.0, growth_interval=2)
    for t in range(5):
        opt.zero_grad()
        scaler.scale((p * p * (float("inf") if t == 1 else 1.0)).sum()).backward()
        with np.errstate(invalid="ignore"):
            scaler.step(opt)
        scaler.update()
    if zero:
        opt.consolidate_state_dict(to=0)
    runs.append((p.detach().numpy(), scaler.get_scale(), opt.state_dict()["state"][0]["step"]))
assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:], runs
print("zero scaler ok", runs[0][1], runs[0][2])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zero scaler ok 64.0 4" in out.stdout, out.stdout


def test_multiple_optimizers_share_one_scaler_as_torch():
    pair = Pair("Adam", dict(lr=1e-2))
    second = [engine.tensor(np.ones(3, np.float32), requires_grad=True)]
    tsecond = [torch.ones(3, requires_grad=True)]
    opt2, topt2 = optim.SGD(second, lr=0.1), torch.optim.SGD(tsecond, lr=0.1)
    for t in range(6):
        pair.zero_grad()
        opt2.zero_grad()
        topt2.zero_grad()
        pair.backward(inject=False)
        pair.scaler.scale((second[0] * second[0]).sum() * (float("inf") if t == 2 else 1.0)).backward()
        pair.tscaler.scale((tsecond[0] * tsecond[0]).sum() * (float("inf") if t == 2 else 1.0)).backward()
        with np.errstate(invalid="ignore"):
            for scaler, opts in ((pair.scaler, (pair.opt, opt2)), (pair.tscaler, (pair.topt, topt2))):
                for o in opts:
                    scaler.step(o)
                scaler.update()
        pair.check_scaler(f"step {t}")
    pair.check_state()
    np.testing.assert_allclose(second[0].detach().numpy(), tsecond[0].detach().numpy(), rtol=1e-6)


def test_no_warning_on_a_skipped_step():
    pair = Pair("Adam", dict(lr=1e-2), fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair.zero_grad()
        pair.backward(inject=True)
        pair.scaler.step(pair.opt)

"""Every parameter's view into the optimizers' flat buffers is 256-byte aligned, and the padding
between parameters is harmless: it stays 0 (states: their fill value), finite, and the results
are bitwise those of one optimizer per parameter (each parameter alone in its buffers, at offset
0: the layout before the padding, and the kernels are elementwise).
"""

import numpy as np
import pytest

import engine
from engine import nn
from engine.io import load, save
from engine.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from engine.optim.optimizer import FLAT_ALIGNMENT_BYTES
from tests.conftest import DEVICES
from tests.optim.test_optimizers import CASES, count_calls, engine_run, grad_fn_for, make_tensors

ODD_SHAPES = [(3, 5), (5,), (7,), (), (0,), (2, 1, 3), (1,), (4, 3)]
DTYPES = [np.float32, np.float64]

OPTIMIZERS = [
    pytest.param(SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), id="sgd-nesterov-wd"),
    pytest.param(SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True),
                 id="sgd-dampening-wd-maximize"),
    pytest.param(Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True), id="adam-wd-amsgrad"),
    pytest.param(Adam, dict(lr=0.01, maximize=True, weight_decay=0.1), id="adam-maximize-wd"),
    pytest.param(AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), id="adamw-amsgrad-maximize"),
    pytest.param(Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1), id="adagrad-wd"),
    pytest.param(Adagrad, dict(lr=0.1, initial_accumulator_value=0.5, maximize=True), id="adagrad-init-maximize"),
    pytest.param(RMSprop, dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1, maximize=True),
                 id="rmsprop-centered-momentum-wd-maximize"),
    pytest.param(RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=0.1), id="rmsprop-wd"),
]


def address(array) -> int:
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return array.data.ptr  # cupy


def assert_aligned(array, what):
    assert address(array) % FLAT_ALIGNMENT_BYTES == 0, f"{what} at {address(array):#x} is not 256-byte aligned"


class OddModel(nn.Module):
    """Linear(3, 5) (bias: 5 elements) into Linear(5, 2), and a loose 7-element parameter."""

    def __init__(self, dtype, device):
        super().__init__()
        self.a = nn.Linear(3, 5, dtype=dtype, device=device)
        self.b = nn.Linear(5, 2, dtype=dtype, device=device)
        rng = np.random.default_rng(0)
        self.extra = nn.Parameter(engine.tensor(rng.standard_normal(7), dtype=dtype, device=device))

    def forward(self, x):
        return self.b(self.a(x).relu()).sum() + (self.extra * self.extra).sum()


def train(model, opt, steps, set_to_none, device):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        x = engine.tensor(rng.standard_normal((4, 3)), dtype=model.extra.dtype, device=device)
        model(x).backward()
        opt.step()


def padding_mask(bucket):
    mask = np.ones(bucket.numel, bool)
    for start, stop in zip(bucket.starts, bucket.stops):
        mask[start:stop] = False
    return mask


def host(array):
    return array if isinstance(array, np.ndarray) else array.get()


def assert_padding_untouched(opt):
    for group, buckets in zip(opt.param_groups, opt._buckets):
        for bucket in buckets:
            pad = padding_mask(bucket)
            assert pad.any()  # the test models do have padding
            assert np.all(host(bucket.flat)[pad] == 0), "param padding moved"
            if bucket.grad_flat is not None:
                assert np.all(host(bucket.grad_flat)[pad] == 0), "grad padding written"
            for name, buffer in bucket.buffers.items():
                fill = opt._buffer_fill(group, name)
                assert np.all(host(buffer)[pad] == fill), f"{name} padding moved from {fill}"
            for array in [bucket.flat, *bucket.buffers.values()]:
                assert np.all(np.isfinite(host(array)))


# ---- alignment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_cls, kwargs", OPTIMIZERS)
@pytest.mark.slow
def test_every_param_grad_and_state_view_is_256_byte_aligned(opt_cls, kwargs, dtype, device):
    model = OddModel(dtype, device)
    opt = opt_cls(model.parameters(), **kwargs)
    train(model, opt, steps=3, set_to_none=False, device=device)  # grads become views of grad_flat
    for name, p in model.named_parameters():
        assert_aligned(p._data, f"{name}._data")
        assert_aligned(p.grad._data, f"{name}.grad")
        assert p.grad._data.base is not None  # a view of the flat grad buffer, not a fresh array
        states = {k: v for k, v in opt.state[p].items() if k != "step"}
        assert states, f"{opt_cls.__name__} keeps no state for {name}"
        for state, view in states.items():
            assert view.shape == p.shape
            assert_aligned(view._data, f"{name} state {state}")
    for bucket in (b for buckets in opt._buckets for b in buckets):  # every view of every buffer
        for buffer in [bucket.flat, bucket.grad_flat, *bucket.buffers.values()]:
            for i in range(len(bucket.params)):
                assert_aligned(bucket._view(buffer, i), f"view {i}")


def test_alignment_survives_rebuilds_and_new_groups():
    model = OddModel(np.float32, "cpu")
    opt = Adam(model.parameters(), lr=0.01)
    train(model, opt, steps=2, set_to_none=True, device="cpu")
    model.double()  # rebinds every ._data: the buckets are rebuilt in float64
    head = nn.Linear(5, 3, dtype=np.float64)
    opt.add_param_group({"params": head.parameters(), "lr": 0.1})
    train(model, opt, steps=2, set_to_none=False, device="cpu")
    for p in list(model.parameters()) + list(head.parameters()):
        assert p.dtype == np.float64
        assert_aligned(p._data, "param")
        if p.grad is not None:
            assert_aligned(p.grad._data, "grad")
        for name, view in opt.state.get(p, {}).items():
            if name != "step":
                assert_aligned(view._data, name)
    assert_padding_untouched(opt)


# ---- the padding is harmless ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-copied", "grads-in-place"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_cls, kwargs", OPTIMIZERS)
def test_padding_stays_zero_through_training(opt_cls, kwargs, dtype, set_to_none, device):
    model = OddModel(dtype, device)
    opt = opt_cls(model.parameters(), **kwargs)
    train(model, opt, steps=6, set_to_none=set_to_none, device=device)
    assert_padding_untouched(opt)


def per_param_run(opt_cls, kwargs, params, dtype, grad_fn, active, steps, lrs):
    """Each parameter alone in its own optimizer: its views start at offset 0, no padding."""
    out = []
    for i, p in enumerate(params):
        (x,) = make_tensors([p], dtype, "cpu")
        opt = opt_cls([x], **dict(kwargs, lr=lrs[i]))
        for t in range(steps):
            x.grad = (engine.tensor(grad_fn(t, i, x.numpy().astype(np.float64)), dtype=x.dtype)
                      if active(t, i) else None)
            opt.step()
        state = opt.state_dict()["state"].get(0, {})
        out.append((x.numpy(), {k: v.numpy() for k, v in state.items() if k != "step"}))
    return out


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_cls, kwargs, ref", CASES)
def test_bitwise_identical_to_one_optimizer_per_param(opt_cls, kwargs, ref, dtype, impl, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNEL_IMPL", impl)
    rng, steps = np.random.default_rng(5), 12
    params = [rng.standard_normal(s) for s in ODD_SHAPES]
    grad_fn = grad_fn_for(seed=6, steps=steps, shapes=ODD_SHAPES)

    def active(t, i):  # uneven step counts split the launches into runs
        return i != 2 or t % 3 == 0

    lrs = [kwargs.get("lr")] * 4 + [0.003] * (len(params) - 4)
    tensors = make_tensors(params, dtype, "cpu")
    opt = opt_cls([{"params": tensors[:4]}, {"params": tensors[4:], "lr": 0.003}], **kwargs)
    got = engine_run(opt, tensors, grad_fn, steps=steps, active=active)
    state = opt.state_dict()["state"]
    want = per_param_run(opt_cls, kwargs, params, dtype, grad_fn, active, steps, lrs)
    for i, (g, (w, w_state)) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"param {i}")
        assert g.dtype == w.dtype
        for name, value in w_state.items():
            assert state[i][name].shape == tensors[i].shape  # state_dict holds unpadded states
            np.testing.assert_array_equal(state[i][name].numpy(), value, err_msg=f"param {i} {name}")
    assert_padding_untouched(opt)


@pytest.mark.parametrize("opt_cls, kwargs", [
    pytest.param(Adam, dict(lr=0.01, eps=0.0), id="adam"),
    pytest.param(RMSprop, dict(lr=0.01, eps=0.0, centered=True), id="rmsprop"),
    pytest.param(Adagrad, dict(lr=0.1, eps=0.0), id="adagrad"),
])
def test_a_zero_eps_never_launches_over_padding(opt_cls, kwargs, monkeypatch):
    # 0 / (sqrt(0) + 0) would turn zero padding into NaN: each param then gets its own launch.
    calls = count_calls(monkeypatch, {Adam: "adam_step", RMSprop: "rmsprop_step", Adagrad: "adagrad_step"}[opt_cls])
    shapes = [(5,), (3,), (4,)]
    tensors = make_tensors([np.ones(s) for s in shapes], np.float32, "cpu")
    opt = opt_cls(tensors, **kwargs)
    engine_run(opt, tensors, grad_fn_for(shapes=shapes), steps=3)
    assert calls == [5, 3, 4] * 3
    assert_padding_untouched(opt)
    assert all(np.all(np.isfinite(x.numpy())) for x in tensors)


def test_adagrad_with_zero_eps_but_an_initial_accumulator_keeps_one_launch(monkeypatch):
    calls = count_calls(monkeypatch, "adagrad_step")
    shapes = [(5,), (3,)]
    tensors = make_tensors([np.ones(s) for s in shapes], np.float32, "cpu")
    opt = Adagrad(tensors, lr=0.1, eps=0.0, initial_accumulator_value=0.1)
    engine_run(opt, tensors, grad_fn_for(shapes=shapes), steps=2)
    assert calls == [64 + 3] * 2
    assert_padding_untouched(opt)


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls, kwargs", OPTIMIZERS)
def test_checkpoint_round_trip_with_padding_continues_bitwise(opt_cls, kwargs, tmp_path):
    model = OddModel(np.float32, "cpu")
    opt = opt_cls([{"params": [model.a.weight, model.a.bias]},
                   {"params": [model.b.weight, model.b.bias, model.extra], "lr": 0.002}], **kwargs)
    train(model, opt, steps=3, set_to_none=False, device="cpu")
    sd = opt.state_dict()
    in_group_order = [p for group in opt.param_groups for p in group["params"]]
    for index, p in enumerate(in_group_order):
        for name, value in sd["state"].get(index, {}).items():
            if name != "step":
                assert value.shape == p.shape, f"state {name} of param {index} is padded"
    save({"model": model.state_dict(), "optim": sd}, tmp_path / "ckpt.npz")
    train(model, opt, steps=3, set_to_none=False, device="cpu")

    ckpt = load(tmp_path / "ckpt.npz")
    twin = OddModel(np.float32, "cpu")
    twin.load_state_dict(ckpt["model"])
    twin_opt = opt_cls([{"params": [twin.a.weight, twin.a.bias]},
                        {"params": [twin.b.weight, twin.b.bias, twin.extra], "lr": 0.5}], **kwargs)
    twin_opt.load_state_dict(ckpt["optim"])
    train(twin, twin_opt, steps=3, set_to_none=False, device="cpu")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)
        assert_aligned(q._data, name)
    assert_padding_untouched(twin_opt)


def test_grads_copied_and_in_place_give_the_same_bits():
    runs = []
    for set_to_none in (True, False):
        engine.manual_seed(0)
        model = OddModel(np.float32, "cpu")
        opt = AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        train(model, opt, steps=4, set_to_none=set_to_none, device="cpu")
        runs.append([p.numpy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)

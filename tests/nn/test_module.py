"""Module: registration, traversal, modes, devices, state dicts, freezing, repr."""

from collections import OrderedDict

import numpy as np
import pytest

import engine
from engine import nn
from engine.errors import DeviceError, DTypeError, ShapeError
from tests.conftest import DEVICES


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(engine.ones(3))
        self.proj = nn.Linear(3, 2)
        self.register_buffer("running", engine.zeros(2))
        self.register_buffer("cache", engine.zeros(1), persistent=False)
        self.note = "plain attribute"

    def forward(self, x):
        return self.proj(x * self.scale)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.act(self.first(x)))


# ---- registration and traversal ---------------------------------------------------------------

def test_parameter_is_a_tensor_that_requires_grad():
    p = nn.Parameter(engine.zeros(2, 3))
    assert isinstance(p, engine.Tensor) and p.requires_grad and p.is_leaf
    assert not nn.Parameter(engine.zeros(2), requires_grad=False).requires_grad
    assert repr(p).startswith("Parameter containing:\ntensor(")
    assert type(p * 2) is engine.Tensor  # ops build plain tensors


def test_named_parameters_are_dotted_and_in_registration_order():
    net = Net()
    assert [name for name, _ in net.named_parameters()] == [
        "first.scale", "first.proj.weight", "first.proj.bias", "head.weight", "head.bias"]
    assert [name for name, _ in net.named_buffers()] == ["first.running", "first.cache"]
    assert [name for name, _ in net.named_children()] == ["first", "act", "head"]
    assert [name for name, _ in net.named_modules()] == ["", "first", "first.proj", "act", "head"]
    assert list(net.children())[0] is net.first
    assert [name for name, _ in net.first.named_parameters(recurse=False)] == ["scale"]
    assert net.first.note == "plain attribute" and "note" not in dict(net.named_parameters())


def test_shared_parameters_are_listed_once():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight  # tied weights
    model = nn.Sequential(a, b, a)  # and a shared module
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.bias"]
    assert model.num_parameters() == 16 + 4 + 4
    assert len(list(model.modules())) == 3
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_reassigning_and_deleting_attributes_updates_registries():
    block = Block()
    with pytest.raises(TypeError, match=r"cannot assign Tensor as parameter 'scale'.*nn.Parameter\(value\)"):
        block.scale = engine.ones(3)
    block.scale = None
    assert "scale" not in dict(block.named_parameters())
    block.running = engine.ones(2)
    assert block.state_dict()["running"].numpy().tolist() == [1.0, 1.0]
    del block.proj
    assert [name for name, _ in block.named_children()] == []
    with pytest.raises(AttributeError, match="'Block' object has no attribute 'proj'"):
        _ = block.proj


def test_assigning_before_init_explains_the_fix():
    class Forgetful(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=r"call super\(\).__init__\(\) first"):
        Forgetful()


def test_forward_is_required():
    with pytest.raises(NotImplementedError, match="Module is missing the required 'forward'"):
        nn.Module()(engine.ones(1))


def test_apply_visits_every_module():
    net = Net()
    net.apply(lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None)
    assert not net.head.weight.numpy().any() and not net.first.proj.weight.numpy().any()


# ---- modes and gradients ----------------------------------------------------------------------

def test_train_and_eval_propagate():
    net = Net()
    assert net.training and net.first.proj.training
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_to_none_or_zeros():
    net = Net()
    net(engine.randn(4, 3)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.numpy().any() for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_freezing_leaves_frozen_grads_none():
    net = Net()
    net.first.requires_grad_(False)
    assert net.num_parameters(trainable_only=True) == 2 + 1
    assert net.num_parameters() == 3 + 6 + 2 + 3
    net(engine.randn(4, 3)).sum().backward()
    assert all(p.grad is None for p in net.first.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


# ---- devices and dtypes -----------------------------------------------------------------------

def test_to_cpu_is_a_no_op_that_keeps_objects():
    net = Net()
    params = list(net.parameters())
    arrays = [p._data for p in params]
    assert net.to("cpu") is net and net.cpu() is net
    assert all(p is q for p, q in zip(net.parameters(), params))
    assert all(p._data is a for p, a in zip(params, arrays))


def test_to_dtype_casts_floating_tensors_in_place():
    net = Net()
    net.first.register_buffer("steps", engine.zeros(1, dtype=engine.int64))
    net(engine.randn(2, 3)).sum().backward()
    weight = net.head.weight
    net.double()
    assert net.head.weight is weight and weight.dtype == np.float64 and weight.grad.dtype == np.float64
    assert net.first.running.dtype == np.float64 and net.first.steps.dtype == np.int64
    assert net(engine.randn(2, 3, dtype=engine.float64)).dtype == np.float64
    with pytest.raises(DTypeError, match="floating dtype"):
        net.to(engine.int32)


def test_to_unavailable_device_raises_without_touching_the_model():
    if engine.cuda_available():
        pytest.skip("this machine has CUDA")
    net = Net()
    before = [p._data for p in net.parameters()]
    with pytest.raises(DeviceError, match="CUDA is not available"):
        net.to("cuda")
    assert all(p._data is a for p, a in zip(net.parameters(), before))


@pytest.mark.gpu
def test_to_cuda_and_back_moves_parameters_buffers_and_grads():
    net = Net()
    net(engine.randn(2, 3)).sum().backward()
    expected = {name: t.numpy().copy() for name, t in net.state_dict().items()}
    weight = net.head.weight
    net.to("cuda")
    assert net.head.weight is weight and weight.device.type == "cuda" and weight.grad.device.type == "cuda"
    assert net.first.running.device.type == "cuda"
    assert net(engine.randn(2, 3, device="cuda")).device.type == "cuda"
    net.to("cpu")
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[name])


# ---- state dicts ------------------------------------------------------------------------------

def test_state_dict_holds_parameters_and_persistent_buffers():
    net = Net()
    state = net.state_dict()
    assert isinstance(state, OrderedDict)
    assert list(state) == ["first.scale", "first.running", "first.proj.weight", "first.proj.bias",
                           "head.weight", "head.bias"]
    assert all(not t.requires_grad and t.grad_fn is None for t in state.values())
    np.testing.assert_array_equal(state["head.weight"].numpy(), net.head.weight.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_copies_values(device):
    source, target = Net().to(device), Net().to(device)
    source.first.running._data[...] = 7
    result = target.load_state_dict(source.state_dict())
    assert result == nn.IncompatibleKeys([], []) and result.missing_keys == []
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    # copied, not aliased: changing the source later leaves the target alone
    source.head.weight._data[...] = 0
    assert target.head.weight.numpy().any()


def test_load_accepts_numpy_arrays_and_keeps_parameter_objects():
    net = nn.Linear(2, 2)
    weight = net.weight
    net.load_state_dict({"weight": np.eye(2, dtype=np.float32), "bias": np.zeros(2, np.float32)})
    assert net.weight is weight
    np.testing.assert_array_equal(net.weight.numpy(), np.eye(2))


def test_strict_load_names_missing_and_unexpected_keys():
    net = Net()
    state = net.state_dict()
    del state["head.bias"]
    state["head.extra"] = engine.zeros(1)
    with pytest.raises(nn.StateDictError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    assert "into Net" in message and "missing key(s): 'head.bias'" in message
    assert "unexpected key(s): 'head.extra'" in message and "strict=False" in message
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["head.extra"]


def test_shape_mismatch_raises_even_when_not_strict_and_changes_nothing():
    net = Net()
    before = {name: t.numpy().copy() for name, t in net.state_dict().items()}
    state = {name: engine.zeros(*t.shape) for name, t in net.state_dict().items()}
    state["head.weight"] = engine.zeros(3, 2)
    for strict in (True, False):
        with pytest.raises(ShapeError, match=r"size mismatch for 'head.weight'.*\(3, 2\).*\(1, 2\)"):
            net.load_state_dict(state, strict=strict)
    for name, value in net.state_dict().items():  # nothing was half-loaded
        np.testing.assert_array_equal(value.numpy(), before[name], err_msg=name)


def test_dtype_mismatch_raises():
    net = nn.Linear(2, 1)
    state = {"weight": engine.zeros(1, 2, dtype=engine.float64), "bias": engine.zeros(1)}
    with pytest.raises(DTypeError, match=r"dtype mismatch for 'weight'.*float64.*float32"):
        net.load_state_dict(state)


# ---- repr -------------------------------------------------------------------------------------

def test_repr_is_nested_like_pytorch():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1),
        nn.Sequential(nn.LayerNorm(8), nn.GELU(approximate="tanh"), nn.Linear(8, 2, bias=False)),
        nn.Softmax(dim=1),
    )
    assert repr(model) == (
        "Sequential(\n"
        "  (0): Linear(in_features=4, out_features=8, bias=True)\n"
        "  (1): ReLU()\n"
        "  (2): Dropout(p=0.1)\n"
        "  (3): Sequential(\n"
        "    (0): LayerNorm((8,), eps=1e-05, elementwise_affine=True)\n"
        "    (1): GELU(approximate='tanh')\n"
        "    (2): Linear(in_features=8, out_features=2, bias=False)\n"
        "  )\n"
        "  (4): Softmax(dim=1)\n"
        ")"
    )
    assert repr(Net()).splitlines()[:3] == ["Net(", "  (first): Block(", "    (proj): Linear(in_features=3, "
                                                                          "out_features=2, bias=True)"]

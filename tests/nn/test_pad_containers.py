"""F.pad in every mode and the padding layers, nn.ModuleDict and nn.DataParallel, against PyTorch 2.13."""

from __future__ import annotations

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import nn
from engine.errors import ShapeError

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(3)

PADS = [
    ((2, 3, 5), (1, 2), "constant", 0.5),
    ((2, 3, 5), (2, 0, 1, 1), "constant", None),
    ((2, 3, 5), (-1, 2), "constant", None),
    ((4, 5), (1, 1, -2, 1), "constant", -1.0),
    ((2, 3, 4, 5), (1, 1, 1, 1, 1, 1, 0, 1), "constant", 2.0),
    ((2, 3, 5), (2, 3), "reflect", None),
    ((3, 5), (4, 1), "reflect", None),
    ((2, 3, 4, 5), (1, 2, 3, 0), "reflect", None),
    ((1, 2, 3, 4, 5), (1, 1, 2, 1, 2, 0), "reflect", None),
    ((2, 3, 5), (3, 6), "replicate", None),
    ((2, 3, 4, 5), (2, 1, 0, 3), "replicate", None),
    ((2, 3, 5), (5, 2), "circular", None),
    ((2, 3, 4, 5), (1, 2, 4, 1), "circular", None),
    ((2, 3, 4, 4, 5), (1, 1, 1, 1, 1, 1), "circular", None),
]


@pytest.mark.parametrize("shape, pad, mode, value", PADS, ids=[f"{m}-{len(s)}d-{p}" for s, p, m, _ in PADS])
def test_pad_values_and_gradients_match_pytorch(shape, pad, mode, value):
    x = RNG.standard_normal(shape)
    xe, xt = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    kwargs = {} if value is None else {"value": value}
    ours, theirs = F.pad(xe, pad, mode, **kwargs), torch.nn.functional.pad(xt, pad, mode, **kwargs)
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy())
    w = RNG.standard_normal(tuple(theirs.shape))
    (ours * engine.tensor(w)).sum().backward()
    (theirs * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(xe.grad.numpy(), xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_pad_keeps_integer_dtypes_and_refuses_bad_widths():
    ints = engine.tensor([[1, 2, 3]])
    assert F.pad(ints, (1, 1), value=7).tolist() == [[7, 1, 2, 3, 7]]
    with pytest.raises(ShapeError, match="smaller than"):
        F.pad(engine.zeros(1, 2, 3), (3, 0), mode="reflect")
    with pytest.raises(ShapeError, match="needs a"):
        F.pad(engine.zeros(3), (1, 1), mode="reflect")
    with pytest.raises(ShapeError, match="even"):
        F.pad(engine.zeros(2, 3), (1,))
    with pytest.raises(ValueError, match="mode"):
        F.pad(engine.zeros(1, 2, 3), (1, 1), mode="wrap")


@pytest.mark.parametrize("name, args", [("ZeroPad2d", (1,)), ("ConstantPad1d", ((1, 2), 3.5)),
                                        ("ReflectionPad2d", ((1, 0, 2, 1),)), ("ReplicationPad1d", (2,)),
                                        ("CircularPad2d", (1,))])
def test_padding_layers_match_pytorch(name, args):
    x = RNG.standard_normal((2, 3, 4, 5) if "2d" in name else (2, 3, 5))
    ours, theirs = getattr(nn, name)(*args), getattr(torch.nn, name)(*args)
    np.testing.assert_allclose(ours(engine.tensor(x)).numpy(), theirs(torch.tensor(x)).numpy())
    assert repr(ours) == repr(theirs)


def test_module_dict_registers_its_modules_as_pytorch():
    layers = nn.ModuleDict(dict(wte=nn.Embedding(5, 3), h=nn.ModuleList([nn.Linear(3, 3)]), ln_f=nn.LayerNorm(3)))
    reference = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(5, 3), h=torch.nn.ModuleList([torch.nn.Linear(3, 3)]),
                                         ln_f=torch.nn.LayerNorm(3)))
    assert list(layers.state_dict()) == list(reference.state_dict())
    assert list(layers) == ["wte", "h", "ln_f"] and "h" in layers and len(layers) == 3
    assert layers.wte is layers["wte"] and isinstance(layers["h"][0], nn.Linear)
    layers["head"] = nn.Linear(3, 5)
    layers.update([("drop", nn.Dropout(0.1))])
    assert list(layers.keys()) == ["wte", "h", "ln_f", "head", "drop"]
    assert layers.pop("drop").p == 0.1 and "drop" not in layers
    assert sum(p.numel() for p in layers.parameters()) == 15 + 12 + 6 + 20
    with pytest.raises(TypeError, match="Module"):
        layers["bad"] = lambda x: x
    with pytest.raises(KeyError):
        layers["missing"]
    layers.clear()
    assert len(layers) == 0 and not list(layers.parameters())


def test_data_parallel_is_a_pass_through_on_one_device():
    engine.manual_seed(0)
    inner = nn.Linear(4, 2)
    model = nn.DataParallel(inner)
    x = engine.randn(3, 4)
    np.testing.assert_array_equal(model(x).numpy(), inner(x).numpy())
    assert list(model.state_dict()) == ["module.weight", "module.bias"]
    assert model.module is inner and model.device_ids == list(range(engine.cuda.device_count()))
    reference = torch.nn.DataParallel(torch.nn.Linear(4, 2))
    assert list(reference.state_dict()) == list(model.state_dict())
    model(x).sum().backward()
    assert inner.weight.grad is not None

"""``index_copy`` / ``index_copy_`` and the static KV cache's position ops against PyTorch itself:
the write a static cache makes (a slice at a position held in an int64 tensor) and the mask it
derives from that tensor. Values, dtypes, float64 gradients and the errors must agree."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(23)
CACHE = RNG.standard_normal((2, 3, 6, 4))  # (batch, heads, positions, head dim)
A34 = RNG.standard_normal((3, 4))

# name: (input, dim, index, source)
CASES = {
    "cache_one_position": (CACHE, 2, [4], RNG.standard_normal((2, 3, 1, 4))),
    "cache_two_positions": (CACHE, 2, [1, 5], RNG.standard_normal((2, 3, 2, 4))),
    "negative_dim": (CACHE, -2, [0, 3], RNG.standard_normal((2, 3, 2, 4))),
    "dim0_reordered": (A34, 0, [2, 0], RNG.standard_normal((2, 4))),
    "last_dim": (A34, 1, [3, 1, 0], RNG.standard_normal((3, 3))),
    "0d_index": (A34, 0, 1, RNG.standard_normal((1, 4))),
    "vector_0d_source": (A34[0], 0, 2, np.array(7.5)),
    "scalar_input": (np.array(1.5), 0, [0], np.array([-2.0])),
}


def _both(case):
    x, dim, index, source = CASES[case]
    return [(lib, lib.tensor(x, requires_grad=True), dim, lib.tensor(index), lib.tensor(source, requires_grad=True))
            for lib in (engine, torch)]


@pytest.mark.parametrize("case", list(CASES))
def test_index_copy_gives_pytorchs_values_and_float64_gradients(case):
    results = []
    for lib, x, dim, index, source in _both(case):
        out = lib.index_copy(x, dim, index, source)
        weights = lib.tensor(np.arange(out.numel(), dtype=np.float64).reshape(out.shape) + 1.0)
        (out * weights).sum().backward()
        results.append((out.detach().numpy(), x.grad.numpy(), source.grad.numpy(), str(out.dtype).split(".")[-1]))
    ours, theirs = results
    assert ours[3] == theirs[3] == "float64"
    for got, want, what in zip(ours[:3], theirs[:3], ("value", "input grad", "source grad")):
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["cache_one_position", "cache_two_positions", "0d_index", "vector_0d_source"])
def test_index_copy__writes_in_place_as_pytorch(case, device):
    x, dim, index, source = CASES[case]
    ours = engine.tensor(x, device=device)
    memory, before = ours._data, ours._version_value
    result = ours.index_copy_(dim, engine.tensor(index, device=device), engine.tensor(source, device=device))
    theirs = torch.tensor(x).index_copy_(dim, torch.tensor(index), torch.tensor(source))
    assert result is ours and ours._data is memory and ours._version_value > before
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_index_copy__keeps_integer_dtypes():
    ours = engine.zeros(5, dtype=engine.int64).index_copy_(0, engine.tensor([1, 3]), engine.tensor([4, -2]))
    theirs = torch.zeros(5, dtype=torch.int64).index_copy_(0, torch.tensor([1, 3]), torch.tensor([4, -2]))
    assert ours.dtype == engine.int64
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_index_copy__on_a_graph_tensor_gives_pytorchs_gradients():
    x, dim, index, source = CASES["cache_two_positions"]
    grads = []
    for lib in (engine, torch):
        leaf, src = lib.tensor(x, requires_grad=True), lib.tensor(source, requires_grad=True)
        y = leaf * 3
        y.index_copy_(dim, lib.tensor(index), src * 2)
        (y * lib.tensor(x)).sum().backward()
        grads.append((leaf.grad.numpy(), src.grad.numpy()))
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want)


BAD = {  # name: (dim, index, source), each refused by PyTorch too
    "int32_index": (2, np.array([1], dtype=np.int32), CACHE[:, :, :1], DTypeError, "int64"),
    "2d_index": (2, np.array([[1]]), CACHE[:, :, :1], ShapeError, "0 or 1 dims"),
    "source_dtype": (2, np.array([1]), CACHE[:, :, :1].astype(np.float32), DTypeError, "dtype float64"),
    "source_shape": (2, np.array([1, 2]), CACHE[:, :, :1], ShapeError, r"shape \(2, 3, 2, 4\)"),
    "source_ndim": (2, np.array([1]), CACHE[0, :, :1], ShapeError, r"shape \(2, 3, 1, 4\)"),
    "out_of_bounds": (2, np.array([6]), CACHE[:, :, :1], EngineError, r"in \[0, 6\)"),
    "negative_index": (2, np.array([-1]), CACHE[:, :, :1], EngineError, r"in \[0, 6\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_operands_are_refused_as_pytorch_refuses_them(case):
    dim, index, source, error, message = BAD[case]
    with pytest.raises((RuntimeError, IndexError)):
        torch.tensor(CACHE).index_copy_(dim, torch.tensor(index), torch.tensor(source))
    ours = engine.tensor(CACHE)
    with pytest.raises(error, match=rf"^index_copy_: .*{message}"):
        ours.index_copy_(dim, engine.tensor(index), engine.tensor(source))
    np.testing.assert_array_equal(ours.numpy(), CACHE)  # nothing written
    with pytest.raises(error, match=rf"^index_copy: .*{message}"):
        engine.index_copy(ours, dim, engine.tensor(index), engine.tensor(source))


@pytest.mark.parametrize("device", DEVICES)
def test_a_mask_from_a_position_tensor_matches_pytorchs(device):
    """The static cache's mask: key slot j is visible to the new query at position p when j <= p,
    computed from the position tensor on the device (no host read)."""
    for lib in (engine, torch):
        position = lib.tensor([5], device=device)
        positions = position + lib.arange(3, device=device)  # three new queries at 5, 6, 7
        mask = lib.arange(8, device=device) <= positions[:, None]
        if lib is engine:
            ours = mask.numpy()
        else:
            theirs = mask.cpu().numpy()
    assert ours.dtype == np.bool_ and ours.shape == (3, 8)
    np.testing.assert_array_equal(ours, theirs)

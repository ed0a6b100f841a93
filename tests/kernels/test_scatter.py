"""The CPU row scatter-add (kernels/cpu/scatter.py): np.add.at's bits for an integer row index,
and the embedding / index_select backward that uses it, with torch as the oracle."""

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import backend
from engine.kernels.cpu import scatter

torch = pytest.importorskip("torch")


def bits(a):
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,index_shape", [
    ((256, 128), (16, 64)),  # a GPT batch's token rows: many repeats
    ((7,), (50,)),  # a 1-d table
    ((5, 3, 2), (9,)),  # rows of more than one dim
    ((1, 4), (0,)),  # no rows at all
    ((3, 0), (4,)),  # empty rows
])
def test_add_rows_gives_add_at_bits(dtype, shape, index_shape):
    rng = np.random.default_rng(sum(shape) + len(index_shape))
    rows = rng.integers(-shape[0], shape[0], index_shape)  # negative rows count from the end, as numpy's
    values = rng.standard_normal(index_shape + shape[1:]).astype(dtype)
    values.reshape(-1)[::3] = -0.0
    start = rng.standard_normal(shape).astype(dtype)
    expected, got = start.copy(), start.copy()
    np.add.at(expected, rows, values)
    assert scatter.takes(got, rows, values)
    scatter.add_rows(got, rows, values)
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_non_contiguous_values_and_int32_rows():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((8, 12)).astype(np.float32)[:, ::2]  # strided
    rows = rng.integers(0, 4, 8).astype(np.int32)
    expected, got = np.zeros((4, 6), np.float32), np.zeros((4, 6), np.float32)
    np.add.at(expected, rows, values)
    scatter.add_rows(got, rows, values)
    np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("bad", [4, -5])
def test_rows_out_of_range_raise_as_add_at(bad):
    target = np.zeros((4, 2), np.float32)
    rows = np.array([0, bad, 1])
    with pytest.raises(IndexError, match="out of bounds"):
        scatter.add_rows(target, rows, np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(target, 0)  # nothing written


def test_what_the_loop_does_not_take_goes_to_add_at():
    target = np.zeros((4, 3), np.float32)
    rows = np.array([1, 1, 2])
    assert not scatter.takes(target.astype(np.int64), rows, np.ones((3, 3), np.int64))  # integers
    assert not scatter.takes(target, rows, np.ones((3, 3), np.float64))  # dtypes differ
    assert not scatter.takes(np.zeros((3, 4), np.float32).T, rows, np.ones((3, 3), np.float32))  # strided target
    assert not scatter.takes(target, rows.astype(np.float32), np.ones((3, 3), np.float32))  # float rows
    assert not scatter.takes(target, rows, np.ones((3, 1), np.float32))  # broadcast values
    backend.scatter_add(target, rows, np.ones((3, 1), np.float32))  # np.add.at broadcasts them
    np.testing.assert_array_equal(target, [[0] * 3, [2] * 3, [1] * 3, [0] * 3])


def test_embedding_and_index_select_gradients_match_torch():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((11, 5)).astype(np.float32)
    ids = rng.integers(0, 11, (6, 7))
    upstream = rng.standard_normal((6, 7, 5)).astype(np.float32)

    w = engine.tensor(table, requires_grad=True)
    (F.embedding(engine.tensor(ids), w) * engine.tensor(upstream)).sum().backward()
    (engine.index_select(w, 0, engine.tensor(ids[0])) ** 2).sum().backward()

    tw = torch.tensor(table, requires_grad=True)
    (torch.nn.functional.embedding(torch.tensor(ids), tw) * torch.tensor(upstream)).sum().backward()
    (torch.index_select(tw, 0, torch.tensor(ids[0])) ** 2).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), rtol=1e-6, atol=1e-6)

"""The third round of PyTorch's tensor ops (tril/triu, masked_fill, gather/scatter, topk/sort, split,
flip, repeat, repeat_interleave, multinomial, randint ...) and assignment into graph tensors,
checked against PyTorch itself: the same expression runs on both libraries (the engine's API is
PyTorch's, so one lambda serves both), and values, dtypes and float64 gradients must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import DTypeError, EngineError, GradError, ShapeError
from tests.conftest import DEVICES

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(7)
A34 = RNG.standard_normal((3, 4))
A234 = RNG.standard_normal((2, 3, 4))
B = RNG.standard_normal((2, 4, 5))
INT = RNG.integers(-5, 6, size=(3, 4))
TIES = np.array([[1.0, 3.0, 3.0, 2.0], [0.5, 0.5, -1.0, 4.0], [2.0, 2.0, 2.0, 2.0]])


def _lib_tensor(lib, array, requires_grad=False):
    return lib.tensor(array, requires_grad=requires_grad)


# name: (expression of (lib, *tensors), input arrays, differentiable?)
CASES = {
    "tril": (lambda L, x: L.tril(x), [A34], True),
    "tril_diag-1_batched": (lambda L, x: x.tril(-1), [A234], True),
    "triu_diag1": (lambda L, x: L.triu(x, diagonal=1), [A34], True),
    "triu_int": (lambda L, x: x.triu(), [INT], False),
    "tril_bool": (lambda L, x: (x > 0).tril(), [INT], False),
    "masked_fill_scalar": (lambda L, x: x.masked_fill(x > 0, -1.5), [A34], True),
    "masked_fill_broadcast_mask": (lambda L, x: x.masked_fill(L.tensor([True, False, True, False]), 2.0), [A34], True),
    "masked_fill_attention_idiom": (lambda L, x: L.softmax(x.masked_fill(L.tril(L.ones(4, 4)) == 0, float("-inf")), -1),
                                    [RNG.standard_normal((2, 4, 4))], True),
    "masked_fill_mask_broadcasts_input": (lambda L, x: x.masked_fill(L.ones(2, 1, 4, dtype=L.bool), 0.5),
                                          [A34], True),
    "masked_fill_int_float_value": (lambda L, x: x.masked_fill(x > 0, 1.7), [INT], False),
    "masked_fill_0d_tensor_value": (lambda L, x, v: x.masked_fill(x > 0, v), [A34, np.array(0.25)], True),
    "masked_select": (lambda L, x: L.masked_select(x, x > 0), [A34], True),
    "gather_dim1_repeats": (lambda L, x: L.gather(x, 1, L.tensor([[0, 0], [3, 1], [2, 2]])), [A34], True),
    "gather_dim0": (lambda L, x: x.gather(0, L.tensor([[2, 1, 0, 0]])), [A34], True),
    "scatter_src": (lambda L, x, s: x.scatter(1, L.tensor([[0, 2], [1, 3], [3, 0]]), s), [A34, A34[:, :2] + 1], True),
    "scatter_larger_src": (lambda L, x, s: x.scatter(1, L.tensor([[0, 2], [1, 3], [3, 0]]), s), [A34, A34[:, :3] + 1],
                           False),
    "scatter_value": (lambda L, x: L.scatter(x, 0, L.tensor([[1, 0, 2, 1]]), 0.5), [A34], True),
    "scatter_add": (lambda L, x, s: x.scatter_add(1, L.tensor([[0, 0], [3, 1], [2, 2]]), s), [A34, A34[:, :2]], True),
    "index_select_repeats": (lambda L, x: L.index_select(x, 1, L.tensor([3, 0, 3])), [A34], True),
    "index_fill": (lambda L, x: x.index_fill(1, L.tensor([0, 2]), -1.0), [A34], True),
    "index_fill_0d_value": (lambda L, x, v: x.index_fill(0, L.tensor([1, 1]), v), [A34, np.array(2.0)], True),
    "topk": (lambda L, x: L.topk(x, 2).values, [A34], True),
    "topk_indices": (lambda L, x: x.topk(2, dim=1).indices, [A34], False),  # ties: order unspecified in PyTorch
    "topk_smallest_dim0": (lambda L, x: x.topk(2, dim=0, largest=False).values, [A34], True),
    "topk_int": (lambda L, x: x.topk(3)[0], [INT], False),
    "sort_descending": (lambda L, x: L.sort(x, descending=True).values, [A34], True),
    "sort_indices_ties": (lambda L, x: x.sort(dim=1, stable=True).indices, [TIES], False),
    "sort_descending_indices_ties": (lambda L, x: x.sort(dim=1, descending=True, stable=True).indices, [TIES], False),
    "argsort_dim0": (lambda L, x: L.argsort(x, dim=0), [A34], False),
    "split_size": (lambda L, x: L.cat([p * (i + 1) for i, p in enumerate(L.split(x, 3, dim=1))], 1), [A234], True),
    "split_sections": (lambda L, x: L.cat([p * (i + 1) for i, p in enumerate(x.split([1, 3], 1))], 1), [A34], True),
    "chunk": (lambda L, x: L.cat([p * (i + 2) for i, p in enumerate(x.chunk(3, dim=-1))], -1), [A234], True),
    "unbind": (lambda L, x: L.stack([p * (i + 1) for i, p in enumerate(x.unbind(1))]), [A34], True),
    "narrow": (lambda L, x: x.narrow(1, 1, 2), [A34], True),
    "narrow_negative_start": (lambda L, x: L.narrow(x, 0, -2, 2), [A34], True),
    "flip": (lambda L, x: L.flip(x, (0, 2)), [A234], True),
    "flip_method_varargs": (lambda L, x: x.flip(0, 1), [A34], True),
    "flip_bool": (lambda L, x: (x > 0).flip(1), [INT], False),
    "fliplr": (lambda L, x: L.fliplr(x), [A34], True),
    "roll": (lambda L, x: L.roll(x, (1, -1), (0, 1)), [A34], True),
    "roll_flat": (lambda L, x: x.roll(5), [A34], True),
    "repeat": (lambda L, x: x.repeat(2, 1, 3), [A34], True),
    "repeat_new_dims": (lambda L, x: x.repeat(2, 1, 1, 2), [A234], True),
    "tile": (lambda L, x: L.tile(x, (2,)), [A34], True),
    "repeat_interleave_int": (lambda L, x: x.repeat_interleave(2, dim=1), [A34], True),
    "repeat_interleave_flat": (lambda L, x: L.repeat_interleave(x, 3), [A34], True),
    "repeat_interleave_tensor": (lambda L, x: x.repeat_interleave(L.tensor([1, 0, 2]), dim=0), [A34], True),
    "repeat_interleave_counts_only": (lambda L, x: L.repeat_interleave(L.tensor([1, 0, 3])), [A34], False),
    "cumsum": (lambda L, x: L.cumsum(x, dim=1), [A34], True),
    "cumsum_int": (lambda L, x: x.cumsum(0), [INT], False),
    "cumsum_bool": (lambda L, x: (x > 0).cumsum(1), [INT], False),
    "bmm": (lambda L, x, y: L.bmm(x, y), [RNG.standard_normal((2, 3, 4)), B], True),
    "movedim": (lambda L, x: L.movedim(x, 0, -1), [A234], True),
    "movedim_pairs": (lambda L, x: x.movedim((0, 1), (2, 0)), [A234], True),
    "view_as": (lambda L, x: x.view_as(L.zeros(4, 3)), [A34], True),
    "expand_as": (lambda L, x: x[:1].expand_as(x), [A34], True),
    "type_as": (lambda L, x: x.type_as(L.ones(1, dtype=L.long)), [A34 * 3], False),
    "unsqueeze_keyword": (lambda L, x: L.unsqueeze(x, dim=-1), [A34], True),
    "squeeze_tuple": (lambda L, x: x.reshape(3, 1, 4, 1).squeeze((1, 3)), [A34], True),
    "contiguous_of_transpose": (lambda L, x: x.t().contiguous() * 2, [A34], True),
    "eq_view_as_idiom": (lambda L, x: x.argmax(dim=1, keepdim=True).eq(L.tensor([0, 1, 2]).view_as(
        x.argmax(dim=1, keepdim=True))).sum(), [A34], False),
    "nonzero": (lambda L, x: L.nonzero(x > 0), [A34], False),
    "nonzero_as_tuple": (lambda L, x: L.stack(L.nonzero(x > 0, as_tuple=True)), [A34], False),
    "nonzero_0d": (lambda L, x: L.nonzero(x.sum() > -100), [A34], False),
    "argwhere": (lambda L, x: L.argwhere(x), [INT], False),
    "count_nonzero": (lambda L, x: L.count_nonzero(x, dim=0), [INT], False),
    "isclose": (lambda L, x: L.isclose(x, x + 1e-9), [A34], False),
    "new_zeros_full": (lambda L, x: x.new_zeros(2, 3) + x.new_full((2, 3), 2.5) + x.new_ones((2, 3)), [A34], False),
    "setitem_column": (lambda L, x: _setitem(x * 1, (slice(None), 0), 0.0), [A34], True),
    "setitem_mask_value": (lambda L, x: _setitem(x * 2, ~(x > 0), -1.0), [A34], True),
    "setitem_tensor_value": (lambda L, x, v: _setitem(x * 1, 1, v * 3), [A34, RNG.standard_normal(4)], True),
    "setitem_broadcast_value": (lambda L, x, v: _setitem(x * 1, (slice(0, 2), slice(1, 3)), v.exp()),
                                [A34, RNG.standard_normal(2)], True),
    "setitem_index_tensor": (lambda L, x, v: _setitem(x.sin(), L.tensor([2, 0]), v), [A34, A34[:2] * 2], True),
    "setitem_into_plain_tensor": (lambda L, x, v: _setitem(L.zeros(3, 4, dtype=L.float64), (0, slice(None)), v * v),
                                  [A34, RNG.standard_normal(4)], True),
    "setitem_twice": (lambda L, x, v: _setitem(_setitem(x * 1, 0, v), (slice(None), 1), v[1] * 2),
                      [A34, RNG.standard_normal(4)], True),
}


def _setitem(t, index, value):
    t[index] = value
    return t


def _run(lib, expr, arrays, requires_grad):
    tensors = [_lib_tensor(lib, a, requires_grad and a.dtype.kind == "f") for a in arrays]
    return expr(lib, *tensors), tensors


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_values_and_dtypes_match_pytorch(case):
    expr, arrays, _ = CASES[case]
    ours, _ = _run(engine, expr, arrays, False)
    theirs, _ = _run(torch, expr, arrays, False)
    expected = theirs.detach().numpy()
    assert ours.shape == tuple(theirs.shape)
    assert np.dtype(ours.dtype) == expected.dtype, (ours.dtype, theirs.dtype)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]], ids=[c for c in CASES if CASES[c][2]])
def test_gradients_match_pytorch(case):
    expr, arrays, _ = CASES[case]
    weights = RNG.standard_normal(_run(torch, expr, arrays, False)[0].shape)
    ours, our_inputs = _run(engine, expr, arrays, True)
    theirs, their_inputs = _run(torch, expr, arrays, True)
    (ours * engine.tensor(weights)).sum().backward()
    (theirs * torch.tensor(weights)).sum().backward()
    for mine, reference in zip(our_inputs, their_inputs):
        if reference.grad is None:
            assert mine.grad is None or not mine.grad.numpy().any()
            continue
        np.testing.assert_allclose(mine.grad.numpy(), reference.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["tril", "masked_fill_scalar", "gather_dim1_repeats", "scatter_src", "topk",
                                  "repeat_interleave_tensor", "flip", "cumsum", "setitem_tensor_value"])
def test_gradients_match_finite_differences(case):
    expr, arrays, _ = CASES[case]
    inputs = [engine.tensor(a) for a in arrays]
    assert engine.gradcheck(lambda *t: expr(engine, *t), inputs)


# ---- in-place forms ----------------------------------------------------------------------------------

INPLACE = {
    "masked_fill_": lambda L, x: x.masked_fill_(x > 0.5, 0.0),
    "index_fill_": lambda L, x: x.index_fill_(1, L.tensor([0, 2]), -1.0),
    "scatter_": lambda L, x: x.scatter_(1, L.tensor([[0], [1], [3]]), 1.0),
    "scatter_add_": lambda L, x: x.scatter_add_(0, L.tensor([[0, 1, 2, 0]]), L.ones(1, 4, dtype=L.float64)),
    "scatter_reduce_add": lambda L, x: x.scatter_(1, L.tensor([[0, 0], [1, 1], [3, 3]]), 1.0, reduce="add"),
    "scatter_reduce_multiply": lambda L, x: x.scatter_(1, L.tensor([[0, 0], [1, 1], [3, 3]]), 2.0, reduce="multiply"),
    "tril_": lambda L, x: x.tril_(),
    "triu_": lambda L, x: x.triu_(1),
    "fill_0d_tensor": lambda L, x: x.fill_(L.tensor(2.5, dtype=L.float64)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(INPLACE), ids=list(INPLACE))
def test_inplace_forms_match_pytorch_and_bump_the_version(case, device):
    ours = engine.tensor(A34, device=device)
    before = ours._version_value
    result = INPLACE[case](engine, ours)
    theirs = torch.tensor(A34)
    INPLACE[case](torch, theirs)
    assert result is ours and ours._version_value > before
    np.testing.assert_allclose(ours.numpy(), theirs.numpy())


@pytest.mark.parametrize("case", ["masked_fill_", "index_fill_", "scatter_", "tril_", "fill_0d_tensor"])
def test_inplace_forms_on_graph_tensors_give_pytorchs_gradients(case):
    grads = []
    for lib in (engine, torch):
        x = lib.tensor(A34, requires_grad=True)
        y = x * 3
        INPLACE[case](lib, y)
        (y * lib.tensor(A34)).sum().backward()
        grads.append(x.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1])


def test_fill_with_a_0d_tensor_that_requires_grad_sends_it_the_gradient():
    for lib in (engine, torch):
        v = lib.tensor(2.0, requires_grad=True)
        y = lib.zeros(3).fill_(v)
        (y * lib.tensor([1.0, 2.0, 3.0])).sum().backward()
        assert v.grad.item() == pytest.approx(6.0)
    with pytest.raises(EngineError, match="0-dimension"):
        engine.zeros(3).fill_(engine.tensor([2.0]))


def test_inplace_forms_refuse_a_leaf_that_requires_grad():
    w = engine.ones(3, 3, requires_grad=True)
    for change in (lambda: w.masked_fill_(w > 0, 0.0), lambda: w.tril_(),
                   lambda: w.index_fill_(0, engine.tensor([0]), 1.0)):
        with pytest.raises(GradError, match="leaf"):
            change()


# ---- __setitem__ on graph tensors: CopySlices and the version rules -------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_setitem_on_a_graph_tensor_is_recorded(device):
    x = engine.tensor(A34, device=device, requires_grad=True)
    y = x * 2
    y_id = id(y)
    y[:, 0] = 0
    y[~(x > 0)] = -1.0
    assert id(y) == y_id and y.grad_fn is not None
    y.sum().backward()
    expected = np.where(A34 > 0, 2.0, 0.0)
    expected[:, 0] = 0.0
    np.testing.assert_allclose(x.grad.numpy(), expected)


def test_setitem_of_a_tensor_requiring_grad_reaches_both_tensors():
    x = engine.tensor(A34, requires_grad=True)
    v = engine.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x.sin()
    y[engine.tensor([1, 2]), engine.tensor([0, 3])] = v * v
    y.sum().backward()
    expected = np.cos(A34)
    expected[1, 0] = expected[2, 3] = 0.0
    np.testing.assert_allclose(x.grad.numpy(), expected)
    np.testing.assert_allclose(v.grad.numpy(), [2.0, 4.0])


def test_setitem_after_a_saved_use_refuses_backward():
    # (y * y) saved y; changing y afterwards would make its gradient wrong: PyTorch raises too.
    x = engine.tensor(A34, requires_grad=True)
    y = x * 1
    z = (y * y).sum()
    y[0] = 5.0
    with pytest.raises(GradError, match="modified by an in-place operation"):
        z.backward()


def test_setitem_on_an_output_a_node_saved_refuses_backward():
    x = engine.tensor(A34, requires_grad=True)
    y = x.exp()   # exp keeps its output for backward
    y[:, 1] = 0.0
    with pytest.raises(GradError, match="modified by an in-place operation"):
        y.sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        t = torch.tensor(A34, requires_grad=True).exp()
        t[:, 1] = 0.0
        t.sum().backward()


def test_setitem_refusals_match_pytorch():
    w = engine.ones(3, requires_grad=True)
    with pytest.raises(GradError, match="leaf"):
        w[0] = 2.0
    with engine.no_grad():
        w[0] = 2.0  # an update, as optimizers do
    assert w.numpy()[0] == 2.0
    y = w * 1
    with pytest.raises(GradError, match="view"):
        y[0:2][0] = 1.0  # a view of a graph tensor: PyTorch rebases, the engine refuses (documented)


def test_setitem_casts_into_the_destination_dtype():
    counts = engine.zeros(3, dtype=engine.long)
    counts[1] = 2.9
    counts[engine.tensor([0, 2])] = engine.tensor([1.5, -1.5])
    assert counts.dtype == np.int64 and counts.tolist() == [1, 2, -1]
    with pytest.raises(DTypeError):
        counts[0] = float("nan")


# ---- random functions -----------------------------------------------------------------------------------

def test_randint_forms_follow_pytorch():
    engine.manual_seed(0)
    assert engine.randint(5, (3,)).dtype == np.int64
    for t, lo, hi, shape in ((engine.randint(3, 5, (200,)), 3, 5, (200,)),
                             (engine.randint(3, 5, size=(2, 50)), 3, 5, (2, 50)),
                             (engine.randint(7, size=(100,)), 0, 7, (100,)),
                             (engine.randint(low=-2, high=2, size=(100,)), -2, 2, (100,)),
                             (engine.randint(high=4, size=[100]), 0, 4, (100,))):
        values = t.numpy()
        assert t.shape == shape and values.min() >= lo and values.max() < hi
        assert set(np.unique(values)) == set(range(lo, hi))
    assert engine.randint(5, (3,), dtype=engine.float).dtype == np.float32
    with pytest.raises(TypeError, match="tuple"):
        engine.randint(5, 3)  # PyTorch: size must be a tuple of ints
    with pytest.raises(DTypeError):
        engine.randint(5, (3,), requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        engine.randint(5, 5, (3,))


def test_rand_and_randn_take_size_as_a_keyword():
    assert engine.randn(size=(2, 3)).shape == (2, 3)
    assert engine.rand(size=[4]).shape == (4,)
    assert engine.rand((2, 3)).shape == (2, 3) and engine.randn(2, 3, dtype=engine.float64).dtype == np.float64
    with pytest.raises(TypeError):
        engine.rand(2, size=(2, 3))


def test_generator_gives_a_reproducible_stream_of_its_own():
    g = engine.Generator().manual_seed(1337)
    first = engine.randperm(20, generator=g).tolist()
    engine.rand(5)  # the global stream does not disturb it
    g.manual_seed(1337)
    assert engine.randperm(20, generator=g).tolist() == first and sorted(first) == list(range(20))
    g2 = engine.Generator().manual_seed(1337)
    np.testing.assert_array_equal(engine.randn(3, generator=g2).numpy(),
                                  engine.randn(3, generator=g.manual_seed(1337)).numpy())
    assert g.initial_seed() == 1337
    state = g.get_state()
    a = engine.randint(0, 100, (5,), generator=g).tolist()
    g.set_state(state)
    assert engine.randint(0, 100, (5,), generator=g).tolist() == a
    with pytest.raises(TypeError, match="Generator"):
        engine.rand(2, generator=np.random.default_rng(0))


def test_multinomial_frequencies_follow_the_weights():
    engine.manual_seed(0)
    weights = engine.tensor([1.0, 0.0, 3.0, 6.0])  # unnormalised, as PyTorch accepts
    draws = engine.multinomial(weights, 20000, replacement=True)
    assert draws.dtype == np.int64 and draws.shape == (20000,)
    freq = np.bincount(draws.numpy(), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.3, 0.6], atol=0.02)
    rows = engine.softmax(engine.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]), dim=-1)
    picks = rows.multinomial(num_samples=1)
    assert picks.shape == (2, 1)


def test_multinomial_without_replacement_draws_each_category_once():
    engine.manual_seed(1)
    weights = engine.tensor([[0.1, 0.2, 0.3, 0.4]] * 500)
    draws = engine.multinomial(weights, 4).numpy()
    assert all(sorted(row) == [0, 1, 2, 3] for row in draws)
    # the first draw is proportional to the weights
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 500, [0.1, 0.2, 0.3, 0.4], atol=0.06)
    # zero-weight categories come last, as in PyTorch
    assert engine.multinomial(engine.tensor([0.0, 1.0, 0.0]), 2).tolist()[0] == 1


@pytest.mark.parametrize("bad, error", [((engine.tensor([-1.0, 1.0]), 1), "element < 0"),
                                        ((engine.tensor([0.0, 0.0]), 1), "sum of probabilities"),
                                        ((engine.tensor([1, 2]), 1), "floating"),
                                        ((engine.ones(2, 2, 2), 1), "1 or 2 dim"),
                                        ((engine.ones(3), 4), "without replacement")])
def test_multinomial_refuses_what_pytorch_refuses(bad, error):
    with pytest.raises((EngineError, ValueError), match=error):
        engine.multinomial(*bad)


# ---- legacy types, whole-tensor comparisons, small methods -----------------------------------------------

def test_legacy_tensor_types():
    assert engine.LongTensor([1.5, 2]).tolist() == [1, 2] and engine.LongTensor([1]).dtype == np.int64
    assert engine.LongTensor(2, 3).shape == (2, 3) and engine.LongTensor().shape == (0,)
    assert engine.FloatTensor([1, 2]).dtype == np.float32 and engine.ByteTensor([1]).dtype == np.uint8
    assert isinstance(engine.ones(1), engine.FloatTensor) and not isinstance(engine.ones(1), engine.LongTensor)
    assert isinstance(engine.arange(3), engine.LongTensor) and not isinstance(engine.arange(3), engine.cuda.LongTensor)
    assert engine.ones(1).type() == "torch.FloatTensor"


def test_allclose_isclose_equal():
    a = engine.ones(3)
    assert engine.allclose(a, a + 1e-9) and a.allclose(engine.ones(1))
    assert not engine.allclose(a, a + 1e-3)
    assert engine.allclose(engine.tensor([float("nan")]), engine.tensor([float("nan")]), equal_nan=True)
    with pytest.raises(DTypeError):
        engine.allclose(a, engine.ones(3, dtype=engine.float64))  # PyTorch: Float did not match Double
    assert engine.equal(a, engine.ones(3)) and not engine.equal(a, engine.ones(4))


def test_detach_in_place_contiguous_nelement():
    x = engine.ones(2, 3, requires_grad=True)
    y = x * 2
    assert y.detach_() is y and y.grad_fn is None and not y.requires_grad
    assert x.nelement() == 6
    t = engine.ones(2, 3)
    assert t.contiguous() is t and t.is_contiguous()
    assert not t.t().is_contiguous() and t.t().contiguous().is_contiguous()


def test_dims_out_of_range_are_refused():
    with pytest.raises(ShapeError):
        engine.ones(2).unsqueeze(2)  # numpy would wrap it to 0
    with pytest.raises(ShapeError):
        engine.ones(2, 3).flip(2)
    with pytest.raises(ShapeError):
        engine.tril(engine.ones(3))
    with pytest.raises(ShapeError):
        engine.topk(engine.ones(4), 5)
    with pytest.raises(ShapeError):
        engine.split(engine.arange(10), [3, 6])
    with pytest.raises(ShapeError):
        engine.bmm(engine.ones(2, 3, 4), engine.ones(4, 5))


def test_index_checks_follow_pytorch():
    x = engine.ones(3, 4)
    with pytest.raises(EngineError, match="out of bounds"):
        x.gather(1, engine.tensor([[4]]))
    with pytest.raises(EngineError, match="out of bounds"):
        x.index_select(0, engine.tensor([-1]))
    with pytest.raises(DTypeError, match="integer"):
        x.gather(1, engine.tensor([[0.0]]))
    with pytest.raises(DTypeError, match="boolean"):
        x.masked_fill(engine.ones(3, 4), 0.0)
    with pytest.raises(ShapeError, match="0-dimensional"):
        x.masked_fill(x > 0, engine.tensor([1.0]))
    with pytest.raises(DTypeError, match="dtype"):
        x.scatter(1, engine.tensor([[0]]), engine.ones(1, 1, dtype=engine.long))
    # index_fill takes negative indices, as PyTorch's
    np.testing.assert_array_equal(x.index_fill(1, engine.tensor([-1]), 0.0).numpy()[:, 3], 0.0)


def test_split_pieces_are_views_sharing_the_version():
    x = engine.arange(10.0)
    first, *_ = x.split(4)
    with engine.no_grad():
        first.fill_(-1.0)
    assert x.numpy()[:4].tolist() == [-1.0] * 4
    assert first._version is x._version


def test_flip_roll_repeat_return_new_memory():
    x = engine.arange(6.0).reshape(2, 3)
    for out in (x.flip(0), x.roll(1, 0), x.repeat(1, 1), x.repeat_interleave(1, dim=0)):
        with engine.no_grad():
            out.fill_(0.0)
    assert x.numpy().tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_tensor_to_accepts_pytorchs_keywords():
    x = engine.ones(2)
    assert x.to(device="cpu", dtype=engine.float64).dtype == np.float64
    assert x.to("cpu", non_blocking=True) is x
    assert x.to(engine.zeros(1, dtype=engine.long)).dtype == np.int64
    assert x.to("cpu", copy=True) is not x and x.pin_memory() is x

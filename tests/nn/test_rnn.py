"""nn.RNN / nn.LSTM / nn.GRU, their cells, and packed sequences, against PyTorch 2.13: the same
weights (copied through state dicts, whose keys must be PyTorch's) give the same outputs, final
states and gradients, in float64, for every layout: layers, directions, batch_first, initial
states, unbatched input, and packed variable-length batches."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import nn
from engine.errors import ShapeError
from engine.nn.utils import rnn as rnn_utils

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(11)


def _pair(kind: str, *args, **kwargs):
    """The engine module and PyTorch's with the engine's weights (float64)."""
    ours = getattr(nn, kind)(*args, **kwargs).double()
    theirs = getattr(torch.nn, kind)(*args, **kwargs).double()
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict()), "parameter names and order must be PyTorch's"
    theirs.load_state_dict({k: torch.tensor(v.numpy()) for k, v in state.items()})
    return ours, theirs


def _flat(result):
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flat(r)]
    if isinstance(result, (rnn_utils.PackedSequence, torch.nn.utils.rnn.PackedSequence)):
        return [result.data]
    return [result]


def _compare(ours_out, theirs_out, our_leaves, their_leaves, atol=1e-10):
    mine, reference = _flat(ours_out), _flat(theirs_out)
    assert len(mine) == len(reference)
    loss_mine = loss_ref = 0
    for a, b in zip(mine, reference):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9, atol=atol)
        w = RNG.standard_normal(a.shape)
        loss_mine = loss_mine + (a * engine.tensor(w)).sum()
        loss_ref = loss_ref + (b * torch.tensor(w)).sum()
    loss_mine.backward()
    loss_ref.backward()
    for a, b in zip(our_leaves, their_leaves):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-9, atol=atol)


def _params(module):
    return list(module.parameters())


CONFIGS = [
    ("RNN", dict(num_layers=1)),
    ("RNN", dict(num_layers=2, nonlinearity="relu", bidirectional=True)),
    ("RNN", dict(bias=False, batch_first=True)),
    ("LSTM", dict(num_layers=1)),
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(num_layers=3, batch_first=True, bias=False)),
    ("GRU", dict(num_layers=1)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("kind, kwargs", CONFIGS, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}"
                                                      for k, kw in CONFIGS])
@pytest.mark.parametrize("with_state", [False, True])
def test_outputs_states_and_gradients_match_pytorch(kind, kwargs, with_state):
    ours, theirs = _pair(kind, 5, 7, **kwargs)
    steps, batch = 6, 3
    shape = (batch, steps, 5) if kwargs.get("batch_first") else (steps, batch, 5)
    x = RNG.standard_normal(shape)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    states = [RNG.standard_normal((layers, batch, 7)) for _ in range(2 if kind == "LSTM" else 1)]
    xe, xt = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    our_leaves, their_leaves = [xe, *_params(ours)], [xt, *_params(theirs)]
    args_e, args_t = [xe], [xt]
    if with_state:
        se = [engine.tensor(s, requires_grad=True) for s in states]
        st = [torch.tensor(s, requires_grad=True) for s in states]
        args_e.append(tuple(se) if kind == "LSTM" else se[0])
        args_t.append(tuple(st) if kind == "LSTM" else st[0])
        our_leaves += se
        their_leaves += st
    _compare(ours(*args_e), theirs(*args_t), our_leaves, their_leaves)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_unbatched_input_matches_pytorch(kind):
    ours, theirs = _pair(kind, 4, 3, num_layers=2)
    x = RNG.standard_normal((5, 4))
    xe, xt = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    _compare(ours(xe), theirs(xt), [xe, *_params(ours)], [xt, *_params(theirs)])


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences_match_pytorch(kind, enforce_sorted, bidirectional):
    lengths = [5, 3, 3, 1] if enforce_sorted else [3, 5, 1, 3]
    ours, theirs = _pair(kind, 4, 6, num_layers=2, bidirectional=bidirectional, batch_first=True)
    x = RNG.standard_normal((4, 5, 4))
    xe, xt = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    packed_e = rnn_utils.pack_padded_sequence(xe, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    packed_t = torch.nn.utils.rnn.pack_padded_sequence(xt, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    np.testing.assert_array_equal(packed_e.batch_sizes.numpy(), packed_t.batch_sizes.numpy())
    out_e, state_e = ours(packed_e)
    out_t, state_t = theirs(packed_t)
    assert isinstance(out_e, rnn_utils.PackedSequence)
    padded_e, len_e = rnn_utils.pad_packed_sequence(out_e, batch_first=True, total_length=6)
    padded_t, len_t = torch.nn.utils.rnn.pad_packed_sequence(out_t, batch_first=True, total_length=6)
    assert len_e.tolist() == len_t.tolist() == lengths
    _compare((padded_e, state_e), (padded_t, state_t), [xe, *_params(ours)], [xt, *_params(theirs)])


def test_packed_sequence_round_trip_and_helpers():
    seqs = [engine.tensor(RNG.standard_normal((n, 2))) for n in (2, 4, 1)]
    packed = rnn_utils.pack_sequence(seqs, enforce_sorted=False)
    reference = torch.nn.utils.rnn.pack_sequence([torch.tensor(s.numpy()) for s in seqs], enforce_sorted=False)
    np.testing.assert_allclose(packed.data.numpy(), reference.data.numpy())
    assert packed.sorted_indices.tolist() == reference.sorted_indices.tolist()
    assert packed.unsorted_indices.tolist() == reference.unsorted_indices.tolist()
    for mine, original in zip(rnn_utils.unpack_sequence(packed), seqs):
        np.testing.assert_array_equal(mine.numpy(), original.numpy())
    padded, lengths = rnn_utils.pad_packed_sequence(packed, padding_value=-1.0)
    assert padded.shape == (4, 3, 2) and lengths.tolist() == [2, 4, 1]
    assert padded.numpy()[2:, 0].tolist() == [[-1.0, -1.0]] * 2
    with pytest.raises(ValueError, match="decreasing"):
        rnn_utils.pack_padded_sequence(engine.zeros(4, 3, 2), [1, 2, 3])
    with pytest.raises(ValueError, match="greater than 0"):
        rnn_utils.pack_padded_sequence(engine.zeros(4, 2, 2), [3, 0])


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_match_pytorch(kind, batched):
    ours, theirs = _pair(kind, 4, 5)
    x = RNG.standard_normal((3, 4) if batched else (4,))
    state_shape = (3, 5) if batched else (5,)
    xe, xt = engine.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    states = [RNG.standard_normal(state_shape) for _ in range(2 if kind == "LSTMCell" else 1)]
    se = [engine.tensor(s, requires_grad=True) for s in states]
    st = [torch.tensor(s, requires_grad=True) for s in states]
    hx_e = tuple(se) if kind == "LSTMCell" else se[0]
    hx_t = tuple(st) if kind == "LSTMCell" else st[0]
    _compare(ours(xe, hx_e), theirs(xt, hx_t), [xe, *se, *_params(ours)], [xt, *st, *_params(theirs)])
    assert _flat(ours(xe))[0].shape == state_shape  # hx defaults to zeros


def test_cells_unrolled_by_hand_train_like_pytorch():
    # The time_sequence_prediction pattern: LSTMCells stepped over input.split(1, dim=1).
    ours, theirs = _pair("LSTMCell", 1, 8)
    x = RNG.standard_normal((2, 6))
    results = []
    for lib, cell in ((engine, ours), (torch, theirs)):
        h = c = lib.zeros(2, 8, dtype=lib.double)
        outs = []
        for step in lib.tensor(x).split(1, dim=1):
            h, c = cell(step, (h, c))
            outs.append(h.sum(1, keepdim=True))
        loss = (lib.cat(outs, dim=1) ** 2).mean()
        loss.backward()
        results.append((loss.item(), [p.grad.numpy() for p in cell.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_dropout_between_layers_only_in_training():
    engine.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    x = engine.randn(5, 2, 3)
    lstm.eval()
    a, _ = lstm(x)
    b, _ = lstm(x)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    lstm.train()
    c, _ = lstm(x)
    assert not np.allclose(a.numpy(), c.numpy())
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        nn.GRU(3, 4, dropout=0.2)


def test_module_surface_is_pytorchs():
    lstm = nn.LSTM(10, 20, 2, bidirectional=True)
    assert [n for n, _ in lstm.named_parameters()] == [n for n, _ in torch.nn.LSTM(10, 20, 2, bidirectional=True)
                                                       .named_parameters()]
    assert lstm.weight_ih_l0.shape == (80, 10) and lstm.weight_ih_l1_reverse.shape == (80, 40)
    assert len(lstm.all_weights) == 4 and lstm.all_weights[1][0] is lstm.weight_ih_l0_reverse
    lstm.flatten_parameters()
    bound = 1 / np.sqrt(20)
    assert all(np.abs(p.numpy()).max() <= bound for p in lstm.parameters())
    assert repr(nn.GRU(3, 4, batch_first=True)) == repr(torch.nn.GRU(3, 4, batch_first=True))
    assert repr(nn.RNN(3, 4, 2, nonlinearity="relu")) == repr(torch.nn.RNN(3, 4, 2, nonlinearity="relu"))
    assert repr(nn.RNNCell(3, 4, bias=False, nonlinearity="relu")) == repr(torch.nn.RNNCell(3, 4, bias=False,
                                                                                         nonlinearity="relu"))


def test_bad_inputs_raise_clear_errors():
    lstm = nn.LSTM(3, 4)
    with pytest.raises(ShapeError, match="input_size"):
        lstm(engine.randn(5, 2, 2))
    with pytest.raises(ShapeError, match="hidden size"):
        lstm(engine.randn(5, 2, 3), (engine.zeros(1, 3, 4), engine.zeros(1, 3, 4)))
    with pytest.raises(TypeError, match="tuple"):
        lstm(engine.randn(5, 2, 3), engine.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="proj_size"):
        nn.LSTM(3, 4, proj_size=4)  # projections must be narrower than the hidden state (test_round3_api.py)
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.RNN(3, 4, nonlinearity="sigmoid")


def test_a_weight_changed_before_backward_is_detected():
    gru = nn.GRU(3, 4)
    out, _ = gru(engine.randn(5, 2, 3))
    with engine.no_grad():
        gru.weight_hh_l0.mul_(2)
    with pytest.raises(engine.GradError, match="modified by an in-place operation"):
        out.sum().backward()


def test_float32_lstm_language_model_trains():
    engine.manual_seed(0)
    vocab, steps = 7, 12
    data = engine.tensor(np.tile(np.arange(vocab), 8)[:steps * 4].reshape(4, steps).T.copy())  # (T, B)
    emb, lstm, head = nn.Embedding(vocab, 8), nn.LSTM(8, 16), nn.Linear(16, vocab)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = engine.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(60):
        out, _ = lstm(emb(data[:-1]))
        loss = nn.functional.cross_entropy(head(out).reshape(-1, vocab), data[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

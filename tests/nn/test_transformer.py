"""MultiheadAttention, TransformerEncoderLayer / TransformerEncoder and pad_sequence against NumPy
float64 re-implementations of PyTorch's math, PyTorch's state_dict keys, finite differences, and
fused vs unfused parity."""

import math

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import kernels
from engine import nn
from engine.errors import DeviceError, DTypeError, ShapeError
from engine.nn.utils.rnn import pad_sequence
from tests.conftest import DEVICES

_erf = np.vectorize(math.erf)


def _t(a, device="cpu", dtype=np.float32, requires_grad=False):
    return engine.tensor(np.asarray(a), dtype=dtype, device=device, requires_grad=requires_grad)


def _np(p):
    return None if p is None else p.numpy().astype(np.float64)


def _softmax_rows(s):
    top = s.max(axis=-1, keepdims=True)
    dead = np.isneginf(top)
    e = np.exp(s - np.where(dead, 0, top))
    return np.where(dead, 0, e / np.where(dead, 1, e.sum(axis=-1, keepdims=True)))


def _as_bias(mask):
    """torch.nn convention: boolean True = blocked -> -inf; float added."""
    return np.where(mask, -np.inf, 0.0) if mask.dtype == bool else mask


def reference_mha(mha, query, key, value, key_padding_mask=None, attn_mask=None, average=True):
    """PyTorch's F.multi_head_attention_forward in float64, on seq-first (L, N, E) inputs."""
    e, h = mha.embed_dim, mha.num_heads
    hd = e // h
    b = np.zeros(3 * e) if mha.in_proj_bias is None else _np(mha.in_proj_bias)
    if mha.in_proj_weight is not None:
        w = _np(mha.in_proj_weight)
        wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
    else:
        wq, wk, wv = _np(mha.q_proj_weight), _np(mha.k_proj_weight), _np(mha.v_proj_weight)
    q, k, v = query @ wq.T + b[:e], key @ wk.T + b[e:2 * e], value @ wv.T + b[2 * e:]
    length, n, _ = q.shape
    bias = None
    if attn_mask is not None:
        bias = _as_bias(attn_mask)
        bias = bias[None] if bias.ndim == 2 else bias  # (1 or N*H, L, S)
    if key_padding_mask is not None:
        kp = np.repeat(_as_bias(key_padding_mask)[:, None, None, :], h, axis=1).reshape(n * h, 1, -1)
        bias = kp if bias is None else bias + kp
    if mha.bias_k is not None:
        k = np.concatenate([k, np.repeat(_np(mha.bias_k), n, axis=1)])
        v = np.concatenate([v, np.repeat(_np(mha.bias_v), n, axis=1)])
        bias = None if bias is None else np.concatenate([bias, np.zeros(bias.shape[:-1] + (1,))], -1)
    # PyTorch's layout: (L, N * H, hd) -> (N * H, L, hd)
    q = q.reshape(length, n * h, hd).transpose(1, 0, 2)
    k = k.reshape(k.shape[0], n * h, hd).transpose(1, 0, 2)
    v = v.reshape(v.shape[0], n * h, hd).transpose(1, 0, 2)
    if mha.add_zero_attn:
        k = np.concatenate([k, np.zeros((n * h, 1, hd))], 1)
        v = np.concatenate([v, np.zeros((n * h, 1, hd))], 1)
        bias = None if bias is None else np.concatenate([bias, np.zeros(bias.shape[:-1] + (1,))], -1)
    scores = (q / math.sqrt(hd)) @ k.transpose(0, 2, 1)
    if bias is not None:
        scores = scores + bias
    p = _softmax_rows(scores)
    out = (p @ v).transpose(1, 0, 2).reshape(length * n, e)
    ob = 0 if mha.out_proj.bias is None else _np(mha.out_proj.bias)
    out = (out @ _np(mha.out_proj.weight).T + ob).reshape(length, n, e)
    weights = p.reshape(n, h, length, -1)
    return out, (weights.mean(axis=1) if average else weights)


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + (0 if b is None else b)


def reference_encoder_layer(layer, src, src_mask=None, key_padding_mask=None, activation="relu"):
    """PyTorch's TransformerEncoderLayer.forward in float64 (dropout off), seq-first input."""
    def sa(x):
        return reference_mha(layer.self_attn, x, x, x, key_padding_mask, src_mask)[0]

    def ff(x):
        hidden = x @ _np(layer.linear1.weight).T + _np(layer.linear1.bias)
        hidden = np.maximum(hidden, 0) if activation == "relu" else 0.5 * hidden * (1 + _erf(hidden / math.sqrt(2)))
        return hidden @ _np(layer.linear2.weight).T + _np(layer.linear2.bias)

    n1 = lambda x: _layer_norm(x, _np(layer.norm1.weight), _np(layer.norm1.bias))  # noqa: E731
    n2 = lambda x: _layer_norm(x, _np(layer.norm2.weight), _np(layer.norm2.bias))  # noqa: E731
    x = src
    if layer.norm_first:
        x = x + sa(n1(x))
        return x + ff(n2(x))
    x = n1(x + sa(x))
    return n2(x + ff(x))


def _padding(rng, n, s):
    """(n, s) torch.nn key_padding_mask: True = padding; row 0 keeps one key only."""
    lengths = rng.integers(1, s + 1, size=n)
    lengths[0] = 1
    return np.arange(s)[None, :] >= lengths[:, None]


def _randomise(module, rng):
    """Random (nonzero) values in every parameter, so zero-initialised biases are exercised."""
    for p in module.parameters():
        p._data[...] = rng.standard_normal(p.shape).astype(p.dtype) * 0.5


# ---- MultiheadAttention ------------------------------------------------------------------------------

MASKS = ["none", "bool_attn", "float_attn", "per_head_attn", "padding", "padding_and_attn"]


def _masks(kind, rng, n, h, length, s):
    attn = padding = None
    if kind in ("bool_attn", "padding_and_attn"):
        attn = rng.random((length, s)) < 0.3
        attn[:, 0] = False
    if kind == "float_attn":
        attn = rng.standard_normal((length, s))
    if kind == "per_head_attn":
        attn = rng.random((n * h, length, s)) < 0.3
        attn[3, 1] = True  # one fully blocked row
    if kind in ("padding", "padding_and_attn"):
        padding = _padding(rng, n, s)
    return attn, padding


def _engine_mask(mask, device="cpu"):
    if mask is None:
        return None
    return _t(mask, device, dtype=None if mask.dtype == bool else np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_mha_matches_numpy_pytorch_math(rng, device, kind, batch_first, need_weights, average):
    e, h, length, s, n = 12, 3, 4, 6, 2
    mha = nn.MultiheadAttention(e, h, batch_first=batch_first, device=device)
    _randomise(mha, rng)
    query = rng.standard_normal((length, n, e))
    key, value = rng.standard_normal((s, n, e)), rng.standard_normal((s, n, e))
    attn, padding = _masks(kind, rng, n, h, length, s)
    to_input = (lambda a: _t(a.transpose(1, 0, 2), device)) if batch_first else (lambda a: _t(a, device))
    out, weights = mha(to_input(query), to_input(key), to_input(value), key_padding_mask=_engine_mask(padding, device),
                       need_weights=need_weights, attn_mask=_engine_mask(attn, device), average_attn_weights=average)
    ref_out, ref_weights = reference_mha(mha, query, key, value, padding, attn, average)
    if batch_first:
        ref_out = ref_out.transpose(1, 0, 2)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-4, atol=1e-4)
    if need_weights:
        np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=1e-4, atol=1e-5)
    else:
        assert weights is None


def test_mha_self_attention_packed_projection_and_unbatched(rng):
    e, h = 8, 2
    mha = nn.MultiheadAttention(e, h)
    _randomise(mha, rng)
    x = rng.standard_normal((5, e))
    attn = rng.random((h, 5, 5)) < 0.3
    attn[:, :, 0] = False
    padding = np.array([False, False, False, True, True])
    tx = _t(x)
    out, weights = mha(tx, tx, tx, key_padding_mask=_t(padding, dtype=None), attn_mask=_t(attn, dtype=None),
                       average_attn_weights=False)
    ref_out, ref_w = reference_mha(mha, x[:, None], x[:, None], x[:, None], padding[None], attn, average=False)
    assert out.shape == (5, e) and weights.shape == (h, 5, 5)
    np.testing.assert_allclose(out.numpy(), ref_out[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights.numpy(), ref_w[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(kdim=5, vdim=7), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                     dict(add_bias_kv=True, add_zero_attn=True, bias=False)])
def test_mha_kdim_vdim_bias_kv_zero_attn(rng, options):
    e, h, length, s, n = 8, 2, 3, 5, 2
    mha = nn.MultiheadAttention(e, h, **options)
    _randomise(mha, rng)
    query = rng.standard_normal((length, n, e))
    key = rng.standard_normal((s, n, options.get("kdim", e)))
    value = rng.standard_normal((s, n, options.get("vdim", e)))
    padding = _padding(rng, n, s)
    attn = rng.random((length, s)) < 0.3
    attn[:, 0] = False
    for need_weights in (True, False):
        out, weights = mha(_t(query), _t(key), _t(value), key_padding_mask=_t(padding, dtype=None),
                           attn_mask=_t(attn, dtype=None), need_weights=need_weights)
        ref_out, ref_w = reference_mha(mha, query, key, value, padding, attn)
        np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-4, atol=1e-4)
        if need_weights:
            np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-4, atol=1e-5)


def test_mha_state_dict_keys_and_init_are_pytorchs():
    e = 16
    mha = nn.MultiheadAttention(e, 4)
    assert list(mha.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert mha.in_proj_weight.shape == (3 * e, e) and mha.in_proj_bias.shape == (3 * e,)
    assert not mha.in_proj_bias.numpy().any() and not mha.out_proj.bias.numpy().any()
    bound = math.sqrt(6 / (e + 3 * e))  # xavier_uniform on (3E, E)
    w = mha.in_proj_weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    assert list(nn.MultiheadAttention(e, 4, kdim=3, vdim=5).state_dict()) == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert list(nn.MultiheadAttention(e, 4, add_bias_kv=True).state_dict()) == [
        "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"]
    assert list(nn.MultiheadAttention(e, 4, bias=False).state_dict()) == ["in_proj_weight", "out_proj.weight"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MASKS)
def test_mha_fused_and_unfused_agree_forward_and_backward(rng, device, kind):
    e, h, length, s, n = 10, 2, 5, 7, 3
    mha = nn.MultiheadAttention(e, h, batch_first=True, device=device)
    _randomise(mha, rng)
    q, kv = rng.standard_normal((n, length, e)), rng.standard_normal((n, s, e))
    attn, padding = _masks(kind, rng, n, h, length, s)
    g = rng.standard_normal((n, length, e))
    results = []
    for fused in (True, False):
        mha.zero_grad()
        tq, tkv = _t(q, device, requires_grad=True), _t(kv, device, requires_grad=True)
        with F.fused_kernels(fused):
            out, _ = mha(tq, tkv, tkv, key_padding_mask=_engine_mask(padding, device),
                         attn_mask=_engine_mask(attn, device), need_weights=False)
        out.backward(_t(g, device))
        results.append([out.numpy(), tq.grad.numpy(), tkv.grad.numpy()] + [p.grad.numpy() for p in mha.parameters()])
    for a, b in zip(*results):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_mha_attention_dropout_is_seeded_and_weights_are_after_dropout(rng):
    mha = nn.MultiheadAttention(8, 2, dropout=0.5)
    x = _t(rng.standard_normal((6, 2, 8)))
    engine.manual_seed(3)
    out1, w1 = mha(x, x, x, average_attn_weights=False)
    engine.manual_seed(3)
    out2, w2 = mha(x, x, x, average_attn_weights=False)
    np.testing.assert_array_equal(out1.numpy(), out2.numpy())
    dropped = w1.numpy() == 0
    assert 0.3 < dropped.mean() < 0.7  # weights returned after dropout, as PyTorch's
    mha.eval()
    out_eval, w_eval = mha(x, x, x)
    np.testing.assert_allclose(w_eval.numpy().sum(-1), 1, rtol=1e-5)


def test_mha_errors_name_the_problem(rng):
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads.*embed_dim=10.*num_heads=3"):
        nn.MultiheadAttention(10, 3)
    mha = nn.MultiheadAttention(8, 2)
    x = _t(rng.standard_normal((4, 2, 8)))
    with pytest.raises(ShapeError, match=r"MultiheadAttention: feature dims.*shape=\(4, 2, 6\)"):
        mha(x, _t(rng.standard_normal((4, 2, 6))), x)
    with pytest.raises(ShapeError, match="batch sizes"):
        y = _t(rng.standard_normal((4, 3, 8)))
        mha(x, y, y)
    with pytest.raises(ShapeError, match="key and value"):
        mha(x, x, _t(rng.standard_normal((5, 2, 8))))
    with pytest.raises(ShapeError, match=r"key_padding_mask.*\(2, 4\)"):
        mha(x, x, x, key_padding_mask=_t(np.zeros((4, 2), bool), dtype=None))
    with pytest.raises(ShapeError, match=r"attn_mask.*\(4, 4\)"):
        mha(x, x, x, attn_mask=_t(np.zeros((3, 4), bool), dtype=None))
    with pytest.raises(ShapeError, match="batched 3-D or unbatched 2-D"):
        mha(x, _t(rng.standard_normal((4, 8))), x)
    with pytest.raises(DTypeError, match="attn_mask"):
        mha(x, x, x, attn_mask=_t(np.zeros((4, 4)), dtype=np.float64))
    with pytest.raises(RuntimeError, match="is_causal"):
        mha(x, x, x, is_causal=True)


@pytest.mark.gpu
def test_mha_mask_on_another_device_is_refused(rng):
    mha = nn.MultiheadAttention(8, 2, device="cuda")
    x = _t(rng.standard_normal((4, 2, 8)), "cuda")
    with pytest.raises(DeviceError, match="key_padding_mask.*different devices"):
        mha(x, x, x, key_padding_mask=_t(np.zeros((2, 4), bool), dtype=None))


# ---- TransformerEncoderLayer / TransformerEncoder -------------------------------------------------------

ENCODER_KEYS = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]


def test_encoder_layer_and_encoder_state_dict_keys_are_pytorchs():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    assert list(layer.state_dict()) == ENCODER_KEYS
    assert [name for name, _ in layer.named_children()] == [
        "self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"]
    encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(8))
    assert list(encoder.state_dict()) == ([f"layers.{i}.{k}" for i in (0, 1) for k in ENCODER_KEYS]
                                          + ["norm.weight", "norm.bias"])
    # Deep copies: equal values, separate parameters.
    a, b = encoder.layers[0].linear1.weight, encoder.layers[1].linear1.weight
    assert a is not b and a is not layer.linear1.weight
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding_and_attn"])
def test_encoder_layer_matches_numpy_float64(rng, device, norm_first, activation, masks):
    d, h, ff, s, n = 8, 2, 12, 5, 3
    layer = nn.TransformerEncoderLayer(d, h, ff, dropout=0.1, activation=activation, norm_first=norm_first,
                                       batch_first=True, device=device)
    _randomise(layer, rng)
    layer.eval()  # dropout off
    src = rng.standard_normal((s, n, d))
    attn, padding = _masks(masks, rng, n, h, s, s)
    out = layer(_t(src.transpose(1, 0, 2), device), src_mask=_engine_mask(attn, device),
                src_key_padding_mask=_engine_mask(padding, device))
    expected = reference_encoder_layer(layer, src, attn, padding, activation).transpose(1, 0, 2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_encoder_layer_callable_activation_and_relu_fusion(rng, monkeypatch):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    calls = []
    real = kernels.linear_relu_forward
    monkeypatch.setattr(kernels, "linear_relu_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = _t(rng.standard_normal((4, 2, 8)))
    fused_out = layer(x)
    assert calls == [1]
    with F.fused_kernels(False):
        np.testing.assert_allclose(layer(x).numpy(), fused_out.numpy(), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    gelu_tanh = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.GELU(approximate="tanh"))
    gelu_tanh.load_state_dict(layer.state_dict())
    manual = layer.norm2(layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0]))
    assert gelu_tanh(x).shape == manual.shape
    with pytest.raises(ValueError, match="activation should be relu/gelu"):
        nn.TransformerEncoderLayer(8, 2, activation="swish")


@pytest.mark.slow
def test_encoder_layer_gradcheck_float64(rng):
    layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, dtype=np.float64)
    _randomise(layer, rng)
    padding = _t(np.array([[False, False, True], [False, False, False]]), dtype=None)
    x = rng.standard_normal((3, 2, 4))
    assert engine.gradcheck(lambda t: layer(t, src_key_padding_mask=padding), [_t(x, dtype=np.float64)])
    # Parameter gradients against central differences at a few elements of every parameter.
    weights = rng.standard_normal((3, 2, 4))

    def loss():
        return float((layer(_t(x, dtype=np.float64), src_key_padding_mask=padding).numpy() * weights).sum())

    layer.zero_grad()
    (layer(_t(x, dtype=np.float64), src_key_padding_mask=padding) * _t(weights, dtype=np.float64)).sum().backward()
    for name, p in layer.named_parameters():
        flat = p._data.reshape(-1)
        for j in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            original = flat[j]
            flat[j] = original + 1e-6
            plus = loss()
            flat[j] = original - 1e-6
            minus = loss()
            flat[j] = original
            np.testing.assert_allclose(p.grad.numpy().reshape(-1)[j], (plus - minus) / 2e-6, rtol=1e-4, atol=1e-6,
                                       err_msg=name)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_fused_and_unfused_training_steps_agree(rng, norm_first):
    engine.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8))
    state = {k: v.numpy().copy() for k, v in encoder.state_dict().items()}
    x = _t(rng.standard_normal((3, 5, 8)))
    padding = _t(_padding(rng, 3, 5), dtype=None)
    finals = []
    for fused in (True, False):
        encoder.load_state_dict({k: _t(v) for k, v in state.items()})
        opt = engine.optim.SGD(encoder.parameters(), lr=0.1)
        with F.fused_kernels(fused):
            for _ in range(3):
                opt.zero_grad()
                loss = (encoder(x, src_key_padding_mask=padding) ** 2).mean()
                loss.backward()
                opt.step()
        finals.append({k: v.numpy().copy() for k, v in encoder.state_dict().items()})
    for k in finals[0]:
        np.testing.assert_allclose(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_encoder_runs_layers_in_turn_then_norm(rng):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(8))
    _randomise(encoder, rng)
    x = _t(rng.standard_normal((5, 2, 8)))
    mask = nn.transformer.generate_square_subsequent_mask(5)
    expected = x
    for sub in encoder.layers:
        expected = sub(expected, src_mask=mask)
    expected = encoder.norm(expected)
    np.testing.assert_allclose(encoder(x, mask=mask, is_causal=True).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.isneginf(mask.numpy()), np.triu(np.ones((5, 5), bool), 1))


# ---- pad_sequence and Embedding(padding_idx) --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_sequence_values_and_gradient(rng, device, batch_first, side):
    arrays = [rng.standard_normal((length, 2)) for length in (3, 1, 4)]
    seqs = [_t(a, device, requires_grad=True) for a in arrays]
    out = pad_sequence(seqs, batch_first=batch_first, padding_value=-7.0, padding_side=side)
    expected = np.full((3, 4, 2), -7.0)
    for i, a in enumerate(arrays):
        if side == "right":
            expected[i, :len(a)] = a
        else:
            expected[i, 4 - len(a):] = a
    if not batch_first:
        expected = expected.transpose(1, 0, 2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    g = rng.standard_normal(expected.shape)
    out.backward(_t(g, device))
    rows = g if batch_first else g.transpose(1, 0, 2)
    for i, (a, s) in enumerate(zip(arrays, seqs)):
        want = rows[i, :len(a)] if side == "right" else rows[i, 4 - len(a):]
        np.testing.assert_allclose(s.grad.numpy(), want, rtol=1e-6)


def test_pad_sequence_integer_ids_and_errors():
    ids = pad_sequence([engine.tensor([5, 6, 7]), engine.tensor([8])], batch_first=True, padding_value=0)
    assert ids.dtype == np.int64 and ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    import engine.nn.utils.rnn as rnn
    assert nn.utils.rnn.pad_sequence is rnn.pad_sequence
    with pytest.raises(ValueError, match="empty"):
        pad_sequence([])
    with pytest.raises(ShapeError, match=r"pad_sequence: sequence 1.*trailing dims"):
        pad_sequence([engine.zeros(2, 3), engine.zeros(2, 4)])
    with pytest.raises(DTypeError, match="pad_sequence"):
        pad_sequence([engine.zeros(2), engine.tensor([1, 2])])
    with pytest.raises(ValueError, match="padding_side"):
        pad_sequence([engine.zeros(2)], padding_side="middle")


def test_embedding_padding_idx_row_gets_no_gradient_through_an_encoder(rng):
    emb = nn.Embedding(6, 8, padding_idx=0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    ids = engine.tensor([[3, 4, 0, 0], [5, 1, 2, 0]])
    layer(emb(ids), src_key_padding_mask=ids == 0).sum().backward()
    assert not emb.weight.grad.numpy()[0].any() and emb.weight.grad.numpy()[1:6].any()


# ---- TransformerDecoderLayer / TransformerDecoder / Transformer ---------------------------------------

DECODER_KEYS = (["self_attn." + k for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
                + ["multihead_attn." + k for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                   "out_proj.bias")]
                + ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm1.weight", "norm1.bias",
                   "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias"])


def reference_decoder_layer(layer, tgt, memory, tgt_mask, memory_padding, activation):
    """PyTorch's TransformerDecoderLayer.forward in float64 (dropout off), seq-first inputs."""
    def sa(x):
        return reference_mha(layer.self_attn, x, x, x, None, tgt_mask)[0]

    def ca(x):
        return reference_mha(layer.multihead_attn, x, memory, memory, memory_padding, None)[0]

    def ff(x):
        hidden = x @ _np(layer.linear1.weight).T + _np(layer.linear1.bias)
        hidden = np.maximum(hidden, 0) if activation == "relu" else 0.5 * hidden * (1 + _erf(hidden / math.sqrt(2)))
        return hidden @ _np(layer.linear2.weight).T + _np(layer.linear2.bias)

    norms = [lambda x, m=m: _layer_norm(x, _np(m.weight), _np(m.bias)) for m in (layer.norm1, layer.norm2, layer.norm3)]
    x = tgt
    if layer.norm_first:
        x = x + sa(norms[0](x))
        x = x + ca(norms[1](x))
        return x + ff(norms[2](x))
    x = norms[0](x + sa(x))
    x = norms[1](x + ca(x))
    return norms[2](x + ff(x))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_numpy_float64_and_keys(rng, norm_first, activation):
    d, h, t, s, n = 8, 2, 4, 6, 2
    layer = nn.TransformerDecoderLayer(d, h, 12, dropout=0.0, activation=activation, norm_first=norm_first)
    assert list(layer.state_dict()) == DECODER_KEYS
    _randomise(layer, rng)
    tgt, memory = rng.standard_normal((t, n, d)), rng.standard_normal((s, n, d))
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    padding = _padding(rng, n, s)
    out = layer(_t(tgt), _t(memory), tgt_mask=causal, memory_key_padding_mask=_t(padding, dtype=None),
                tgt_is_causal=True)
    expected = reference_decoder_layer(layer, tgt, memory, causal.numpy().astype(np.float64), padding, activation)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_transformer_is_encoder_then_decoder_with_pytorch_keys(rng):
    model = nn.Transformer(8, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=12, dropout=0.0,
                           batch_first=True)
    keys = list(model.state_dict())
    assert keys[:12] == [f"encoder.layers.0.{k}" for k in ENCODER_KEYS]
    assert "encoder.norm.weight" in keys and keys[-2:] == ["decoder.norm.weight", "decoder.norm.bias"]
    assert [k for k in keys if k.startswith("decoder.layers.0.")] == [f"decoder.layers.0.{k}" for k in DECODER_KEYS]
    bound = math.sqrt(6 / (8 + 12))  # xavier_uniform on every matrix, linear1.weight (12, 8) here
    assert np.abs(model.encoder.layers[0].linear1.weight.numpy()).max() <= bound
    src, tgt = _t(rng.standard_normal((2, 5, 8))), _t(rng.standard_normal((2, 3, 8)))
    mask = nn.Transformer.generate_square_subsequent_mask(3)
    memory = model.encoder(src)
    expected = model.decoder(tgt, memory, tgt_mask=mask)
    np.testing.assert_allclose(model(src, tgt, tgt_mask=mask).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError, match="batch number"):
        model(src, _t(rng.standard_normal((3, 3, 8))))

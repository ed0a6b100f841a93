"""F.scaled_dot_product_attention against a NumPy float64 reference, finite differences, and
fused (kernels.attention_*) vs unfused parity, forward and backward."""

import math

import numpy as np
import pytest

import engine
import engine.functional as F
import engine.functional.attention as attention_impl
from engine import kernels
import engine.nn.functional as nnF
from engine.errors import DeviceError, DTypeError, ShapeError
from engine.kernels.cpu import attention_heads
from tests.conftest import DEVICES


@pytest.fixture
def flash_path(monkeypatch):
    """Short CPU calls take the flash kernels (kernels.attention_*) instead of the heads kernel."""
    monkeypatch.setattr(attention_heads, "HEADS_MAX_PAIRS", 0)


@pytest.fixture(params=["heads", "flash"])
def cpu_path(request, monkeypatch):
    """Each of the two fused CPU paths: the heads kernel (short sequences) and the flash kernels."""
    if request.param == "flash":
        monkeypatch.setattr(attention_heads, "HEADS_MAX_PAIRS", 0)
    return request.param


def reference_sdpa(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + mask) v in float64; rows that see no key give 0 (the engine's choice)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    dead = np.isneginf(top)
    e = np.exp(s - np.where(dead, 0, top))
    p = np.where(dead, 0, e / np.where(dead, 1, e.sum(axis=-1, keepdims=True)))
    return p @ v


def _t(a, device="cpu", dtype=np.float32, requires_grad=False):
    return engine.tensor(np.asarray(a), dtype=dtype, device=device, requires_grad=requires_grad)


def _key_padding(rng, n, s):
    """(n, s) True = may attend, with row 0 keeping only its first key and some rows padded."""
    lengths = rng.integers(1, s + 1, size=n)
    lengths[0] = 1
    return np.arange(s)[None, :] < lengths[:, None]


# Batch dims, L, S, E, Ev, and the mask kind: odd sizes, L != S both ways, no batch dims too.
CASES = [
    ((2, 3), 5, 7, 4, 3, None),
    ((2, 3), 6, 6, 8, 8, "causal"),
    ((2, 3), 7, 4, 5, 6, "causal"),
    ((2, 3), 5, 7, 3, 5, "bool_shared"),
    ((2, 3), 5, 7, 6, 2, "float_full"),
    ((2, 3), 4, 9, 5, 5, "key_padding"),
    ((), 5, 6, 7, 3, "bool_shared"),
    ((), 4, 4, 1, 1, None),
    ((3,), 3, 8, 9, 4, "key_padding_float"),
    ((2, 3), 5, 6, 4, 4, "per_head"),
]


def _mask_for(kind, rng, batch, l, s):
    """(numpy mask for the reference, same mask for the engine, causal flag)."""
    if kind is None:
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool_shared":
        m = rng.random((l, s)) < 0.7
        m[:, 0] = True
        m[1, :] = False  # one fully masked row
        return m, False
    if kind == "float_full":
        return rng.standard_normal(batch + (l, s)), False
    if kind in ("key_padding", "key_padding_float"):
        m = _key_padding(rng, batch[0], s).reshape((batch[0],) + (1,) * (len(batch) - 1) + (1, s))
        if kind == "key_padding_float":
            return np.where(m, 0.0, -np.inf), False
        return m, False
    if kind == "per_head":  # varies over heads, shared over the first batch dim
        return rng.random((1, batch[1], l, s)) < 0.8, False
    raise AssertionError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("batch,l,s,e,ev,kind", CASES)
@pytest.mark.slow
def test_sdpa_matches_float64_reference(rng, cpu_path, device, fused, batch, l, s, e, ev, kind):
    q, k, v = (rng.standard_normal(batch + shape) for shape in ((l, e), (s, e), (s, ev)))
    mask, causal = _mask_for(kind, rng, batch, l, s)
    engine_mask = None if mask is None else (_t(mask, device, dtype=None) if mask.dtype == bool
                                             else _t(mask, device))
    out = F.scaled_dot_product_attention(_t(q, device), _t(k, device), _t(v, device), attn_mask=engine_mask,
                                         is_causal=causal, fused=fused)
    assert out.shape == batch + (l, ev) and out.dtype == np.float32
    expected = reference_sdpa(q, k, v, mask, causal)
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_sdpa_custom_scale_and_nn_functional_alias(rng, fused):
    q, k, v = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 2))
    out = nnF.scaled_dot_product_attention(_t(q), _t(k), _t(v), scale=0.37, fused=fused)
    np.testing.assert_allclose(out.numpy(), reference_sdpa(q, k, v, scale=0.37), rtol=2e-5, atol=2e-5)
    assert nnF.scaled_dot_product_attention is F.scaled_dot_product_attention


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", [None, "causal", "bool_shared", "key_padding", "float_full"])
@pytest.mark.slow
def test_sdpa_gradcheck_float64(rng, cpu_path, fused, kind):
    batch, l, s, e, ev = (2, 2), 3, 4, 3, 2
    q, k, v = (rng.standard_normal(batch + shape) for shape in ((l, e), (s, e), (s, ev)))
    mask, causal = _mask_for(kind, rng, batch, l, s)
    # The mask is a constant here (closure, float64): a float mask that requires grad would take
    # the unfused path whatever ``fused`` says.
    engine_mask = None if mask is None else engine.tensor(mask, dtype=None if mask.dtype == bool else np.float64)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=engine_mask, is_causal=causal, fused=fused)

    assert engine.gradcheck(fn, [_t(q), _t(k), _t(v)])


def test_sdpa_float_mask_gets_gradient_through_unfused_path(rng):
    q, k, v = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    bias = rng.standard_normal((3, 4))
    assert engine.gradcheck(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                            [_t(q), _t(k), _t(v), _t(bias)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,l,s,e,ev,kind", CASES)
@pytest.mark.slow
def test_sdpa_fused_and_unfused_agree_forward_and_backward(rng, cpu_path, device, batch, l, s, e, ev, kind):
    q, k, v = (rng.standard_normal(batch + shape) for shape in ((l, e), (s, e), (s, ev)))
    mask, causal = _mask_for(kind, rng, batch, l, s)
    g = rng.standard_normal(batch + (l, ev))
    results = []
    for fused in (True, False):
        tq, tk, tv = (_t(a, device, requires_grad=True) for a in (q, k, v))
        engine_mask = None if mask is None else _t(mask, device, dtype=None if mask.dtype == bool else np.float32)
        out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=engine_mask, is_causal=causal, fused=fused)
        out.backward(_t(g, device))
        results.append([out.numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert np.isfinite(a).all() and np.isfinite(b).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_sdpa_fully_masked_rows_are_zero_with_no_gradient_on_both_paths(rng, cpu_path):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    mask = np.ones((2, 3, 5), bool)
    mask[0, 1] = False
    mask[1, 2] = False
    for fused in (True, False):
        tq = _t(q, requires_grad=True)
        out = F.scaled_dot_product_attention(tq, _t(k), _t(v), attn_mask=_t(mask, dtype=None), fused=fused)
        assert np.all(out.numpy()[0, 1] == 0) and np.all(out.numpy()[1, 2] == 0)
        out.sum().backward()
        assert np.all(tq.grad.numpy()[0, 1] == 0) and np.isfinite(tq.grad.numpy()).all()


def test_sdpa_dropout_uses_seeded_rng_and_unfused_path(rng):
    q, k, v = (_t(rng.standard_normal((2, 4, 6, 5))) for _ in range(3))
    engine.manual_seed(7)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    engine.manual_seed(7)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    no_drop = F.scaled_dot_product_attention(q, k, v)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), no_drop.numpy())
    # dropout_p = 1 drops every weight: the output is exactly 0.
    assert np.all(F.scaled_dot_product_attention(q, k, v, dropout_p=1.0).numpy() == 0)


def test_sdpa_broadcasts_batch_dims_and_gqa(rng, cpu_path):
    q = rng.standard_normal((2, 4, 3, 5))
    k, v = rng.standard_normal((2, 2, 6, 5)), rng.standard_normal((2, 2, 6, 3))
    expected = reference_sdpa(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1))
    for fused in (True, False):
        out = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), enable_gqa=True, fused=fused)
        np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=2e-5)
    shared_kv = F.scaled_dot_product_attention(_t(q), _t(k[:1, :1]), _t(v[:1, :1]))
    np.testing.assert_allclose(shared_kv.numpy(), reference_sdpa(q, k[:1, :1], v[:1, :1]), rtol=2e-5, atol=2e-5)


def test_sdpa_kernel_mask_is_not_expanded_for_shared_and_key_padding_masks(rng, monkeypatch, flash_path):
    seen = []
    real = kernels.attention_forward

    def spy(q, k, v, mask=None, **kw):
        seen.append(None if mask is None else mask.shape)
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    q, k, v = (_t(rng.standard_normal((2, 3, 5, 4))) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, attn_mask=_t(rng.random((5, 5)) < 0.5, dtype=None))
    F.scaled_dot_product_attention(q, k, v, attn_mask=_t(_key_padding(rng, 2, 5)[:, None, None, :], dtype=None))
    assert seen == [(1, 5, 5), (6, 1, 5)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sdpa_16_bit_kernel_calls(rng, monkeypatch, flash_path, dtype):
    """On the CPU bfloat16 / float16 reach the kernels widened to float32 (backward's D from the
    unrounded out), on a GPU as they are (tensor cores); the float32 mask and the engine's
    precision choice are passed; output and gradients keep the dtype and match the definition."""
    seen = []
    real_fwd, real_bwd = kernels.attention_forward, kernels.attention_backward

    def spy_fwd(q, k, v, mask=None, **kw):
        seen.append(("fwd", q.dtype, None if mask is None else mask.dtype, kw["precision"]))
        return real_fwd(q, k, v, mask, **kw)

    def spy_bwd(g, q, *rest, **kw):
        seen.append(("bwd", g.dtype, q.dtype, kw["precision"]))
        return real_bwd(g, q, *rest, **kw)

    monkeypatch.setattr(kernels, "attention_forward", spy_fwd)
    monkeypatch.setattr(kernels, "attention_backward", spy_bwd)
    low = getattr(engine, dtype)
    q, k, v = (_t(rng.standard_normal((2, 3, 7, 8))).to(low).detach().requires_grad_() for _ in range(3))
    mask = _t(_key_padding(rng, 2, 7)[:, None, None, :], dtype=None)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(engine.ones_like(out))
    np_low = np.dtype(out.dtype)
    assert out.dtype == low and q.grad.dtype == low and k.grad.dtype == low
    assert seen == [("fwd", np.float32, np.float32, None), ("bwd", np.float32, np.float32, None)]
    assert attention_impl._attention_function("cpu", np_low) is attention_impl.ScaledDotProductAttention
    assert attention_impl._attention_function("cuda", np_low).computes_in_float32 is False
    assert attention_impl._attention_function("cuda", np.float32) is attention_impl.ScaledDotProductAttention
    want = reference_sdpa(*(t.detach().float().numpy() for t in (q, k, v)), mask=mask.numpy())
    eps = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(out.float().numpy(), want, rtol=2 * eps, atol=2 * eps)


@pytest.fixture
def restore_matmul_precision():
    saved = engine.get_float32_matmul_precision()
    yield
    engine.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("setting,float32_precision", [
    ("highest", None), ("high", "3xtf32"), ("medium", "3xtf32"),
    ("allow_tf32=True", "3xtf32"), ("allow_tf32=False", None),
])
def test_sdpa_precision_follows_float32_matmul_precision(rng, monkeypatch, flash_path, restore_matmul_precision, setting,
                                                         float32_precision):
    """float32 attention asks the kernels for 3xTF32 (tensor cores, float32-level error) when the
    user allowed TF32 ("high" / "medium", or backends.cuda.matmul.allow_tf32 = True, the same
    switch) and for the exact CUDA-core kernel under "highest"; the choice made in forward reaches
    backward. float64 (CPU only) always gets None. The CPU impls compute exactly whatever it says,
    so the argument itself is what is checked here."""
    seen = []
    real_fwd, real_bwd = kernels.attention_forward, kernels.attention_backward

    def spy_fwd(q, k, v, mask=None, **kw):
        seen.append(("fwd", np.dtype(q.dtype).name, kw["precision"]))
        return real_fwd(q, k, v, mask, **kw)

    def spy_bwd(g, q, *rest, **kw):
        seen.append(("bwd", np.dtype(q.dtype).name, kw["precision"]))
        return real_bwd(g, q, *rest, **kw)

    monkeypatch.setattr(kernels, "attention_forward", spy_fwd)
    monkeypatch.setattr(kernels, "attention_backward", spy_bwd)
    if setting.startswith("allow_tf32="):
        engine.backends.cuda.matmul.allow_tf32 = setting.endswith("True")
    else:
        engine.set_float32_matmul_precision(setting)
    for dtype in (np.float32, np.float64):
        q, k, v = (_t(rng.standard_normal((2, 5, 8)), dtype=dtype).requires_grad_() for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        engine.set_float32_matmul_precision("highest")  # a later change does not reach this call's backward
        out.backward(engine.ones_like(out))
        want = reference_sdpa(*(t.detach().numpy() for t in (q, k, v)), causal=True)
        np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-5)  # computed exactly on the CPU
        if setting.startswith("allow_tf32="):
            engine.backends.cuda.matmul.allow_tf32 = setting.endswith("True")
        else:
            engine.set_float32_matmul_precision(setting)
    assert seen == [("fwd", "float32", float32_precision), ("bwd", "float32", float32_precision),
                    ("fwd", "float64", None), ("bwd", "float64", None)]


def test_sdpa_uses_unfused_path_when_disabled_or_dropout(rng, monkeypatch, flash_path):
    calls = []
    real = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = _t(rng.standard_normal((3, 4)))
    with F.fused_kernels(False):
        F.scaled_dot_product_attention(q, q, q)
    F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    assert calls == []
    F.scaled_dot_product_attention(q, q, q)
    assert calls == [1]


def test_sdpa_bad_inputs_name_op_and_shapes(rng):
    q = _t(rng.standard_normal((2, 3, 4)))
    with pytest.raises(ShapeError, match=r"scaled_dot_product_attention.*shape=\(2, 3, 5\)"):
        F.scaled_dot_product_attention(q, _t(rng.standard_normal((2, 3, 5))), q)
    with pytest.raises(ShapeError, match="attn_mask.*does not broadcast"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=_t(np.ones((4, 3), bool), dtype=None))
    with pytest.raises(RuntimeError, match="is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=_t(np.ones((3, 3), bool), dtype=None), is_causal=True)
    with pytest.raises(DTypeError, match="dtype"):
        F.scaled_dot_product_attention(q, q, _t(rng.standard_normal((2, 3, 4)), dtype=np.float64))
    with pytest.raises(DTypeError, match="attn_mask"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=_t(np.zeros((3, 3)), dtype=np.float64))
    with pytest.raises(ShapeError, match=r"at least 2 dims.*query Tensor\(shape=\(3,\).*value Tensor\(shape=\(2, 3, 4\)"):
        F.scaled_dot_product_attention(_t(np.ones(3)), q, q)
    with pytest.raises(ShapeError, match=r"one E and one S: query .*key Tensor\(shape=\(2, 3, 5\)"):
        F.scaled_dot_product_attention(q, _t(rng.standard_normal((2, 3, 5))), q)
    with pytest.raises(ShapeError, match="enable_gqa"):
        F.scaled_dot_product_attention(_t(rng.standard_normal((3, 2, 4))), q, q, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=1.5)


@pytest.mark.gpu
def test_sdpa_refuses_mixed_devices(rng):
    q = _t(rng.standard_normal((2, 3, 4)))
    with pytest.raises(DeviceError, match="different devices"):
        F.scaled_dot_product_attention(q, q.to("cuda"), q)


# ---- layer_norm: fused kernel vs the unfused LayerNorm Function --------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,normalized", [((4, 7), (7,)), ((2, 3, 5), (5,)), ((2, 3, 4), (3, 4)),
                                              ((0, 6), (6,))])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm_fused_matches_unfused_and_float64(rng, device, shape, normalized, affine):
    x = rng.standard_normal(shape) * 3 + 1
    w = rng.standard_normal(normalized) if affine in ("both", "weight") else None
    b = rng.standard_normal(normalized) if affine in ("both", "bias") else None
    g = rng.standard_normal(shape)
    axes = tuple(range(len(shape) - len(normalized), len(shape)))
    mean = x.mean(axis=axes, keepdims=True)
    expected = (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    expected = expected * (1 if w is None else w) + (0 if b is None else b)
    results = []
    for fused in (True, False):
        tx = _t(x, device, requires_grad=True)
        tw, tb = (None if a is None else _t(a, device, requires_grad=True) for a in (w, b))
        out = F.layer_norm(tx, normalized, tw, tb, fused=fused)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
        out.backward(_t(g, device))
        results.append([out.numpy(), tx.grad.numpy()] + [t.grad.numpy() for t in (tw, tb) if t is not None])
    for a, b_ in zip(*results):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.slow
def test_layer_norm_gradcheck_both_paths(rng, fused):
    x, w, b = rng.standard_normal((3, 2, 4)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    assert engine.gradcheck(lambda x, w, b: F.layer_norm(x, (2, 4), w, b, fused=fused), [_t(x), _t(w), _t(b)])


def test_layer_norm_fused_calls_the_kernel_on_rows(rng, monkeypatch):
    shapes = []
    real = kernels.layer_norm_forward
    monkeypatch.setattr(kernels, "layer_norm_forward",
                        lambda x, *a, **kw: shapes.append(x.shape) or real(x, *a, **kw))
    x = _t(rng.standard_normal((2, 3, 4, 5)))
    F.layer_norm(x, (4, 5))
    with F.fused_kernels(False):
        F.layer_norm(x, (4, 5))
    assert shapes == [(6, 20)]


@pytest.mark.parametrize("case", ["E=0", "E=0 scale", "E=0 mask", "E=0 causal", "Ev=0", "E=Ev=0", "S=0", "L=0",
                                  "B=0", "S=0 causal"])
@pytest.mark.parametrize("fused", [True, False])
def test_sdpa_zero_sized_dims_match_torch(rng, case, fused):
    """E = 0: every score is 0 (the default scale 1 / sqrt(0) is not used), so the output is the
    mean of v over the keys each row sees; S = 0 gives zeros, L = 0 and B = 0 empty outputs."""
    torch = pytest.importorskip("torch")
    shapes = {"Ev=0": (1, 3, 4, 2, 0), "E=Ev=0": (1, 3, 4, 0, 0), "S=0": (1, 3, 0, 2, 2), "S=0 causal": (1, 3, 0, 2, 2),
              "L=0": (1, 0, 4, 2, 2), "B=0": (0, 3, 4, 2, 2)}
    b, l, s, e, ev = shapes.get(case, (2, 3, 4, 0, 2))  # the E=0 cases: (2, 3, 4, 0, 2)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((b, l, e), (b, s, e), (b, s, ev))]
    kw = {"scale": 0.5} if "scale" in case else {"is_causal": True} if "causal" in case else {}
    mask = None
    if "mask" in case:
        mask = np.array([[True, False, True, True]] * l)
        mask[1] = False  # a fully masked row: zeros
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    want = torch.nn.functional.scaled_dot_product_attention(
        *leaves, attn_mask=None if mask is None else torch.tensor(mask), **kw)
    want.sum().backward()
    tensors = [_t(a, requires_grad=True) for a in arrays]
    got = F.scaled_dot_product_attention(*tensors, attn_mask=None if mask is None else _t(mask, dtype=None),
                                         fused=fused, **kw)
    got.sum().backward()
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(tensors, leaves):
        assert mine.grad is not None and mine.grad.shape == mine.shape
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-5, atol=1e-6)


def _gpt_heads(x: np.ndarray, heads: int, dtype=np.float32, requires_grad=True):
    """A (B, T, C) projection and its (B, H, T, C / H) head view, as a GPT makes them (no copy)."""
    b, t, c = x.shape
    proj = _t(x, dtype=dtype, requires_grad=requires_grad)
    return proj, proj.reshape(b, t, heads, c // heads).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_heads_kernel_reads_head_views_in_place_and_matches_torch(rng, monkeypatch, dtype, tol, causal):
    """The GPT's attention (heads split by reshape + transpose, merged by transpose + reshape) runs
    the heads kernel on the views themselves: q, k, v reach it sharing the projections' memory,
    and its output merges back without a copy; forward and gradients match torch's SDPA."""
    torch = pytest.importorskip("torch")
    b, t, h, d = 3, 9, 4, 6
    xs = [rng.standard_normal((b, t, h * d)) for _ in range(3)]
    g = rng.standard_normal((b, t, h * d))
    seen = []
    real = kernels.attention_heads_forward

    def spy(q, k, v, mask=None, **kw):
        seen.append((q, k, v))
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(kernels, "attention_heads_forward", spy)
    projs, views = zip(*(_gpt_heads(x, h, dtype) for x in xs))
    out = F.scaled_dot_product_attention(*views, is_causal=causal)
    merged = out.transpose(1, 2).reshape(b, t, h * d)
    assert np.shares_memory(merged.numpy(), out.numpy())  # the merge is a view
    merged.backward(_t(g, dtype=dtype))
    assert len(seen) == 1 and all(np.shares_memory(a, p.numpy()) for a, p in zip(seen[0], projs))

    tx = [torch.tensor(x, requires_grad=True) for x in xs]
    tout = torch.nn.functional.scaled_dot_product_attention(
        *(x.reshape(b, t, h, d).transpose(1, 2) for x in tx), is_causal=causal).transpose(1, 2).reshape(b, t, h * d)
    tout.backward(torch.tensor(g))
    np.testing.assert_allclose(merged.detach().numpy(), tout.detach().numpy(), rtol=tol, atol=tol)
    for p, x in zip(projs, tx):
        np.testing.assert_allclose(p.grad.numpy(), x.grad.numpy(), rtol=tol * 5, atol=tol * 5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sdpa_heads_kernel_16_bit_calls(rng, monkeypatch, dtype):
    """16-bit inputs reach the heads kernel widened to float32 with a float32 (N·H, 1, S) key-padding
    mask, never expanded; out and gradients keep the dtype and match the definition."""
    seen = []
    real_fwd, real_bwd = kernels.attention_heads_forward, kernels.attention_heads_backward

    def spy_fwd(q, k, v, mask=None, **kw):
        seen.append(("fwd", q.dtype, None if mask is None else (mask.dtype, mask.shape)))
        return real_fwd(q, k, v, mask, **kw)

    def spy_bwd(g, q, *rest, **kw):
        seen.append(("bwd", g.dtype, q.dtype))
        return real_bwd(g, q, *rest, **kw)

    monkeypatch.setattr(kernels, "attention_heads_forward", spy_fwd)
    monkeypatch.setattr(kernels, "attention_heads_backward", spy_bwd)
    low = getattr(engine, dtype)
    q, k, v = (_t(rng.standard_normal((2, 3, 7, 8))).to(low).detach().requires_grad_() for _ in range(3))
    mask = _t(_key_padding(rng, 2, 7)[:, None, None, :], dtype=None)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(engine.ones_like(out))
    assert out.dtype == low and q.grad.dtype == low and k.grad.dtype == low and v.grad.dtype == low
    assert seen == [("fwd", np.float32, (np.float32, (6, 1, 7))), ("bwd", np.float32, np.float32)]
    want = reference_sdpa(*(t.detach().float().numpy() for t in (q, k, v)), mask=mask.numpy())
    eps = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(out.float().numpy(), want, rtol=2 * eps, atol=2 * eps)


def test_sdpa_long_sequences_keep_the_flash_kernels(rng, monkeypatch):
    """Past HEADS_MAX_PAIRS query-key pairs per head the CPU runs the flash kernels (O(L) memory)."""
    calls = []
    real = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setattr(attention_heads, "HEADS_MAX_PAIRS", 8 * 8)
    q = _t(rng.standard_normal((2, 8, 4)))
    F.scaled_dot_product_attention(q, q, q)
    assert calls == []
    q = _t(rng.standard_normal((2, 9, 4)))
    F.scaled_dot_product_attention(q, q, q)
    assert calls == [(2, 9, 4)]

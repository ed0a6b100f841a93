"""16-bit tensors reach the fused kernels as they are (linear_relu, cross_entropy), and embedding
accumulates its gradient in float32: results equal the float32 computation rounded once, as the
upcast path of Function.apply gave, without its float32 copies."""

import numpy as np
import pytest

import engine
import engine.nn as nn
import engine.nn.functional as F
from engine import kernels
from tests.conftest import DEVICES

LOW = [pytest.param(engine.bfloat16, id="bfloat16"), pytest.param(engine.float16, id="float16")]
UNIT_ROUNDOFF = {np.dtype(engine.bfloat16): 2.0**-8, np.dtype(engine.float16): 2.0**-11}


def bits(t):
    return t.detach().cpu().numpy().view(np.uint16)


def rounded(t, dtype):
    """A float32 tensor's values rounded once to ``dtype``, as bits."""
    return t.detach().cpu().numpy().astype(dtype).view(np.uint16)


@pytest.fixture
def kernel_dtypes(monkeypatch):
    """The dtypes of the first array each fused kernel is handed, per kernel name."""
    seen = {}
    for name in ("linear_relu_forward", "linear_relu_backward", "softmax_cross_entropy"):
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kw):
            seen.setdefault(_name, []).append(args[0].dtype)
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return seen


def _leaf(rng, shape, dtype, scale=1.0):
    return engine.tensor((rng.standard_normal(shape) * scale).astype(np.float32)).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", LOW)
def test_linear_relu_hands_the_kernels_16_bit_arrays_and_equals_float32_rounded_once(dtype, kernel_dtypes):
    rng = np.random.default_rng(0)
    x, w, b = _leaf(rng, (37, 29), dtype), _leaf(rng, (53, 29), dtype, 0.2), _leaf(rng, (53,), dtype)
    dy = engine.tensor(rng.standard_normal((37, 53)).astype(np.float32)).to(dtype)
    y = F.linear_relu(x, w, b)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    assert kernel_dtypes["linear_relu_forward"] == [np.dtype(dtype)]
    assert kernel_dtypes["linear_relu_backward"] == [np.dtype(dtype)]

    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    y32 = F.linear_relu(x32, w32, b32)
    y32.backward(dy.float())
    np.testing.assert_array_equal(bits(y), rounded(y32, dtype))
    for low, wide in ((x, x32), (w, w32), (b, b32)):
        np.testing.assert_array_equal(bits(low.grad), rounded(wide.grad, dtype))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_hands_the_kernel_16_bit_logits_and_equals_float32_rounded_once(dtype, reduction,
                                                                                    kernel_dtypes):
    """383 rows, 17 of them ignored: a 'mean' denominator of 366 is not exact in bfloat16 (its spacing
    is 2 there), so a 16-bit denominator would move every gradient; it is float32."""
    rng = np.random.default_rng(1)
    logits = _leaf(rng, (383, 50), dtype, 3.0)
    weight = engine.tensor(rng.uniform(0.5, 2.0, 50).astype(np.float32)).to(dtype)
    target = rng.integers(0, 50, 383)
    target[rng.choice(383, 17, replace=False)] = -100
    target = engine.tensor(target)
    loss = F.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=0.05)
    assert loss.dtype == dtype  # as torch: the loss in the logits' dtype
    (loss if reduction != "none" else loss.sum()).backward()
    assert logits.grad.dtype == dtype and kernel_dtypes["softmax_cross_entropy"] == [np.dtype(dtype)]

    wide = logits.detach().float().requires_grad_()
    loss32 = F.cross_entropy(wide, target, weight.float(), reduction=reduction, label_smoothing=0.05)
    np.testing.assert_array_equal(bits(loss), rounded(loss32, dtype))
    if reduction == "none":
        # the 'none' seed is the bf16 ones of sum's backward, not the unit seed: one more exact product
        loss32.sum().backward()
    else:
        loss32.backward()
    np.testing.assert_array_equal(bits(logits.grad), rounded(wide.grad, dtype))


@pytest.mark.parametrize("dtype", LOW)
def test_cross_entropy_matches_torch_in_the_same_dtype(dtype):
    """torch's bf16 / fp16 cross_entropy rounds its log-softmax to the low dtype; ours keeps float32
    to the end: the same dtype, values within 3 u (loss) and 3 u of the row's largest gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = _leaf(rng, (16, 300), dtype, 3.0)
    target = rng.integers(0, 300, 16)
    loss = F.cross_entropy(logits, engine.tensor(target))
    loss.backward()
    torch_dtype = {np.dtype(engine.bfloat16): torch.bfloat16, np.dtype(engine.float16): torch.float16}[np.dtype(dtype)]
    tl = torch.tensor(logits.detach().float().numpy()).to(torch_dtype).requires_grad_()
    theirs = torch.nn.functional.cross_entropy(tl, torch.tensor(target))
    theirs.backward()
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    assert str(theirs.dtype).endswith(np.dtype(dtype).name)
    assert abs(loss.item() - theirs.item()) <= 3 * u * abs(theirs.item())
    ours, their_grad = logits.grad.float().numpy(), tl.grad.float().numpy()
    assert (np.abs(ours - their_grad) <= 3 * u * np.abs(their_grad).max(axis=1, keepdims=True)).all()


@pytest.mark.parametrize("dtype", LOW)
def test_embedding_accumulates_repeated_rows_in_float32(dtype):
    """1000 lookups of one row: the gradient is the float32 sum rounded once (PyTorch's CUDA
    embedding backward; its CPU one adds in the low dtype, where a long sum stalls)."""
    rng = np.random.default_rng(3)
    weight = _leaf(rng, (4, 3), dtype)
    idx = np.zeros(1000, np.int64)
    idx[::7] = 2
    upstream = rng.standard_normal((1000, 3)).astype(np.float32)
    out = F.embedding(engine.tensor(idx), weight)
    assert out.dtype == dtype
    np.testing.assert_array_equal(bits(out), bits(weight)[idx])
    out.backward(engine.tensor(upstream).to(dtype))
    g = engine.tensor(upstream).to(dtype).float().numpy()
    expected = np.zeros((4, 3), np.float32)
    np.add.at(expected, idx, g)
    np.testing.assert_array_equal(bits(weight.grad), expected.astype(dtype).view(np.uint16))


@pytest.mark.parametrize("dtype", LOW)
def test_embedding_layer_with_padding_idx_in_low_precision(dtype):
    layer = nn.Embedding(10, 4, padding_idx=0).to(dtype)
    idx = engine.tensor(np.array([[0, 3, 3, 9], [0, 0, 1, 3]]))
    out = layer(idx)
    out.float().sum().backward()
    assert out.dtype == dtype and layer.weight.grad.dtype == dtype
    grad = layer.weight.grad.float().numpy()
    assert not grad[0].any() and (grad[3] == 3).all() and (grad[1] == 1).all() and not grad[5].any()


def test_bfloat16_model_trains_through_the_fused_kernels(kernel_dtypes):
    """A bf16 Sequential (Linear -> ReLU fused) with cross-entropy on a learnable task: the loss goes
    down, every gradient is bf16, and the kernels are handed bf16 arrays only."""
    engine.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(engine.bfloat16)
    rng = np.random.default_rng(4)
    features = rng.standard_normal((128, 20)).astype(np.float32)
    x = engine.tensor(features).bfloat16()
    y = engine.tensor(np.argmax(features @ rng.standard_normal((20, 5)), axis=1))
    opt = engine.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert loss.dtype == engine.bfloat16 and all(p.grad.dtype == engine.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.6 * losses[0], losses
    assert {"linear_relu_forward", "linear_relu_backward", "softmax_cross_entropy"} <= set(kernel_dtypes)
    assert {d for seen in kernel_dtypes.values() for d in seen} == {np.dtype(engine.bfloat16)}


def test_autocast_runs_linear_relu_in_bfloat16_and_cross_entropy_in_float32(kernel_dtypes):
    rng = np.random.default_rng(5)
    x = engine.tensor(rng.standard_normal((8, 6)).astype(np.float32))
    w = engine.tensor(rng.standard_normal((4, 6)).astype(np.float32), requires_grad=True)
    with engine.autocast("cpu"):
        h = F.linear_relu(x, w)
        loss = F.cross_entropy(h, engine.tensor(rng.integers(0, 4, 8)))
    loss.backward()
    assert h.dtype == engine.bfloat16 and loss.dtype == engine.float32 and w.grad.dtype == engine.float32
    assert kernel_dtypes["linear_relu_forward"] == [np.dtype(engine.bfloat16)]
    assert kernel_dtypes["softmax_cross_entropy"] == [np.dtype(np.float32)]


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_fused_kernels_in_low_precision_match_the_cpu(device, dtype):
    """On the GPU (cupy impls): linear_relu within two roundings (cuBLAS rounds before the bias
    pass) and cross_entropy within one rounding of the CPU's float32 computation; embedding exact."""
    rng = np.random.default_rng(6)
    x, w, b = _leaf(rng, (64, 48), dtype), _leaf(rng, (80, 48), dtype, 0.2), _leaf(rng, (80,), dtype)
    target = rng.integers(0, 80, 64)
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    results = {}
    for where in ("cpu", device):
        leaves = [t.detach().to(where).requires_grad_() for t in (x, w, b)]
        h = F.linear_relu(*leaves)
        loss = F.cross_entropy(h, engine.tensor(target).to(where))
        loss.backward()
        results[where] = [h, loss] + [t.grad for t in leaves]
    magnitude = np.abs(x.float().numpy()) @ np.abs(w.float().numpy()).T + np.abs(b.float().numpy())
    cpu, gpu = ([t.detach().cpu().float().numpy() for t in results[k]] for k in ("cpu", device))
    assert all(t.dtype == dtype for t in results[device])
    assert (np.abs(gpu[0] - cpu[0]) <= 2 * u * (np.abs(cpu[0]) + magnitude) + 1e-5 * magnitude).all()
    assert abs(gpu[1] - cpu[1]) <= 4 * u * abs(cpu[1])
    for g_gpu, g_cpu in zip(gpu[2:], cpu[2:]):
        assert (np.abs(g_gpu - g_cpu) <= 4 * u * np.abs(g_cpu).max()).all()
    table = _leaf(rng, (6, 5), dtype).to(device)
    idx = engine.tensor(np.zeros(500, np.int64)).to(device)
    F.embedding(idx, table).float().sum().backward()
    assert table.grad.dtype == dtype and (table.grad.float().cpu().numpy()[0] == 500).all()

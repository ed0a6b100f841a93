"""F.layer_norm and F.gelu with float16 / bfloat16 input through the fused kernels, which take the
16-bit arrays themselves (float32 math inside, one rounding at the store), against torch on the
CPU in the same dtype, against the float32 computation rounded once, and against the engine's
unfused path (which upcasts in Function.apply); autocast keeps working.
"""

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import kernels

torch = pytest.importorskip("torch")

LOW = [(engine.bfloat16, torch.bfloat16), (engine.float16, torch.float16)]
EPS = {np.dtype(engine.bfloat16): 2.0 ** -8, np.dtype(engine.float16): 2.0 ** -11}
SUBNORMAL_SPACING = {2.0 ** -11: 2.0 ** -24}  # by unit roundoff: float16's


def assert_within_ulps(got, want, eps, what, ulps=2.0, normwise=False):
    """Every element within ``ulps`` units of ``eps`` (the unit roundoff, half the spacing) of
    ``want``, relative to the element or, where it cancels to near 0, to the largest one. Two
    results rounded from slightly different float32 values may be one spacing apart: 2 units.
    ``normwise``: every error relative to the largest element."""
    got = np.asarray(got.float().numpy() if isinstance(got, engine.Tensor) else got, np.float64)
    want = np.asarray(want.detach().float().numpy() if hasattr(want, "detach") else want, np.float64)
    scale = np.full(want.shape, np.abs(want).max()) if normwise else np.maximum(np.abs(want), np.abs(want).max() * eps)
    # float16's subnormals (below 6.1e-5) are spaced 6e-8 apart, whatever their size
    err = np.maximum(np.abs(got - want) - SUBNORMAL_SPACING.get(eps, 0.0), 0) / np.maximum(scale, 1e-30)
    assert err.max() <= ulps * eps, f"{what}: off by {err.max() / eps:.2f} units"


@pytest.fixture
def kernel_calls(monkeypatch):
    """The dtypes each layer_norm / gelu kernel call received."""
    calls = []
    for name in ("layer_norm_forward", "layer_norm_backward", "gelu_forward", "gelu_backward"):
        real = getattr(kernels, name)

        def record(*args, _real=real, _name=name, **kw):
            calls.append((_name, tuple(None if a is None else np.dtype(a.dtype) for a in args)))
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, record)
    return calls


def _pair(shape, dtype, torch_dtype, seed, scale=1.0, offset=0.0):
    a = (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float32)
    return (engine.tensor(a).to(dtype).requires_grad_(), torch.tensor(a).to(torch_dtype).requires_grad_())


# ---- layer_norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("affine", ["x-dtype", "float32", "none", "weight-only"])
@pytest.mark.parametrize("shape", [(4, 7, 200), (3, 768), (2, 4100)], ids=["4x7x200", "3x768", "2x4100"])
@pytest.mark.slow
def test_layer_norm_matches_torch_and_the_float32_result(dtype, torch_dtype, affine, shape, kernel_calls):
    d = shape[-1]
    (x, tx) = _pair(shape, dtype, torch_dtype, seed=0, scale=2.0, offset=0.5)
    pdt, tpdt = (dtype, torch_dtype) if affine != "float32" else (engine.float32, torch.float32)
    (w, tw) = _pair((d,), pdt, tpdt, seed=1, scale=0.3, offset=1.0)
    (b, tb) = _pair((d,), pdt, tpdt, seed=2)
    if affine == "none":
        w = tw = b = tb = None
    if affine == "weight-only":
        b = tb = None
    y = F.layer_norm(x, (d,), w, b)
    ty = torch.nn.functional.layer_norm(tx, (d,), tw, tb)
    leaves = [(x, tx)] + [(p, tp) for p, tp in ((w, tw), (b, tb)) if p is not None]
    exact = [tp.detach().float().requires_grad_() for _, tp in leaves]
    ty32 = torch.nn.functional.layer_norm(exact[0], (d,), *(exact[1:] + [None] * (3 - len(exact))))
    eps = EPS[np.dtype(dtype)]
    assert y.dtype == np.dtype(dtype)
    assert_within_ulps(y, ty32.to(torch_dtype), eps, "y vs float32 rounded")
    assert_within_ulps(y, ty, eps, "y vs torch")
    # the kernels got the 16-bit rows themselves, not float32 copies
    assert kernel_calls[0][0] == "layer_norm_forward" and kernel_calls[0][1][0] == np.dtype(dtype)
    seed = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    y.backward(engine.tensor(seed).to(dtype))
    ty.backward(torch.tensor(seed).to(torch_dtype))
    ty32.backward(torch.tensor(seed).to(torch_dtype).float())
    assert kernel_calls[1][0] == "layer_norm_backward" and kernel_calls[1][1][:2] == (np.dtype(dtype),) * 2
    for i, ((ours, theirs), oracle) in enumerate(zip(leaves, exact)):
        assert ours.grad.dtype == ours.dtype
        want = oracle.grad.to(theirs.dtype)
        if ours.dtype == np.float32:  # float32 parameters: column sums over the rows, in float32
            top = np.abs(want.numpy()).max()
            np.testing.assert_allclose(ours.grad.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * top)
        else:
            assert_within_ulps(ours.grad, want, eps, f"grad {i} vs float32 rounded")
        # torch's CPU backward rounds inside (its bf16 dweight is off by ~1.5 units of the largest):
        # compared to the largest element
        top = np.abs(theirs.grad.float().numpy()).max()
        err = np.abs(ours.grad.float().numpy() - theirs.grad.float().numpy()).max()
        assert err <= 4 * max(eps, EPS.get(np.dtype(ours.dtype), 0)) * top, f"grad {i} vs torch"


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
def test_layer_norm_saves_16_bit_x_and_float32_statistics(dtype, torch_dtype):
    x = engine.randn(6, 32, dtype=dtype, requires_grad=True)
    w = engine.ones(32, dtype=dtype, requires_grad=True)
    y = F.layer_norm(x, (32,), w)
    fn = y.grad_fn if type(y.grad_fn).__name__ == "FusedLayerNorm" else y.grad_fn.inputs[0].grad_fn
    saved_x, saved_w, mean, rstd = fn.saved
    assert saved_x.dtype == saved_w.dtype == np.dtype(dtype) and mean.dtype == rstd.dtype == np.float32


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
def test_layer_norm_fused_and_unfused_agree(dtype, torch_dtype):
    """The native kernels against the unfused Function (float32 copies made by Function.apply,
    rounded once): the same within one rounding."""
    x = engine.randn(5, 3, 96, dtype=dtype)
    w, b = engine.randn(96) * 0.1 + 1, engine.randn(96)  # float32 parameters, as under autocast
    results = []
    for fused in (True, False):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = F.layer_norm(leaves[0], (96,), leaves[1], leaves[2], fused=fused)
        (y.float() * engine.arange(96).float()).sum().backward()
        results.append([y] + [t.grad for t in leaves])
    eps = EPS[np.dtype(dtype)]
    for name, a, b_ in zip(("y", "dx", "dweight", "dbias"), *results):
        assert a.dtype == b_.dtype
        if a.dtype == np.dtype(dtype):
            assert_within_ulps(a, b_.float().numpy(), eps, name)
        else:  # float32 parameter gradients: sums over rows that may cancel, so judged normwise
            assert_within_ulps(a, b_.float().numpy(), 1e-5, name, normwise=True)


def test_layer_norm_gradient_of_another_dtype_is_cast():
    """A float32 gradient reaching the bfloat16 output is cast to bfloat16 first, as torch casts
    an incoming gradient to its output's dtype: the same input gradient as the bfloat16 one."""
    x = engine.randn(4, 16, dtype=engine.bfloat16, requires_grad=True)
    y = F.layer_norm(x, (16,))
    g = engine.randn(4, 16, dtype=engine.bfloat16)
    y.backward(g, retain_graph=True)
    fn = y.grad_fn if type(y.grad_fn).__name__ == "FusedLayerNorm" else y.grad_fn.inputs[0].grad_fn
    (gx,) = fn.backward(g.float().numpy().reshape(4, 16))
    assert gx.dtype == np.dtype(engine.bfloat16) and x.grad.float().numpy().any()
    np.testing.assert_array_equal(gx.astype(np.float32), x.grad.float().numpy())


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
def test_layer_norm_bias_only_gradient_sums_in_float32(dtype, torch_dtype):
    """Without a weight the bias gradient is dy's column sum: accumulated in float32 over many
    rows (a 16-bit running sum would lose every term once the sum is 256x larger in bfloat16)."""
    n, d = 4096, 8
    x = engine.randn(n, d, dtype=dtype)
    b = engine.zeros(d, dtype=dtype, requires_grad=True)
    F.layer_norm(x, (d,), None, b).backward(engine.ones(n, d, dtype=dtype))
    assert b.grad.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(b.grad.float().numpy(), np.full(d, float(n), np.float32))


def test_layer_norm_under_cpu_autocast_runs_the_mixed_kernel(kernel_calls):
    """CPU autocast keeps layer_norm in the input's dtype: Linear -> LayerNorm gives bfloat16 rows
    with float32 parameters, which the kernel takes as they are (PyTorch's mixed-dtype rule)."""
    model = engine.nn.Sequential(engine.nn.Linear(16, 32), engine.nn.LayerNorm(32))
    x = engine.randn(8, 16)
    with engine.autocast("cpu"):
        y = model(x)
    assert y.dtype == engine.bfloat16
    forward = [dtypes for name, dtypes in kernel_calls if name == "layer_norm_forward"]
    assert forward == [(np.dtype(engine.bfloat16), np.dtype(np.float32), np.dtype(np.float32))]
    y.float().sum().backward()
    assert model[1].weight.grad.dtype == np.float32 and model[0].weight.grad.dtype == np.float32


# ---- gelu ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.slow
def test_gelu_matches_torch_and_the_float32_result(dtype, torch_dtype, approximate, transpose, kernel_calls):
    x, tx = _pair((64, 257), dtype, torch_dtype, seed=4, scale=3.0)
    inp, tinp = (x.T, tx.T) if transpose else (x, tx)
    y = F.gelu(inp, approximate=approximate)
    ty = torch.nn.functional.gelu(tinp, approximate=approximate)
    # the oracle: torch in float64 on the same 16-bit values (its float32 tanh form cancels in the
    # left tail: 0 where the slope is 2e-6 at x = -5.1), rounded once
    exact = tx.detach().double().requires_grad_()
    ty32 = torch.nn.functional.gelu(exact.T if transpose else exact, approximate=approximate)
    eps = EPS[np.dtype(dtype)]
    assert y.dtype == np.dtype(dtype) and kernel_calls[0] == ("gelu_forward", (np.dtype(dtype),))
    assert_within_ulps(y, ty32.to(torch_dtype), eps, "y vs float64 rounded")
    assert_within_ulps(y, ty, eps, "y vs torch")
    seed = torch.tensor(np.random.default_rng(5).standard_normal(tuple(ty.shape)).astype(np.float32))
    y.backward(engine.tensor(seed.numpy()).to(dtype))
    ty.backward(seed.to(torch_dtype))
    ty32.backward(seed.to(torch_dtype).double())
    assert kernel_calls[1] == ("gelu_backward", (np.dtype(dtype),) * 2)
    assert x.grad.dtype == np.dtype(dtype)
    assert_within_ulps(x.grad, exact.grad.to(torch_dtype), eps, "dx vs float64 rounded")
    # torch's float32 tanh form cancels in the left tail (its slope is 0 at x = -5.1, ours 2.2e-6):
    # against torch itself, errors count relative to the largest element
    assert_within_ulps(x.grad, tx.grad, eps, "dx vs torch", normwise=True)


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_fused_and_unfused_agree_and_only_x_is_saved(dtype, torch_dtype, approximate):
    x = (engine.randn(33, 17) * 2).to(dtype)
    out = []
    for fused in (True, False):
        leaf = x.detach().requires_grad_()
        with F.fused_kernels(fused):
            y = F.gelu(leaf, approximate=approximate)
            if fused:
                assert len(y.grad_fn.saved) == 1 and y.grad_fn.saved[0] is leaf._data  # no float32 copy
            y.backward(engine.ones(33, 17, dtype=dtype))
        out.append((y, leaf.grad))
    # the unfused tanh form cancels in the left tail (1 + tanh, 1 - tanh^2) and the exact form rounds
    # Phi(x) to the dtype, where the kernels keep their digits: errors relative to the largest
    for name, a, b in zip(("y", "dx"), *out):
        assert a.dtype == b.dtype == np.dtype(dtype)
        assert_within_ulps(a, b.float().numpy(), EPS[np.dtype(dtype)], name, normwise=True)


# ---- on a GPU: the cupy kernels against the CPU ones ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("weight_dtype", ["x", "float32"])
@pytest.mark.parametrize("d", [96, 771, 4096, 8200])
def test_layer_norm_on_cuda_matches_the_cpu(dtype, torch_dtype, weight_dtype, d):
    """cupy's 16-bit kernels (packed and scalar rows, on chip and tiled) against numba_cpu's, on the
    same 16-bit values: both are the float32 computation rounded once, so within one spacing."""
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((37, d)) * 2 + 0.5).astype(np.float32)
    w, b, g = rng.standard_normal(d) * 0.3 + 1, rng.standard_normal(d), rng.standard_normal((37, d))
    pdt = dtype if weight_dtype == "x" else engine.float32
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [engine.tensor(x, device=device).to(dtype).requires_grad_()] + \
                 [engine.tensor(a.astype(np.float32), device=device).to(pdt).requires_grad_() for a in (w, b)]
        y = F.layer_norm(leaves[0], (d,), leaves[1], leaves[2])
        y.backward(engine.tensor(g.astype(np.float32), device=device).to(dtype))
        results[device] = [y] + [t.grad for t in leaves]
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), results["cuda"], results["cpu"]):
        assert got.dtype == want.dtype
        eps = EPS.get(np.dtype(got.dtype), 1e-6)
        assert_within_ulps(got.float().cpu().numpy(), want.float().numpy(), eps, f"{name} cuda vs cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset3"])
def test_gelu_on_cuda_matches_the_cpu(dtype, torch_dtype, approximate, offset):
    a = (np.random.default_rng(offset).standard_normal(offset + 8 * 4099 + 5) * 3).astype(np.float32)
    results = {}
    for device in ("cpu", "cuda"):
        leaf = engine.tensor(a, device=device).to(dtype).requires_grad_()
        y = F.gelu(leaf[offset:], approximate=approximate)
        y.backward(engine.ones(*y.shape, dtype=dtype, device=device))
        results[device] = (y, leaf.grad)
    for name, got, want in zip(("y", "dx"), results["cuda"], results["cpu"]):
        assert got.dtype == want.dtype == np.dtype(dtype)
        assert_within_ulps(got.float().cpu().numpy(), want.float().numpy(), EPS[np.dtype(dtype)], f"{name} cuda vs cpu")

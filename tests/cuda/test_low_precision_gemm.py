"""float16 / bfloat16 GEMMs on the GPU path: ``linear``, ``matmul`` and ``bmm`` hand the 16-bit
arrays to cuBLAS as they are (float32 accumulation, one rounding), forward and backward, with no
float32 copies of their inputs and 16-bit saved arrays (``conv2d`` likewise); on the CPU they still compute in float32
copies (``Function.computes_in_float32 = ON_CPU``).

The fake GPU (tests/cuda/fake_capture.py) models ``cupy.matmul`` on 16-bit arrays as cuBLAS's
``CUBLAS_COMPUTE_32F``: the float32 product rounded once to the operands' dtype, and records the
dtypes of every GEMM. The ``gpu`` tests run the same ops on a real GPU against torch on the CPU in
float32, rounded once, with an inner dimension (4096) large enough that a GEMM accumulating in 16
bits would fail them.
"""

import contextlib

import numpy as np
import pytest

import engine
import engine.nn.functional as F
from engine import nn
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)
from tests.test_low_precision import EPS, LOW, _assert_close_in_ulps, torch

IDS = ["bf16", "fp16"]


@contextlib.contextmanager
def _allocations(fake):
    """The (dtype name, shape) of every array the fake GPU allocates inside the block."""
    made = []
    allocate = fake._allocate

    def record(host):
        array = allocate(host)
        made.append((array.dtype.name, array.shape))
        return array
    fake._allocate = record  # the instance attribute hides the method until deleted
    try:
        yield made
    finally:
        del fake._allocate


def _random(rng, shape, dtype, device="cuda", requires_grad=True):
    t = engine.tensor(rng.standard_normal(shape).astype(np.float32)).to(dtype).to(device)
    return t.requires_grad_() if requires_grad else t


def _oracle(t):
    """A float32 torch leaf holding ``t``'s (16-bit) values."""
    return torch.tensor(t.detach().float().cpu().numpy(), requires_grad=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=IDS)
def test_a_16bit_linear_on_the_gpu_runs_its_gemms_on_the_16bit_arrays(fake_gpu, dtype, torch_dtype, bias):
    rng = np.random.default_rng(0)
    n, k, m = 6, 40, 5
    x, w, b = (_random(rng, s, dtype) for s in ((n, k), (m, k), (m,)))
    g = _random(rng, (n, m), dtype, requires_grad=False)
    name = np.dtype(dtype).name
    fake_gpu.gemms.clear()
    with _allocations(fake_gpu) as made:
        y = F.linear(x, w, b if bias else None)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert fake_gpu.gemms == [(name, name, name)]
    saved = y.grad_fn.saved
    assert saved[0] is x._data and saved[1] is w._data, "x and W are saved as they are: 16-bit, no copies"
    assert y.grad_fn.low_dtype is None, "no float32 rule applied"
    assert [a for a in made if a[0] != name] == [], "no float32 copy of an input or of the product"

    with _allocations(fake_gpu) as made:
        y.backward(g)
    assert fake_gpu.gemms[1:] == [(name, name, name)] * 2  # dx = g @ W, dW = g.T @ x
    grads = [x.grad, w.grad] + ([b.grad] if bias else [])
    assert all(t.dtype == dtype for t in grads)
    # db's column sums accumulate in float32 (kernels.gpu_bias_grad): the one float32 array, the partial
    # sums of its one block row (n <= 8 rows), which the reduction kernel rounds once into db
    assert [a for a in made if a[0] != name] == ([("float32", (1, m))] if bias else [])

    tx, tw, tb, tg = (_oracle(t) for t in (x, w, b, g))
    ty = torch.nn.functional.linear(tx, tw, tb if bias else None)
    ty.backward(tg)
    # With a bias the product is rounded, then the bias added in float32 and rounded again (as
    # cupy adds 16-bit arrays): where the two cancel, the error is the product's rounding, so that
    # case is compared with the largest element (docs/precision.md).
    _assert_close_in_ulps(y.cpu(), ty.to(torch_dtype), EPS[dtype], "linear forward", normwise=bias)
    for got, want, what in zip(grads, (tx, tw, tb), ("dx", "dW", "db")):
        _assert_close_in_ulps(got.cpu(), want.grad.to(torch_dtype), EPS[dtype], f"linear {what}")


MATMUL_CASES = {  # name: (shape of a, shape of b, a broadcast operand whose gradient sums products)
    "2d": ((4, 24), (24, 3), False),
    "batched": ((2, 4, 24), (2, 24, 3), False),
    "broadcast-b": ((2, 4, 24), (24, 3), True),
    "broadcast-both": ((2, 1, 4, 24), (3, 24, 5), True),
    "vector-a": ((24,), (2, 24, 3), True),
    "vector-b": ((2, 4, 24), (24,), True),
}


@pytest.mark.parametrize("case", list(MATMUL_CASES))
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=IDS)
def test_a_16bit_matmul_on_the_gpu_runs_its_gemms_on_the_16bit_arrays(fake_gpu, dtype, torch_dtype, case):
    shape_a, shape_b, broadcast = MATMUL_CASES[case]
    rng = np.random.default_rng(1)
    a, b = _random(rng, shape_a, dtype), _random(rng, shape_b, dtype)
    name = np.dtype(dtype).name
    fake_gpu.gemms.clear()
    with _allocations(fake_gpu) as made:
        out = engine.matmul(a, b)
    assert out.dtype == dtype and fake_gpu.gemms == [(name, name, name)]
    assert out.grad_fn.saved[0] is a._data and out.grad_fn.saved[1] is b._data
    assert [s for s in made if s[0] != name] == []
    g = _random(rng, out.shape, dtype, requires_grad=False)
    out.backward(g)
    assert fake_gpu.gemms[1:] == [(name, name, name)] * 2
    assert a.grad.dtype == dtype and b.grad.dtype == dtype

    ta, tb, tg = _oracle(a), _oracle(b), _oracle(g)
    tout = ta @ tb
    tout.backward(tg)
    _assert_close_in_ulps(out.cpu(), tout.to(torch_dtype), EPS[dtype], f"{case} forward")
    # A broadcast operand's gradient sums 16-bit products (in float32, rounded once): where they
    # cancel, each product's rounding shows, so those are compared with the largest element.
    for got, want, what in ((a.grad, ta.grad, "da"), (b.grad, tb.grad, "db")):
        _assert_close_in_ulps(got.cpu(), want.to(torch_dtype), EPS[dtype], f"{case} {what}", normwise=broadcast)


@pytest.mark.parametrize("dtype", [engine.bfloat16, engine.float16], ids=IDS)
def test_bmm_on_the_gpu_is_the_16bit_batched_gemm(fake_gpu, dtype):
    rng = np.random.default_rng(2)
    a, b = _random(rng, (3, 4, 8), dtype), _random(rng, (3, 8, 2), dtype)
    fake_gpu.gemms.clear()
    out = engine.bmm(a, b)
    out.backward(_random(rng, out.shape, dtype, requires_grad=False))
    name = np.dtype(dtype).name
    assert fake_gpu.gemms == [(name, name, name)] * 3
    assert (out.dtype, a.grad.dtype, b.grad.dtype) == (dtype,) * 3


@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=IDS)
def test_a_16bit_conv2d_on_the_gpu_runs_its_gemms_on_the_16bit_arrays(fake_gpu, dtype, torch_dtype):
    rng = np.random.default_rng(5)
    x, w, b = (_random(rng, s, dtype) for s in ((2, 4, 7, 6), (6, 2, 3, 3), (6,)))
    geometry = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    name = np.dtype(dtype).name
    fake_gpu.gemms.clear()
    with _allocations(fake_gpu) as made:
        y = F.conv2d(x, w, b, **geometry)
    assert y.dtype == dtype and fake_gpu.gemms == [(name, name, name)]  # one batched GEMM over the groups
    assert [a.dtype for a in y.grad_fn.saved] == [dtype, dtype]  # the im2col columns and W
    assert [a for a in made if a[0] != name] == [], "no float32 copy of an input or of the product"
    g = _random(rng, y.shape, dtype, requires_grad=False)
    with _allocations(fake_gpu) as made:
        y.backward(g)
    assert fake_gpu.gemms[1:] == [(name, name, name)] * 2  # dW and the columns' gradient
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (dtype,) * 3
    # float32: the padded input gradient the overlapping windows are summed into, and db's sums
    assert [a for a in made if a[0] != name] == [("float32", (2, 4, 9, 8)), ("float32", (6,))]

    tx, tw, tb, tg = (_oracle(t) for t in (x, w, b, g))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **geometry)
    ty.backward(tg)
    # The bias is added to the rounded product, and dx sums rounded window products: where those
    # cancel, the first rounding shows, so both compare with the largest element.
    _assert_close_in_ulps(y.cpu(), ty.to(torch_dtype), EPS[dtype], "conv2d forward", normwise=True)
    _assert_close_in_ulps(x.grad.cpu(), tx.grad.to(torch_dtype), EPS[dtype], "conv2d dx", normwise=True)
    _assert_close_in_ulps(w.grad.cpu(), tw.grad.to(torch_dtype), EPS[dtype], "conv2d dW")
    _assert_close_in_ulps(b.grad.cpu(), tb.grad.to(torch_dtype), EPS[dtype], "conv2d db")


@pytest.mark.parametrize("dtype", [engine.bfloat16, engine.float16], ids=IDS)
def test_on_the_cpu_16bit_gemms_still_compute_in_float32_copies(dtype):
    rng = np.random.default_rng(3)
    x, w = _random(rng, (4, 8), dtype, "cpu"), _random(rng, (3, 8), dtype, "cpu")
    y, z = F.linear(x, w), x @ w.t()
    for out in (y, z):
        assert out.dtype == dtype and out.grad_fn.low_dtype == dtype  # the float32 rule applied
        assert out.grad_fn.saved[0].dtype == np.float32  # a float32 copy: numpy has no 16-bit GEMM
    np.testing.assert_array_equal(y.float().numpy(), (x.float() @ w.float().t()).to(dtype).float().numpy())


def test_cuda_autocast_runs_linear_in_float16_on_the_cached_weight_cast(fake_gpu):
    engine.manual_seed(0)
    layer = nn.Linear(8, 4).to("cuda")
    x1, x2 = engine.randn(5, 8).to("cuda"), engine.randn(5, 8).to("cuda")
    fake_gpu.gemms.clear()
    with _allocations(fake_gpu) as made, engine.autocast("cuda"):  # float16, CUDA's default
        y1, y2 = layer(x1), layer(x2)
    assert y1.dtype == y2.dtype == engine.float16
    assert fake_gpu.gemms == [("float16", "float16", "float16")] * 2
    assert made.count(("float16", (4, 8))) == 1, "the weight is cast once for the region"
    assert [s for s in made if s[0] != "float16"] == [], "nothing in float32: casts, GEMMs, bias adds"
    assert y1.grad_fn.saved[1] is y2.grad_fn.saved[1] and y1.grad_fn.saved[1].dtype == np.float16
    (y1.float().sum() + y2.float().sum()).backward()
    assert fake_gpu.gemms[2:] == [("float16", "float16", "float16")] * 2  # dW of each; x needs none
    assert layer.weight.grad.dtype == engine.float32 and layer.bias.grad.dtype == engine.float32


# ---- on a real GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype, torch_dtype", LOW, ids=IDS)
def test_on_the_gpu_16bit_linear_matmul_and_conv_match_torch_float32_rounded(dtype, torch_dtype):
    rng = np.random.default_rng(4)
    n, k, m = 64, 4096, 96  # k large: a GEMM accumulating in 16 bits would be off by many ulps
    x, w, b = (_random(rng, s, dtype) for s in ((n, k), (m, k), (m,)))
    g = _random(rng, (n, m), dtype, requires_grad=False)
    y = F.linear(x, w, b)
    assert y.grad_fn.saved[0].dtype == dtype and y.grad_fn.low_dtype is None  # native: no float32 copies
    y.backward(g)
    tx, tw, tb, tg = (_oracle(t) for t in (x, w, b, g))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(tg)
    _assert_close_in_ulps(y.cpu(), ty.to(torch_dtype), EPS[dtype], "linear forward", normwise=True)
    for got, want, what in ((x.grad, tx, "dx"), (w.grad, tw, "dW"), (b.grad, tb, "db")):
        assert got.dtype == dtype
        _assert_close_in_ulps(got.cpu(), want.grad.to(torch_dtype), EPS[dtype], f"linear {what}")

    for shape_a, shape_b in (((4, 32, k), (4, k, 48)), ((4, 32, k), (k, 48))):
        a, c = _random(rng, shape_a, dtype), _random(rng, shape_b, dtype)
        out = a @ c
        assert out.dtype == dtype and out.grad_fn.low_dtype is None
        go = _random(rng, out.shape, dtype, requires_grad=False)
        out.backward(go)
        ta, tc, tgo = _oracle(a), _oracle(c), _oracle(go)
        tout = ta @ tc
        tout.backward(tgo)
        _assert_close_in_ulps(out.cpu(), tout.to(torch_dtype), EPS[dtype], f"{shape_a} @ {shape_b}")
        _assert_close_in_ulps(a.grad.cpu(), ta.grad.to(torch_dtype), EPS[dtype], f"{shape_a} @ {shape_b} da")
        _assert_close_in_ulps(c.grad.cpu(), tc.grad.to(torch_dtype), EPS[dtype], f"{shape_a} @ {shape_b} db",
                              normwise=len(shape_b) == 2)

    x, w, b = (_random(rng, s, dtype) for s in ((4, 64, 17, 15), (32, 64, 3, 3), (32,)))
    y = F.conv2d(x, w, b, padding=1)
    assert y.dtype == dtype and y.grad_fn.low_dtype is None
    gy = _random(rng, y.shape, dtype, requires_grad=False)
    y.backward(gy)
    tx, tw, tb, tgy = (_oracle(t) for t in (x, w, b, gy))
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
    ty.backward(tgy)
    _assert_close_in_ulps(y.cpu(), ty.to(torch_dtype), EPS[dtype], "conv2d forward", normwise=True)
    _assert_close_in_ulps(x.grad.cpu(), tx.grad.to(torch_dtype), EPS[dtype], "conv2d dx", normwise=True)
    _assert_close_in_ulps(w.grad.cpu(), tw.grad.to(torch_dtype), EPS[dtype], "conv2d dW")
    _assert_close_in_ulps(b.grad.cpu(), tb.grad.to(torch_dtype), EPS[dtype], "conv2d db")

"""attention_forward / attention_backward: every impl against an independent float64 formula and numpy.

The float64 reference below is softmax(scale * q k^T + mask) v written directly (with the causal
triangle as PyTorch's ``ones(L, S).tril()``), and the numpy impl's backward is checked against
central differences of it, so the impls are held to the definition and not only to each other.
GPU impls (cupy, numba_cuda) run in the cases marked ``gpu``, where a device answers.
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels.registry import KernelError
from tests.kernels.helpers import to_device, to_host

CPU_IMPLS = ["numpy", "numba_cpu"]
GPU_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("cupy", "numba_cuda")]
FUSED_IMPLS = ["numba_cpu"] + GPU_IMPLS


def make_case(b, l, s, e, ev, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((b, n, e)).astype(dtype) for n in (l, s))
    v = rng.standard_normal((b, s, ev)).astype(dtype)
    return q, k, v


def make_mask(kind, b, l, s, dtype=np.float32, seed=1):
    """An additive mask of one accepted shape: random biases plus some -inf, never a whole row."""
    rng = np.random.default_rng(seed)
    shape = {"shared": (1, l, s), "padding": (b, 1, s), "full": (b, l, s), "keys": (1, 1, s)}[kind]
    mask = rng.uniform(-2, 1, shape)
    if kind == "padding":  # key padding: the last keys of some batch rows are padding
        for row in range(b):
            pad = row % s  # batch row r has r % S padding keys at the end
            if pad:
                mask[row, 0, s - pad:] = -np.inf
    else:
        mask[rng.random(shape) < 0.2] = -np.inf
    mask[..., 0] = 0.0  # key 0 stays visible: no row is fully masked here
    return mask.astype(dtype)


def reference(q, k, v, mask=None, scale=1.0, causal=False):
    """float64 (out, lse) from the definition."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("ble,bse->bls", q, k) * scale
    if mask is not None:
        s = s + mask.astype(np.float64)
    if causal:
        keep = np.tril(np.ones((q.shape[1], k.shape[1]), bool))
        s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    return (p / total) @ v, (m + np.log(total))[..., 0]


def run(impl, fn, *arrays, **kw):
    """Call ``kernels.<fn>`` with ``impl`` on numpy inputs (moved to the GPU for GPU impls, except
    under the Numba CUDA simulator, where numba_cuda takes numpy arrays: tests/cudasim uses this)."""
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")
    result = getattr(kernels, fn)(*(a if simulated else to_device(a, impl) for a in arrays), impl=impl, **kw)
    return tuple(to_host(r) for r in result)


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if np.dtype(dtype) == np.float64 else dict(rtol=2e-4, atol=2e-5)


def assert_close_to_numpy(impl, q, k, v, mask=None, scale=0.5, causal=False, seed=3):
    """Forward and backward of ``impl`` against the numpy impl on the same inputs."""
    kw = dict(scale=scale, causal=causal)
    out, lse = run(impl, "attention_forward", q, k, v, mask, **kw)
    ref_out, ref_lse = kernels.attention_forward(q, k, v, mask, impl="numpy", **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(out, ref_out, **tol(q.dtype))
    np.testing.assert_allclose(lse, ref_lse, **tol(q.dtype))
    grad_out = np.random.default_rng(seed).standard_normal(out.shape).astype(q.dtype)
    grads = run(impl, "attention_backward", grad_out, q, k, v, ref_out, ref_lse, mask, **kw)
    ref_grads = kernels.attention_backward(grad_out, q, k, v, ref_out, ref_lse, mask, impl="numpy", **kw)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == q.dtype and got.shape == want.shape, name
        scale_of = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
        np.testing.assert_allclose(got, want, rtol=tol(q.dtype)["rtol"], atol=tol(q.dtype)["atol"] * scale_of,
                                   err_msg=name)
    return out, lse, grads


# ---- the numpy impl against the definition ---------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full", "keys"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 3), (3, 11, 4, 1, 6), (1, 1, 1, 2, 2), (2, 16, 16, 33, 8)])
def test_numpy_forward_matches_the_definition(dtype, causal, mask_kind, shape):
    b, l, s, e, ev = shape
    q, k, v = make_case(*shape, dtype=dtype)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s, dtype)
    out, lse = kernels.attention_forward(q, k, v, mask, scale=0.7, causal=causal, impl="numpy")
    ref_out, ref_lse = reference(q, k, v, mask, 0.7, causal)
    tight = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out, ref_out, **tight)
    np.testing.assert_allclose(lse, ref_lse, **tight)


def test_default_scale_is_one_over_sqrt_e():
    q, k, v = make_case(2, 3, 4, 9, 5)
    out, _ = kernels.attention_forward(q, k, v, impl="numpy")
    np.testing.assert_allclose(out, reference(q, k, v, scale=1 / 3)[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "padding", "full"])
def test_numpy_backward_matches_finite_differences(causal, mask_kind):
    """dq, dk, dv of the numpy impl against central differences of sum(out * g), in float64."""
    b, l, s, e, ev = 2, 4, 5, 3, 2
    q, k, v = make_case(b, l, s, e, ev, dtype=np.float64, seed=7)
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s, np.float64, seed=8)
    g = np.random.default_rng(9).standard_normal((b, l, ev))
    kw = dict(scale=0.8, causal=causal)
    out, lse = kernels.attention_forward(q, k, v, mask, impl="numpy", **kw)
    grads = kernels.attention_backward(g, q, k, v, out, lse, mask, impl="numpy", **kw)
    inputs = [q, k, v]
    h = 1e-6
    for which, grad in enumerate(grads):
        numeric = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            plus = [a.copy() for a in inputs]
            minus = [a.copy() for a in inputs]
            plus[which][idx] += h
            minus[which][idx] -= h
            f_plus = (reference(*plus, mask, 0.8, causal)[0] * g).sum()
            f_minus = (reference(*minus, mask, 0.8, causal)[0] * g).sum()
            numeric[idx] = (f_plus - f_minus) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg="dq dk dv"[3 * which:3 * which + 2])


# ---- fused impls against numpy ---------------------------------------------------------------


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "shared", "padding", "full", "keys"])
@pytest.mark.parametrize("shape", [
    (2, 37, 70, 7, 5),     # L != S, odd head dims, partial key and query tiles
    (3, 70, 37, 33, 64),   # L > S: causal rows past S see every key
    (1, 1, 9, 1, 1),       # B = 1, L = 1, head dim 1
    (2, 9, 1, 64, 128),    # S = 1
    (1, 130, 130, 128, 17),
])
@pytest.mark.slow
def test_fused_impls_match_numpy(impl, causal, mask_kind, shape):
    b, l, s, e, ev = shape
    q, k, v = make_case(*shape, seed=sum(shape))
    mask = None if mask_kind is None else make_mask(mask_kind, b, l, s)
    assert_close_to_numpy(impl, q, k, v, mask, scale=e ** -0.5, causal=causal)


@pytest.mark.parametrize("impl", ["numba_cpu"])
@pytest.mark.slow
def test_float64_on_the_cpu(impl):
    q, k, v = make_case(2, 19, 23, 5, 6, dtype=np.float64)
    assert_close_to_numpy(impl, q, k, v, make_mask("padding", 2, 19, 23, np.float64), causal=True)


@pytest.mark.parametrize("impl", CPU_IMPLS + GPU_IMPLS)
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_no_gradient(impl):
    b, l, s = 3, 6, 10
    q, k, v = make_case(b, l, s, 8, 4, seed=11)
    mask = make_mask("full", b, l, s)
    mask[0, 2, :] = -np.inf  # one query row of batch 0 sees nothing
    mask[2, :, :] = -np.inf  # batch 2: every row sees nothing
    out, lse, (dq, dk, dv) = assert_close_to_numpy(impl, q, k, v, mask, causal=False)
    assert not out[0, 2].any() and not out[2].any()
    assert np.isneginf(lse[0, 2]) and np.isneginf(lse[2]).all()
    assert np.isfinite(lse[0, :2]).all() and np.isfinite(out).all()
    assert not dq[0, 2].any() and not dq[2].any() and not dk[2].any() and not dv[2].any()
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    # the masked row takes no share of the other rows' gradients: changing its query and its
    # output gradient changes no dk or dv
    g = np.random.default_rng(12).standard_normal(out.shape).astype(np.float32)
    ref_out, ref_lse = kernels.attention_forward(q, k, v, mask, scale=0.5, impl="numpy")
    base = run(impl, "attention_backward", g, q, k, v, ref_out, ref_lse, mask, scale=0.5)
    q2, g2 = q.copy(), g.copy()
    q2[0, 2] += 5.0
    g2[0, 2] = 100.0
    moved = run(impl, "attention_backward", g2, q2, k, v, ref_out, ref_lse, mask, scale=0.5)
    for before, after in zip(base[1:], moved[1:]):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("impl", CPU_IMPLS + GPU_IMPLS)
def test_shared_and_padding_masks_equal_their_expanded_full_mask(impl):
    b, l, s = 3, 7, 12
    q, k, v = make_case(b, l, s, 6, 5, seed=13)
    for kind in ("shared", "padding", "keys"):
        mask = make_mask(kind, b, l, s)
        full = np.ascontiguousarray(np.broadcast_to(mask, (b, l, s)))
        got = run(impl, "attention_forward", q, k, v, mask, scale=0.4)
        want = run(impl, "attention_forward", q, k, v, full, scale=0.4)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_edges(impl):
    q, k, v = make_case(2, 0, 5, 3, 4)
    out, lse = kernels.attention_forward(q, k, v, scale=1.0, impl=impl)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    q, k, v = make_case(2, 3, 0, 3, 4)  # no keys at all: every row fully masked
    out, lse = kernels.attention_forward(q, k, v, scale=1.0, impl=impl)
    assert not out.any() and np.isneginf(lse).all() and out.shape == (2, 3, 4)
    dq, dk, dv = kernels.attention_backward(np.ones_like(out), q, k, v, out, lse, scale=1.0, impl=impl)
    assert dq.shape == q.shape and dk.shape == (2, 0, 3) and dv.shape == (2, 0, 4) and not dq.any()


def test_numba_cpu_serial_and_parallel_builds_agree_bitwise(monkeypatch):
    """The parallel split (query tiles; key chunks with a fixed-order dq sum) gives the serial bits."""
    import engine.kernels.cpu.attention as cpu

    q, k, v = make_case(3, 45, 150, 16, 8, seed=5)
    mask = make_mask("padding", 3, 45, 150)
    g = np.random.default_rng(6).standard_normal((3, 45, 8)).astype(np.float32)
    results = []
    monkeypatch.setattr(cpu, "BLAS_MIN_PAIRS", 1 << 62)  # the numba tile kernel at this size, not BLAS tiles
    for threshold in (1, 1 << 62):
        monkeypatch.setattr(cpu, "PARALLEL_MIN", threshold)
        out, lse = cpu.attention_forward_numba(q, k, v, mask, scale=0.3, causal=True)
        results.append((out, lse, *cpu.attention_backward_numba(g, q, k, v, out, lse, mask, scale=0.3, causal=True)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ---- validation ------------------------------------------------------------------------------


def _args(**over):
    q, k, v = make_case(2, 3, 4, 5, 6)
    args = dict(q=q, k=k, v=v, mask=None)
    args.update(over)
    return args


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("over,message", [
    (dict(q=np.zeros((2, 3), np.float32)), "q must be 3-D"),
    (dict(k=np.zeros((2, 4, 6), np.float32)), "shapes do not agree"),
    (dict(v=np.zeros((2, 5, 6), np.float32)), "shapes do not agree"),
    (dict(v=np.zeros((3, 4, 6), np.float32)), "shapes do not agree"),
    (dict(q=np.zeros((2, 3, 5), np.float64)), "q has float64"),
    (dict(q=np.zeros((2, 3, 5), np.int32)), "dtype int32 is not supported"),
    (dict(mask=np.zeros((3, 4), np.float32)), "mask must be 3-D"),
    (dict(mask=np.zeros((2, 2, 4), np.float32)), "mask shape (2, 2, 4) is not one of"),
    (dict(mask=np.zeros((1, 3, 5), np.float32)), "is not one of"),
    (dict(mask=np.broadcast_to(np.zeros((1, 1, 4), np.float32), (2, 3, 4))), "un-expanded"),
    (dict(q=np.zeros((2, 5, 3), np.float32).transpose(0, 2, 1)), "q is not C-contiguous"),
])
def test_bad_inputs_are_named(impl, over, message):
    args = _args(**over)
    with pytest.raises(KernelError, match="attention_forward") as info:
        kernels.attention_forward(args["q"], args["k"], args["v"], args["mask"], scale=1.0, impl=impl)
    assert message in str(info.value)
    assert "q=numpy.ndarray(" in str(info.value)  # the shapes and dtypes are named


def test_backward_checks_its_saved_state():
    q, k, v = make_case(2, 3, 4, 5, 6)
    out, lse = kernels.attention_forward(q, k, v, scale=1.0, impl="numpy")
    with pytest.raises(KernelError, match=r"attention_backward.*lse must have shape \(B, L\)"):
        kernels.attention_backward(out, q, k, v, out, np.ascontiguousarray(lse[:, :2]), scale=1.0, impl="numba_cpu")
    with pytest.raises(KernelError, match=r"grad_out must have the forward output's shape"):
        kernels.attention_backward(np.ascontiguousarray(out[:, :2]), q, k, v, out, lse, scale=1.0, impl="numpy")
    with pytest.raises(KernelError, match="scale must be finite"):
        kernels.attention_forward(q, k, v, scale=float("nan"), impl="numpy")
    for impl in CPU_IMPLS:  # an int beyond float's range: float() raised a raw OverflowError
        with pytest.raises(KernelError, match="scale must be finite"):
            kernels.attention_forward(q, k, v, scale=10**400, impl=impl)
    with pytest.raises(KernelError, match="causal must be True or False"):
        kernels.attention_forward(q, k, v, scale=1.0, causal="yes", impl="numpy")


def test_gpu_limits_are_named():
    """Head dims over 128 and float64 are refused by the GPU impls' shared check, naming the shapes."""
    from engine.kernels.cpu.attention import check_gpu_limits, validate_forward

    q, k, v = make_case(2, 3, 4, 129, 6)
    spec = validate_forward(q, k, v, scale=1.0, causal=False)
    with pytest.raises(KernelError, match=r"attention_forward \(cupy\): head dims E = 129.*limit of 128"):
        check_gpu_limits(spec, "attention_forward", "cupy")
    q, k, v = make_case(2, 3, 4, 8, 6, dtype=np.float64)
    spec = validate_forward(q, k, v, scale=1.0, causal=False)
    with pytest.raises(KernelError, match="float64 is not supported on the GPU"):
        check_gpu_limits(spec, "attention_backward", "numba_cuda")


def test_registered_impls_in_preference_order():
    for kernel in ("attention_forward", "attention_backward"):
        assert kernels.impls(kernel, available_only=False) == ["numba_cpu", "numpy", "cupy", "numba_cuda"]


# ---- the cupy wrapper's launch plan (fake cupy: no GPU needed) ----------------------------------

from tests.kernels.fake_cupy import fake_cupy  # noqa: E402,F401 - the fixture

CU_TEXT = (Path(kernels.__file__).parent / "cuda" / "attention.cu").read_text()
GRID_Y_Z_LIMIT = 65535


def cu_constants():
    """THREADS, FWD_ROWS and the Tiles<HD> table as attention.cu states them."""
    threads = int(re.search(r"constexpr int THREADS = (\d+);", CU_TEXT).group(1))
    fwd_rows = int(re.search(r"constexpr int FWD_ROWS = (\d+);", CU_TEXT).group(1))
    tiles = {int(hd): (int(keys), int(rows)) for hd, keys, rows in re.findall(
        r"struct Tiles<(\d+)> \{ static constexpr int FWD_KEYS = (\d+), BWD_ROWS = (\d+); \};", CU_TEXT)}
    return threads, fwd_rows, tiles


def test_cu_tiles_fit_static_shared_memory_and_match_the_host_constants():
    from engine.kernels.cuda import attention as cu

    threads, fwd_rows, tiles = cu_constants()
    assert (threads, fwd_rows, threads // 4) == (cu.THREADS, cu.FWD_ROWS, cu.BWD_KEYS)
    assert sorted(tiles) == list(cu.HEAD_DIMS)
    for hd, (fwd_keys, bwd_rows) in tiles.items():
        assert fwd_keys % 4 == 0  # each of a row's 4 lanes scores fwd_keys / 4 keys
        fwd = 4 * (fwd_rows * (hd + 1) + 2 * fwd_keys * (hd + 1) + fwd_rows * (fwd_keys + 1))  # qs, ks, vs, ps
        bwd = 4 * (2 * bwd_rows * (hd + 1) + bwd_rows * (threads // 4 + 1))  # qs, dos, dss
        assert fwd <= 48 * 1024 and bwd <= 48 * 1024, (hd, fwd, bwd)  # static __shared__ limit


@pytest.mark.parametrize("b,l,s,e,ev,mask_shape,causal,hd", [
    (3, 37, 29, 12, 12, None, True, 32),  # L, S not multiples of the tiles; causal with L != S
    (2, 64, 64, 64, 64, (1, 64, 64), False, 64),  # shared mask: zero batch stride
    (5, 33, 100, 1, 65, (5, 1, 100), False, 128),  # key padding mask: zero row stride; Ev picks the bucket
    (4, 1, 1, 127, 3, (1, 1, 1), True, 128),  # odd head dims, one query and one key
    (70000, 2, 33, 8, 8, None, False, 32),  # B over gridDim.y's 65535: B goes along x
])
@pytest.mark.slow
def test_cupy_launch_plan(fake_cupy, b, l, s, e, ev, mask_shape, causal, hd):  # noqa: E741
    from engine.kernels.cuda import attention as cu

    fake = fake_cupy
    rng = np.random.default_rng(0)
    q, k, v = (fake.on(1, rng.standard_normal(shape).astype(np.float32)) for shape in ((b, l, e), (b, s, e), (b, s, ev)))
    mask = None if mask_shape is None else fake.on(1, np.zeros(mask_shape, np.float32))
    out, lse = cu.attention_forward(q, k, v, mask, scale=0.25, causal=causal)
    assert out.shape == (b, l, ev) and lse.shape == (b, l)
    (fwd,) = fake.launches
    assert fwd.name == f"attn_fwd_f32_hd{hd}" and fwd.device == 1 and fwd.block == (128,)
    # blockIdx.x = batch row, blockIdx.y * 32 = first query row: every row of every batch row covered
    assert fwd.grid == (b, -(-l // 32)) and (fwd.grid[1] - 1) * 32 < l <= fwd.grid[1] * 32
    assert fwd.grid[0] <= cu.MAX_GRID_X and fwd.grid[1] <= GRID_Y_Z_LIMIT
    bs = ls = 0
    if mask_shape is not None:
        bs = 0 if mask_shape[0] == 1 else mask_shape[1] * s
        ls = 0 if mask_shape[1] == 1 else s
    assert fwd.args[0] is q and fwd.args[1] is k and fwd.args[2] is v and fwd.args[4] is out and fwd.args[5] is lse
    assert [int(a) for a in fwd.args[6:14]] == [l, s, e, ev, bs, ls, mask is not None, causal]
    assert fwd.args[14] == np.float32(0.25) and fwd.args[14].dtype == np.float32
    assert fwd.args[10].dtype == np.int64 and fwd.args[11].dtype == np.int64  # 64-bit mask strides

    fake.launches.clear()
    grad = fake.on(1, rng.standard_normal((b, l, ev)).astype(np.float32))
    dq, dk, dv = cu.attention_backward(grad, q, k, v, out, lse, mask, scale=0.25, causal=causal)
    rowdot, bwd = fake.launches
    assert rowdot.name == "attn_bwd_rowdot_f32" and rowdot.block == (256,) and rowdot.grid == (-(-(b * l) // 8),)
    assert int(rowdot.args[3]) == b * l and int(rowdot.args[4]) == ev
    assert bwd.name == f"attn_bwd_f32_hd{hd}" and bwd.block == (128,) and bwd.grid == (b, -(-s // 32))
    assert bwd.grid[1] <= GRID_Y_Z_LIMIT
    assert all(launch.device == 1 for launch in (rowdot, bwd))
    assert bwd.args[6] is rowdot.args[2]  # D from the first launch feeds the second
    assert bwd.args[7] is dq and not dq.host.any()  # dq: atomics into a zero-filled buffer
    assert (dq.shape, dk.shape, dv.shape) == ((b, l, e), (b, s, e), (b, s, ev))
    assert [int(a) for a in bwd.args[10:18]] == [l, s, e, ev, bs, ls, mask is not None, causal]


def test_cupy_grid_over_the_limit_is_refused():
    from engine.kernels.cuda import attention as cu

    assert cu.launch_grid(70000, 33, 32, "attention_forward") == (70000, 2)
    with pytest.raises(KernelError, match="over CUDA's limits"):
        cu.launch_grid(4, 32 * 65535 + 1, 32, "attention_forward")


# ---- NaN and inf: propagated as in PyTorch, never turned into a zero row ---------------------------

def _poison(name):
    """(q, k, v, mask, causal) for one non-finite case: B = 1, L = 5, S = 70 (two numba_cpu key
    tiles), a NaN or inf at one place. Keys 3 and 66 are masked out for every row in the masked
    cases, row 2 sees no key in the fully masked ones."""
    q, k, v = make_case(1, 5, 70, 4, 3, seed=21)
    mask = np.zeros((1, 5, 70), np.float32)
    where = {
        "nan_q": (q, (0, 1, 2), np.nan), "inf_q": (q, (0, 1, 2), np.inf),
        "nan_k": (k, (0, 66, 1), np.nan), "inf_k": (k, (0, 2, 1), -np.inf),
        "nan_v": (v, (0, 66, 1), np.nan), "inf_v": (v, (0, 2, 1), np.inf),
        "nan_mask": (mask, (0, 1, 3), np.nan), "inf_mask": (mask, (0, 1, 67), np.inf),
    }
    masked_keys = name.startswith("masked_key") or name.startswith("full_row")
    if masked_keys:
        mask[..., [3, 66]] = -np.inf
    if name.startswith("full_row"):
        mask[0, 2] = -np.inf
    extra = {"masked_key_nan_v": (v, (0, 66, 0), np.nan), "masked_key_nan_k": (k, (0, 3, 0), np.nan),
             "full_row": None, "full_row_nan_v": (v, (0, 66, 0), np.nan), "full_row_nan_q": (q, (0, 2, 0), np.nan),
             "full_row_nan_mask": (mask, (0, 2, 9), np.nan), "causal_nan_q": (q, (0, 1, 2), np.nan),
             "causal_nan_k": (k, (0, 2, 1), np.nan)}
    target = {**where, **extra}[name]
    if target is not None:
        array, index, value = target
        array[index] = value
    causal = name.startswith("causal")
    uses_mask = name.endswith("_mask") or masked_keys
    return q, k, v, (mask if uses_mask else None), causal


NONFINITE_CASES = ["nan_q", "inf_q", "nan_k", "inf_k", "nan_v", "inf_v", "nan_mask", "inf_mask", "masked_key_nan_v",
                   "masked_key_nan_k", "full_row", "full_row_nan_v", "full_row_nan_q", "full_row_nan_mask",
                   "causal_nan_q", "causal_nan_k"]


def assert_same_nonfinite(got, want, what):
    """Equal NaN and inf positions, and close finite values."""
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{what}: inf positions")
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5, err_msg=what)


def torch_attention(q, k, v, mask, causal, grad_out):
    """PyTorch's (out, dq, dk, dv) for (B, L, E) arrays: scaled_dot_product_attention on the CPU."""
    torch = pytest.importorskip("torch")
    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(
        *leaves, attn_mask=None if mask is None else torch.tensor(mask), is_causal=causal)
    out.backward(torch.tensor(grad_out))
    return [out.detach().numpy()] + [t.grad.numpy() for t in leaves]


def assert_nonfinite_like_reference(impl, name, reference):
    """``impl``'s forward and backward on case ``name`` against ``reference`` (out, dq, dk, dv).

    With causal=True, dq must be NaN at least where the reference's is, and dk / dv are not
    compared: whether a non-finite value reaches the gradients of pairs the causal mask hides
    (0 * NaN in a tile's product, or a whole key tile skipped) depends on the tiling, as between
    PyTorch's own math path and flash kernel.
    """
    q, k, v, mask, causal = _poison(name)
    out, lse = run(impl, "attention_forward", q, k, v, mask, scale=0.5, causal=causal)
    grad_out = np.random.default_rng(5).standard_normal(out.shape).astype(np.float32)
    grads = run(impl, "attention_backward", grad_out, q, k, v, out, lse, mask, scale=0.5, causal=causal)
    want = reference(q, k, v, mask, causal, grad_out)
    assert_same_nonfinite(out, want[0], f"{impl} {name} out")
    for what, got, expected in list(zip(("dq", "dk", "dv"), grads, want[1:]))[:1 if causal else 3]:
        if causal:
            assert np.isnan(got)[np.isnan(expected)].all(), f"{impl} {name} {what}: NaN turned into numbers"
        else:
            assert_same_nonfinite(got, expected, f"{impl} {name} {what}")
    return out, lse


def torch_like_reference(q, k, v, mask, causal, grad_out):
    """PyTorch's results, except that with causal=True a row never sees a key j > i,
    whatever its value: there the rows before the poisoned key are PyTorch's with that key made
    finite (its math path adds -inf to the NaN score, NaN, and poisons every row; its flash
    kernel does not)."""
    want = torch_attention(q, k, v, mask, causal, grad_out)
    if causal and not np.isfinite(k).all():
        clean = torch_attention(q, np.nan_to_num(k), v, mask, causal, grad_out)
        first_bad = int(np.argmax(~np.isfinite(k[0]).all(axis=-1)))
        for got, fixed in zip(want[:2], clean[:2]):  # out and dq
            got[:, :first_bad] = fixed[:, :first_bad]
    return want


@pytest.mark.parametrize("impl", CPU_IMPLS + GPU_IMPLS)
@pytest.mark.parametrize("name", NONFINITE_CASES)
@pytest.mark.slow
def test_nan_and_inf_propagate_as_in_torch(impl, name):
    out, lse = assert_nonfinite_like_reference(impl, name, torch_like_reference)
    nan_rows = np.isnan(out).all(axis=-1)
    assert nan_rows.any() or name in ("full_row", "full_row_nan_v", "nan_v", "inf_v", "masked_key_nan_v")
    np.testing.assert_array_equal(np.isnan(lse), nan_rows)  # a NaN row has a NaN lse, never -inf
    if name in ("full_row", "full_row_nan_v"):
        assert np.isneginf(lse[0, 2])  # still fully masked: P = 0 (out 0, or NaN from 0 * NaN v)


@pytest.mark.parametrize("impl", CPU_IMPLS + GPU_IMPLS)
def test_zero_head_dims(impl):
    """E = 0: every score is 0 (plus the mask), so out is the mean of v over the keys a row sees and
    lse = log(their count), as PyTorch gives; the default scale (1 / sqrt(0)) is not used. Ev = 0:
    an empty out with the same lse."""
    b, l, s = 2, 3, 5
    mask = np.zeros((b, 1, s), np.float32)
    mask[1, 0, 3:] = -np.inf  # batch row 1 sees keys 0..2
    seen = np.array([s, 3])[:, None]
    q, k, v = make_case(b, l, s, 0, 4)
    out, lse = run(impl, "attention_forward", q, k, v, mask)
    want = np.stack([v[0].mean(axis=0), v[1, :3].mean(axis=0)])[:, None].repeat(l, axis=1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, np.log(seen).repeat(l, axis=1), rtol=1e-6)
    grad_out = np.ones_like(out)
    dq, dk, dv = run(impl, "attention_backward", grad_out, q, k, v, out, lse, mask)
    assert dq.shape == (b, l, 0) and dk.shape == (b, s, 0)
    want_dv = np.where(np.isneginf(mask[:, 0, :, None]), 0, l / seen[..., None]) * np.ones((1, 1, 4))
    np.testing.assert_allclose(dv, want_dv, rtol=1e-5)
    q, k, v = make_case(b, l, s, 2, 0)
    out0, lse0 = run(impl, "attention_forward", q, k, v, mask, causal=True)
    ref_lse = reference(q, np.ascontiguousarray(k), v, mask, scale=2 ** -0.5, causal=True)[1]
    assert out0.shape == (b, l, 0)
    np.testing.assert_allclose(lse0, ref_lse, rtol=1e-5, atol=1e-6)
    dq, dk, dv = run(impl, "attention_backward", np.ones_like(out0), q, k, v, out0, lse0, mask, causal=True)
    assert not dq.any() and not dk.any() and dv.shape == (b, s, 0)  # no output, so no gradient

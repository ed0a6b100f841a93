"""kernels/cuda/gemm.py ``matmul``: the engine's one GEMM entry for cupy arrays, on the fake GPU.

Every product runs on the fake cuBLAS (tests/kernels/fake_cublas.py), which reads the operands
column-major through the leading dimensions, transposition flags and batch strides passed, so a
wrong one gives a wrong result or an error. Each case is compared with numpy's ``matmul`` and
checks how it reached cuBLAS: one call, transposed views read in place (a flag, no copy), a
batch-broadcast operand with batch stride 0, and no call into cupy's own cuBLAS binding (which
cupy refuses while a stream captures).
"""

import gc

import numpy as np
import pytest

from engine import backend
from engine.backend import CaptureError
from engine.kernels.cuda import gemm
from tests.cuda.fake_capture import CUPY_CUBLAS_REFUSAL, fake_gpu  # noqa: F401  (fixture)
from tests.kernels.fake_cublas import FakeCublasError
from tests.kernels.helpers import BF16, F16

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), F16, BF16]
UNIT = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}
T, N = gemm.CUBLAS_OP_T, gemm.CUBLAS_OP_N


def _reference(a, b):
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


def _assert_close(actual, a, b, what):
    expected = _reference(a, b)
    assert actual.shape == expected.shape and actual.dtype == a.dtype, what
    k = a.shape[-1]
    scale = max(np.linalg.norm(expected), 1e-30)
    bound = 4 * UNIT[a.dtype.name] * np.sqrt(max(k, 1)) + (1e-6 if a.dtype == np.float32 else 0)
    error = np.linalg.norm(actual.astype(np.float64) - expected) / scale
    assert error <= bound, f"{what}: relative error {error:.3g}"


def _views(fake, host, kind):
    """``host`` on the fake GPU as the view ``kind`` names (the values stay ``host``'s)."""
    if kind == "plain":
        return fake.asarray(host), host
    if kind == "T":  # a transposed view of a C-contiguous array holding host.T
        stored = fake.asarray(np.ascontiguousarray(np.swapaxes(host, -1, -2)))
        return fake.swapaxes(stored, -1, -2), host
    if kind == "padded":  # rows further apart than their length: a leading dimension > columns
        stored = fake.asarray(np.concatenate([host, np.zeros_like(host[..., :3])], axis=-1))
        return stored[..., : host.shape[-1]], host
    if kind == "every-other-column":  # no unit stride in the matrix: copied first
        stored = fake.asarray(np.repeat(host, 2, axis=-1))
        return stored[..., ::2], host
    if kind == "reversed-rows":  # a negative stride: copied first
        stored = fake.asarray(np.ascontiguousarray(host[..., ::-1, :]))
        return stored[..., ::-1, :], host
    raise AssertionError(kind)


# (a shape, b shape, a view, b view, flags (transa, transb) as cuBLAS gets them, batch strides (a, b)
#  or None when a copy comes first)
CASES = [
    ((37, 70), (70, 33), "plain", "plain", (N, N), (0, 0)),
    ((37, 70), (70, 33), "plain", "T", (T, N), (0, 0)),  # x @ W.T: W read transposed in place
    ((33, 70), (70, 37), "T", "plain", (N, T), (0, 0)),  # g.T @ x
    ((5, 7), (7, 3), "T", "T", (T, T), (0, 0)),
    ((5, 7), (7, 3), "padded", "padded", (N, N), (0, 0)),
    ((4, 9, 6), (4, 6, 5), "plain", "plain", (N, N), (54, 30)),  # bmm
    ((4, 9, 6), (6, 5), "plain", "plain", (N, N), (54, 0)),  # a weight shared by the batch: stride 0
    ((9, 6), (4, 6, 5), "plain", "plain", (N, N), (0, 30)),
    ((4, 9, 6), (4, 6, 5), "plain", "T", (T, N), (54, 30)),  # q @ k^T as a swapaxes view
    ((2, 3, 9, 6), (3, 6, 5), "plain", "plain", (N, N), (54, 30)),  # 4-D x 3-D: (3,) broadcast to (2, 3)
    ((2, 1, 9, 6), (1, 3, 6, 5), "plain", "plain", (N, N), None),  # the batch does not collapse: copies
    ((5, 7), (7, 3), "every-other-column", "plain", (N, N), None),
    ((5, 7), (7, 3), "reversed-rows", "plain", (N, N), None),
    ((1, 7), (7, 1), "plain", "plain", (N, N), (0, 0)),
    ((7,), (7, 3), "plain", "plain", (N, N), (0, 0)),  # 1-D operands: promoted, the dim removed
    ((5, 7), (7,), "plain", "plain", (N, N), (0, 0)),
    ((7,), (7,), "plain", "plain", (N, N), (0, 0)),
    ((3, 5, 7), (7,), "plain", "plain", (N, N), (35, 0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}")
def test_matmul_matches_numpy_with_one_cublas_call(fake_gpu, dtype, case):
    a_shape, b_shape, a_kind, b_kind, flags, strides = case
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    a = rng.uniform(-1.5, 1.5, a_shape).astype(dtype)
    b = rng.uniform(-1.5, 1.5, b_shape).astype(dtype)
    (da, a), (db, b) = _views(fake_gpu, a, a_kind), _views(fake_gpu, b, b_kind)
    out = gemm.matmul(da, db)
    _assert_close(out.host, a, b, "matmul")
    assert out.flags.c_contiguous
    (call,) = fake_gpu.cublas.calls
    assert fake_gpu.cupy_cublas_calls == [], "cupy's own cuBLAS binding was called"
    assert (call.transa, call.transb) == flags, "a view was copied, or read with the wrong transposition"
    batch = int(np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))) if min(a.ndim, b.ndim) > 1 else \
        int(np.prod((a if a.ndim > 1 else b).shape[:-2]))
    assert call.batch == batch
    if strides is not None and batch > 1:
        assert call.strides[:2] == (strides[1], strides[0])  # C^T = op(B)^T op(A)^T: b is cuBLAS's A


def test_empty_products_and_k_zero(fake_gpu):
    a, b = fake_gpu.asarray(np.ones((3, 0), np.float32)), fake_gpu.asarray(np.ones((0, 4), np.float32))
    out = gemm.matmul(a, b)
    np.testing.assert_array_equal(out.host, np.zeros((3, 4), np.float32))
    empty = gemm.matmul(fake_gpu.asarray(np.ones((0, 2, 5), np.float32)), fake_gpu.asarray(np.ones((5, 4), np.float32)))
    assert empty.shape == (0, 2, 4) and fake_gpu.cublas.calls == []


def test_bad_shapes_raise(fake_gpu):
    a = fake_gpu.asarray(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"inner dims differ: shapes \(3, 4\) and \(3, 4\)"):
        gemm.matmul(a, a)
    with pytest.raises(ValueError, match="batch dims do not broadcast"):
        gemm.matmul(fake_gpu.asarray(np.ones((2, 3, 4), np.float32)), fake_gpu.asarray(np.ones((3, 4, 5), np.float32)))


def test_float32_follows_the_tf32_setting(fake_gpu):
    """cupy's compute type for float32 (set from the engine's matmul precision) picks the compute type."""
    rng = np.random.default_rng(3)
    a, b = (fake_gpu.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((2, 8, 64), (64, 4)))
    gemm.matmul(a, b)
    fake_gpu._core.set_compute_type(np.float32, 7)  # COMPUTE_TYPE_TF32
    gemm.matmul(a, b)
    assert [c.compute_type for c in fake_gpu.cublas.calls] == [gemm.CUBLAS_COMPUTE_32F,
                                                                gemm.CUBLAS_COMPUTE_32F_FAST_TF32]


def test_other_dtypes_fall_back_to_cupy_matmul_and_a_capture_names_the_op(fake_gpu):
    ints = fake_gpu.asarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    np.testing.assert_array_equal(backend.matmul(ints, ints.T).host, np.arange(6).reshape(2, 3) @ np.arange(6).reshape(
        2, 3).T)
    assert fake_gpu.cupy_cublas_calls == ["matmul"] and fake_gpu.cublas.calls == []
    stream = fake_gpu.cuda.Stream(non_blocking=True)
    with stream, backend.capturing("a test capture"):
        stream.begin_capture()
        with pytest.raises(CaptureError, match=r"my_op: a \(2, 3\) int64 x \(3, 2\) int64 product .*inside a test "
                                                r"capture.*cupy refuses every cuBLAS call"):
            backend.matmul(ints, ints.T, "my_op")
        stream.end_capture()


def test_numpy_arrays_take_numpys_matmul_unchanged():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 5, 7)).astype(np.float32), rng.standard_normal((7, 2)).astype(np.float32)
    assert np.array_equal(backend.matmul(a, b), a @ b) and np.array_equal(backend.matmul(a[0].T, a[1]), a[0].T @ a[1])


# ---- the fake models cupy's refusal, and catches wrong strides ------------------------------------

@pytest.mark.parametrize("call", ["matmul", "operator", "dot", "vdot", "einsum", "tensordot", "inv"])
def test_cupys_own_cublas_routines_are_refused_while_capturing(fake_gpu, call):
    a = fake_gpu.asarray(np.eye(3, dtype=np.float32))
    run = {"matmul": lambda: fake_gpu.matmul(a, a), "operator": lambda: a @ a, "dot": lambda: fake_gpu.dot(a, a),
           "vdot": lambda: fake_gpu.vdot(a, a), "einsum": lambda: fake_gpu.einsum("ij,jk->ik", a, a),
           "tensordot": lambda: fake_gpu.tensordot(a, a), "inv": lambda: fake_gpu.linalg.inv(a)}[call]
    run()  # outside a capture: fine
    stream = fake_gpu.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(NotImplementedError, match=CUPY_CUBLAS_REFUSAL):
            run()
        stream.end_capture()


def test_the_fake_strided_batched_gemm_catches_a_wrong_stride(fake_gpu):
    rng = np.random.default_rng(5)
    a = fake_gpu.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))
    b = fake_gpu.asarray(rng.standard_normal((3, 5, 2)).astype(np.float32))
    out = fake_gpu.empty((3, 4, 2), np.float32)
    one, zero = gemm.ALPHA_BETA[np.float32]
    f32, c32 = gemm.CUDA_R_32F, gemm.CUBLAS_COMPUTE_32F

    def call(stride_a=10, stride_b=20, stride_c=8, batch=3):
        fake_gpu.cublas.gemm_strided_batched_ex(0, N, N, 2, 4, 5, one, b.data.ptr, f32, 2, stride_a, a.data.ptr,
                                                f32, 5, stride_b, zero, out.data.ptr, f32, 2, stride_c, batch,
                                                c32, -1)
        return out.host.copy()

    np.testing.assert_allclose(call(), np.matmul(a.host, b.host), rtol=1e-5, atol=1e-6)
    assert not np.allclose(call(stride_a=0), np.matmul(a.host, b.host))  # b's first matrix for all: wrong
    for bad in (dict(stride_b=21), dict(stride_c=7), dict(batch=4)):  # past an end, overlapping C
        with pytest.raises(FakeCublasError):
            call(**bad)


# ---- the workspace ---------------------------------------------------------------------------------

def test_a_workspace_per_handle_and_stream_set_after_every_set_stream_and_kept_alive(fake_gpu, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    a = fake_gpu.asarray(np.ones((4, 4), np.float32))
    gemm.matmul(a, a)
    gemm.matmul(a, a)
    side = fake_gpu.cuda.Stream(non_blocking=True)
    with side:
        gemm.matmul(a, a)
    calls = fake_gpu.cublas.workspace_calls
    handle = fake_gpu.cuda.get_cublas_handle()
    assert [(h, s, size) for h, s, _, size in calls] == [(handle, 0, 32 << 20)] * 2 + [(handle, side.ptr, 32 << 20)]
    assert calls[0][2] == calls[1][2] != calls[2][2], "one workspace per (handle, stream), reused"
    assert [c.workspace for c in fake_gpu.cublas.calls] == [(c[2], c[3]) for c in calls], "set before each GEMM"
    assert set(gemm._workspaces) == {(handle, 0), (handle, side.ptr)}
    gc.collect()
    fake_gpu.resolve(calls[0][2] + (32 << 20) - 1, np.uint8)  # still a live allocation


def test_the_workspace_size_is_pytorchs(fake_gpu, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert gemm.workspace_size(0) == 32 * 1024 * 1024  # the fake reports sm_90
    monkeypatch.setattr(gemm, "_compute_capability", lambda device_id: 80)
    assert gemm.workspace_size(0) == 4096 * 1024 * 2 + 16 * 1024 * 8
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert gemm.workspace_size(0) == 4096 * 1024 * 8
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the deterministic setting PyTorch documents
    assert gemm.workspace_size(0) == 16 * 1024 * 8


def test_a_captured_gemm_without_the_engines_workspace_is_refused_by_the_fake(fake_gpu, monkeypatch):
    """The fake holds the engine to its rule: inside a capture cuBLAS must have a workspace of ours."""
    monkeypatch.setattr(gemm, "prepare_handle", lambda cupy, lib: lib.set_stream(
        cupy.cuda.get_cublas_handle(), cupy.cuda.get_current_stream().ptr) or cupy.cuda.get_cublas_handle())
    a = fake_gpu.asarray(np.ones((4, 4), np.float32))
    stream = fake_gpu.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(FakeCublasError, match="no workspace"):
            gemm.matmul(a, a)
        stream.end_capture()


# ---- on a real GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}")
def test_on_the_gpu_matmul_matches_numpy(dtype, case):
    cupy = pytest.importorskip("cupy")
    a_shape, b_shape, a_kind, b_kind, _, _ = case
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    a = rng.uniform(-1.5, 1.5, a_shape).astype(dtype)
    b = rng.uniform(-1.5, 1.5, b_shape).astype(dtype)
    views = {"plain": lambda x: cupy.asarray(x),
             "T": lambda x: cupy.asarray(np.ascontiguousarray(np.swapaxes(x, -1, -2))).swapaxes(-1, -2),
             "padded": lambda x: cupy.asarray(np.concatenate([x, np.zeros_like(x[..., :3])], -1))[..., :x.shape[-1]],
             "every-other-column": lambda x: cupy.asarray(np.repeat(x, 2, axis=-1))[..., ::2],
             "reversed-rows": lambda x: cupy.asarray(np.ascontiguousarray(x[..., ::-1, :]))[..., ::-1, :]}
    out = gemm.matmul(views[a_kind](a), views[b_kind](b))
    _assert_close(cupy.asnumpy(out), a, b, "matmul on the GPU")
    assert gemm._cublas() is not None, "the direct cuBLAS path is not in use on this GPU"

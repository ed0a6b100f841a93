"""The cupy linear_relu's GEMMs as direct cuBLAS calls (kernels/cuda/gemm.py), checked without a GPU.

A fake cuBLAS (tests/kernels/fake_cublas.py) executes every ``cublasGemmEx`` call with NumPy under
cuBLAS's column-major semantics, on the fake cupy's arrays found by address, and NumPy
transcriptions of the linear_relu.cu kernels compute the launches; so the cupy impl's forward and
backward produce real results, compared here with the numpy impl. A wrong transposition, leading
dimension, m/n/k, operand order, data type or scalar type changes the result or raises. The
``gpu`` tests at the end compare the real thing with the same reference.
"""

import ctypes
import sys
import types

import numpy as np
import pytest

from engine import kernels
from engine.kernels.cuda import gemm
from tests.kernels.fake_cublas import FakeCublasError, round_to_tf32
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.fake_linear_relu_kernels import impls
from tests.kernels.helpers import BF16, F16

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), F16, BF16]
# (N, K, M): odd sizes in every direction, size-1 edges, K = 0, M = 1, more rows than one prologue block row
SHAPES = [(37, 70, 33), (1, 1, 1), (3, 0, 4), (5, 7, 1), (1, 9, 6), (64, 48, 80), (130, 5, 12)]
UNIT = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _inputs(rng, n, k, m, dtype, bias=True):
    x = rng.uniform(0.5, 1.5, (n, k)) * rng.choice([-1.0, 1.0], (n, k))
    w = rng.uniform(0.5, 1.5, (m, k)) * rng.choice([-1.0, 1.0], (m, k)) / np.sqrt(max(k, 1))
    b = rng.uniform(0.1, 1.0, m) * rng.choice([-1.0, 1.0], m)
    dy = rng.standard_normal((n, m))
    cast = (lambda a: np.ascontiguousarray(a.astype(dtype)))
    return cast(x), cast(w), cast(b) if bias else None, cast(dy)


def _assert_close(actual, expected, dtype, k, what):
    """Within a few roundings of the result's dtype, relative to the norm (a wrong GEMM is off by O(1))."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    scale = max(np.linalg.norm(e), 1e-30)
    bound = 4 * UNIT[dtype.name] * np.sqrt(max(k, 1)) + (1e-6 if dtype == np.float32 else 0)
    assert np.linalg.norm(a - e) <= bound * scale, f"{what}: relative error {np.linalg.norm(a - e) / scale:.3g}"


@pytest.fixture
def gpu(fake_cupy):  # noqa: F811 - the fixture
    """The fake GPU, computing: fake cuBLAS GEMMs and the linear_relu kernels transcribed."""
    fake_cupy.kernel_impls.update(impls())
    return fake_cupy


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_numpy_impl(gpu, dtype, bias, shape):
    n, k, m = shape
    x, w, b, dy = _inputs(np.random.default_rng(0), n, k, m, dtype, bias)
    y = kernels.get("linear_relu_forward", "cupy")(*[None if a is None else gpu.on(0, a) for a in (x, w, b)])
    y_ref = kernels.get("linear_relu_forward", "numpy")(x, w, b)
    _assert_close(y.host, y_ref, dtype, k + 1, "y")
    grads = kernels.get("linear_relu_backward", "cupy")(gpu.on(0, dy), gpu.on(0, x), gpu.on(0, w), gpu.on(0, y_ref))
    refs = kernels.get("linear_relu_backward", "numpy")(dy, x, w, y_ref)
    for name, got, ref, terms in zip(("dx", "dW", "db"), grads, refs, (m, n, n)):
        _assert_close(got.host, ref, dtype, terms, name)
    gemms = [int(bool(n * m)) * (k > 0)] * 3  # one GEMM per product, none when it is empty or K = 0
    assert len(gpu.cublas.calls) == sum(gemms) == len(gpu.gemms)  # no cupy.matmul fallback


@pytest.mark.parametrize("shape", [(37, 70, 33), (8, 1, 3)], ids=lambda s: "x".join(map(str, s)))
def test_backward_without_grad_x_makes_two_gemms(gpu, shape):
    n, k, m = shape
    x, w, _, dy = _inputs(np.random.default_rng(1), n, k, m, np.float32)
    y = kernels.get("linear_relu_forward", "numpy")(x, w)
    dx, dw, db = kernels.get("linear_relu_backward", "cupy")(gpu.on(0, dy), gpu.on(0, x), gpu.on(0, w), gpu.on(0, y),
                                                              compute_grad_x=False)
    _, dw_ref, db_ref = kernels.get("linear_relu_backward", "numpy")(dy, x, w, y)
    assert dx is None and len(gpu.cublas.calls) == 1
    _assert_close(dw.host, dw_ref, np.dtype(np.float32), n, "dW")
    _assert_close(db.host, db_ref, np.dtype(np.float32), n, "db")


def test_the_calls_are_the_column_major_transposes_of_the_row_major_products(gpu):
    """C^T = op(B)^T op(A)^T: forward y^T = W x^T (W read transposed), dx^T = W^T g^T, dW^T = x^T g."""
    n, k, m = 37, 70, 33
    x, w, b, dy = (gpu.on(0, a) for a in _inputs(np.random.default_rng(2), n, k, m, np.float32))
    y = kernels.get("linear_relu_forward", "cupy")(x, w, b)
    kernels.get("linear_relu_backward", "cupy")(dy, x, w, y)
    T, N = gemm.CUBLAS_OP_T, gemm.CUBLAS_OP_N
    got = [(c.transa, c.transb, c.m, c.n, c.k, c.lda, c.ldb, c.ldc) for c in gpu.cublas.calls]
    assert got == [(T, N, m, n, k, k, k, m),  # y: W (k x m col-major, transposed) times x^T (k x n)
                   (N, N, k, n, m, k, m, k),  # dx: W^T (k x m) times g^T (m x n)
                   (N, T, k, m, n, k, m, k)]  # dW: x^T (k x n) times g (g^T read transposed)
    assert {(c.alpha, c.beta, c.data_type, c.compute_type) for c in gpu.cublas.calls} == {
        (1.0, 0.0, gemm.CUDA_R_32F, gemm.CUBLAS_COMPUTE_32F)}


def test_each_call_runs_on_the_inputs_device_handle_and_the_current_stream(gpu):
    x, w, b, _ = (gpu.on(1, a) for a in _inputs(np.random.default_rng(3), 5, 6, 7, np.float32))
    kernels.get("linear_relu_forward", "cupy")(x, w, b)
    (call,) = gpu.cublas.calls
    assert call.handle_device == 1 and call.devices == (1, 1, 1)  # device 1's handle, while device 0 was current
    assert call.stream == gpu.cuda.get_current_stream().ptr
    assert gpu.current == 0


def test_tf32_follows_cupys_compute_type_for_float32(gpu):
    """The engine's matmul precision reaches these calls through cupy's compute type (engine/backend.py)."""
    n, k, m = 16, 256, 8
    x, w, _, _ = _inputs(np.random.default_rng(4), n, k, m, np.float32, bias=False)
    exact = np.maximum(x.astype(np.float64) @ w.astype(np.float64).T, 0)
    full = kernels.get("linear_relu_forward", "cupy")(gpu.on(0, x), gpu.on(0, w)).host
    gpu.compute_type_f32 = 7  # COMPUTE_TYPE_TF32, what set_float32_matmul_precision("high") sets
    tf32 = kernels.get("linear_relu_forward", "cupy")(gpu.on(0, x), gpu.on(0, w)).host
    assert [c.compute_type for c in gpu.cublas.calls] == [gemm.CUBLAS_COMPUTE_32F, gemm.CUBLAS_COMPUTE_32F_FAST_TF32]
    scale = np.abs(exact).max()
    assert np.abs(full - exact).max() / scale < 1e-5 < np.abs(tf32 - exact).max() / scale < 1e-2
    tf32_ref = np.maximum(round_to_tf32(x) @ round_to_tf32(w).T, 0)
    np.testing.assert_allclose(tf32, tf32_ref, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("cause", ["no library", "dimension over int32"])
def test_cupy_matmul_is_the_fallback(gpu, monkeypatch, cause):
    if cause == "no library":
        monkeypatch.setattr(gemm, "_cublas", lambda: None)
    else:
        monkeypatch.setattr(gemm, "INT_MAX", 6)
    x, w, b, _ = (gpu.on(0, a) for a in _inputs(np.random.default_rng(5), 5, 7, 3, np.float32))
    kernels.get("linear_relu_forward", "cupy")(x, w, b)
    assert gpu.cublas.calls == [] and len(gpu.gemms) == 1


def test_a_non_contiguous_operand_goes_to_cupy_matmul(gpu):
    """The leading-dimension trick needs C-contiguous rows; strided views take cupy's general path."""
    rng = np.random.default_rng(10)
    a = gpu.on(0, rng.standard_normal((6, 8)).astype(np.float32))
    strided = type(a)(a.host[:, ::2], 0, gpu)  # (6, 4), every other column
    b = gpu.on(0, rng.standard_normal((4, 3)).astype(np.float32))
    gemm.matmul_into(gpu.empty((6, 3), np.float32), strided, b)
    assert gpu.cublas.calls == [] and len(gpu.gemms) == 1
    gemm.matmul_into(gpu.empty((6, 3), np.float32), gpu.on(0, strided.host), b)  # a contiguous copy: direct
    assert len(gpu.cublas.calls) == 1


def test_rocm_and_a_missing_library_fall_back(fake_cupy, monkeypatch):  # noqa: F811 - the fixture
    def pathfinder(loaded):  # a stand-in for the cuda.pathfinder package that cupy 14 finds its libraries with
        module = types.ModuleType("cuda.pathfinder")
        module.load_nvidia_dynamic_lib = loaded
        package = types.ModuleType("cuda")
        package.pathfinder = module
        monkeypatch.setitem(sys.modules, "cuda", package)
        monkeypatch.setitem(sys.modules, "cuda.pathfinder", module)

    def not_found(name):
        raise FileNotFoundError(f"lib{name}.so.13")
    asked = []
    pathfinder(lambda name: asked.append(name) or types.SimpleNamespace(abs_path=None))  # loaded, path unknown
    for is_hip, expected_asks in ((True, []), (False, ["cublas"])):
        gemm._load_cublas.cache_clear()
        fake_cupy.cuda.runtime.is_hip = is_hip
        assert gemm._load_cublas() is None and asked == expected_asks
    pathfinder(not_found)
    gemm._load_cublas.cache_clear()
    assert gemm._load_cublas() is None
    gemm._load_cublas.cache_clear()


# ---- the fake itself catches what it must ------------------------------------------------------

def test_the_fake_cublas_catches_a_wrong_transpose_leading_dimension_and_type(gpu):
    rng = np.random.default_rng(6)
    a, b = gpu.on(0, rng.standard_normal((5, 3)).astype(np.float32)), gpu.on(0, rng.standard_normal((3, 4)).astype(
        np.float32))
    out = gpu.empty((5, 4), np.float32)
    one, zero = gemm.ALPHA_BETA[np.float32]
    f32, c32, N, T = gemm.CUDA_R_32F, gemm.CUBLAS_COMPUTE_32F, gemm.CUBLAS_OP_N, gemm.CUBLAS_OP_T
    args = dict(m=4, n=5, k=3, lda=4, ldb=3, ldc=4)

    def call(transa=N, transb=N, dtype=f32, compute=c32, alpha=one, **kw):
        p = {**args, **kw}
        gpu.cublas.gemm_ex(0, transa, transb, p["m"], p["n"], p["k"], alpha, b.data.ptr, dtype, p["lda"], a.data.ptr,
                           dtype, p["ldb"], zero, out.data.ptr, dtype, p["ldc"], compute, -1)
        return out.host.copy()

    np.testing.assert_allclose(call(), a.host @ b.host, rtol=1e-6)
    assert not np.allclose(call(alpha=gemm.ALPHA_BETA[np.float64][0]), a.host @ b.host)  # a double 1.0 read as float
    for bad in (dict(lda=3), dict(ldc=2), dict(transa=T), dict(dtype=gemm.CUDA_R_16F),
                dict(compute=gemm.CUBLAS_COMPUTE_64F), dict(k=4, ldb=4)):
        with pytest.raises(FakeCublasError):
            call(**bad)


# ---- the ctypes binding --------------------------------------------------------------------------

def test_the_ctypes_binding_passes_every_argument_and_returns_the_status():
    seen = {}

    def stub(name, signature, status):
        types_ = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_longlong, "z": ctypes.c_size_t}
        proto = ctypes.CFUNCTYPE(ctypes.c_int, *[types_[c] for c in signature])
        return proto(lambda *args: seen.__setitem__(name, args) or status)

    lib = type("Lib", (), {})()
    # the C signatures of cublas_api.h: handle, ops, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
    # Ctype, ldc, computeType, algo (enums are ints)
    lib.cublasSetStream_v2 = stub("cublasSetStream_v2", "pp", 0)
    lib.cublasGemmEx = stub("cublasGemmEx", "piiiiippiipiippiiii", 7)
    # ... the same with a long long stride after each leading dimension and the batch count before computeType
    lib.cublasGemmStridedBatchedEx = stub("cublasGemmStridedBatchedEx", "piiiiippiilpiilppiiliii", 8)
    lib.cublasSetWorkspace_v2 = stub("cublasSetWorkspace_v2", "ppz", 0)  # handle, workspace, size_t bytes
    bound = gemm._Library(lib)
    assert bound.set_stream(0x1234, 0x5678) == 0
    args = (0x1234, 1, 0, 4, 5, 3, 0x10, 0x20, 0, 3, 0x30, 0, 3, 0x40, 0x50, 0, 4, 68, 99)
    assert bound.gemm_ex(*args) == 7
    assert seen["cublasSetStream_v2"] == (0x1234, 0x5678) and seen["cublasGemmEx"] == args
    batched = (0x1234, 1, 0, 4, 5, 3, 0x10, 0x20, 0, 3, 2**33 + 1, 0x30, 0, 3, 0, 0x40, 0x50, 0, 4, 20, 7, 68, 99)
    assert bound.gemm_strided_batched_ex(*batched) == 8 and seen["cublasGemmStridedBatchedEx"] == batched
    assert bound.set_workspace(0x1234, 0x9000, 2**35) == 0 and seen["cublasSetWorkspace_v2"] == (0x1234, 0x9000, 2**35)


def test_a_cublas_error_status_raises_naming_the_gemm(gpu, monkeypatch):
    monkeypatch.setattr(gpu.cublas, "gemm_ex", lambda *args: 7)  # CUBLAS_STATUS_INVALID_VALUE
    x, w, _, _ = (gpu.on(0, a) for a in _inputs(np.random.default_rng(9), 5, 6, 7, np.float32))
    with pytest.raises(gemm.CublasError, match=r"cublasGemmEx returned cuBLAS status 7 for a \(5, 6\) x \(6, 7\) "
                                               r"float32 GEMM \(trans_a=False, trans_b=True\)"):
        kernels.get("linear_relu_forward", "cupy")(x, w)


# ---- against the real library, where libcublas can be loaded (no GPU needed) ------------------

def _real_cublas_module():
    """cupy's own cuBLAS binding, importable where libcublas is found (else the test skips)."""
    pytest.importorskip("cupy")
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError as exc:
        pytest.skip(f"libcublas is not loadable here: {str(exc).splitlines()[0]}")
    return cublas


def test_the_constants_are_cupys():
    cublas = _real_cublas_module()
    from cupy.cuda import runtime

    for name in ("CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_GEMM_DEFAULT", "CUBLAS_GEMM_DEFAULT_TENSOR_OP",
                 "CUBLAS_COMPUTE_32F", "CUBLAS_COMPUTE_32F_PEDANTIC", "CUBLAS_COMPUTE_32F_FAST_TF32",
                 "CUBLAS_COMPUTE_64F"):
        assert getattr(gemm, name) == getattr(cublas, name), name
    for name in ("CUDA_R_32F", "CUDA_R_64F", "CUDA_R_16F", "CUDA_R_16BF"):
        assert getattr(gemm, name) == getattr(runtime, name), name
    from cupy._core import _routines_linalg as linalg

    assert (gemm._CUPY_COMPUTE_TYPE_PEDANTIC, gemm._CUPY_COMPUTE_TYPE_TF32) == (
        linalg.COMPUTE_TYPE_PEDANTIC, linalg.COMPUTE_TYPE_TF32)


def test_the_ctypes_binding_loads_the_library_cupy_uses():
    _real_cublas_module()
    gemm._load_cublas.cache_clear()
    try:
        lib = gemm._load_cublas()
        assert lib is not None, "libcublas is loadable for cupy but not for kernels/cuda/gemm.py"
        # A NULL handle: cuBLAS answers CUBLAS_STATUS_NOT_INITIALIZED (1), so the call reached it intact.
        one, zero = gemm.ALPHA_BETA[np.float32]
        assert lib.set_stream(0, 0) == 1
        assert lib.gemm_ex(0, 1, 0, 4, 5, 3, one, 0, 0, 3, 0, 0, 3, zero, 0, 0, 4, 68, 99) == 1
    finally:
        gemm._load_cublas.cache_clear()


# ---- on a real GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(37, 70, 33), (1, 1, 1), (3, 0, 4), (130, 5, 12), (256, 1024, 512)],
                         ids=lambda s: "x".join(map(str, s)))
def test_on_the_gpu_the_direct_gemms_match_the_numpy_impl(dtype, bias, shape):
    cupy = pytest.importorskip("cupy")
    n, k, m = shape
    x, w, b, dy = _inputs(np.random.default_rng(7), n, k, m, dtype, bias)
    d = [None if a is None else cupy.asarray(a) for a in (x, w, b, dy)]
    y = kernels.get("linear_relu_forward", "cupy")(*d[:3])
    y_ref = kernels.get("linear_relu_forward", "numpy")(x, w, b)
    _assert_close(cupy.asnumpy(y), y_ref, dtype, k + 1, "y")
    grads = kernels.get("linear_relu_backward", "cupy")(d[3], d[0], d[1], cupy.asarray(y_ref))
    refs = kernels.get("linear_relu_backward", "numpy")(dy, x, w, y_ref)
    for name, got, ref, terms in zip(("dx", "dW", "db"), grads, refs, (m, n, n)):
        _assert_close(cupy.asnumpy(got), ref, dtype, terms, name)
    if k and n * m:
        assert gemm._cublas() is not None, "the direct cuBLAS path is not in use on this GPU"


@pytest.mark.gpu
def test_on_the_gpu_the_direct_gemms_run_on_a_side_stream_and_in_a_captured_graph():
    cupy = pytest.importorskip("cupy")
    n, k, m = 64, 96, 48
    x, w, b, dy = _inputs(np.random.default_rng(8), n, k, m, np.float32)
    dx_ = [cupy.asarray(a) for a in (x, w, b, dy)]
    forward, backward = kernels.get("linear_relu_forward", "cupy"), kernels.get("linear_relu_backward", "cupy")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        backward(dx_[3], dx_[0], dx_[1], forward(*dx_[:3]))  # warm-up: compiles the kernels, creates the handle
        stream.begin_capture(cupy.cuda.runtime.streamCaptureModeRelaxed)  # cupy's pool may cudaMalloc
        y = forward(*dx_[:3])
        grads = backward(dx_[3], dx_[0], dx_[1], y)
        graph = stream.end_capture()
        x2 = np.ascontiguousarray(-x)
        dx_[0].set(x2)
        graph.launch()
    stream.synchronize()
    y_ref = kernels.get("linear_relu_forward", "numpy")(x2, w, b)
    _assert_close(cupy.asnumpy(y), y_ref, np.dtype(np.float32), k + 1, "y")
    for name, got, ref, terms in zip(("dx", "dW", "db"), grads,
                                     kernels.get("linear_relu_backward", "numpy")(dy, x2, w, y_ref), (m, n, n)):
        _assert_close(cupy.asnumpy(got), ref, np.dtype(np.float32), terms, name)

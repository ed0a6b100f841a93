"""float32 matmul precision: ``engine.set_float32_matmul_precision`` and
``engine.backends.cuda.matmul.allow_tf32``, kept consistent as PyTorch keeps them, and applied to
cuBLAS (cupy's compute type for float32 GEMMs) on the GPU.

torch CPU is the oracle for the settings; a fake cupy (tests/kernels/fake_cupy.py, extended here
with cupy's compute-type API) shows what reaches cuBLAS without a GPU.
"""

import itertools
import sys
import types
import warnings

import numpy as np
import pytest

import engine
from engine import backend
from engine.errors import EngineError
from engine.kernels.cuda import gemm
from tests.kernels.fake_cupy import FakeCupy, clear_cuda_caches, install_fake_cublas

DEFAULT, TF32 = 1, 7  # cupy._core._routines_linalg.COMPUTE_TYPE_DEFAULT / COMPUTE_TYPE_TF32


@pytest.fixture(autouse=True)
def fresh_setting(monkeypatch):
    """Each test starts at the default ("highest", cupy not configured) and leaves it so."""
    monkeypatch.setattr(backend, "_matmul_precision", "highest")
    monkeypatch.setattr(backend, "_cublas_configured", None)


# ---- the settings, against torch --------------------------------------------------------------

OPS = [("allow_tf32", True), ("allow_tf32", False), ("precision", "highest"), ("precision", "high"),
       ("precision", "medium"), ("precision", "High")]


def _apply(module, op, value):
    if op == "allow_tf32":
        module.backends.cuda.matmul.allow_tf32 = value
    else:
        module.set_float32_matmul_precision(value)


def test_defaults_are_pytorchs():
    torch = pytest.importorskip("torch")
    assert engine.get_float32_matmul_precision() == "highest"
    assert engine.backends.cuda.matmul.allow_tf32 is False
    assert engine.backends.cudnn.allow_tf32 is True
    torch.set_float32_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("length", [1, 2, 3])
def test_every_sequence_of_settings_reads_back_as_in_torch(length):
    torch = pytest.importorskip("torch")
    compared = 0
    for sequence in itertools.product(OPS, repeat=length):
        torch.set_float32_matmul_precision("highest")  # torch's state is global: start each sequence afresh
        engine.set_float32_matmul_precision("highest")
        for op, value in sequence:
            with warnings.catch_warnings(record=True) as torch_warned:
                warnings.simplefilter("always")
                _apply(torch, op, value)
            with warnings.catch_warnings(record=True) as engine_warned:
                warnings.simplefilter("always")
                _apply(engine, op, value)
            assert bool(engine_warned) == bool(torch_warned), (sequence, op, value)
            assert engine.backends.cuda.matmul.allow_tf32 is torch.backends.cuda.matmul.allow_tf32, sequence
            mine = engine.get_float32_matmul_precision()
            assert engine.backends.cuda.matmul.allow_tf32 is (mine != "highest"), sequence
            try:
                theirs = torch.get_float32_matmul_precision()
            except RuntimeError:
                # torch 2.13 refuses to answer when its CPU oneDNN flag, set by an earlier
                # set_float32_matmul_precision, disagrees with a later allow_tf32 (its "mix of the
                # legacy and new APIs" error); the engine has no oneDNN flag and answers what the
                # last call set, which is what allow_tf32 reads above.
                continue
            assert mine == theirs, (sequence, op, value)
            compared += 1
    assert compared >= len(OPS) ** length // 2  # most sequences were compared, not skipped
    torch.set_float32_matmul_precision("highest")


def test_a_bad_value_warns_or_raises_and_changes_nothing():
    engine.set_float32_matmul_precision("medium")
    with pytest.warns(UserWarning, match="not one of 'highest', 'high', or 'medium'"):
        engine.set_float32_matmul_precision("low")
    assert engine.get_float32_matmul_precision() == "medium"
    with pytest.raises(EngineError, match="expects a str, but got int"):
        engine.set_float32_matmul_precision(1)
    for value in (1, None, "True"):
        with pytest.raises(EngineError, match="allow_tf32 expects a bool"):
            engine.backends.cuda.matmul.allow_tf32 = value
        with pytest.raises(EngineError, match="allow_tf32 expects a bool"):
            engine.backends.cudnn.allow_tf32 = value
    assert engine.get_float32_matmul_precision() == "medium" and engine.backends.cudnn.allow_tf32 is True
    with pytest.raises(AttributeError, match="allow_tf32"):
        engine.backends.cuda.matmul.allow_tf16 = True


def test_cudnn_allow_tf32_is_a_flag_of_its_own():
    engine.backends.cudnn.allow_tf32 = False
    try:
        assert engine.backends.cudnn.allow_tf32 is False
        assert engine.get_float32_matmul_precision() == "highest"  # independent, as in torch
        engine.backends.cuda.matmul.allow_tf32 = True
        assert engine.backends.cudnn.allow_tf32 is False
    finally:
        engine.backends.cudnn.allow_tf32 = True
    import engine.backends.cudnn as cudnn_module  # the import path reads the same flag

    assert cudnn_module.allow_tf32 is True and cudnn_module is engine.backends.cudnn


def test_on_the_cpu_the_setting_changes_no_result():
    x, w = engine.randn(17, 33), engine.randn(33, 9)
    exact = (x @ w).numpy()
    for precision in ("high", "medium"):
        engine.set_float32_matmul_precision(precision)
        assert np.array_equal((x @ w).numpy(), exact)
    assert backend._cublas_configured is None  # no GPU was touched: nothing was handed to cupy


# ---- applied to cuBLAS: a fake cupy records the compute type ----------------------------------

class ComputeTypeCupy(FakeCupy):
    """FakeCupy plus cupy's compute-type API: ``set_compute_type`` calls are recorded, and every
    GEMM records the float32 compute type in force when it was issued (``cupy.matmul`` here; the
    direct cuBLAS calls of the linear kernels record theirs in ``cublas.calls``)."""

    def __init__(self, compute_capability="90"):
        super().__init__()
        fake = self
        self.compute_type_calls = []
        self.compute_type = 0  # COMPUTE_TYPE_TBD: cupy decides at its first GEMM
        self.gemm_compute_types = []

        def set_compute_type(dtype, compute_type):
            fake.compute_type_calls.append((np.dtype(dtype), compute_type))
            fake.compute_type = compute_type

        linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=DEFAULT, COMPUTE_TYPE_TF32=TF32)
        self._core = types.SimpleNamespace(set_compute_type=set_compute_type, _routines_linalg=linalg,
                                           get_compute_type=lambda dtype: fake.compute_type or DEFAULT)
        self.cuda.Device.compute_capability = compute_capability

    def matmul(self, a, b, out=None):
        self.gemm_compute_types.append(self.compute_type)
        return super().matmul(a, b, out=out)


@pytest.fixture
def gpu(monkeypatch):
    """A machine with two fake GPUs of compute capability 9.0 (see :class:`ComputeTypeCupy`)."""
    def install(compute_capability="90"):
        fake = ComputeTypeCupy(compute_capability)
        clear_cuda_caches()
        monkeypatch.setitem(sys.modules, "cupy", fake)
        install_fake_cublas(monkeypatch, fake.cublas)
        monkeypatch.setattr(backend, "cuda_device_count", lambda: 2)
        return fake

    yield install
    monkeypatch.undo()
    clear_cuda_caches()


def test_the_first_gpu_use_gives_cupy_the_default_full_float32(gpu):
    fake = gpu()
    assert backend.xp_for(engine.device("cuda")) is fake
    assert fake.compute_type_calls == [(np.dtype(np.float32), DEFAULT)]
    backend.xp_for(engine.device("cuda:1"))
    assert len(fake.compute_type_calls) == 1, "configured once, not on every call"


def test_a_setting_made_before_the_gpu_is_used_is_applied_at_first_use(gpu):
    fake = gpu()
    engine.set_float32_matmul_precision("high")
    assert fake.compute_type_calls == []  # cupy is not touched until a GPU is used
    backend.xp_for(engine.device("cuda"))
    assert fake.compute_type_calls == [(np.dtype(np.float32), TF32)]


@pytest.mark.parametrize("op, value, expected", [
    ("allow_tf32", True, TF32), ("allow_tf32", False, DEFAULT), ("precision", "high", TF32),
    ("precision", "medium", TF32), ("precision", "highest", DEFAULT)])
def test_each_setting_reaches_cublas_at_once(gpu, op, value, expected):
    fake = gpu()
    backend.xp_for(engine.device("cuda"))
    engine.set_float32_matmul_precision("high" if expected == DEFAULT else "highest")  # start at the other one
    _apply(engine, op, value)
    assert fake.compute_type_calls[-1] == (np.dtype(np.float32), expected)


def test_before_ampere_tf32_is_not_asked_of_cupy(gpu):
    fake = gpu(compute_capability="75")
    backend.xp_for(engine.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cupy would warn; PyTorch stays silent, and so does the engine
        engine.backends.cuda.matmul.allow_tf32 = True
    assert engine.backends.cuda.matmul.allow_tf32 is True  # the setting is kept, as in torch
    assert {call[1] for call in fake.compute_type_calls} == {DEFAULT}


def test_the_linear_kernels_gemms_run_with_the_compute_type_set(gpu):
    from engine.kernels.cuda import linear_relu

    fake = gpu()
    backend.xp_for(engine.device("cuda"))
    rng = np.random.default_rng(0)
    x, w, b = (fake.on(0, rng.standard_normal(s).astype(np.float32)) for s in ((8, 16), (4, 16), (4,)))
    linear_relu.linear_relu_forward(x, w, b)
    engine.backends.cuda.matmul.allow_tf32 = True
    linear_relu.linear_relu_forward(x, w, b)
    dy, y = (fake.on(0, rng.standard_normal((8, 4)).astype(np.float32)) for _ in range(2))
    linear_relu.linear_relu_backward(dy, x, w, y)
    engine.set_float32_matmul_precision("highest")
    linear_relu.linear_relu_forward(x, w, b)
    # the direct cublasGemmEx calls: forward, forward, backward dx and dW, forward
    fast, full = gemm.CUBLAS_COMPUTE_32F_FAST_TF32, gemm.CUBLAS_COMPUTE_32F
    assert [call.compute_type for call in fake.cublas.calls] == [full, fast, fast, fast, full]
    assert fake.gemm_compute_types == [], "no GEMM went through cupy.matmul"


def test_16_bit_linear_gemms_accumulate_in_float32_whatever_the_setting(gpu):
    import ml_dtypes

    from engine.kernels.cuda import linear_relu

    fake = gpu()
    backend.xp_for(engine.device("cuda"))
    engine.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.default_rng(0)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        x, w = (fake.on(0, rng.standard_normal(s).astype(dtype)) for s in ((8, 16), (4, 16)))
        linear_relu.linear_relu_forward(x, w)
    assert [call.compute_type for call in fake.cublas.calls] == [gemm.CUBLAS_COMPUTE_32F] * 2
    assert [call.data_type for call in fake.cublas.calls] == [gemm.CUDA_R_16F, gemm.CUDA_R_16BF]


# ---- on a real GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_on_the_gpu_tf32_changes_float32_gemms_and_highest_restores_them():
    cupy = pytest.importorskip("cupy")
    from cupy._core import _routines_linalg as linalg

    a = engine.randn(512, 512, device="cuda")
    b = engine.randn(512, 512, device="cuda")
    exact = (a.double() @ b.double()).float().numpy()
    full = (a @ b).numpy()
    assert cupy._core.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
    engine.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = (a @ b).numpy()
        ampere = int(cupy.cuda.Device().compute_capability) >= 80
        assert cupy._core.get_compute_type(np.float32) == (
            linalg.COMPUTE_TYPE_TF32 if ampere else linalg.COMPUTE_TYPE_DEFAULT)
    finally:
        engine.set_float32_matmul_precision("highest")
    assert np.array_equal((a @ b).numpy(), full)
    scale = np.abs(exact).max()
    assert np.abs(full - exact).max() / scale < 1e-5
    if int(cupy.cuda.Device().compute_capability) >= 80:
        # TF32 keeps 10 mantissa bits: an error of the order of 2^-11 relative, far above float32's
        assert 1e-5 < np.abs(tf32 - exact).max() / scale < 1e-2

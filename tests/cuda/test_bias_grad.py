"""Linear's bias gradient on the GPU: ``kernels.gpu_bias_grad``, checked without a GPU.

On cupy arrays ``Linear.backward`` takes db from the mask-free column-sum pass of linear_relu.cu
(``linear_relu_bwd_colsum*``) and its fixed-order reduction, instead of cupy's ``sum(0)`` (a
reduction launch with tens of microseconds of host work each). With the fake cupy the launches
run as NumPy transcriptions of the kernels (tests/kernels/fake_linear_relu_kernels.py), so the
values, the launch plan, the 16-bit accumulation, the capture and the fallbacks are checked here;
what the kernels do on a GPU is checked by the NVRTC compile (tests/kernels/test_gpu_compile.py)
and by the ``gpu`` test at the end.
"""

import copy
import importlib

import numpy as np
import pytest

import engine
from engine import kernels, nn
from tests.cuda.fake_capture import fake_gpu  # noqa: F401 - the fixture
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.fake_linear_relu_kernels import impls
from tests.kernels.helpers import BF16, F16

linear_module = importlib.import_module("engine.functional.linear")  # engine.functional.linear is the function
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), F16, BF16]
# (N, M): one block row (N <= 8), many block rows, 16-byte packs (M % lanes == 0) or not, size-1 edges
SHAPES = [(1, 1), (5, 24), (8, 20), (37, 33), (256, 10), (3000, 40), (9, 64)]
UNIT = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture
def gpu(fake_cupy):  # noqa: F811 - the fixture
    fake_cupy.kernel_impls.update(impls())
    return fake_cupy


def _grad(rng, n, m, dtype):
    return np.ascontiguousarray((rng.standard_normal((n, m)) * rng.uniform(0.5, 2.0, m)).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_column_sums_match_numpy_within_one_rounding(gpu, dtype, shape):
    n, m = shape
    g = _grad(np.random.default_rng(n * 1000 + m), n, m, dtype)
    db = kernels.gpu_bias_grad(gpu.on(0, g)).host
    exact = g.astype(np.float64).sum(axis=0)
    assert db.dtype == dtype and db.shape == (m,)
    # float32 (float64) accumulation and one rounding to the storage dtype: within a rounding of the
    # result plus the accumulation's error over n terms
    acc_unit = UNIT["float64" if dtype == np.float64 else "float32"]
    bound = UNIT[dtype.name] * np.abs(exact) + n * acc_unit * np.abs(g.astype(np.float64)).sum(axis=0) + 1e-300
    assert (np.abs(db.astype(np.float64) - exact) <= bound).all(), np.abs(db.astype(np.float64) - exact).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(5, 24), (5, 20), (3000, 40)], ids=["vec", "scalar", "rows"])
def test_launch_plan(gpu, dtype, shape):
    """The linear_relu backward's plan without the mask: 16-byte packs when M is a multiple of the pack,
    float32 partials for 16-bit g (always reduced by the second kernel, which rounds once), the partials
    as db itself for float32 when one block row suffices; no GEMM, no cupy reduction."""
    from engine.kernels.cuda.linear_relu import _suffix

    n, m = shape
    g = gpu.on(0, _grad(np.random.default_rng(0), n, m, dtype))
    db = kernels.gpu_bias_grad(g)
    suffix, vec = _suffix(dtype), m % (16 // dtype.itemsize) == 0
    names = [launch.name for launch in gpu.launches]
    first = gpu.launches[0]
    assert first.name == f"linear_relu_bwd_colsum_{'vec_' if vec else ''}{suffix}"
    assert first.args[0] is g and len(first.args) == 4 and first.block == (32, 8)
    partial = first.args[1]
    if dtype in (np.float32, np.float64) and first.grid[1] == 1:
        assert names == [first.name] and partial is db
    else:
        assert partial.dtype == (np.float64 if dtype == np.float64 else np.float32)
        assert partial.shape == (first.grid[1], m)
        assert names == [first.name, f"linear_relu_bwd_db_reduce_{suffix}"]
        assert gpu.launches[1].args[1] is db
    assert gpu.gemms == [] and {launch.device for launch in gpu.launches} == {0}


def test_the_plan_and_so_the_sums_do_not_depend_on_the_device(gpu):
    """Deterministic: the same g gives the same bits, on either GPU (no atomics, no device-sized grid)."""
    g = _grad(np.random.default_rng(1), 3000, 40, np.float32)
    first = kernels.gpu_bias_grad(gpu.on(0, g)).host.copy()
    second = kernels.gpu_bias_grad(gpu.on(1, g)).host
    assert first.tobytes() == second.tobytes()
    assert [launch.device for launch in gpu.launches] == [0, 0, 1, 1]  # each on its array's GPU


@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty_gradients_give_zeros_with_no_launch(gpu, shape):
    db = kernels.gpu_bias_grad(gpu.on(0, np.ones(shape, np.float32)))
    assert db.shape == (shape[1],) and not db.host.any() and gpu.launches == []


def test_linear_backward_falls_back_where_the_kernel_does_not_apply(gpu, monkeypatch):
    """numpy arrays keep unbroadcast (bit for bit the CPU path); so do GPU arrays the kernel does not
    take (strided, an integer dtype)."""
    called = []
    monkeypatch.setattr(kernels, "gpu_bias_grad", lambda g: called.append(("kernel", g)), raising=False)
    monkeypatch.setattr(linear_module, "unbroadcast", lambda g, shape, dtype: called.append(("unbroadcast", g)))
    contiguous = gpu.on(0, np.ones((3, 4), np.float32))
    cases = [np.ones((3, 4), np.float32), contiguous, contiguous.T, gpu.on(0, np.ones((3, 4), np.int32))]
    for g in cases:
        linear_module._bias_grad(g, (g.shape[1],))
    assert [(kind, g is case) for (kind, g), case in zip(called, cases)] == [
        ("unbroadcast", True), ("kernel", True), ("unbroadcast", True), ("unbroadcast", True)]


# ---- the engine's Linear on the fake GPU with stream capture -------------------------------------

def test_a_linear_layers_bias_gradient_comes_from_the_column_sum_kernel(fake_gpu):  # noqa: F811
    engine.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10))
    model = copy.deepcopy(reference).to("cuda")
    x = np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32)
    (model(engine.tensor(x, device="cuda")) ** 2).mean().backward()
    (reference(engine.tensor(x)) ** 2).mean().backward()
    # the last layer first (10 outputs: scalar columns), then the first (16: float4 packs)
    assert [n for n in fake_gpu.kernel_launches if "colsum" in n] == ["linear_relu_bwd_colsum_f32",
                                                                      "linear_relu_bwd_colsum_vec_f32"]
    for p, q in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(p.grad._data.host, q.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_a_captured_linear_step_replays_the_bias_gradient(fake_gpu):  # noqa: F811
    engine.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(3)
    static_x = engine.tensor(rng.standard_normal((20, 6)).astype(np.float32), device="cuda")
    graph = engine.cuda.CUDAGraph()
    with engine.cuda.graph(graph):
        (model(static_x) ** 2).mean().backward()
    captured = list(fake_gpu.kernel_launches)
    assert sum("colsum" in n for n in captured) == 2 and fake_gpu.host_reads == 0
    for step in range(2):
        x = rng.standard_normal((20, 6)).astype(np.float32)
        static_x.copy_(engine.tensor(x, device="cuda"))
        graph.replay()
        reference.zero_grad()
        (reference(engine.tensor(x)) ** 2).mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            np.testing.assert_allclose(p.grad._data.host, q.grad.numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=f"replay {step}: {name}")
    assert fake_gpu.kernel_launches == captured, "a replay launches nothing from the host"


# ---- on a real GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_on_the_gpu_the_column_sums_match_numpy(dtype, shape):
    if not engine.cuda.is_available():
        pytest.skip("no CUDA device")
    import cupy

    dtype = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    n, m = shape
    g = _grad(np.random.default_rng(n + m), n, m, dtype)
    gpu_g = cupy.asarray(g)
    db = kernels.gpu_bias_grad(gpu_g).get()
    again = kernels.gpu_bias_grad(gpu_g).get()
    assert db.tobytes() == again.tobytes(), "not deterministic"
    exact = g.astype(np.float64).sum(axis=0)
    acc_unit = UNIT["float64" if dtype == np.float64 else "float32"]
    bound = UNIT[dtype.name] * np.abs(exact) + n * acc_unit * np.abs(g.astype(np.float64)).sum(axis=0) + 1e-300
    assert (np.abs(db.astype(np.float64) - exact) <= bound).all()

"""GPU code compiles without a GPU: every .cu file through NVRTC, every numba.cuda kernel to PTX.

- .cu files: sm_80 and sm_90, and ptxas must report no register spill.
- numba.cuda kernels: each module in kernels/numba_cuda lists ``PTX_CHECKS``, tuples of
  ``(jitted kernel, argument signature, dtype name)``; a float32 or float16 kernel's PTX must hold
  no float64 arithmetic (a stray Python float literal promotes the whole expression to double).
"""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import engine.kernels.numba_cuda
from engine.kernels.cuda.module import CUPY_ADDED_OPTIONS, NVRTC_OPTIONS, SOURCE_DIR, sources

CU_FILES = sources()


def test_compile_check_uses_the_options_cupy_compiles_with():
    """The CI build is cupy's build: our options, then what cupy appends (-ftz=true), then the
    include path, the target and ptxas's report."""
    from engine.kernels.cuda.nvrtc import compile_options, cuda_include_options

    assert CUPY_ADDED_OPTIONS == ("-ftz=true",)
    assert compile_options("sm_90") == (*NVRTC_OPTIONS, f"-I{SOURCE_DIR}", *CUPY_ADDED_OPTIONS,
                                        *cuda_include_options(), "--gpu-architecture=sm_90",
                                        "--ptxas-options=-v")


def test_compile_check_finds_the_low_precision_headers():
    """common.cuh includes cuda_fp16.h and cuda_bf16.h: the CI compile must see the toolkit
    headers cupy compiles with, or every bf16/fp16 kernel would go unchecked."""
    pytest.importorskip("cupy")
    from engine.kernels.cuda.nvrtc import cuda_include_options

    (option,) = cuda_include_options()
    include = Path(option[2:])
    assert (include / "cuda_bf16.h").is_file() and (include / "cuda_fp16.h").is_file(), include


COMMON_PROBE = """
#include "common.cuh"
template <typename T, int NV>
__device__ void probe(const T* x, T* y, typename Acc<T>::type* scratch) {
    typename Acc<T>::type v[NV];
    for (int i = 0; i < NV; ++i) v[i] = to_acc(x[threadIdx.x * NV + i]);
    BlockGroup<typename Acc<T>::type, NV> block{scratch};
    group_reduce(block, v, SumOp(), typename Acc<T>::type(0));
    WarpGroup<8> group{0xffffffffu, int(threadIdx.x & 7)};
    group_reduce(group, v, MaxOp(), typename Acc<T>::type(0));
    y[threadIdx.x] = from_acc<T>(v[0]);
}
extern "C" __global__ void probe_f32(const float* x, float* y) { __shared__ float s[66]; probe<float, 2>(x, y, s); }
extern "C" __global__ void probe_f64(const double* x, double* y) { __shared__ double s[66]; probe<double, 2>(x, y, s); }
extern "C" __global__ void probe_f16(const __half* x, __half* y) { __shared__ float s[66]; probe<__half, 2>(x, y, s); }
extern "C" __global__ void probe_bf16(const __nv_bfloat16* x, __nv_bfloat16* y) {
    __shared__ float s[66];
    probe<__nv_bfloat16, 2>(x, y, s);
}
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_common_header_compiles_for_every_storage_type(tmp_path, arch):
    """common.cuh's conversions and reductions instantiate for float, double, __half and
    __nv_bfloat16 (a .cu file that includes it is compiled from its own folder's -I)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from engine.kernels.cuda.nvrtc import compile_file

    probe = tmp_path / "common_probe.cu"
    probe.write_text(COMMON_PROBE)
    result = compile_file(probe, arch)
    for kernel in ("probe_f32", "probe_f64", "probe_f16", "probe_bf16"):
        assert kernel in result.log, result.log
    assert result.spills() == {}, result.log


def test_installed_cupy_appends_what_we_say_it_does():
    """Should a cupy release stop (or start) appending options, CUPY_ADDED_OPTIONS must follow."""
    pytest.importorskip("cupy")
    import inspect

    from cupy.cuda import compiler

    code = inspect.getsource(compiler._compile_with_cache_cuda)
    appended = re.findall(r"^\s*options \+= \(([^)]*)\)", code, re.M)
    assert appended, "cupy's _compile_with_cache_cuda no longer appends options: update CUPY_ADDED_OPTIONS"
    unconditional = [o.strip().strip("',\"") for o in appended[0].split(",") if o.strip()]
    assert tuple(unconditional) == CUPY_ADDED_OPTIONS, (appended, CUPY_ADDED_OPTIONS)


# .cu files whose tests parse the entry points the file instantiates (every dtype, float16 and
# bfloat16 included): each of them must be in the compiled module, not only some entry.
INSTANTIATIONS = {"linear_relu.cu": "tests.kernels.test_linear_relu",
                  "softmax_cross_entropy.cu": "tests.kernels.test_softmax_cross_entropy",
                  "attention_tc.cu": "tests.kernels.test_attention_tc"}


# .cu files whose kernels must keep every array in registers: no stack frame (local memory) either.
NO_STACK_FRAME = {"attention_tc.cu"}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=[p.name for p in CU_FILES])
@pytest.mark.slow
def test_cu_file_compiles_without_spills(path, arch):
    pytest.importorskip("cuda.bindings.nvrtc")
    from engine.kernels.cuda.nvrtc import compile_file

    result = compile_file(path, arch)
    assert "Compiling entry function" in result.log, result.log
    assert result.spills() == {}, f"{path.name} spills registers on {arch}: {result.spills()}\n{result.log}"
    if path.name in NO_STACK_FRAME:
        assert result.stack_frames() == {}, f"{path.name} uses local memory on {arch}: {result.stack_frames()}"
    if path.name in INSTANTIATIONS:
        expected = importlib.import_module(INSTANTIATIONS[path.name])._instantiated_kernels()
        assert expected <= set(result.registers()), sorted(expected - set(result.registers()))
        for suffix in ("_f16", "_bf16"):
            assert any(suffix + "_" in name or name.endswith(suffix) for name in expected), (path.name, suffix)


def _ptx_checks():
    checks = []
    for info in pkgutil.iter_modules(engine.kernels.numba_cuda.__path__):
        module = importlib.import_module(f"engine.kernels.numba_cuda.{info.name}")
        for fn, sig, dtype in getattr(module, "PTX_CHECKS", []):
            checks.append(pytest.param(fn, sig, dtype, id=f"{info.name}.{fn.py_func.__name__}-{dtype}"))
    return checks


# Float64 arithmetic or conversions to double; loads/stores of f64 parameters are not matched
# because float32 kernels have none.
F64_OP = re.compile(r"^\s*(add|sub|mul|fma|div|cvt\.f64|neg|max|min|sqrt|ex2|lg2|rcp)[.\w]*\.f64\b", re.M)


@pytest.mark.parametrize("fn,sig,dtype", _ptx_checks())
@pytest.mark.slow
def test_numba_cuda_kernel_compiles_to_sm90_ptx(fn, sig, dtype):
    from numba import cuda

    ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))
    assert ".entry" in ptx or ".visible .func" in ptx
    if dtype.startswith(("float32", "float16")):  # float16 storage is computed in float32
        ops = F64_OP.findall(ptx)
        assert not ops, f"{dtype} kernel {fn.py_func.__name__} has float64 arithmetic in its PTX: {ops[:10]}"


# numba-cuda (<= 0.30, not to be fixed upstream) registers an overload of np.row_stack when its
# CUDA target loads; numpy 2.5 removed the name, so every numba_cuda kernel failed to compile on
# the GPU machine (numpy 2.5.2) while CI (numpy 2.4) passed. Each case runs in a fresh process,
# because numba loads its CUDA target once per process.
_COMPILE_WITHOUT_ROW_STACK = """
import numpy as np
try:
    del np.row_stack          # numpy < 2.5: remove the name, as numpy 2.5 did
except AttributeError:
    pass                      # numpy >= 2.5: already gone
{prepare}
from numba import cuda

@cuda.jit
def add_one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1

cuda.compile_ptx(add_one.py_func, "(float32[:],)", cc=(9, 0))
print("compiled")
"""


@pytest.mark.parametrize("with_shim", [True, False], ids=["engine.kernels.numba_cuda-imported", "bare-numba-cuda"])
@pytest.mark.slow
def test_numba_cuda_compiles_under_numpy_without_row_stack(with_shim):
    import subprocess
    import sys

    prepare = "import engine.kernels.numba_cuda" if with_shim else ""
    env = {**__import__("os").environ, "NUMBA_ENABLE_CUDASIM": "0"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_WITHOUT_ROW_STACK.format(prepare=prepare)],
                         capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[2]))
    if with_shim:
        assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
    else:
        # The failure the shim exists for; should a numba-cuda release fix it, this case tells us
        # the shim can go.
        assert run.returncode != 0 and "row_stack" in run.stderr, (run.stdout, run.stderr[-3000:])

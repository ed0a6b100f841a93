"""GPU code compiles without a GPU: every .cu file through NVRTC, every numba.cuda kernel to PTX.

- .cu files: sm_80 and sm_90, and ptxas must report no register spill.
- numba.cuda kernels: each module in kernels/numba_cuda lists ``PTX_CHECKS``, tuples of
  ``(jitted kernel, argument signature, dtype name)``; a float32 kernel's PTX must hold no
  float64 arithmetic (a stray Python float literal promotes the whole expression to double).
"""

import importlib
import pkgutil
import re

import pytest

import kernels.numba_cuda
from kernels.cuda.module import sources

CU_FILES = sources()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_file_compiles_without_spills(path, arch):
    pytest.importorskip("cuda.bindings.nvrtc")
    from kernels.cuda.nvrtc import compile_file

    result = compile_file(path, arch)
    assert "Compiling entry function" in result.log, result.log
    assert result.spills() == {}, f"{path.name} spills registers on {arch}: {result.spills()}\n{result.log}"


def _ptx_checks():
    checks = []
    for info in pkgutil.iter_modules(kernels.numba_cuda.__path__):
        module = importlib.import_module(f"kernels.numba_cuda.{info.name}")
        for fn, sig, dtype in getattr(module, "PTX_CHECKS", []):
            checks.append(pytest.param(fn, sig, dtype, id=f"{info.name}.{fn.py_func.__name__}-{dtype}"))
    return checks


# Float64 arithmetic or conversions to double; loads/stores of f64 parameters are not matched
# because float32 kernels have none.
F64_OP = re.compile(r"^\s*(add|sub|mul|fma|div|cvt\.f64|neg|max|min|sqrt|ex2|lg2|rcp)[.\w]*\.f64\b", re.M)


@pytest.mark.parametrize("fn,sig,dtype", _ptx_checks())
def test_numba_cuda_kernel_compiles_to_sm90_ptx(fn, sig, dtype):
    from numba import cuda

    ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))
    assert ".entry" in ptx or ".visible .func" in ptx
    if dtype == "float32":
        ops = F64_OP.findall(ptx)
        assert not ops, f"float32 kernel {fn.py_func.__name__} has float64 arithmetic in its PTX: {ops[:10]}"

"""Compile a .cu file with NVRTC for a given architecture, without a GPU.

Used by CI (tests/kernels/test_gpu_compile.py) to prove every CUDA C++ kernel compiles for sm_80
and sm_90 and that ptxas reports no register spills. NVRTC is the compiler CuPy uses at run time,
and :func:`compile_options` are the options cupy gives it, ``-ftz=true`` included.
Needs ``cuda-bindings`` and an NVRTC wheel of the same CUDA major (the ``cuda12`` or ``cuda13`` extra).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..cuda.module import CUPY_ADDED_OPTIONS, build_options


@dataclass
class CompileResult:
    path: Path
    arch: str
    log: str  # ptxas -v output: registers, shared memory, spills per kernel

    def spills(self) -> dict[str, tuple[int, int]]:
        """kernel name -> (spill store bytes, spill load bytes), for kernels that spill."""
        return {kernel: (int(m.group(1)), int(m.group(2)))
                for kernel, m in self._per_kernel(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
                if int(m.group(1)) or int(m.group(2))}

    def stack_frames(self) -> dict[str, int]:
        """kernel name -> bytes of stack frame, for kernels that have one (local memory: a register
        array indexed at run time lands there without being counted as a spill)."""
        return {kernel: int(m.group(1)) for kernel, m in self._per_kernel(r"(\d+) bytes stack frame")
                if int(m.group(1))}

    def registers(self) -> dict[str, int]:
        """kernel name -> registers per thread."""
        return {kernel: int(m.group(1)) for kernel, m in self._per_kernel(r"Used (\d+) registers")}

    def _per_kernel(self, pattern: str):
        """(kernel name, match) for each log line that matches ``pattern``, after the line that
        names the entry function ptxas is reporting on."""
        current = None
        for line in self.log.splitlines():
            entry = re.search(r"Compiling entry function '([^']+)'", line)
            if entry:
                current = entry.group(1)
            found = re.search(pattern, line)
            if found and current:
                yield current, found


class NvrtcError(RuntimeError):
    pass


def compile_file(path: Path, arch: str = "sm_90") -> CompileResult:
    """Compile ``path`` to cubin-through-ptxas for ``arch``; raise NvrtcError with the log on failure."""
    from cuda.bindings import nvrtc

    src = Path(path).read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(src, str(Path(path).name).encode(), 0, [], [])
    _check(err, "create", path)
    options = [o.encode() for o in compile_options(arch)]
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        log = _log(nvrtc, prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC failed to compile {Path(path).name} for {arch}:\n{log}")
        return CompileResult(Path(path), arch, log)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_options(arch: str) -> tuple[str, ...]:
    """What cupy hands NVRTC at run time (our options, then the ones cupy adds: ``-ftz=true`` and
    the CUDA toolkit's include folder), plus the target architecture and ptxas's register report."""
    return (*build_options(), *CUPY_ADDED_OPTIONS, *cuda_include_options(),
            f"--gpu-architecture={arch}", "--ptxas-options=-v")


def cuda_include_options() -> tuple[str, ...]:
    """``-I<CUDA path>/include``, found as cupy finds it for every RawModule it compiles
    (``cupy._environment.get_cuda_path``: the nvidia/cu13 wheel beside NVRTC, or a system
    toolkit). It holds ``cuda_fp16.h`` and ``cuda_bf16.h``, which common.cuh includes."""
    try:
        from cupy._environment import get_cuda_path
    except ImportError:
        return ()
    path = get_cuda_path()
    if path is None or not (Path(path) / "include").is_dir():
        return ()
    return (f"-I{Path(path) / 'include'}",)


def _log(nvrtc, prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\x00 ").decode(errors="replace")


def _check(err, what, path):
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"nvrtc {what} failed for {path}: {err}")

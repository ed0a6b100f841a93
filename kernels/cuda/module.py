"""Load the CUDA C++ sources in this folder with cupy.RawModule, once per process.

The same sources and options are what kernels/cuda/nvrtc.py compiles in CI without a GPU, so
the build CI checks is the build that runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

SOURCE_DIR = Path(__file__).parent

# Options shared by the run-time build (cupy) and the CI check (nvrtc.py). No fast-math: the
# kernels must agree with the numpy reference to float32 rounding.
NVRTC_OPTIONS = ("-std=c++17",)


def source(name: str) -> str:
    """Text of ``kernels/cuda/<name>.cu``."""
    return (SOURCE_DIR / f"{name}.cu").read_text()


def sources() -> list[Path]:
    """Every .cu file of the package (CI compiles each of them)."""
    return sorted(SOURCE_DIR.glob("*.cu"))


@functools.cache
def load(name: str):
    """A cupy.RawModule for ``<name>.cu`` (compiled by NVRTC on first use, cached by cupy on disk)."""
    import cupy

    return cupy.RawModule(code=source(name), options=NVRTC_OPTIONS + (f"-I{SOURCE_DIR}",))


def function(module: str, kernel: str):
    """The ``extern "C"`` kernel ``kernel`` from ``<module>.cu``."""
    return load(module).get_function(kernel)

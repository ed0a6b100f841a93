"""kernels/cuda/module.py without a GPU: kernels looked up once per (module, kernel, device), lazily.

A fake cupy (tests/kernels/fake_cupy.py) records every RawModule built and every get_function.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.kernels.cuda import module
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]


def test_a_kernel_is_looked_up_once_per_device(fake_cupy):
    first = module.function("optim", "adam_step_f32")
    assert module.function("optim", "adam_step_f32") is first
    assert fake_cupy.lookups == [("adam_step_f32", 0)]
    other = module.function("optim", "sgd_step_f32")
    assert other is not first
    assert fake_cupy.lookups == [("adam_step_f32", 0), ("sgd_step_f32", 0)]
    assert len(fake_cupy.modules) == 1, "one module per .cu file and device"

    fake_cupy.current = 1
    on_1 = module.function("optim", "adam_step_f32")
    assert on_1 is not first and module.function("optim", "adam_step_f32") is on_1
    assert fake_cupy.lookups[-1] == ("adam_step_f32", 1)
    assert len(fake_cupy.lookups) == 3 and len(fake_cupy.modules) == 2


def test_an_explicit_device_is_looked_up_with_that_device_current(fake_cupy):
    kernel = module.function("linear_relu", "linear_relu_fwd_epilogue_f32", device_id=1)
    assert fake_cupy.lookups == [("linear_relu_fwd_epilogue_f32", 1)]
    assert kernel.device_id == 1
    assert fake_cupy.current == 0, "the previous device is current again"
    fake_cupy.current = 1
    assert module.function("linear_relu", "linear_relu_fwd_epilogue_f32") is kernel


def test_repeated_launches_reuse_the_kernel(fake_cupy):
    from engine.kernels.cuda import optim

    p, g, m, v = (fake_cupy.on(0, np.full(1000, x, np.float32)) for x in (1.0, 0.5, 0.0, 0.0))
    for step in (1, 2, 3):
        optim.adam_step(p, g, m, v, lr=1e-3, step=step)
    assert [launch.name for launch in fake_cupy.launches] == ["adam_step_f32"] * 3
    assert fake_cupy.lookups == [("adam_step_f32", 0)]


def test_modules_are_built_with_the_package_options(fake_cupy):
    module.function("softmax_cross_entropy", "sce_warp_f32_g8_k4")
    (options,) = fake_cupy.modules
    assert options == module.NVRTC_OPTIONS + (f"-I{module.SOURCE_DIR}",)


@pytest.mark.slow
def test_importing_the_kernels_imports_no_cupy():
    code = ("import sys, engine.kernels as kernels, engine.kernels.cuda.module, engine.kernels.cuda.optim, engine.kernels.cuda.linear_relu, "
            "engine.kernels.cuda.softmax_cross_entropy; kernels.impls('adam_step', available_only=False); "
            "assert 'cupy' not in sys.modules, 'cupy was imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]

"""The cupy wrappers compute on the GPU their inputs live on, not on the current device.

Without a GPU a fake cupy (tests/kernels/fake_cupy.py, two devices, device 0 current) runs each
wrapper on inputs allocated on device 1 and records where every allocation, GEMM and launch
went. With two GPUs, the ``gpu`` test at the end does the same with real cupy and checks results.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError
from engine.kernels.cuda import linear_relu, optim, softmax_cross_entropy
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401 - the fixture
from tests.kernels.helpers import make_cross_entropy_case


def _floats(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _calls(rng):
    """name -> (wrapper, host arrays, keyword arguments): one small call per cupy wrapper."""
    x, w, b = _floats(rng, 8, 16), _floats(rng, 32, 16), _floats(rng, 32)
    y, dy = np.maximum(_floats(rng, 8, 32), 0), _floats(rng, 8, 32)
    p, g, s1, s2 = _floats(rng, 1000), _floats(rng, 1000), _floats(rng, 1000), np.abs(_floats(rng, 1000))
    logits, soft, _ = make_cross_entropy_case(6, 10, np.float32, kind="soft")
    return {
        "linear_relu_forward": (linear_relu.linear_relu_forward, [x, w, b], {}),
        "linear_relu_forward-no-bias": (linear_relu.linear_relu_forward, [x, w, None], {}),
        "linear_relu_backward": (linear_relu.linear_relu_backward, [dy, x, w, y], {}),
        "linear_relu_backward-no-grad-x": (linear_relu.linear_relu_backward, [dy, x, w, y],
                                           {"compute_grad_x": False}),
        # Soft targets: the hard-target range check is another test's business (test_softmax_cross_entropy).
        "softmax_cross_entropy": (softmax_cross_entropy.softmax_cross_entropy, [logits, soft, None],
                                  {"grad_scale": 0.5}),
        "adam_step": (optim.adam_step, [p, g, s1, s2], {"lr": 1e-3, "step": 2}),
        "adam_step-amsgrad": (optim.adam_step, [p, g, s1, s2, s2.copy()], {"lr": 1e-3, "step": 2, "amsgrad": True}),
        "sgd_step": (optim.sgd_step, [p, g, s1], {"lr": 0.1, "momentum": 0.9}),
        "adagrad_step": (optim.adagrad_step, [p, g, s2], {"lr": 0.1, "step": 2}),
        "rmsprop_step": (optim.rmsprop_step, [p, g, s2, s1, s2.copy()],
                         {"lr": 0.01, "momentum": 0.9, "centered": True}),
    }


CALLS = list(_calls(np.random.default_rng(0)))


def _flat(result):
    if result is None:
        return []
    if isinstance(result, tuple):
        return [r for r in result if r is not None]
    return [result]


@pytest.mark.parametrize("call", CALLS)
def test_wrapper_runs_on_the_inputs_device_not_the_current_one(fake_cupy, call):
    fn, host, kw = _calls(np.random.default_rng(1))[call]
    args = [None if a is None else fake_cupy.on(1, a) for a in host]
    assert fake_cupy.current == 0

    result = fn(*args, **kw)

    assert fake_cupy.launches, "the wrapper launched nothing"
    for launch in fake_cupy.launches:
        assert launch.device == 1, f"{launch.name} was launched with device {launch.device} current"
        assert launch.built_for == 1, f"{launch.name} was loaded for device {launch.built_for}"
    assert fake_cupy.allocations == [1] * len(fake_cupy.allocations), fake_cupy.allocations
    for current, operands in fake_cupy.gemms:
        assert current == 1 and set(operands) == {1}, (current, operands)
    assert all(out.device_id == 1 for out in _flat(result))
    assert 1 in fake_cupy.entered and 0 not in fake_cupy.entered, fake_cupy.entered
    assert fake_cupy.current == 0, "the caller's device is current again"


def test_wrapper_on_the_current_device_stays_there(fake_cupy):
    fn, host, kw = _calls(np.random.default_rng(1))["linear_relu_forward"]
    y = fn(*[fake_cupy.on(0, a) for a in host], **kw)
    assert y.device_id == 0 and {launch.device for launch in fake_cupy.launches} == {0}
    assert fake_cupy.allocations == [0] * len(fake_cupy.allocations)


# name -> index of the argument moved to device 1 (the others stay on device 0), argument name
SPLIT = {
    "linear_relu_forward": (1, "weight"),
    "linear_relu_backward": (3, "out"),
    "softmax_cross_entropy": (1, "targets"),
    "adam_step": (2, "exp_avg"),
    "sgd_step": (2, "momentum_buf"),
    "adagrad_step": (2, "state_sum"),
    "rmsprop_step": (1, "grad"),
}


@pytest.mark.parametrize("call", list(SPLIT))
def test_inputs_on_two_gpus_are_a_kernel_error_naming_both(fake_cupy, call):
    fn, host, kw = _calls(np.random.default_rng(1))[call]
    moved, name = SPLIT[call]
    args = [None if a is None else fake_cupy.on(1 if i == moved else 0, a) for i, a in enumerate(host)]
    with pytest.raises(KernelError) as info:
        fn(*args, **kw)
    text = str(info.value)
    kernel = call.split("-")[0]
    assert text.startswith(kernel), text
    assert "different GPUs (cuda:0, cuda:1)" in text, text
    shape = ", ".join(map(str, host[moved].shape))
    assert f"{name}=cupy.ndarray({shape}{',' if host[moved].ndim == 1 else ''}) {host[moved].dtype} on cuda:1" in text, text
    assert "on cuda:0" in text, text
    assert not fake_cupy.launches and not fake_cupy.allocations


# --------------------------------------------------------------------------------------------
# On real GPUs
# --------------------------------------------------------------------------------------------


def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any failure to ask means no GPU
        return 0


PUBLIC = {
    "linear_relu_forward": kernels.linear_relu_forward, "linear_relu_backward": kernels.linear_relu_backward,
    "softmax_cross_entropy": kernels.softmax_cross_entropy, "adam_step": kernels.adam_step,
    "sgd_step": kernels.sgd_step, "adagrad_step": kernels.adagrad_step, "rmsprop_step": kernels.rmsprop_step,
}


@pytest.mark.gpu
@pytest.mark.parametrize("call", CALLS)
def test_cupy_wrapper_on_cuda1_while_device0_is_current(call):
    if _gpu_count() < 2:
        pytest.skip(f"needs two GPUs to put inputs on cuda:1; this machine has {_gpu_count()}")
    import cupy

    _, host, kw = _calls(np.random.default_rng(2))[call]
    public = PUBLIC[call.split("-")[0]]
    expected_args = [None if a is None else a.copy() for a in host]
    expected = public(*expected_args, **kw, impl="numpy")
    with cupy.cuda.Device(1):
        args = [None if a is None else cupy.asarray(a) for a in host]
    with cupy.cuda.Device(0):
        result = public(*args, **kw, impl="cupy")
        assert cupy.cuda.runtime.getDevice() == 0
    cupy.cuda.Device(1).synchronize()
    outputs = _flat(result) if result is not None else [a for a in args if a is not None]
    assert all(out.device.id == 1 for out in outputs)
    got = [cupy.asnumpy(r) for r in _flat(result)] if result is not None else [cupy.asnumpy(a) for a in args if a is not None]
    want = _flat(expected) if result is not None else [a for a in expected_args if a is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)

"""kernels/numba_cuda/launch.py without a GPU: a fake cupy (tests/kernels/fake_cupy.py) and a fake
numba.cuda record what a launch does with streams, devices and the arrays' synchronization.

The GPU suite checks the same on a device: tests/test_host_syncs.py (no wait for the device in a
step) and the numba_cuda kernel tests.
"""

import contextlib
import types

import numpy as np
import pytest

from engine.kernels.numba_cuda import launch as launch_module
from tests.kernels.fake_cupy import fake_cupy  # noqa: F401  (fixture)


class FakeNumbaCuda:
    """Just what launch.py calls on ``numba.cuda``, recording each call."""

    def __init__(self):
        self.wrapped = []  # (array, sync) per from_cuda_array_interface call
        self.external = []  # stream pointers wrapped
        self.entered = []  # devices entered through cuda.gpus[i]
        self.current = 0
        self.default = types.SimpleNamespace(name="default stream")
        fake = self

        class Gpus:
            def __getitem__(self, index):
                @contextlib.contextmanager
                def context():
                    fake.entered.append(index)
                    previous, fake.current = fake.current, index
                    yield
                    fake.current = previous
                return context()

        self.gpus = Gpus()

    def from_cuda_array_interface(self, desc, owner=None, sync=True):
        self.wrapped.append((owner, sync))
        return types.SimpleNamespace(wrapped=owner)

    def default_stream(self):
        return self.default

    def external_stream(self, ptr):
        self.external.append(ptr)
        return types.SimpleNamespace(name=f"external {ptr}")

    def get_current_device(self):
        return types.SimpleNamespace(id=self.current)


class FakeKernel:
    def __init__(self):
        self.launches = []

    def __getitem__(self, config):
        def run(*args):
            self.launches.append((config, args))
        return run


@pytest.fixture
def numba_cuda(monkeypatch, fake_cupy):  # noqa: F811
    fake = FakeNumbaCuda()
    monkeypatch.setattr(launch_module, "cuda", fake)
    monkeypatch.setattr(launch_module, "simulator", lambda: False)
    launch_module.numba_stream.cache_clear()
    yield fake
    launch_module.numba_stream.cache_clear()


def test_cupy_arrays_are_wrapped_without_a_sync_and_launched_on_cupys_stream(numba_cuda, fake_cupy):  # noqa: F811
    a, b = fake_cupy.on(0, np.ones(4, np.float32)), fake_cupy.on(0, np.zeros(4, np.float32))
    kernel = FakeKernel()
    launch_module.launch(kernel, 2, 32, (a, np.float32(1.5), b))
    (config, args), = kernel.launches
    assert config[:2] == (2, 32) and config[2] is numba_cuda.default  # cupy's stream 0 = legacy default
    assert [sync for _, sync in numba_cuda.wrapped] == [False, False]
    assert args[0].wrapped is a and args[2].wrapped is b and args[1] == np.float32(1.5)


def test_a_non_default_cupy_stream_is_wrapped_once(numba_cuda, fake_cupy, monkeypatch):  # noqa: F811
    stream = types.SimpleNamespace(ptr=0xABC0)
    monkeypatch.setattr(fake_cupy.cuda, "get_current_stream", lambda: stream)
    a = fake_cupy.on(0, np.ones(4, np.float32))
    kernel = FakeKernel()
    for _ in range(3):
        launch_module.launch(kernel, 1, 32, (a,))
    assert numba_cuda.external == [0xABC0]  # cached per (device, pointer)
    assert all(config[2].name == "external 43968" for config, _ in kernel.launches)


def test_the_launch_runs_on_the_inputs_device_not_the_current_one(numba_cuda, fake_cupy):  # noqa: F811
    a = fake_cupy.on(1, np.ones(4, np.float32))
    seen = []
    launch_module.launch(_Recording(FakeKernel(), seen, fake_cupy, numba_cuda), 1, 32, (a,))
    assert seen == [(1, 1)]  # cupy and numba both on device 1 at the launch
    assert fake_cupy.current == 0 and numba_cuda.current == 0  # and back afterwards
    assert numba_cuda.entered == [1]


class _Recording:
    """A kernel that records the current cupy and numba devices when it is configured."""

    def __init__(self, kernel, seen, fake_cupy, numba_cuda):  # noqa: F811
        self.kernel, self.seen, self.cupy, self.numba = kernel, seen, fake_cupy, numba_cuda

    def __getitem__(self, config):
        self.seen.append((self.cupy.current, self.numba.current))
        return self.kernel[config]


def test_numpy_arguments_launch_as_they_are(numba_cuda):
    kernel = FakeKernel()
    host = np.ones(3)
    launch_module.launch(kernel, 1, 8, (host,))
    (config, args), = kernel.launches
    assert config == (1, 8) and args[0] is host and numba_cuda.wrapped == []

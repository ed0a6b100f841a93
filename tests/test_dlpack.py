"""DLPack and the CUDA array interface: arrays in and out of the engine without copies.

torch (CPU) and numpy are the consumers and producers on the CPU; the CUDA side is checked with
a fake cupy (what is forwarded to cupy: the consumer's stream, the device), and for real in the
GPU run (``-m gpu``).
"""

import types

import numpy as np
import pytest

import engine
from engine import backend, dlpack
from engine.errors import DeviceError, DTypeError, GradError

torch = pytest.importorskip("torch")

DTYPES = [("float32", torch.float32), ("float64", torch.float64), ("float16", torch.float16),
          ("bfloat16", torch.bfloat16), ("int64", torch.int64), ("int32", torch.int32), ("int8", torch.int8),
          ("uint8", torch.uint8), ("bool", torch.bool)]


def _engine_tensor(name, shape=(3, 4)):
    values = np.random.default_rng(0).normal(size=shape) * 10
    return engine.tensor(values).to(getattr(engine, name if name != "bool" else "bool_"))


def _ptr(t) -> int:
    return t._data.__array_interface__["data"][0]


@pytest.mark.parametrize("name,torch_dtype", DTYPES)
def test_engine_to_torch_shares_memory_and_dtype(name, torch_dtype):
    t = _engine_tensor(name)
    out = torch.from_dlpack(t)
    assert out.dtype == torch_dtype and tuple(out.shape) == t.shape
    assert out.data_ptr() == _ptr(t)  # zero-copy
    np.testing.assert_array_equal(out.float().numpy(), t.float().numpy())
    assert torch.as_tensor(t).data_ptr() == _ptr(t)


@pytest.mark.parametrize("name,torch_dtype", DTYPES)
def test_torch_to_engine_shares_memory_and_dtype(name, torch_dtype):
    source = (torch.randn(3, 4, dtype=torch.float64) * 10).to(torch_dtype)
    t = engine.from_dlpack(source)
    assert str(t.dtype) == name and t.shape == (3, 4)
    assert _ptr(t) == source.data_ptr()
    np.testing.assert_array_equal(t.float().numpy(), source.float().numpy())


def test_writes_show_on_both_sides():
    t = engine.zeros(2, 3)
    torch.from_dlpack(t)[0, 1] = 7.0
    assert t[0, 1].item() == 7.0
    source = torch.zeros(4, dtype=torch.bfloat16)
    shared = engine.from_dlpack(source)
    source[2] = 1.5
    assert shared[2].item() == 1.5


def test_numpy_round_trips():
    t = engine.arange(6.0).reshape(2, 3)
    for array in (np.from_dlpack(t), np.asarray(t)):
        assert array.__array_interface__["data"][0] == _ptr(t)
        np.testing.assert_array_equal(array, t.numpy())
    back = engine.from_dlpack(np.arange(5, dtype=np.int16))
    assert back.dtype == np.int16 and back.tolist() == [0, 1, 2, 3, 4]
    assert engine.from_dlpack(t).tolist() == t.tolist()  # an engine Tensor is a producer too


def test_non_contiguous_zero_d_and_empty():
    source = torch.arange(12.0).reshape(3, 4).t()
    t = engine.from_dlpack(source)
    np.testing.assert_array_equal(t.numpy(), source.numpy())
    assert engine.from_dlpack(torch.tensor(2.5)).item() == 2.5
    assert torch.as_tensor(engine.tensor(3.0)).item() == 3.0  # 0-d: the issue's `len() of a 0-d tensor`
    assert engine.from_dlpack(torch.zeros(0, 3)).shape == (0, 3)
    strided = engine.arange(12.0).reshape(3, 4)[:, 1::2]
    np.testing.assert_array_equal(torch.from_dlpack(strided).numpy(), strided.numpy())


def test_capsule_and_legacy_to_dlpack():
    capsule = torch.utils.dlpack.to_dlpack(torch.arange(3, dtype=torch.bfloat16))
    t = engine.from_dlpack(capsule)
    assert t.dtype == engine.bfloat16 and t.float().tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(Exception, match="consumed|dltensor"):
        engine.from_dlpack(capsule)  # a capsule is consumed once


def test_from_dlpack_copy_and_device():
    source = torch.arange(4.0)
    copied = engine.from_dlpack(source, copy=True)
    source[0] = 9.0
    assert copied[0].item() == 0.0
    assert engine.from_dlpack(source, device="cpu", copy=False)[0].item() == 9.0
    with pytest.raises(TypeError, match="__dlpack__"):
        engine.from_dlpack([1, 2, 3])


def test_export_refuses_grad_and_guards_saved_memory():
    w = engine.ones(3, requires_grad=True)
    with pytest.raises(GradError, match="requires grad"):
        torch.from_dlpack(w)
    assert torch.from_dlpack(w.detach()).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(GradError, match=r"torch.Tensor requires grad; pass x.detach\(\)"):
        engine.from_dlpack(torch.ones(2, requires_grad=True))
    x = engine.ones(3)
    y = (w * x).sum()  # x is kept for backward: an export must not let a consumer overwrite it
    assert not np.from_dlpack(x).flags.writeable
    y.backward()
    assert np.from_dlpack(x).flags.writeable


def test_engine_tensor_as_tensor_and_state_dict_take_torch_tensors():
    source = torch.randn(3, 2, requires_grad=True)  # detached on the way in, as the values are what counts
    copied = engine.tensor(source)
    assert not copied.requires_grad and _ptr(copied) != source.data_ptr()
    np.testing.assert_array_equal(copied.numpy(), source.detach().numpy())
    shared = engine.as_tensor(source.detach())
    assert _ptr(shared) == source.data_ptr()
    assert engine.as_tensor(shared) is shared
    assert engine.as_tensor(shared, dtype=engine.float64).dtype == np.float64
    assert engine.as_tensor([1.0, 2.0]).dtype == np.float32
    assert engine.tensor(torch.ones(2, dtype=torch.bfloat16)).dtype == engine.bfloat16


def test_load_state_dict_from_a_torch_module():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.GELU(),
                                    torch.nn.Linear(8, 3))
    model = engine.nn.Sequential(engine.nn.Linear(5, 8), engine.nn.LayerNorm(8), engine.nn.GELU(),
                                 engine.nn.Linear(8, 3))
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 5)
    np.testing.assert_allclose(model(engine.tensor(x)).detach().numpy(), reference(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    wrong = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.LayerNorm(9), torch.nn.GELU(), torch.nn.Linear(9, 3))
    with pytest.raises(engine.ShapeError, match=r"'0.weight'.*\(9, 5\).*\(8, 5\)"):
        model.load_state_dict(wrong.state_dict())


def test_cuda_array_interface_absent_on_cpu():
    t = engine.ones(2)
    assert not hasattr(t, "__cuda_array_interface__")
    assert t.__dlpack_device__() == (dlpack.KDL_CPU, 0)


# ---- the CUDA side, with a fake cupy --------------------------------------------------------------

class _FakeCudaArray:
    """A host array standing for a cupy array on cuda:1: records the stream each export was given."""

    __module__ = "cupy._core.core"

    def __init__(self, host, log):
        self.host, self.log = host, log
        self.shape, self.dtype, self.ndim, self.size = host.shape, host.dtype, host.ndim, host.size
        self.device = types.SimpleNamespace(id=1)

    def view(self, dtype):
        return _FakeCudaArray(self.host.view(dtype), self.log)

    def __dlpack__(self, stream=None, **kwargs):
        self.log.append(("export", stream, kwargs))
        return self.host.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (dlpack.KDL_CUDA, 1)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (1234, False), "version": 3,
                "strides": None, "stream": 1}


@pytest.fixture
def fake_cuda(monkeypatch):
    log = []

    class _Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            log.append(("device", self.index))

        def __exit__(self, *exc):
            return False

    def from_dlpack(producer):
        log.append(("consume", producer.__dlpack_device__()))
        # cupy hands the producer its current stream (here: a made-up stream pointer)
        return _FakeCudaArray(np.from_dlpack(_HostView(producer, stream=0xABC)), log)

    fake = types.SimpleNamespace(from_dlpack=from_dlpack, cuda=types.SimpleNamespace(Device=_Device))
    monkeypatch.setattr(backend, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(backend, "xp_for", lambda dev: np if dev.type == "cpu" else fake)
    return log


class _HostView:
    """What the fake cupy reads a producer through: calls its __dlpack__ with cupy's stream."""

    def __init__(self, producer, stream):
        self.producer, self.stream = producer, stream

    def __dlpack__(self, **kwargs):
        return self.producer.__dlpack__(stream=self.stream)

    def __dlpack_device__(self):
        return (dlpack.KDL_CPU, 0)


def test_cuda_export_forwards_the_consumers_stream(fake_cuda):
    t = engine.Tensor(_FakeCudaArray(np.arange(4, dtype=np.float32), fake_cuda))
    assert t.device == engine.device("cuda:1")
    assert t.__dlpack_device__() == (dlpack.KDL_CUDA, 1)
    np.from_dlpack(_HostView(t, stream=0x5EED))
    assert fake_cuda[-1] == ("export", 0x5EED, {})
    interface = t.__cuda_array_interface__
    assert interface["version"] == 3 and interface["shape"] == (4,)
    with pytest.raises(GradError, match="requires grad"):
        _ = engine.Tensor(_FakeCudaArray(np.ones(2, np.float32), fake_cuda), requires_grad=True).__cuda_array_interface__


def test_cuda_import_goes_through_cupy_on_the_producers_device(fake_cuda):
    producer = _FakeCudaArray(np.arange(3, dtype=np.float32), fake_cuda)
    t = engine.from_dlpack(producer)
    assert ("device", 1) in fake_cuda and ("consume", (dlpack.KDL_CUDA, 1)) in fake_cuda
    assert ("export", 0xABC, {}) in fake_cuda  # cupy's current stream reached the producer
    assert t.device == engine.device("cuda:1")


def test_cuda_import_bfloat16_is_relabelled(fake_cuda):
    bits = np.array([1.0, -2.0], dtype=engine.bfloat16)

    class _Bf16Producer(_FakeCudaArray):
        def __dlpack__(self, stream=None, **kwargs):
            fake_cuda.append(("export", stream, kwargs))
            return torch.utils.dlpack.to_dlpack(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))

    t = engine.from_dlpack(_Bf16Producer(bits.view(np.uint16), fake_cuda))
    assert t.dtype == engine.bfloat16 and t._data.host.astype(np.float32).tolist() == [1.0, -2.0]


def test_unknown_device_and_dtype_are_clear_errors():
    class _OnMetal:
        def __dlpack__(self, **kwargs):
            raise AssertionError("not reached")

        def __dlpack_device__(self):
            return (8, 0)  # kDLMetal

    with pytest.raises(DeviceError, match="device type 8"):
        engine.from_dlpack(_OnMetal())
    with pytest.raises(DTypeError, match="cannot share"):
        engine.from_dlpack(torch.ones(2).to(torch.float8_e4m3fn))


# ---- the GPU run ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_round_trips_with_cupy_and_torch():
    cupy = pytest.importorskip("cupy")
    t = engine.arange(8.0, device="cuda").reshape(2, 4)
    shared = cupy.from_dlpack(t)
    assert shared.data.ptr == t._data.data.ptr
    assert cupy.asarray(t).data.ptr == t._data.data.ptr  # through __cuda_array_interface__
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:  # written on a side stream; the consumer on the default stream must see it
        t._data[...] = cupy.arange(8, dtype=cupy.float32).reshape(2, 4) * 2
        back = engine.from_dlpack(t._data)
    np.testing.assert_array_equal(back.numpy(), np.arange(8).reshape(2, 4) * 2)
    if torch.cuda.is_available():
        out = torch.from_dlpack(t)
        assert out.device.type == "cuda" and out.data_ptr() == t._data.data.ptr
        b = engine.from_dlpack(torch.ones(3, device="cuda", dtype=torch.bfloat16))
        assert b.dtype == engine.bfloat16 and b.device.type == "cuda"

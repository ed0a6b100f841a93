"""engine.cuda's device queries, streams, events and memory statistics: without CUDA (the answers
PyTorch gives without CUDA, clear errors for the rest) and on the fake GPU of tests/cuda/fake_capture.py."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import backend
from tests.cuda.fake_capture import FakeCupy, fake_gpu  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
no_cuda = pytest.mark.skipif(engine.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.slow
def test_engine_cuda_is_a_package_whose_import_does_not_import_cupy():
    code = ("import sys, engine, engine.cuda, engine.cuda.amp, engine.backends.cudnn, engine.cpu.amp; "
            "print(engine.cuda.__file__); print('cupy' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    path, cupy_imported = run.stdout.split()
    assert Path(path) == ROOT / "engine" / "cuda" / "__init__.py" and cupy_imported == "False"


@no_cuda
@pytest.mark.slow
def test_without_cuda_the_queries_answer_as_pytorch_does():
    torch = pytest.importorskip("torch")
    assert engine.cuda.is_available() is torch.cuda.is_available() is False
    assert engine.cuda.device_count() == torch.cuda.device_count() == 0
    assert engine.cuda.memory_allocated() == torch.cuda.memory_allocated() == 0
    assert engine.cuda.max_memory_allocated() == torch.cuda.max_memory_allocated() == 0
    assert engine.cuda.memory_reserved() == torch.cuda.memory_reserved() == 0
    assert engine.cuda.memory_stats() == dict(torch.cuda.memory_stats()) == {}
    assert engine.cuda.is_initialized() is torch.cuda.is_initialized() is False
    assert engine.cuda.is_bf16_supported() is False
    engine.cuda.empty_cache()  # nothing to free: no error, as in PyTorch
    engine.cuda.manual_seed(1)
    engine.cuda.manual_seed_all(1)
    with engine.cuda.stream(None):  # a None stream is no change, as in PyTorch
        pass


@no_cuda
@pytest.mark.parametrize("call, name", [
    (lambda: engine.cuda.current_device(), "current_device"), (lambda: engine.cuda.synchronize(), "synchronize"),
    (lambda: engine.cuda.set_device(0), "set_device"), (lambda: engine.cuda.get_device_name(), "get_device_name"),
    (lambda: engine.cuda.get_device_capability(), "get_device_capability"),
    (lambda: engine.cuda.mem_get_info(), "mem_get_info"), (lambda: engine.cuda.Event(), "Event"),
    (lambda: engine.cuda.Stream(), "Stream"), (lambda: engine.cuda.current_stream(), "current_stream"),
    (lambda: engine.cuda.default_stream(), "default_stream"),
    (lambda: engine.cuda.reset_peak_memory_stats(), "reset_peak_memory_stats"),
    (lambda: engine.cuda.CUDAGraph(), "CUDAGraph")])
def test_without_cuda_gpu_only_calls_raise_naming_the_call_and_device(call, name):
    with pytest.raises(engine.DeviceError, match=rf"^engine\.cuda\.{name}: needs a CUDA device \(cuda:0\), but CUDA "
                                                 "is not available here"):
        call()


def test_bad_device_arguments_are_clear_errors():
    with pytest.raises(engine.DeviceError, match="expected a CUDA device, got cpu"):
        engine.cuda.synchronize("cpu")
    with pytest.raises(engine.DeviceError, match="expected a CUDA device"):
        engine.cuda.memory_allocated(1.5)


# ---- on the fake GPU -----------------------------------------------------------------------------

def test_device_queries(fake_gpu):
    assert engine.cuda.is_available() and engine.cuda.device_count() == 1
    assert engine.cuda.current_device() == 0
    assert engine.cuda.get_device_name() == "Fake GPU" and engine.cuda.get_device_capability() == (9, 0)
    props = engine.cuda.get_device_properties(0)
    assert props.total_memory == 80 << 30 and props.multi_processor_count == 132
    assert engine.cuda.mem_get_info() == (70 << 30, 80 << 30)
    assert engine.cuda.is_bf16_supported()
    with pytest.raises(engine.DeviceError, match=r"device cuda:3 does not exist; this machine has 1 CUDA device"):
        engine.cuda.synchronize(3)


def test_set_device_makes_cuda_mean_that_device(monkeypatch):
    fake = FakeCupy(device_count=2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(backend, "_cupy_state", {"module": None, "tracker": None})
    try:
        engine.cuda.set_device(1)
        assert engine.cuda.current_device() == 1 and fake.current_device == 1
        assert engine.device("cuda") == engine.device("cuda:1")
        assert engine.zeros(2, device="cuda").device == engine.device("cuda:1")
        with engine.cuda.device(0):
            assert engine.device("cuda") == engine.device("cuda:0") and fake.current_device == 0
        assert engine.cuda.current_device() == 1
    finally:
        backend.set_current_cuda_index(0)


def test_manual_seed_reseeds_the_cuda_generator_alone(fake_gpu, monkeypatch):
    seeded = []
    monkeypatch.setattr(backend, "seed_device", lambda dev, seed: seeded.append((str(dev), seed)))
    engine.cuda.manual_seed(7)
    engine.cuda.manual_seed_all(8)
    assert seeded == [("cuda:0", 7), ("cuda:0", 8)]


def test_streams_and_the_stream_context(fake_gpu):
    s = engine.cuda.Stream()
    assert engine.cuda.current_stream() == engine.cuda.default_stream() != s
    assert engine.cuda.default_stream().cuda_stream == 0
    with engine.cuda.stream(s) as entered:
        assert entered is s and engine.cuda.current_stream() == s
        event = s.record_event()
    assert engine.cuda.current_stream() == engine.cuda.default_stream()
    other = engine.cuda.Stream(priority=-1)
    other.wait_event(event)
    other.wait_stream(s)
    assert other.query() is True
    other.synchronize()
    with pytest.raises(engine.EngineError, match="expected an engine.cuda.Stream or None"):
        engine.cuda.stream("side")


def test_events_time_gpu_work(fake_gpu):
    start, end = engine.cuda.Event(enable_timing=True), engine.cuda.Event(enable_timing=True)
    with pytest.raises(engine.EngineError, match="the start event was never recorded"):
        start.elapsed_time(end)
    s = engine.cuda.Stream()
    with engine.cuda.stream(s):
        start.record()  # on the current stream (cupy's own default would be the null stream)
    assert start._cupy_event.stream is s._cupy_stream
    end.record()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) > 0
    untimed = engine.cuda.Event()
    untimed.record()
    with pytest.raises(engine.EngineError, match="the end event was created without enable_timing=True"):
        start.elapsed_time(untimed)


def test_memory_statistics_follow_the_default_pool(fake_gpu):
    pool = fake_gpu.get_default_memory_pool()
    engine.cuda.reset_peak_memory_stats()
    base = engine.cuda.memory_allocated()
    a = engine.zeros(1000, device="cuda")  # 4000 bytes
    assert engine.cuda.memory_allocated() == base + 4000 == pool.used_bytes()
    b = engine.zeros(500, device="cuda")
    peak = engine.cuda.memory_allocated()
    del a, b
    assert engine.cuda.memory_allocated() == base
    assert engine.cuda.max_memory_allocated() == peak, "the peak was kept after the frees"
    assert engine.cuda.memory_reserved() >= peak  # the freed blocks stay cached...
    engine.cuda.empty_cache()
    assert engine.cuda.memory_reserved() == engine.cuda.memory_allocated()  # ...until empty_cache
    engine.cuda.reset_peak_memory_stats()
    assert engine.cuda.max_memory_allocated() == base
    stats = engine.cuda.memory_stats()
    assert stats["allocated_bytes.all.current"] == base and stats["allocated_bytes.all.peak"] == base
    assert engine.cuda.is_initialized()


def test_a_program_allocator_is_left_alone_and_the_peak_is_refused(fake_gpu):
    mine = fake_gpu.get_default_memory_pool().malloc
    fake_gpu.cuda.set_allocator(lambda size: mine(size))
    kept = engine.zeros(3, device="cuda")
    assert backend.default_pool_tracker() is None and kept.numel() == 3
    assert engine.cuda.memory_allocated() == 12
    with pytest.raises(engine.EngineError, match="installed its own cupy allocator"):
        engine.cuda.max_memory_allocated()


def test_a_gpu_scalar_operand_is_filled_on_the_device_not_copied(fake_gpu, monkeypatch):
    x = engine.tensor(np.ones(3, np.float32), device="cuda")
    copies = []
    monkeypatch.setattr(fake_gpu, "asarray", lambda *a, **k: copies.append(a))
    y = x * 2.5 + 1
    np.testing.assert_allclose(y._data.host, [3.5, 3.5, 3.5])
    assert copies == [] and y.dtype == np.float32


def test_amp_spellings_are_the_autocast_of_their_device():
    import engine.cpu.amp
    import engine.cuda.amp

    with pytest.warns(FutureWarning, match=r"engine\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"):
        assert engine.cuda.amp.autocast().device_type == "cuda"
    with pytest.warns(FutureWarning):
        assert engine.cpu.amp.autocast().device_type == "cpu"


def test_backends_flags():
    import engine.backends.cudnn
    import engine.backends.mps

    assert engine.backends.mps.is_available() is False and engine.backends.cudnn.is_available() is False
    assert engine.backends.cudnn.version() is None
    engine.backends.cudnn.benchmark = True
    assert engine.backends.cudnn.benchmark is True
    engine.backends.cudnn.benchmark = False

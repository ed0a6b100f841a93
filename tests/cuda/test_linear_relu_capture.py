"""The cupy linear_relu, direct cuBLAS GEMMs included, captured on the fake stream-capture layer.

cupy 14's own cuBLAS binding refuses every call while a stream captures; kernels/cuda/gemm.py
calls libcublas directly so that a captured step can hold the linear layers' GEMMs. Here the
fake cuBLAS (tests/kernels/fake_cublas.py) runs on the capture layer's memory (tests/cuda/
fake_capture.py): at capture it computes at once and records a step that recomputes into the same
memory, as a GPU graph node would, so a replay after new inputs are written must give the new
results. The linear_relu.cu launches run as NumPy transcriptions recorded the same way.
"""

import numpy as np

from engine import kernels
from tests.cuda.fake_capture import fake_gpu  # noqa: F401 - the fixture
from tests.kernels.fake_cublas import FakeCublas


def _install(monkeypatch, fake) -> FakeCublas:
    """The fake cuBLAS over ``fake``'s allocations (the fixture's); the fixture also runs the
    linear_relu kernels as recorded operations (fake_capture.install_linear_relu_kernels)."""
    return fake.cublas


def _case(rng, n=37, k=70, m=33):
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    b, dy = rng.standard_normal(m).astype(np.float32), rng.standard_normal((n, m)).astype(np.float32)
    return x, w, b, dy


def test_a_captured_forward_and_backward_replays_with_new_inputs(fake_gpu, monkeypatch):  # noqa: F811
    fake = fake_gpu
    cublas = _install(monkeypatch, fake)
    rng = np.random.default_rng(0)
    x, w, b, dy = _case(rng)
    X, W, B, DY = (fake.asarray(a) for a in (x, w, b, dy))
    forward, backward = kernels.get("linear_relu_forward", "cupy"), kernels.get("linear_relu_backward", "cupy")
    pool, stream = fake.cuda.MemoryPool(), fake.cuda.Stream(non_blocking=True)
    default_mallocs = fake.default_pool.mallocs
    with stream, fake.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        y = forward(X, W, B)
        dx, dw, db = backward(DY, X, W, y)
        graph = stream.end_capture()
    assert len(cublas.calls) == 3 and {c.stream for c in cublas.calls} == {stream.ptr}
    assert fake.host_reads == 0 and fake.syncs == 0, "a host read or a wait inside the capture"
    assert fake.default_pool.mallocs == default_mallocs and pool.mallocs > 0, "allocated outside the graph's pool"
    assert np.isnan(y.host).all(), "a capture runs nothing: its outputs hold garbage until a replay"
    for step in range(2):
        x2, _, _, dy2 = _case(rng)
        X.host[...], DY.host[...] = x2, dy2  # new data into the static inputs, as copy_() would
        graph.launch()
        y_ref = kernels.get("linear_relu_forward", "numpy")(x2, w, b)
        np.testing.assert_allclose(y.host, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"replay {step}: y")
        for name, got, ref in zip(("dx", "dW", "db"), (dx, dw, db),
                                  kernels.get("linear_relu_backward", "numpy")(dy2, x2, w, y_ref)):
            np.testing.assert_allclose(got.host, ref, rtol=1e-4, atol=1e-4, err_msg=f"replay {step}: {name}")
    assert len(cublas.calls) == 3, "a replay calls nothing on the host"

"""Captured steps whose models multiply matrices: nn.Linear, matmul with a shared weight, bmm, conv2d,
unfused attention, a GRU, a small GPT, a Trainer(cuda_graph=True), on the fake stream-capture layer.

cupy 14 refuses every call of its own cuBLAS binding while a stream captures (``cupy.matmul``,
``@``, ``dot``, ``einsum`` ... raise NotImplementedError), and tests/cuda/fake_capture.py refuses
them the same way: before the engine sent its GEMMs on GPU arrays through kernels/cuda/gemm.py
(libcublas called directly), capturing any of these steps raised there. Here each step is
captured once and replayed with new inputs; every replay must give the loss and the gradients
that the numpy path gives for the same inputs and weights, with no cupy cuBLAS call and every
cuBLAS GEMM issued on the capture stream with the engine's workspace set. The ``gpu`` test at
the end does the same on a real GPU.
"""

import copy

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import nn, optim
from engine.examples.gpt import GPT, lm_loss
from engine.train import Trainer
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)


class _SharedWeight(nn.Module):
    """``x @ W`` (a 2-D weight broadcast over the batch) and ``bmm(y, y^T)``: a batched GEMM each way."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(engine.randn(6, 4))

    def forward(self, x):
        y = x @ self.weight
        return engine.bmm(y, y.transpose(1, 2)).tanh()


class _Attention(nn.Module):
    """Projections and the unfused scaled-dot-product attention (matmul, softmax, matmul)."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (h.reshape(b, t, 2, d // 2).transpose(1, 2) for h in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, fused=False)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), (4, 5, 6)),
    "matmul-bmm": (_SharedWeight, (3, 5, 6)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                                     nn.Flatten(), nn.Linear(36, 2)), (2, 3, 8, 8)),
    "attention-unfused": (_Attention, (2, 5, 8)),
    "gru": (_GRU, (3, 4, 4)),
}


def _host(t):
    return t._data.host.copy()


def _replays_match_the_numpy_path(graph, static_x, static_loss, model, reference, rng, shape, host, *,
                                  loss_rtol, rtol, atol):
    """Three replays with new inputs copied into ``static_x``: each gives the loss ``mean(model(x) ** 2)``
    and the gradients that ``reference`` (the same weights on the CPU) gives for that x."""
    for step in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        static_x.copy_(engine.tensor(x, device="cuda"))
        graph.replay()
        reference.zero_grad()
        loss = (reference(engine.tensor(x)) ** 2).mean()
        loss.backward()
        np.testing.assert_allclose(host(static_loss), loss.item(), rtol=loss_rtol, err_msg=f"replay {step}: loss")
        for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
            np.testing.assert_allclose(host(p.grad), q.grad.numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"replay {step}: {pname}.grad")


@pytest.mark.parametrize("name", list(MODELS))
def test_a_captured_forward_and_backward_replays_as_the_numpy_path(fake_gpu, name):
    make, shape = MODELS[name]
    engine.manual_seed(0)
    reference = make()
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(1)
    static_x = engine.tensor(rng.standard_normal(shape).astype(np.float32), device="cuda")
    graph = engine.cuda.CUDAGraph()
    with engine.cuda.graph(graph):
        static_loss = (model(static_x) ** 2).mean()
        static_loss.backward()
        capture_stream = fake_gpu.get_current_stream().ptr
    assert fake_gpu.cupy_cublas_calls == [], "cupy's own cuBLAS binding was called"
    calls = list(fake_gpu.cublas.calls)
    assert calls and {c.stream for c in calls} == {capture_stream}
    assert all(c.workspace is not None for c in calls), "a captured GEMM without the engine's cuBLAS workspace"
    _replays_match_the_numpy_path(graph, static_x, static_loss, model, reference, rng, shape, _host,
                                  loss_rtol=1e-5, rtol=1e-4, atol=1e-6)
    assert len(fake_gpu.cublas.calls) == len(calls), "a replay calls nothing on the host"


def test_clip_grad_norm_captures_its_dot_product(fake_gpu):
    """clip_grad_norm_'s 2-norm of a flat gradient was ``cupy.vdot`` (cupy's cuBLAS): now a 1-D GEMM."""
    engine.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(4)
    static_x = engine.tensor(rng.standard_normal((7, 6)).astype(np.float32), device="cuda")
    graph = engine.cuda.CUDAGraph()
    with engine.cuda.graph(graph):
        (model(static_x) ** 2).sum().backward()
        static_norm = nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert fake_gpu.cupy_cublas_calls == []
    x = rng.standard_normal((7, 6)).astype(np.float32)
    static_x.copy_(engine.tensor(x, device="cuda"))
    graph.replay()
    (reference(engine.tensor(x)) ** 2).sum().backward()
    norm = nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    np.testing.assert_allclose(_host(static_norm), norm.item(), rtol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(_host(p.grad), q.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_a_small_gpt_step_captures_and_replays_as_the_numpy_path(fake_gpu):
    """Embeddings, layer norms, attention, the MLP and the weight-tied head; the composites run (the fused
    kernels need a GPU), so every product is a GEMM of the engine's entry."""
    engine.manual_seed(0)
    reference = GPT(11, 8, d_model=16, n_layers=2, n_heads=2)
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(3)
    static_ids, static_targets = (engine.tensor(rng.integers(0, 11, (2, 8)), device="cuda") for _ in range(2))
    graph = engine.cuda.CUDAGraph()
    with F.fused_kernels(False):
        with engine.cuda.graph(graph):
            static_loss = lm_loss(model(static_ids), static_targets)
            static_loss.backward()
        assert fake_gpu.cupy_cublas_calls == [] and fake_gpu.cublas.calls
        for step in range(2):
            ids, targets = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
            static_ids.copy_(engine.tensor(ids, device="cuda"))
            static_targets.copy_(engine.tensor(targets, device="cuda"))
            graph.replay()
            reference.zero_grad()
            loss = lm_loss(reference(engine.tensor(ids)), engine.tensor(targets))
            loss.backward()
            np.testing.assert_allclose(_host(static_loss), loss.item(), rtol=1e-5, err_msg=f"replay {step}: loss")
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                np.testing.assert_allclose(_host(p.grad), q.grad.numpy(), rtol=1e-4, atol=1e-6,
                                           err_msg=f"replay {step}: {name}.grad")


def test_a_trainer_with_cuda_graph_trains_an_mlp_as_the_eager_trainer(fake_gpu):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 5)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((5, 2))).astype(np.float32)
    histories, models, launches = [], [], []
    for cuda_graph in (True, False):
        engine.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2)).to("cuda")
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, capturable=True, fused=False)
        trainer = Trainer(model, opt, loss_fn=F.mse_loss, metrics=("mse",), verbose=0,
                          cuda_graph=cuda_graph, cuda_graph_warmup=1)
        before = fake_gpu.launches
        histories.append(trainer.fit((x, y), epochs=3, batch_size=8, shuffle=False))
        models.append(model)
        launches.append(fake_gpu.launches - before)
    assert launches == [3 * 4 - 1, 0], "the graphed trainer replays its step after one warm-up step"
    assert fake_gpu.cupy_cublas_calls == []
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-6)
    assert histories[0]["loss"][-1] < histories[0]["loss"][0]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_allclose(_host(p), _host(q), rtol=1e-6, atol=1e-7)


# ---- on a real GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_on_the_gpu_a_captured_step_replays_as_the_numpy_path(name):
    if not engine.cuda.is_available():
        pytest.skip("no CUDA device")
    make, shape = MODELS[name]
    engine.manual_seed(0)
    reference = make()
    model = copy.deepcopy(reference).to("cuda")
    rng = np.random.default_rng(1)
    static_x = engine.tensor(rng.standard_normal(shape).astype(np.float32), device="cuda")
    for _ in range(2):  # warm-up: kernels compiled, cuBLAS handle and workspace made outside the capture
        (model(static_x) ** 2).mean().backward()
    model.zero_grad(set_to_none=True)
    graph = engine.cuda.CUDAGraph()
    with engine.cuda.graph(graph):
        static_loss = (model(static_x) ** 2).mean()
        static_loss.backward()
    _replays_match_the_numpy_path(graph, static_x, static_loss, model, reference, rng, shape, lambda t: t.numpy(),
                                  loss_rtol=1e-4, rtol=1e-3, atol=1e-5)

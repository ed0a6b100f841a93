"""One GPT decode step with a static KV cache, captured in a CUDA graph and replayed per token, on the
fake stream-capture layer (tests/cuda/fake_capture.py; a ``gpu`` test does the same on a GPU).

The step reads the new id from a static input tensor and its position from the cache's device
tensor, writes the keys and values in place (``index_copy_``) and advances the position: every
replay has the same shapes and no host read. Each replay, at the next position or at a position
set by ``position.fill_(p)``, must give the logits that the eager numpy path gives for the same
text, and a replay must allocate nothing and call nothing on the host.
"""

import contextlib
import copy
import types

import numpy as np
import pytest

import engine
import engine.functional as F
from bench import gpt_decode
from engine.examples.gpt import GPT, StaticKVCache
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)

VOCAB, BATCH, PROMPT, LENGTH = 13, 2, 5, 12


def _models():
    engine.manual_seed(0)
    reference = GPT(VOCAB, 16, d_model=16, n_layers=2, n_heads=2).eval()
    with engine.no_grad():
        reference.tok_emb.weight.normal_(0.0, 1.0)  # logits far from uniform: differences show
    return reference, copy.deepcopy(reference).to("cuda")


def _capture_decode(model, ids, warm_up: bool):
    """Prefill the cache eagerly with the prompt, then capture one single-token step."""
    cache = StaticKVCache(model, batch_size=BATCH, max_cache_len=16)
    model(engine.tensor(ids[:, :PROMPT], device="cuda"), cache, use_cache=True)
    static_ids = engine.tensor(ids[:, PROMPT:PROMPT + 1], device="cuda")
    if warm_up:  # kernels compiled, cuBLAS workspace made, outside the capture (a GPU needs it)
        model(static_ids, cache, use_cache=True)
        cache.position.fill_(PROMPT)
    graph = engine.cuda.CUDAGraph()
    with engine.cuda.graph(graph):
        static_logits, _ = model(static_ids, cache, use_cache=True)
    return graph, cache, static_ids, static_logits


def _replays_match_the_eager_decode(graph, cache, static_ids, static_logits, reference, ids, host, **tol):
    assert cache.get_seq_length() == PROMPT, "the capture ran nothing: the position did not move"
    _, past = reference(engine.tensor(ids[:, :PROMPT]), use_cache=True)
    for t in range(PROMPT, LENGTH):  # token by token: the replay advances the position itself
        static_ids.copy_(engine.tensor(ids[:, t:t + 1], device="cuda"))
        graph.replay()
        logits, past = reference(engine.tensor(ids[:, t:t + 1]), past, use_cache=True)
        np.testing.assert_allclose(host(static_logits), logits.numpy(), **tol, err_msg=f"position {t}")
        assert cache.get_seq_length() == t + 1
    for p in (3, 9, 1):  # rewound or moved on by hand: the slots before p hold this text's keys
        cache.position.fill_(p)
        static_ids.copy_(engine.tensor(ids[:, p:p + 1], device="cuda"))
        graph.replay()
        full = reference(engine.tensor(ids[:, :p + 1]))
        np.testing.assert_allclose(host(static_logits)[:, -1], full.numpy()[:, -1], **tol, err_msg=f"position {p}")


def test_a_captured_decode_step_replays_as_the_eager_decode(fake_gpu):
    reference, model = _models()
    ids = np.random.default_rng(5).integers(0, VOCAB, (BATCH, LENGTH))
    with F.fused_kernels(False), engine.no_grad():  # the composites run (the fused kernels need a GPU)
        graph, cache, static_ids, static_logits = _capture_decode(model, ids, warm_up=False)
        assert np.isnan(static_logits._data.host).all(), "a capture computes nothing"
        static = {id(t) for t in graph.static_inputs}
        assert id(static_ids) in static and id(cache.position) in static
        assert all(id(b) in static for b in cache.keys + cache.values), "the buffers live outside the graph"
        pool = graph.pool().pool
        mallocs, default_mallocs, launches = pool.mallocs, fake_gpu.default_pool.mallocs, fake_gpu.launches
        cublas_calls = len(fake_gpu.cublas.calls)
        _replays_match_the_eager_decode(graph, cache, static_ids, static_logits, reference, ids,
                                        lambda t: t._data.host.copy(), rtol=1e-5, atol=1e-6)
    assert fake_gpu.launches - launches == LENGTH - PROMPT + 3
    assert pool.mallocs == mallocs, "a replay allocated from the graph's pool"
    assert fake_gpu.cupy_cublas_calls == [] and len(fake_gpu.cublas.calls) == cublas_calls
    assert fake_gpu.default_pool.mallocs > default_mallocs  # the reference's copies_: the fake does count


def test_an_eager_static_cache_decode_step_reads_nothing_back_from_the_device(fake_gpu):
    """The position stays on the device in eager decoding too: no host sync per token."""
    _, model = _models()
    ids = np.random.default_rng(6).integers(0, VOCAB, (BATCH, LENGTH))
    with F.fused_kernels(False), engine.no_grad():
        cache = StaticKVCache(model, batch_size=BATCH)
        model(engine.tensor(ids[:, :PROMPT], device="cuda"), cache, use_cache=True)
        steps = [engine.tensor(ids[:, t:t + 1], device="cuda") for t in range(PROMPT, LENGTH)]
        reads, syncs = fake_gpu.host_reads, fake_gpu.syncs
        for step_ids in steps:
            model(step_ids, cache, use_cache=True)
        assert (fake_gpu.host_reads, fake_gpu.syncs) == (reads, syncs)
    assert cache.get_seq_length() == LENGTH


def test_the_benchs_captured_decode_row_replays_as_its_eager_static_cache_row(fake_gpu):
    """bench/gpt_decode.py's captured variant (warm-up on a side stream, rewind, capture, then per
    call: copy the next id in, replay; rewound after 32 tokens) gives the eager static-cache
    variant's logits token for token, across the rewind, with one launch per token."""
    engine.manual_seed(0)
    model = GPT(gpt_decode.VOCAB, gpt_decode.BLOCK, gpt_decode.D_MODEL, gpt_decode.N_LAYERS, gpt_decode.N_HEADS)
    weights = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    ids = np.random.default_rng(7).integers(0, gpt_decode.VOCAB, (1, gpt_decode.MAX_LEN))
    bd = types.SimpleNamespace(kind="cuda", engine_autocast=contextlib.nullcontext)
    x = fake_gpu.asarray(ids)
    with F.fused_kernels(False):
        eager, stat = gpt_decode.engine_static_decode(bd, weights, x, None)
        replayed, _ = gpt_decode.engine_captured_decode(bd, weights, x, None)
        launches = fake_gpu.launches
        tokens = gpt_decode.MAX_LEN - gpt_decode.PROMPT
        for t in range(tokens + 4):  # past the rewind to the prompt
            want, got = eager(), replayed()
            np.testing.assert_allclose(got._data.host, want._data.host, rtol=1e-5, atol=1e-6, err_msg=f"token {t}")
            assert stat(got) == pytest.approx(stat(want), rel=1e-5)
    assert fake_gpu.launches - launches == tokens + 4


@pytest.mark.gpu
def test_on_the_gpu_a_captured_decode_step_replays_as_the_eager_decode():
    if not engine.cuda.is_available():
        pytest.skip("no CUDA device")
    reference, model = _models()
    ids = np.random.default_rng(5).integers(0, VOCAB, (BATCH, LENGTH))
    with engine.no_grad():
        graph, cache, static_ids, static_logits = _capture_decode(model, ids, warm_up=True)
        _replays_match_the_eager_decode(graph, cache, static_ids, static_logits, reference, ids,
                                        lambda t: t.numpy(), rtol=1e-4, atol=1e-4)

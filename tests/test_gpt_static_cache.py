"""The GPT example's static KV cache (engine/examples/gpt.py StaticKVCache): fixed-shape buffers,
the position in a device tensor; eager it gives the logits of the cat-based cache, step by step."""

import numpy as np
import pytest

import engine
from engine.examples.gpt import GPT, StaticKVCache

VOCAB, BLOCK = 23, 24
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-13)}


def _model(dtype="float32"):
    engine.manual_seed(0)
    model = GPT(vocab_size=VOCAB, block_size=BLOCK, d_model=24, n_layers=2, n_heads=3).eval()
    with engine.no_grad():
        model.tok_emb.weight.normal_(0.0, 1.0)  # logits far from uniform: differences show
    return model.double() if dtype == "float64" else model


def _ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_with_the_static_cache_gives_the_cat_cache_logits(dtype, batch):
    model, ids = _model(dtype), _ids(batch, 14)
    cache = StaticKVCache(model, batch_size=batch, max_cache_len=16)
    assert cache.keys[0].shape == (batch, 3, 16, 8) and cache.keys[0].dtype == model.tok_emb.weight.dtype
    with engine.no_grad():
        static, same = model(engine.tensor(ids[:, :6]), cache, use_cache=True)  # a prompt of 6
        assert same is cache and cache.get_seq_length() == 6
        cat, past = model(engine.tensor(ids[:, :6]), use_cache=True)
        np.testing.assert_allclose(static.numpy(), cat.numpy(), **TOLERANCE[dtype], err_msg="prompt")
        for t in range(6, 14):  # then one token at a time
            static, cache = model(engine.tensor(ids[:, t:t + 1]), cache, use_cache=True)
            cat, past = model(engine.tensor(ids[:, t:t + 1]), past, use_cache=True)
            assert static.shape == cat.shape == (batch, 1, VOCAB)
            np.testing.assert_allclose(static.numpy(), cat.numpy(), **TOLERANCE[dtype], err_msg=f"position {t}")
            for layer, (k, v) in enumerate(past):  # the buffers hold the cat cache's keys, the rest is zero
                np.testing.assert_allclose(cache.keys[layer].numpy()[:, :, :t + 1], k.numpy(), **TOLERANCE[dtype])
                np.testing.assert_allclose(cache.values[layer].numpy()[:, :, :t + 1], v.numpy(), **TOLERANCE[dtype])
                assert not cache.keys[layer].numpy()[:, :, t + 1:].any()
        np.testing.assert_allclose(static.numpy()[:, -1], model(engine.tensor(ids)).numpy()[:, -1], **TOLERANCE[dtype])
    assert cache.get_seq_length() == 14


def test_chunks_of_several_tokens_after_a_prompt_see_the_causal_mask():
    model, ids = _model(), _ids(2, 12, seed=1)
    cache = StaticKVCache(model, batch_size=2)
    with engine.no_grad():
        for start, stop in ((0, 4), (4, 7), (7, 8), (8, 12)):
            static, cache = model(engine.tensor(ids[:, start:stop]), cache, use_cache=True)
        full = model(engine.tensor(ids))
    np.testing.assert_allclose(static.numpy(), full.numpy()[:, 8:], rtol=1e-5, atol=1e-6)


def test_rewinding_the_position_masks_the_stale_slots():
    """position.fill_(p) rewinds: slots from p on still hold old keys, masked until rewritten."""
    model, ids, other = _model(), _ids(1, 10, seed=2), _ids(1, 10, seed=3)
    cache = StaticKVCache(model, batch_size=1, max_cache_len=12)
    with engine.no_grad():
        model(engine.tensor(other), cache, use_cache=True)  # fill 10 slots with another text
        cache.position.fill_(0)
        model(engine.tensor(ids[:, :4]), cache, use_cache=True)
        static, _ = model(engine.tensor(ids[:, 4:5]), cache, use_cache=True)
        full = model(engine.tensor(ids[:, :5]))
    np.testing.assert_allclose(static.numpy()[:, -1], full.numpy()[:, -1], rtol=1e-5, atol=1e-6)
    cache.reset()
    assert cache.get_seq_length() == 0 and not any(b.numpy().any() for b in cache.keys + cache.values)


def test_a_full_cache_and_a_wrong_batch_are_refused_with_the_sizes():
    model = _model()
    cache = StaticKVCache(model, batch_size=2, max_cache_len=5)
    with engine.no_grad():
        model(engine.tensor(_ids(2, 4)), cache, use_cache=True)
        with pytest.raises(ValueError, match=r"4 cached \+ 2 new positions exceed max_cache_len=5.*fill_"):
            model(engine.tensor(_ids(2, 2)), cache, use_cache=True)
        with pytest.raises(ValueError, match=r"do not fit a cache of batch 2"):
            model(engine.tensor(_ids(3, 1)), cache, use_cache=True)
    assert cache.get_seq_length() == 4  # a refused call changed nothing
    with pytest.raises(ValueError, match=r"max_cache_len must be in \[1, block_size=24\]"):
        StaticKVCache(model, batch_size=1, max_cache_len=25)


def test_the_cache_keeps_its_dtype_and_the_logits_only_come_back_with_use_cache():
    model = _model()
    cache = StaticKVCache(model, batch_size=1, dtype=engine.float64)
    with engine.no_grad():
        logits = model(engine.tensor(_ids(1, 3)), cache)
    assert isinstance(logits, engine.Tensor) and logits.shape == (1, 3, VOCAB)
    assert cache.keys[1].dtype == engine.float64 and cache.get_seq_length() == 3


def test_with_grad_mode_on_the_cache_gives_the_same_logits_and_records_no_graph():
    """Outside no_grad, q, k and v come from the packed weight's row blocks (the training path)."""
    model, ids = _model(), _ids(2, 7, seed=4)
    cache = StaticKVCache(model, batch_size=2)
    logits, _ = model(engine.tensor(ids[:, :5]), cache, use_cache=True)
    step, _ = model(engine.tensor(ids[:, 5:7]), cache, use_cache=True)
    assert logits.requires_grad and not any(b.requires_grad for b in cache.keys + cache.values)
    with engine.no_grad():
        full = model(engine.tensor(ids))
    np.testing.assert_allclose(step.detach().numpy(), full.numpy()[:, 5:], rtol=1e-5, atol=1e-6)


def test_update_writes_keys_and_values_at_the_positions_and_returns_the_buffers():
    cache = StaticKVCache(_model(), batch_size=1, max_cache_len=6)
    key, value = engine.randn(1, 3, 2, 8), engine.randn(1, 3, 2, 8)
    keys, values = cache.update(1, key, value, engine.tensor([4, 2]))
    assert keys is cache.keys[1] and values is cache.values[1] and keys.shape == (1, 3, 6, 8)
    np.testing.assert_array_equal(keys.numpy()[:, :, [4, 2]], key.numpy())
    np.testing.assert_array_equal(values.numpy()[:, :, [4, 2]], value.numpy())
    assert not keys.numpy()[:, :, [0, 1, 3, 5]].any() and not cache.keys[0].numpy().any()

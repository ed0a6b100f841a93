"""GPT decode as end-to-end rows (model ``gpt-decode``): one generated token with the KV cache.

The model is bench/gpt_step.py's (``engine.examples.gpt.GPT`` at the example's default size:
vocabulary 256, block 64, d_model 128, 4 layers, 4 heads) with the same weights, and its torch
twin from there, which keeps the engine example's cat-based cache. A prompt of :data:`PROMPT`
ids runs once, untimed (the prefill); every timed call then decodes ONE token: the next id of a
fixed stream goes in (teacher forcing: no sampling, the row times the model, not a sampler),
the cache grows by one position, and after :data:`MAX_LEN` positions it is rewound to the
prompt. So the median per call is the time per generated token at cache lengths 32 to 63, and
"samples/s" is tokens/s. All under no_grad, eval mode.

Variants (rows):

* ``engine GPT decode, cat cache``: ``model(ids, past, use_cache=True)`` with the returned
  presents (``engine.cat`` per layer and token), the example's ``generate``;
* ``engine GPT decode, static cache``: ``StaticKVCache(max_cache_len=64)``, eager: fixed
  buffers written in place at the position held in a device tensor, attention over all 64 slots
  with a mask (docs/performance.md, "Decode");
* ``engine GPT decode, static cache, CUDA graph``: that step captured once (engine.cuda.graph)
  and replayed per token after copying the next id into the static input; GPU only;
* ``torch eager``: the twin, cat cache, ``torch.no_grad()``.

The first three calls' logits (their mean square, in the loss columns) are compared with the
first variant's: same weights, same ids, the same logits to float32 rounding.

Targets (issue 23, GPU, batch 1): eager at most 1.0x torch eager's time per token, captured at
most 0.3x (end_to_end.TARGET_CASES, CAPTURED_STEP_TIME_TARGET); on the CPU every engine row gets
the CPU step target (end_to_end.STEP_TIME_TARGET).
"""

from __future__ import annotations

from bench import gpt_step
from bench.device import Unavailable
from bench.e2e_common import step_row

VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS = gpt_step.LAYERS
PROMPT, MAX_LEN = 32, gpt_step.BLOCK  # cached positions before the first timed token; the cache's size
LAYERS = gpt_step.LAYERS + (PROMPT, MAX_LEN)  # the row's "layers" field: the GPT's config, prompt, cache size

BATCHES = {("cpu", "quick"): [1], ("cpu", "full"): [1], ("cuda", "quick"): [1], ("cuda", "full"): [1]}

setup = gpt_step.setup  # (weights, ids (batch, 64), unused targets): the prompt and the stream decoded


def token_flops(batch: int) -> int:
    """Matmul FLOPs of one decoded token: the per-token projections (12 d^2 per layer) and the tied
    head (V d), plus QK^T and AV over the cached keys (the mean count of the cat cache, 48)."""
    keys = (PROMPT + 1 + MAX_LEN) / 2
    return int(2 * batch * (N_LAYERS * 12 * D_MODEL * D_MODEL + VOCAB * D_MODEL) + batch * N_LAYERS * 4 * keys * D_MODEL)


def base_row(model_name, layers, batch, name, bd) -> dict:
    return step_row(model_name, layers, batch, name, bd, params=gpt_step.parameter_count(), flops=token_flops(batch))


# ---- the engine's variants ------------------------------------------------------------------------

def _engine_model(bd, weights):
    import engine
    from engine.examples.gpt import GPT

    model = GPT(VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS)
    model.load_state_dict({k: engine.tensor(v) for k, v in weights.items()})
    return model.to(bd.kind).eval()


def _engine_tokens(x):
    """The prompt and the one-id tensors decoded after it, sliced once, outside the timed calls."""
    import engine

    ids = engine.Tensor(x)
    return ids[:, :PROMPT], [ids[:, t:t + 1].contiguous() for t in range(PROMPT, MAX_LEN)]


def _logits_stat(logits) -> float:
    """The mean square of the logits: one number that any wrong logit moves (the 'loss' columns)."""
    return float((logits.float() * logits.float()).mean().item())


def engine_cat_decode(bd, weights, x, y):
    """The example's decode: the presents of each call are the next call's past (``engine.cat``)."""
    import engine

    model = _engine_model(bd, weights)
    prompt, tokens = _engine_tokens(x)
    with engine.no_grad(), bd.engine_autocast():
        _, prompt_past = model(prompt, use_cache=True)
    state = {"t": 0, "past": prompt_past}

    def step():
        if state["t"] == len(tokens):  # the cache is full: back to the prompt's
            state.update(t=0, past=prompt_past)
        with engine.no_grad(), bd.engine_autocast():
            logits, state["past"] = model(tokens[state["t"]], state["past"], use_cache=True)
        state["t"] += 1
        return logits

    return step, _logits_stat


def _static_decoder(bd, weights, x):
    """(model, prefilled StaticKVCache, tokens, rewind): the cache holds the prompt's PROMPT positions."""
    import engine
    from engine.examples.gpt import StaticKVCache

    model = _engine_model(bd, weights)
    prompt, tokens = _engine_tokens(x)
    cache = StaticKVCache(model, batch_size=prompt.shape[0], max_cache_len=MAX_LEN)
    with engine.no_grad(), bd.engine_autocast():
        model(prompt, cache, use_cache=True)

    def rewind():
        with engine.no_grad():
            cache.position.fill_(PROMPT)  # the slots from PROMPT on are masked until rewritten

    return model, cache, tokens, rewind


def engine_static_decode(bd, weights, x, y):
    """Eager decode with the static cache: the same shapes at every token."""
    import engine

    model, cache, tokens, rewind = _static_decoder(bd, weights, x)
    state = {"t": 0}

    def step():
        if state["t"] == len(tokens):
            rewind()
            state["t"] = 0
        with engine.no_grad(), bd.engine_autocast():
            logits, _ = model(tokens[state["t"]], cache, use_cache=True)
        state["t"] += 1
        return logits

    return step, _logits_stat


def engine_captured_decode(bd, weights, x, y):
    """The static-cache step captured once; each call copies the next id into the static input and
    replays (the graph writes at the device position and advances it)."""
    if bd.kind != "cuda":
        raise Unavailable("a CUDA graph captures GPU work; this run is on the CPU")
    import engine

    model, cache, tokens, rewind = _static_decoder(bd, weights, x)
    static_ids = tokens[0].clone()
    side = engine.cuda.Stream()  # warm-up off the capture: kernels compiled, workspaces made
    side.wait_stream(engine.cuda.current_stream())
    with engine.cuda.stream(side), engine.no_grad(), bd.engine_autocast():
        model(static_ids, cache, use_cache=True)
    engine.cuda.current_stream().wait_stream(side)
    rewind()
    graph = engine.cuda.CUDAGraph()
    with engine.no_grad(), bd.engine_autocast(), engine.cuda.graph(graph):
        static_logits, _ = model(static_ids, cache, use_cache=True)
    state = {"t": 0}

    def step():
        if state["t"] == len(tokens):
            rewind()
            state["t"] = 0
        with engine.no_grad():
            static_ids.copy_(tokens[state["t"]])
        graph.replay()
        state["t"] += 1
        return static_logits  # overwritten by the next replay

    return step, _logits_stat


# ---- torch ----------------------------------------------------------------------------------------

def torch_cat_decode(bd, weights, x, y):
    """The torch twin decoding with the same cat-based cache."""
    if bd.torch is None:
        raise Unavailable(bd.torch_reason)
    torch = bd.torch
    model = gpt_step._torch_model(torch).to(bd.kind).eval()
    model.load_state_dict({k: bd.to_torch(bd.asarray(v)) for k, v in weights.items()})
    ids = bd.to_torch(x)
    tokens = [ids[:, t:t + 1].contiguous() for t in range(PROMPT, MAX_LEN)]
    with torch.no_grad(), bd.torch_autocast():
        _, prompt_past = model(ids[:, :PROMPT], use_cache=True)
    state = {"t": 0, "past": prompt_past}

    def step():
        if state["t"] == len(tokens):
            state.update(t=0, past=prompt_past)
        with torch.no_grad(), bd.torch_autocast():
            logits, state["past"] = model(tokens[state["t"]], state["past"], use_cache=True)
        state["t"] += 1
        return logits

    return step, lambda logits: float(logits.float().square().mean().item())


CAPTURED_NAME = "engine GPT decode, static cache, CUDA graph"
VARIANTS = (("engine GPT decode, cat cache", engine_cat_decode, "engine"),
            ("engine GPT decode, static cache", engine_static_decode, "engine"),
            (CAPTURED_NAME, engine_captured_decode, "engine"),
            ("torch eager", torch_cat_decode, "torch"))

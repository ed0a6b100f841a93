"""A GPT you can train: a small decoder-only Transformer on text that needs no download.

    python -m engine.examples.gpt [--steps 300] [--data FILE] [--tokenizer byte|bpe] [--out runs/gpt] [--resume]
                                  [--dtype float32|bf16|fp16]

The default corpus is the source of the Python standard library's own modules on this machine
(the first ``--max-bytes`` of its top-level ``*.py`` files, in name order). The text is
tokenized once (bytes by default), split into a training head and a validation tail, and the
model trains on random windows of the head with AdamW (no weight decay on biases, LayerNorm
and embeddings), linear warm-up then cosine decay, gradient clipping, the Trainer's progress
bar and per-epoch checkpoints (``--resume`` continues from ``<out>/last.ckpt``), in float32 or
mixed precision (``--dtype bf16``: the Trainer's ``precision="bf16-mixed"``, forward and loss under
``engine.autocast``; ``--dtype fp16``: ``"16-mixed"``, with a GradScaler). It prints the
validation loss and perplexity beside the unigram baseline, then samples text with a key/value
cache (``--temperature``, ``--top-k``).

The model is the usual pre-norm GPT (as GPT-2 and nanoGPT):

    x = tok_emb(ids) + pos_emb(positions)
    N times:  x = x + attn(ln1(x))      causal self-attention (F.scaled_dot_product_attention)
              x = x + mlp(ln2(x))       Linear(d, 4d) -> GELU -> Linear(4d, d)
    logits = ln_f(x) @ tok_emb.weight.T  (the head shares the token embedding's weights)
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sysconfig
import time
from pathlib import Path

import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
import engine.nn.functional as F
from engine import nn, optim
from engine.data import DataLoader, Subset
from engine.errors import describe
from engine.io import write_atomically
from engine.text import BPETokenizer, ByteTokenizer, LanguageModelDataset, split_tokens, unigram_baseline
from engine.text.tokenizers import _id_list
from engine.train import ModelCheckpoint, Trainer
from engine.train.callbacks import LRSchedulerCallback


# ---- the model ----------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional key/value cache.

    ``forward(x, past)`` attends from the ``T`` new positions of ``x`` to the cached keys and values
    of the positions before them (``past = (k, v)``, each ``(B, heads, P, head_dim)``) and to
    themselves, and returns the new cache ``(k, v)`` covering all ``P + T`` positions.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)  # the q, k, v projections packed, as GPT-2's c_attn
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, past=None):
        B, T, C = x.shape
        H = self.n_heads
        if engine.is_grad_enabled():
            # q, k and v from row blocks of the packed weight: slicing the (3C, C) weight costs little in
            # backward, where slicing the (B, T, 3C) output would scatter into three zero arrays of its size
            q, k, v = (F.linear(x, self.qkv.weight[i * C:(i + 1) * C], self.qkv.bias[i * C:(i + 1) * C])
                       .reshape(B, T, H, C // H).transpose(1, 2) for i in range(3))  # each (B, H, T, head_dim)
            kv = None
        else:  # no backward (decoding): one GEMM and views of it, 5 ops where the slices take 15
            qkv = self.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, T, head_dim)
            q, k, v = qkv.unbind(0)
            kv = qkv[1:] if isinstance(past, _StaticSlot) else None  # packed as a static cache stores them
        if isinstance(past, _StaticSlot):  # write into the fixed buffers, attend over all of them
            k, v = past.write(engine.stack([k, v]) if kv is None else kv)
            if k.dtype != q.dtype:  # a cache kept in another dtype (an fp32 cache under autocast, say)
                k, v = k.to(q.dtype), v.to(q.dtype)
            mask = past.mask
        else:
            if past is not None:
                k, v = engine.cat([past[0], k], dim=2), engine.cat([past[1], v], dim=2)
            mask = _cache_mask(T, k.shape[2], x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=past is None)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), (k, v)


def _cache_mask(new: int, total: int, device):
    """The attention mask when ``new`` queries follow ``total - new`` cached positions.

    Without a cache (new == total) the call uses ``is_causal=True``. One new query may see every
    key (no mask). A chunk of several new queries after a cache needs the causal mask aligned to
    the bottom right (query i sits at position total - new + i); PyTorch's is_causal aligns it to
    the top left, so it is built here: True = may attend.
    """
    if new == total or new == 1:
        return None
    allowed = np.tril(np.ones((new, total), dtype=bool), k=total - new)
    return engine.tensor(allowed, device=device)


class Block(nn.Module):
    """A pre-norm Transformer block: attention and MLP, each behind a LayerNorm and a residual."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        # GPT-2 uses the tanh form of GELU
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, past=None):
        attended, present = self.attn(self.ln1(x), past)
        x = x + self.drop(attended)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, present


class GPT(nn.Module):
    """A decoder-only Transformer language model.

    Args:
        vocab_size: number of token ids.
        block_size: the longest context (the position table's size).
        d_model, n_layers, n_heads: width, depth, heads per attention.
        dropout: after the embeddings, attention output and MLP (0 for small, short runs).

    ``forward(ids)`` returns logits ``(B, T, vocab_size)``; ``forward(ids, past_key_values,
    use_cache=True)`` returns ``(logits, presents)``, where ``past_key_values`` is None or the
    ``presents`` of the previous call (one ``(k, v)`` per layer): the new ids continue the cached
    positions, so generating a token costs one position's work, not a whole forward pass.
    """

    def __init__(self, vocab_size: int, block_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2's initialisation: N(0, 0.02) everywhere, the projections that write into the
        # residual stream scaled by 1/sqrt(2 * layers) so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)

    def forward(self, ids, past_key_values=None, use_cache: bool = False):
        ids = ids if isinstance(ids, engine.Tensor) else engine.tensor(np.asarray(ids, dtype=np.int64))
        if isinstance(past_key_values, StaticKVCache):
            logits = self._forward_static(ids, past_key_values)
            return (logits, past_key_values) if use_cache else logits
        B, T = ids.shape
        start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if start + T > self.block_size:
            raise ValueError(f"GPT: {start} cached + {T} new positions exceed block_size={self.block_size}; "
                             "crop the context (generate does) or build the model with a larger block_size")
        positions = engine.arange(start, start + T, dtype=engine.int64, device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)  # weight-tied head
        return (logits, presents) if use_cache else logits

    def _forward_static(self, ids, cache: "StaticKVCache"):
        """The new ``ids`` at the cache's position (a device tensor: no host read), written into its
        buffers; the position then advances by their count, in place."""
        positions = cache.new_positions(ids)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        mask = cache.mask(positions)
        for i, block in enumerate(self.blocks):
            x, _ = block(x, _StaticSlot(cache, i, positions, mask))
        cache.advance(ids.shape[1])
        return F.linear(self.ln_f(x), self.tok_emb.weight)


class StaticKVCache:
    """A key/value cache of fixed shape for :class:`GPT`, for CUDA-graph decoding (the idea of
    transformers' ``StaticCache``).

    Each layer gets preallocated ``(batch_size, heads, max_cache_len, head_dim)`` key and value
    buffers, zero at first (``keys[i]`` and ``values[i]``, views of one buffer per layer). ``model(ids, cache, use_cache=True)`` writes the keys and values of
    the new ids in place at the positions ``position + arange(T)`` (``Tensor.index_copy_`` along
    dim 2 with an index tensor), attends over the whole buffer with the mask ``slot <= position of
    the query`` built on the device, and advances ``position`` in place: it returns ``(logits,
    cache)``, the same object. Every call with T new ids has the same shapes and reads the
    position from device memory, so one decode step can be captured in a CUDA graph and replayed
    for every token (docs/performance.md, "Decode"). Without a graph it gives the logits of the
    cat-based cache (``past_key_values=None`` first, then the returned presents).

    Args:
        model: the GPT it serves (heads, width, layers, ``block_size``).
        batch_size: the batch every call must have.
        max_cache_len: positions it holds (default and upper bound: ``model.block_size``).
        device, dtype: default the model's; keys and values are cast to ``dtype`` when written.

    Attributes:
        position: an int64 tensor of shape (1,) on the device: the next position to write (the
            number of positions held). Set it with ``position.fill_(p)`` to rewind (the slots from
            ``p`` on are masked until rewritten); a captured step advances it at every replay.

    Example:
        >>> model = GPT(vocab_size=11, block_size=8, d_model=16, n_layers=2, n_heads=2).eval()
        >>> cache = StaticKVCache(model, batch_size=1)
        >>> with engine.no_grad():
        ...     logits, cache = model(engine.tensor([[1, 2, 3]]), cache, use_cache=True)
        >>> cache.get_seq_length()
        3
    """

    def __init__(self, model: GPT, batch_size: int, max_cache_len: int | None = None, device=None, dtype=None):
        max_cache_len = model.block_size if max_cache_len is None else max_cache_len
        if not 1 <= max_cache_len <= model.block_size:
            raise ValueError(f"StaticKVCache: max_cache_len must be in [1, block_size={model.block_size}] (the "
                             f"position table's size), got {max_cache_len}")
        if batch_size < 1:
            raise ValueError(f"StaticKVCache: batch_size must be >= 1, got {batch_size}")
        weight = model.tok_emb.weight
        device = weight.device if device is None else engine.device(device)
        dtype = weight.dtype if dtype is None else dtype
        attn = model.blocks[0].attn
        heads, width = attn.n_heads, attn.proj.weight.shape[0]
        shape = (batch_size, heads, max_cache_len, width // heads)
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        # one (2, ...) buffer per layer, keys then values: one index_copy_ writes both
        self._buffers = [engine.zeros((2,) + shape, dtype=dtype, device=device) for _ in model.blocks]
        self.keys = [buffer[0] for buffer in self._buffers]  # views of the buffers
        self.values = [buffer[1] for buffer in self._buffers]
        self.position = engine.zeros(1, dtype=engine.int64, device=device)
        self._slots = engine.arange(max_cache_len, dtype=engine.int64, device=device)

    def new_positions(self, ids):
        """The positions of ``ids`` (B, T): ``position + arange(T)``, an int64 device tensor."""
        B, T = ids.shape
        keys = self.keys[0]
        if B != self.batch_size or T > self.max_cache_len or ids.device != keys.device:
            raise ValueError(f"StaticKVCache: ids {describe(ids)} do not fit a cache of batch "
                             f"{self.batch_size}, {self.max_cache_len} positions on {keys.device}")
        if ids.device.type == "cpu" and self.get_seq_length() + T > self.max_cache_len:  # free to read here
            raise ValueError(f"StaticKVCache: {self.get_seq_length()} cached + {T} new positions exceed "
                             f"max_cache_len={self.max_cache_len}; rewind with cache.position.fill_(p) or reset()")
        return self.position + engine.arange(T, dtype=engine.int64, device=ids.device)

    def mask(self, positions):
        """(T, max_cache_len) bool: slot j is visible to the query at ``positions[i]`` when j <= it."""
        return self._slots <= positions[:, None]

    def update(self, layer: int, key, value, positions):
        """Write ``key``/``value`` (B, heads, T, head_dim) at ``positions`` of layer ``layer``; return
        the layer's whole buffers."""
        return self._write(layer, engine.stack([key, value]), positions)

    def _write(self, layer: int, key_value, positions):
        """:meth:`update` with the keys and values packed (2, B, heads, T, head_dim)."""
        buffer = self._buffers[layer]
        with engine.no_grad():  # a cache is state, not a graph (as HF's StaticCache under generate)
            buffer.index_copy_(3, positions, key_value.to(buffer.dtype))
        return self.keys[layer], self.values[layer]

    def advance(self, count: int) -> None:
        with engine.no_grad():
            self.position.add_(count)

    def reset(self) -> None:
        """Empty the cache: position 0 and zero buffers."""
        with engine.no_grad():
            self.position.zero_()
            for buffer in self._buffers:
                buffer.zero_()

    def get_seq_length(self) -> int:
        """The number of positions held (transformers' name); a host read of ``position``."""
        return int(engine.backend.to_host(self.position._data)[0])


class _StaticSlot:
    """What a block's attention gets for one layer of a :class:`StaticKVCache` in one forward."""

    __slots__ = ("cache", "layer", "positions", "mask")

    def __init__(self, cache, layer, positions, mask):
        self.cache, self.layer, self.positions, self.mask = cache, layer, positions, mask

    def write(self, key_value):
        return self.cache._write(self.layer, key_value, self.positions)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the matmul weights only; biases, LayerNorm and embeddings get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matmul_weight = p.dim() >= 2 and "emb" not in name
        (decay if is_matmul_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """lr multiplier per step: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def lm_loss(logits, targets):
    """Mean next-token cross-entropy over every position of every window."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---- generation ----------------------------------------------------------------------------------

def generate(model: GPT, prompt, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             use_cache: bool = True, generator: np.random.Generator | None = None) -> list[int]:
    """Continue ``prompt`` (a list of ids) by ``max_new_tokens`` ids.

    ``temperature=0`` picks the most likely token (greedy); else the logits are divided by the
    temperature, cut to the ``top_k`` most likely, and sampled with ``generator`` (default: one
    seeded from the engine's RNG).

    The context is a window of at most ``block_size`` ids. With ``use_cache`` the window runs
    once and each new token is then one single-position forward against the key/value cache.
    When the window would pass ``block_size`` it restarts from the last ``block_size // 2`` ids
    (at least one; one full forward, the cache rebuilt), so a long output costs about one extra
    forward per ``block_size // 2`` tokens. ``use_cache=False`` runs the whole window for every
    token, with the same windows: the reference that the cached path matches token for token.

    Raises:
        ValueError: an empty prompt or an id outside the vocabulary; ``max_new_tokens`` not an
            int >= 0; ``temperature`` not a finite number >= 0; ``top_k`` not None or an int >= 1
            (as Hugging Face's top-k); the model's logits hold NaN. All arguments are checked
            before the model runs, and the model's training mode is restored on every exit.
    """
    prompt = _check_generate_args(model, prompt, max_new_tokens, temperature, top_k, generator)
    if generator is None and temperature > 0:
        generator = np.random.Generator(np.random.PCG64(int(engine.backend.generator(engine.CPU).integers(2**63))))
    ids, device = prompt, model.tok_emb.weight.device
    keep = max(1, model.block_size // 2)  # ids a restarted window keeps (block_size 1 keeps the last one)
    was_training = model.training
    model.eval()
    try:
        start, past = 0, None  # the window's first position; the cache of ids[start:-1]
        with engine.no_grad():
            for _ in range(max_new_tokens):
                if len(ids) - start > model.block_size:
                    start, past = len(ids) - keep, None
                if use_cache and past is not None:
                    logits, past = model(engine.tensor([[ids[-1]]], device=device), past, use_cache=True)
                elif use_cache:
                    logits, past = model(engine.tensor([ids[start:]], device=device), use_cache=True)
                else:
                    logits = model(engine.tensor([ids[start:]], device=device))
                ids.append(_pick(logits._data[0, -1], temperature, top_k, generator))
    finally:
        model.train(was_training)
    return ids


def _check_generate_args(model, prompt, max_new_tokens, temperature, top_k, generator) -> list[int]:
    """The prompt as a list of ids, once every argument of :func:`generate` is known to be valid."""
    prompt = _id_list("generate: prompt", prompt)
    if not prompt:
        raise ValueError("generate: the prompt needs at least one token")
    bad = [(k, i) for k, i in enumerate(prompt) if not 0 <= i < model.vocab_size]
    if bad:
        raise ValueError(f"generate: prompt id {bad[0][1]} at position {bad[0][0]} is outside the model's "
                         f"vocabulary (0..{model.vocab_size - 1})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be None (no cut) or an int >= 1, got {top_k!r}")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(f"generate: generator must be a numpy.random.Generator, got {type(generator).__name__}")
    return prompt


def _pick(logits, temperature: float, top_k: int | None, generator) -> int:
    row = engine.backend.to_host(logits).astype(np.float64)
    if np.isnan(row).any():  # argmax and sampling would pick a token regardless, silently
        raise ValueError("generate: the model's logits hold NaN; the model's weights have diverged (check them "
                         "for NaN) and no token can be picked")
    if temperature <= 0:
        return int(row.argmax())
    with np.errstate(over="ignore"):  # shifted first: a tiny temperature sends the others to -inf, not inf - inf
        row = (row - row.max()) / temperature
    if top_k is not None and top_k < row.size:
        row[row < np.partition(row, -top_k)[-top_k]] = -np.inf
    p = np.exp(row)
    return int(generator.choice(row.size, p=p / p.sum()))


# ---- data ----------------------------------------------------------------------------------------

def stdlib_corpus(max_bytes: int = 1_000_000) -> str:
    """The first ``max_bytes`` characters of the standard library's top-level ``*.py`` files, in name order.

    Deterministic on a given Python installation; no download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    if not parts:
        raise FileNotFoundError(f"gpt: no *.py files under the standard library path {root}; pass --data FILE")
    return "".join(parts)[:max_bytes]


def make_tokenizer(kind: str, text: str, vocab_size: int, out: Path, resume: bool = False):
    """The byte tokenizer, or a BPE trained on ``text`` (on ``--resume``, the run's ``out/tokenizer.json``).

    Nothing is written here: :func:`main` saves a new BPE once every argument is known to be good.
    """
    if kind == "byte":
        return ByteTokenizer()
    path = out / "tokenizer.json"
    if resume and path.exists():
        return BPETokenizer.from_file(path)
    return BPETokenizer.train([text], vocab_size=vocab_size)


# ---- the run -------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Train, evaluate and sample (see the module's docstring); returns the report it prints.

    Every argument is checked (``argparse`` errors, exit code 2) and the model, datasets and
    optimizer are built before anything is written to ``--out``: a bad argument leaves a run
    directory, and its ``--resume``, as they were.
    """
    args = _parse(argv)
    if args.init_from:  # sample from a Hugging Face GPT-2 directory instead of training
        from engine.examples import gpt2_weights

        device = chosen_device(args.device)
        return gpt2_weights.sample(args.init_from, args.prompt, args.sample_tokens, args.temperature,
                                   args.top_k or None, device)
    out = Path(args.out)
    engine.manual_seed(args.seed)
    device = chosen_device(args.device)
    text = Path(args.data).read_text(encoding="utf-8", errors="replace") if args.data else stdlib_corpus(args.max_bytes)
    tokenizer = make_tokenizer(args.tokenizer, text, args.vocab_size, out, args.resume)
    prompt = tokenizer.encode(args.prompt) or [0]  # encoded now: a prompt it cannot encode fails before training
    train_ids, val_ids = split_tokens(tokenizer.encode(text), val_fraction=args.val_fraction)
    baseline = unigram_baseline(train_ids, val_ids, tokenizer.vocab_size)

    config = {"vocab_size": tokenizer.vocab_size, "block_size": args.block_size, "d_model": args.d_model,
              "n_layers": args.n_layers, "n_heads": args.n_heads, "dropout": args.dropout}
    _check_config(out, config, args.resume)
    model = GPT(**config).to(device)
    optimizer = optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule = optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))

    # An "epoch" is --eval-every random batches, then a validation pass and a checkpoint.
    train_set = LanguageModelDataset(train_ids, args.block_size)
    epochs = args.steps // args.eval_every
    loader = DataLoader(train_set, batch_size=args.batch_size,
                        sampler=train_set.random_windows(args.eval_every * args.batch_size))
    val_set = LanguageModelDataset(val_ids, args.block_size, stride=args.block_size)
    val_set = Subset(val_set, list(range(min(len(val_set), args.val_windows))))
    val_loader = DataLoader(val_set, batch_size=args.batch_size)

    checkpoints = ModelCheckpoint(out, monitor="val_loss")  # writes nothing until an epoch ends
    trainer = Trainer(model, optimizer, loss_fn=lm_loss, metrics=(), grad_clip_norm=args.clip or None,
                      callbacks=[LRSchedulerCallback(schedule, interval="batch"), checkpoints],
                      verbose=0 if args.quiet else 1, precision=PRECISION[args.dtype])
    _write_run(out, config, tokenizer)  # all of the above succeeded: now the run directory may change
    if args.resume and checkpoints.last_path.exists():
        trainer.load_checkpoint(checkpoints.last_path)
        print(f"resumed from {checkpoints.last_path} after {trainer.epoch * args.eval_every} steps")
    elif args.resume:
        print(f"--resume: no checkpoint in {out} yet; starting from step 0")

    print(f"GPT: {model.num_parameters():,} parameters, {tokenizer.vocab_size} tokens ({args.tokenizer}), "
          f"{len(train_ids):,} training / {len(val_ids):,} validation tokens, device {device}, "
          f"precision {trainer.precision}")
    print(f"unigram baseline: entropy {baseline['entropy']:.3f} nats (train), "
          f"cross-entropy {baseline['cross_entropy']:.3f} on validation")
    start = time.perf_counter()
    try:
        history = trainer.fit(loader, epochs=epochs, val_data=val_loader)
    except KeyboardInterrupt:  # Ctrl-C: keep the steps done; --resume continues exactly from here
        trainer.save_checkpoint(checkpoints.last_path)
        print(f"interrupted; checkpoint with the steps done so far in {checkpoints.last_path}: continue with --resume")
        raise
    seconds = time.perf_counter() - start

    val_loss = history["val_loss"][-1]
    top_k = args.top_k or None  # --top-k 0: no cut
    sample_ids = generate(model, prompt, args.sample_tokens, temperature=args.temperature, top_k=top_k)
    sample = tokenizer.decode(sample_ids)
    report = {
        "device": str(device), "precision": trainer.precision, "parameters": model.num_parameters(),
        "steps": len(history) * args.eval_every,
        "seconds": seconds, "train_loss": history["loss"][-1], "val_loss": val_loss,
        "perplexity": math.exp(val_loss), "unigram_entropy": baseline["entropy"],
        "unigram_cross_entropy": baseline["cross_entropy"], "sample": sample,
        "tokens_per_s": float(np.median(history["samples_per_s"])) * args.block_size,
        "last_checkpoint": str(checkpoints.last_path),
    }
    print(f"validation loss {val_loss:.3f} nats (perplexity {report['perplexity']:.2f}) vs unigram "
          f"{baseline['cross_entropy']:.3f} (perplexity {math.exp(baseline['cross_entropy']):.2f}); "
          f"training {seconds:.1f}s, {report['tokens_per_s']:,.0f} tokens/s on {device}")
    print(f"sample (temperature {args.temperature}, top-k {top_k}):\n{sample}")
    return report


# --dtype -> the Trainer's precision (Lightning's names)
PRECISION = {"float32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def _check_config(out: Path, config: dict, resume: bool) -> None:
    """A resume must build the model of the run's checkpoints (``out/config.json``); reads only."""
    path = out / "config.json"
    if not (resume and path.exists()):
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8 or not JSON
        raise ValueError(f"gpt --resume: {str(path)!r} is not a model config ({exc}); restore it, or start "
                         "another run with another --out") from None
    if saved != config:
        raise ValueError(f"gpt --resume: the checkpoints in {out} are of the model {saved}, but these "
                         f"arguments build {config}; pass the same model arguments (or another --out)")


def _write_run(out: Path, config: dict, tokenizer) -> None:
    """The run directory's description: the model config, and a BPE's vocabulary (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "config.json", lambda f: f.write(json.dumps(config).encode("utf-8")),
                     op="engine.examples.gpt")
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out / "tokenizer.json")


def _at_least(low: int):
    """An argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _real(low: float, high: float = math.inf, below_high: bool = False, above_low: bool = False):
    """An argparse type: a finite float in [low, high] (an end excluded where asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if above_low else value < low
        too_high = value >= high if below_high else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if above_low else '['}{low}, {high}{')' if below_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    return parse


def _parse(argv):
    parser = argument_parser("gpt", __doc__.splitlines()[0])
    parser.add_argument("--data", help="a UTF-8 text file (default: the standard library's source)")
    parser.add_argument("--max-bytes", type=_at_least(1), default=1_000_000, help="size of the default corpus")
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                        help="byte: one token per byte; bpe: a byte-pair vocabulary trained on the data")
    parser.add_argument("--vocab-size", type=_at_least(256), default=512, help="BPE vocabulary size")
    parser.add_argument("--block-size", type=_at_least(1), default=64, help="context length in tokens")
    parser.add_argument("--d-model", type=_at_least(1), default=128, help="embedding width")
    parser.add_argument("--n-layers", type=_at_least(1), default=4, help="transformer blocks")
    parser.add_argument("--n-heads", type=_at_least(1), default=4, help="attention heads (must divide --d-model)")
    parser.add_argument("--dropout", type=_real(0.0, 1.0, below_high=True), default=0.0, help="dropout probability")
    parser.add_argument("--steps", type=_at_least(1), default=600, help="optimizer steps")
    parser.add_argument("--eval-every", type=_at_least(1), default=100,
                        help="steps between validation and checkpoints")
    parser.add_argument("--batch-size", type=_at_least(1), default=16, help="windows per optimizer step")
    parser.add_argument("--lr", type=_real(0.0), default=3e-3, help="peak AdamW learning rate (cosine decay)")
    parser.add_argument("--warmup", type=_at_least(0), default=30, help="warm-up steps (0: none)")
    parser.add_argument("--weight-decay", type=_real(0.0), default=0.1, help="AdamW weight decay")
    parser.add_argument("--clip", type=_real(0.0), default=1.0, help="gradient clipping: max global norm (0: none)")
    parser.add_argument("--val-fraction", type=_real(0.0, 1.0, below_high=True, above_low=True), default=0.1,
                        help="share of the corpus held out for validation")
    parser.add_argument("--val-windows", type=_at_least(1), default=128, help="validation windows evaluated")
    parser.add_argument("--prompt", default="def ", help="text the sample continues")
    parser.add_argument("--sample-tokens", type=_at_least(0), default=200, help="tokens sampled at the end")
    parser.add_argument("--temperature", type=_real(0.0), default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=_at_least(0), default=20, help="sample from the k most likely (0: all)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=tuple(PRECISION), default="float32",
                        help="float32, or mixed precision: bf16 (autocast) or fp16 (autocast + GradScaler)")
    parser.add_argument("--out", default="runs/gpt", help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--init-from", metavar="DIR", help="sample from a local Hugging Face GPT-2 directory "
                        "(config.json + model.safetensors or pytorch_model.bin) instead of training")
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    return args


def _check_combinations(parser, args) -> None:
    """What no single argument's type can check; each a ``parser.error`` (exit code 2)."""
    if args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.d_model % args.n_heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --n-heads ({args.n_heads}): each head "
                     "gets d_model / n_heads dimensions")
    if args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        parser.error(f"--init-from {args.init_from!r} is not a directory with a config.json")
    if args.data is not None and not Path(args.data).is_file():
        parser.error(f"--data {args.data!r} is not a file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    if args.device != "auto":
        try:
            engine.backend.check_available(engine.device(args.device))
        except ValueError as exc:  # DeviceError: not a device, or not on this machine
            parser.error(f"--device {args.device!r}: {exc}")


if __name__ == "__main__":
    main()

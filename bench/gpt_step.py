"""The GPT training step as an end-to-end row: engine vs the same model in torch eager.

The model is ``engine.examples.gpt.GPT`` at the example's default size (byte vocabulary 256,
block 64, d_model 128, 4 layers, 4 heads: 0.83M parameters) and its twin written here in torch
with the same parameter names, so one state_dict initialises both. One step is what the
example's Trainer does per batch: forward, next-token cross-entropy over every position (under
autocast(bfloat16) in a ``--dtype bf16`` run, as ``--dtype bf16`` trains),
backward, clip the gradients' global norm to 1, AdamW (betas 0.9/0.95, weight decay on the
matmul weights only). Rows go through bench/end_to_end.py's ``_run_config``: the first losses are
compared, then the variants are timed side by side in rounds.

Target (issue 14): on the CPU the engine's step within 1.3x of torch's (end_to_end.STEP_TIME_TARGET).
The captured row (``engine GPT + AdamW, CUDA graph``: the same step with ``capturable=True``
AdamW, captured once and replayed; bench.e2e_common.captured) runs on the GPU only.
"""

from __future__ import annotations

from bench.device import Unavailable
from bench.e2e_common import captured, step_row

VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS = 256, 64, 128, 4, 4
LAYERS = (VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS)  # the row's "layers" field: the GPT's config
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.1, 1.0

BATCHES = {
    ("cpu", "quick"): [16], ("cpu", "full"): [16, 64],
    ("cuda", "quick"): [64], ("cuda", "full"): [64, 256],
}


def parameter_count() -> int:
    d, v, t, n = D_MODEL, VOCAB, BLOCK, N_LAYERS
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return v * d + t * d + n * per_block + 2 * d


def step_flops(batch: int) -> int:
    """Matmul FLOPs of one step (forward x3 for forward + backward): the per-token projections
    (12 d^2 per layer) and the tied head (V d), plus attention's QK^T and AV over the full T x T
    (a causal kernel may skip the upper half)."""
    tokens = batch * BLOCK
    dense = 2 * tokens * (N_LAYERS * 12 * D_MODEL * D_MODEL + VOCAB * D_MODEL)
    attention = N_LAYERS * 4 * batch * BLOCK * BLOCK * D_MODEL
    return 3 * (dense + attention)


def base_row(model_name, layers, batch, name, bd) -> dict:
    return step_row(model_name, layers, batch, name, bd, params=parameter_count(), flops=step_flops(batch))


def setup(bd, layers, batch):
    """(state_dict of numpy arrays, token ids, next-token targets) for one case."""
    import engine
    from engine.examples.gpt import GPT

    state = engine.get_rng_state()  # the same weights in every run, without moving the bench's own RNG
    engine.manual_seed(0)
    model = GPT(VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS)
    engine.set_rng_state(state)
    weights = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    stream = bd.to_host(bd.random_ints(VOCAB, (batch, BLOCK + 1)))
    return weights, bd.asarray(stream[:, :-1]), bd.asarray(stream[:, 1:])


def engine_step(bd, weights, x, y, capturable: bool = False):
    """The engine GPT's step (``capturable``: AdamW with its lr and step counts on the device, for
    the captured row)."""
    import engine
    from engine import optim
    from engine.examples.gpt import GPT, lm_loss, param_groups
    from engine.nn.utils import clip_grad_norm_

    model = GPT(VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS)
    model.load_state_dict({k: engine.tensor(v) for k, v in weights.items()})
    model.to(bd.kind)
    opt = optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95), capturable=capturable)
    tx, ty = engine.Tensor(x), engine.Tensor(y)
    params = list(model.parameters())

    def step():
        opt.zero_grad()  # to None: in a capture the graph makes the gradients, afresh at every replay
        with bd.engine_autocast():  # bf16 runs: the Trainer's precision="bf16-mixed"
            loss = lm_loss(model(tx), ty)
        loss.backward()
        clip_grad_norm_(params, CLIP)
        opt.step()
        return loss

    return step, lambda loss: float(loss.item())


def _torch_model(torch):
    """The torch twin of the engine GPT, parameter names included; ``forward(ids, past_key_values,
    use_cache=True)`` keeps the engine example's cat-based key/value cache (the decode rows)."""
    nn, F = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)

        def forward(self, x, past=None):
            B, T, C = x.shape
            q, k, v = self.qkv(x).reshape(B, T, 3, N_HEADS, C // N_HEADS).permute(2, 0, 3, 1, 4)
            mask = None
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
                if T > 1:  # a chunk after the cache: the causal mask aligned to the bottom right
                    mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past is None)
            return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn, self.ln2 = nn.LayerNorm(D_MODEL), Attention(), nn.LayerNorm(D_MODEL)
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * D_MODEL, D_MODEL))

        def forward(self, x, past=None):
            attended, present = self.attn(self.ln1(x), past)
            x = x + attended
            return x + self.mlp(self.ln2(x)), present

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(BLOCK, D_MODEL)
            self.blocks = nn.ModuleList([Block() for _ in range(N_LAYERS)])
            self.ln_f = nn.LayerNorm(D_MODEL)

        def forward(self, ids, past_key_values=None, use_cache=False):
            start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
            positions = torch.arange(start, start + ids.shape[1], device=ids.device)
            x = self.tok_emb(ids) + self.pos_emb(positions)
            presents = []
            for i, block in enumerate(self.blocks):
                x, present = block(x, None if past_key_values is None else past_key_values[i])
                presents.append(present)
            logits = F.linear(self.ln_f(x), self.tok_emb.weight)
            return (logits, presents) if use_cache else logits

    return GPT()


def torch_step(bd, weights, x, y):
    if bd.torch is None:
        raise Unavailable(bd.torch_reason)
    torch = bd.torch
    model = _torch_model(torch).to(bd.kind)
    model.load_state_dict({k: bd.to_torch(bd.asarray(v)) for k, v in weights.items()})
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError, TypeError):
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    tx, ty = bd.to_torch(x), bd.to_torch(y)

    def step():
        opt.zero_grad(set_to_none=True)
        with bd.torch_autocast():
            logits = model(tx)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ty.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    return step, lambda loss: float(loss.item())


VARIANTS = (("engine GPT + AdamW", engine_step, "engine"),
            ("engine GPT + AdamW, CUDA graph", captured(engine_step), "engine"),
            ("torch eager", torch_step, "torch"))


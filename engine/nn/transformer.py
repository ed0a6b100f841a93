"""Attention and Transformer layers with PyTorch's names, parameters and semantics.

``MultiheadAttention``, the encoder and decoder layers and stacks, and ``Transformer`` register the same
submodules and parameters as ``torch.nn``'s, so their state_dict keys are PyTorch's and a torch
checkpoint loads into them. Attention runs through ``F.scaled_dot_product_attention`` (the fused
kernel where it applies) unless the weights must be returned (``need_weights=True``), which needs
the probabilities and so takes the unfused composition.

Masks follow ``torch.nn``, which is the opposite of ``F.scaled_dot_product_attention`` for
booleans: here ``True`` means *do not attend* (``key_padding_mask`` True = padding, a boolean
``attn_mask`` True = blocked). Float masks are added to the scores in both.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from engine import functional as F
from engine import ops
from engine.errors import DeviceError, DTypeError, ShapeError, describe
from engine.nn import init
from engine.nn.layers import Dropout, LayerNorm, Linear, ModuleList, ReLU
from engine.nn.module import Module, Parameter
from engine.tensor import Tensor, empty, zeros


class MultiheadAttention(Module):
    """Multi-head attention ``softmax(Q K^T / sqrt(head_dim) + mask) V`` over ``num_heads`` heads.

    Parameters as PyTorch's: ``in_proj_weight`` (3E, E) (xavier-uniform) and ``in_proj_bias`` (3E)
    (zeros) pack the query, key and value projections; ``out_proj`` is a Linear(E, E) whose bias
    starts at zero. With ``kdim``/``vdim`` other than E, ``q_proj_weight`` (E, E),
    ``k_proj_weight`` (E, kdim) and ``v_proj_weight`` (E, vdim) replace ``in_proj_weight``.

    Args:
        embed_dim: E, the model width (query features and output features).
        num_heads: heads; E must be divisible by it (head_dim = E / num_heads).
        dropout: dropout on the attention weights in training mode.
        bias: learn input and output projection biases.
        add_bias_kv: learn ``bias_k``, ``bias_v`` (1, 1, E) appended to the keys and values as
            one extra position.
        add_zero_attn: append a zero key and value per head (one more position) after projection.
        kdim, vdim: key and value feature sizes (default E).
        batch_first: inputs and output are (N, L, E) instead of (L, N, E).
        device, dtype: where and in which dtype to create the parameters.

    Example:
        >>> mha = nn.MultiheadAttention(64, 4, batch_first=True)              # doctest: +SKIP
        >>> out, weights = mha(x, x, x, key_padding_mask=padding)            # weights (N, L, S)
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"MultiheadAttention: embed_dim and num_heads must be positive, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim must be divisible by num_heads, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be a probability in [0, 1], got {dropout}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        e, kw = self.embed_dim, dict(dtype=dtype, device=device)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(empty(3 * e, e, **kw))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = Parameter(empty(e, e, **kw))
            self.k_proj_weight = Parameter(empty(e, self.kdim, **kw))
            self.v_proj_weight = Parameter(empty(e, self.vdim, **kw))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(empty(3 * e, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        # PyTorch's out_proj is a NonDynamicallyQuantizableLinear: a Linear as far as weights go.
        self.out_proj = Linear(e, e, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = Parameter(empty(1, 1, e, **kw))
            self.bias_v = Parameter(empty(1, 1, e, **kw))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """PyTorch's scheme: xavier-uniform projections, zero biases, xavier-normal bias_k/v.

        out_proj.weight keeps Linear's own (kaiming-uniform) initialisation, as in PyTorch.
        """
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            init.constant_(self.in_proj_bias, 0.0)
            init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            init.xavier_normal_(self.bias_k)
            init.xavier_normal_(self.bias_v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E).
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim).
            value: (S, N, vdim) / (N, S, vdim) / (S, vdim).
            key_padding_mask: (N, S) (unbatched (S,)); boolean True = padding (ignored), or float
                added to the scores.
            need_weights: also return the attention weights (computed unfused); False runs
                ``F.scaled_dot_product_attention`` (the fused kernel) and returns None for them.
            attn_mask: (L, S) for every batch entry and head, or (N * num_heads, L, S); boolean
                True = not allowed to attend, or float added to the scores.
            average_attn_weights: return the weights averaged over heads (N, L, S) rather than
                per head (N, num_heads, L, S).
            is_causal: PyTorch's hint that ``attn_mask`` is the causal mask; it requires
                ``attn_mask``, which is always applied as given (a wrong hint cannot change results).

        Returns:
            ``(output, weights)``: output shaped like query with E features; weights (N, L, S) or
            (N, num_heads, L, S) (unbatched: without N), after dropout as in PyTorch, or None.
            A query that may attend to no key gets output ``out_proj.bias`` (zero attention) and
            zero weights, where PyTorch gives NaN.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the causal mask, so it needs "
                               "attn_mask (as in PyTorch); pass attn_mask=nn.Transformer-style causal mask, or call "
                               "F.scaled_dot_product_attention(..., is_causal=True)")
        if not batched:
            query, key, value = (ops.unsqueeze(t, 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = ops.unsqueeze(_mask_tensor(key_padding_mask, query), 0)
        elif self.batch_first:
            query, key, value = (ops.transpose(t, 0, 1) for t in (query, key, value))
        length, batch, e = query.shape
        q, k, v = self._project(query, key, value)
        bias = self._mask_bias(attn_mask, key_padding_mask, q, batch, length, key.shape[0])
        if self.bias_k is not None:
            k = ops.concatenate([k, ops.broadcast_to(self.bias_k, (1, batch, e))], 0)
            v = ops.concatenate([v, ops.broadcast_to(self.bias_v, (1, batch, e))], 0)
            bias = _pad_last(bias)
        q, k, v = (self._split_heads(t) for t in (q, k, v))  # (N, H, L or S, head_dim)
        if self.add_zero_attn:
            pad = Tensor(q.xp.zeros((batch, self.num_heads, 1, self.head_dim), dtype=q.dtype))
            k, v = ops.concatenate([k, pad], 2), ops.concatenate([v, pad], 2)
            bias = _pad_last(bias)
        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if need_weights:
            out, weights = F.attention_unfused(q, k, v, bias, scale, False, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
            weights = None
        out = ops.reshape(ops.permute(out, (2, 0, 1, 3)), (length, batch, e))
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = ops.squeeze(out, 1)
        elif self.batch_first:
            out = ops.transpose(out, 0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = ops.mean(weights, dim=1)
            if not batched:
                weights = ops.squeeze(weights, 0)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate shapes as PyTorch's _mha_shape_check does; return whether the input is batched."""
        op = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        shapes = f"query {describe(query)}, key {describe(key)}, value {describe(value)}"
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ShapeError(f"{op}: query, key and value must all be batched 3-D or unbatched 2-D: {shapes}")
        batched = query.ndim == 3
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ShapeError(f"{op}: feature dims must be embed_dim={self.embed_dim}, kdim={self.kdim}, "
                             f"vdim={self.vdim} (query, key, value): {shapes}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ShapeError(f"{op}: key and value must have the same (S, N) / (N, S) dims: {shapes}")
        seq = 1 if batched and self.batch_first else 0
        length, keys = query.shape[seq], key.shape[seq]
        if batched and query.shape[1 - seq] != key.shape[1 - seq]:
            raise ShapeError(f"{op}: query and key have different batch sizes: {shapes}")
        n = query.shape[1 - seq] if batched else None
        if key_padding_mask is not None:
            expected = (n, keys) if batched else (keys,)
            if tuple(key_padding_mask.shape) != expected:
                raise ShapeError(f"{op}: key_padding_mask {describe(key_padding_mask)} must have shape {expected} "
                                 f"((N, S), True = padding): {shapes}")
        if attn_mask is not None:
            heads = (n if batched else 1) * self.num_heads
            if tuple(attn_mask.shape) not in ((length, keys), (heads, length, keys)):
                raise ShapeError(f"{op}: attn_mask {describe(attn_mask)} must be (L, S) = {(length, keys)} or "
                                 f"(N * num_heads, L, S) = {(heads, length, keys)}: {shapes}")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """The q, k, v input projections on (L or S, N, features) inputs."""
        e, b = self.embed_dim, self.in_proj_bias
        biases = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if not self._qkv_same_embed_dim:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return tuple(F.linear(x, w, bb) for x, w, bb in zip((query, key, value), weights, biases))
        if query is key and key is value:  # self-attention: one GEMM for the three projections
            packed = F.linear(query, self.in_proj_weight, b)
            return packed[..., :e], packed[..., e:2 * e], packed[..., 2 * e:]
        w = self.in_proj_weight
        weights = (w[:e], w[e:2 * e], w[2 * e:])
        return tuple(F.linear(x, ww, bb) for x, ww, bb in zip((query, key, value), weights, biases))

    def _split_heads(self, t: Tensor) -> Tensor:
        """(T, N, E) -> (N, H, T, head_dim)."""
        seq, batch = t.shape[:2]
        return ops.permute(ops.reshape(t, (seq, batch, self.num_heads, self.head_dim)), (1, 2, 0, 3))

    def _mask_bias(self, attn_mask, key_padding_mask, q: Tensor, batch: int, length: int, keys: int):
        """attn_mask and key_padding_mask merged into one additive bias broadcastable to (N, H, L, S).

        Each keeps its small shape ((1, 1, L, S) and (N, 1, 1, S)); only when both are given does
        their sum have (N, 1, L, S) entries, as in PyTorch's merge.
        """
        bias = None
        if attn_mask is not None:
            m = _additive(_mask_tensor(attn_mask, q), q, "attn_mask")
            bias = ops.reshape(m, (1, 1, length, keys) if m.ndim == 2 else (batch, self.num_heads, length, keys))
        if key_padding_mask is not None:
            pad = ops.reshape(_additive(_mask_tensor(key_padding_mask, q), q, "key_padding_mask"),
                              (batch, 1, 1, keys))
            bias = pad if bias is None else bias + pad
        return bias

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def _mask_tensor(mask, like: Tensor) -> Tensor:
    return mask if isinstance(mask, Tensor) else Tensor(np.asarray(mask), device=like.device)


def _additive(mask: Tensor, q: Tensor, name: str) -> Tensor:
    """A torch.nn-style mask as an additive bias: boolean True (blocked) -> -inf, False -> 0."""
    if mask.device != q.device:
        raise DeviceError(f"MultiheadAttention: {name} {describe(mask)} and the inputs ({describe(q)}) are on "
                          f"different devices; move the mask with .to('{q.device}')")
    if mask.dtype == np.bool_:
        return Tensor(q.xp.where(mask._data, q.dtype.type(-np.inf), q.dtype.type(0)))
    if mask.dtype != q.dtype:
        raise DTypeError(f"MultiheadAttention: {name} {describe(mask)} must be boolean or have the query's dtype "
                         f"{q.dtype}")
    return mask


def _pad_last(bias: Tensor | None) -> Tensor | None:
    """One more key position (bias_k or the zero attention) that every query may attend to."""
    if bias is None:
        return None
    zero = Tensor(bias.xp.zeros(bias.shape[:-1] + (1,), dtype=bias.dtype))
    return ops.concatenate([bias, zero], -1)


def _activation(activation):
    """"relu" / "gelu" / a callable -> (callable, whether it is ReLU, so Linear + ReLU can fuse)."""
    if activation == "relu":
        return F.relu, True
    if activation == "gelu":
        return F.gelu, False
    if isinstance(activation, str) or not callable(activation):
        raise ValueError(f"activation should be relu/gelu or a callable, not {activation!r}")
    is_relu = activation is F.relu or activation is ops.relu or type(activation) is ReLU
    return activation, is_relu


class _TransformerLayer(Module):
    """What the encoder and decoder layers share: their submodules, made in PyTorch's order (so
    state_dict keys and repr match), and the self-attention block."""

    def _make_sublayers(self, blocks: int, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                        batch_first, norm_first, bias, device, dtype) -> None:
        """``blocks`` sub-blocks: 2 (self-attention, feed-forward) or 3 (with attention over memory)."""
        kw = dict(device=device, dtype=dtype)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **kw)
        if blocks == 3:
            self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                     batch_first=batch_first, **kw)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = bool(norm_first)
        for i in range(1, blocks + 1):
            setattr(self, f"norm{i}", LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        for i in range(1, blocks + 1):
            setattr(self, f"dropout{i}", Dropout(dropout))
        self.activation, self._relu = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        out = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                             is_causal=is_causal)[0]
        return self.dropout1(out)


class TransformerEncoderLayer(_TransformerLayer):
    """One encoder block: self-attention and a feed-forward network, each with residual and LayerNorm.

    Post-norm (``norm_first=False``, the original Transformer and PyTorch's default)::

        x = norm1(x + dropout1(self_attn(x)));  x = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))

    Pre-norm (``norm_first=True``) normalises before each sub-block instead. Submodules as PyTorch's
    (``self_attn``, ``linear1``, ``dropout``, ``linear2``, ``norm1``, ``norm2``, ``dropout1``,
    ``dropout2``), so state_dict keys match. With ReLU, ``linear1`` and the activation run as the
    fused ``F.linear_relu`` while fused kernels are enabled.

    Args:
        d_model: model width E.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward network.
        dropout: dropout probability (attention weights, after each sub-block, inside the FFN).
        activation: "relu", "gelu" or a callable (e.g. ``nn.GELU(approximate="tanh")``).
        layer_norm_eps: LayerNorm eps.
        batch_first: (N, S, E) input instead of (S, N, E).
        norm_first: pre-norm instead of post-norm.
        bias: learn biases in the linear layers and LayerNorms.
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._make_sublayers(2, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                             norm_first, bias, device, dtype)

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> Tensor:
        """Args as ``MultiheadAttention``'s: ``src_mask`` (S, S) or (N * nhead, S, S), boolean True =
        blocked or float added; ``src_key_padding_mask`` (N, S), True = padding; ``is_causal`` a hint
        that src_mask is causal (it requires src_mask)."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(_feed_forward_hidden(self, x))))


def _clones(owner: str, name: str, layer: Module, num_layers: int) -> ModuleList:
    """``num_layers`` independent deep copies of ``layer`` (PyTorch's ``_get_clones``): the stacks'
    ``layers.0`` ... entries."""
    if not isinstance(layer, Module):
        raise TypeError(f"{owner}: {name} must be a Module, got {type(layer).__name__}")
    if num_layers < 0:
        raise ValueError(f"{owner}: num_layers must be >= 0, got {num_layers}")
    return ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])


class TransformerEncoder(Module):
    """``num_layers`` deep copies of ``encoder_layer`` applied in turn (``layers.0``, ``layers.1``, ...),
    then ``norm`` if given.

    Args:
        encoder_layer: the layer to copy (its parameters are copied, not shared).
        num_layers: how many copies.
        norm: optional final normalisation module (e.g. LayerNorm for pre-norm stacks).
        enable_nested_tensor: accepted for PyTorch compatibility; the engine has no nested tensors,
            so padding is always handled through the key-padding mask.
    """

    def __init__(self, encoder_layer: Module, num_layers: int, norm: Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True):
        super().__init__()
        self.layers = _clones("TransformerEncoder", "encoder_layer", encoder_layer, num_layers)
        self.num_layers = int(num_layers)
        self.norm = norm
        self.enable_nested_tensor = bool(enable_nested_tensor)

    def forward(self, src: Tensor, mask=None, src_key_padding_mask=None, is_causal: bool | None = None) -> Tensor:
        """Run every layer with the same masks (see TransformerEncoderLayer.forward)."""
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return out if self.norm is None else self.norm(out)


class TransformerDecoderLayer(_TransformerLayer):
    """One decoder block: self-attention, attention over the encoder's ``memory``, feed-forward;
    each with residual, dropout and LayerNorm (post-norm by default, pre-norm with ``norm_first``).

    Submodules as PyTorch's (``self_attn``, ``multihead_attn``, ``linear1``, ``dropout``, ``linear2``,
    ``norm1``..``norm3``, ``dropout1``..``dropout3``), so state_dict keys match. Arguments as
    :class:`TransformerEncoderLayer`.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._make_sublayers(3, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                             norm_first, bias, device, dtype)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Tensor:
        """Masks as MultiheadAttention's: ``tgt_mask`` (T, T) over the target, ``memory_mask`` (T, S),
        key-padding masks (N, T) and (N, S) with True = padding."""
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return self.norm3(x + self._ff_block(x))

    def _mha_block(self, x, memory, attn_mask, key_padding_mask, is_causal):
        out = self.multihead_attn(x, memory, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                  need_weights=False, is_causal=is_causal)[0]
        return self.dropout2(out)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(_feed_forward_hidden(self, x))))


class TransformerDecoder(Module):
    """``num_layers`` deep copies of ``decoder_layer`` (``layers.0`` ...) applied in turn, then ``norm``."""

    def __init__(self, decoder_layer: Module, num_layers: int, norm: Module | None = None):
        super().__init__()
        self.layers = _clones("TransformerDecoder", "decoder_layer", decoder_layer, num_layers)
        self.num_layers = int(num_layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        """Run every layer with the same masks (see TransformerDecoderLayer.forward)."""
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return out if self.norm is None else self.norm(out)


class Transformer(Module):
    """The encoder-decoder Transformer of "Attention Is All You Need", as ``torch.nn.Transformer``.

    ``encoder`` is a TransformerEncoder of ``num_encoder_layers`` layers with a final LayerNorm,
    ``decoder`` a TransformerDecoder likewise; every parameter with more than one dim is
    re-initialised xavier-uniform, as PyTorch does. ``custom_encoder`` / ``custom_decoder``
    replace them.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation="relu", custom_encoder=None,
                 custom_decoder=None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                      bias)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(TransformerEncoderLayer(*layer_args, **kw), num_encoder_layers,
                                              LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(TransformerDecoderLayer(*layer_args, **kw), num_decoder_layers,
                                              LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        for p in self.parameters():
            if p.ndim > 1:
                init.xavier_uniform_(p)
        self.d_model, self.nhead, self.batch_first = int(d_model), int(nhead), bool(batch_first)

    def forward(self, src: Tensor, tgt: Tensor, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        """Encode ``src`` (S, N, E) and decode ``tgt`` (T, N, E) against it ((N, ., E) with batch_first)."""
        batch_dim = 0 if self.batch_first else 1
        if src.ndim == 3 and tgt.ndim == 3 and src.shape[batch_dim] != tgt.shape[batch_dim]:
            raise ShapeError(f"Transformer: the batch number of src {describe(src)} and tgt {describe(tgt)} must "
                             "be equal")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ShapeError(f"Transformer: the feature number of src {describe(src)} and tgt {describe(tgt)} must "
                             f"be equal to d_model={self.d_model}")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """The (sz, sz) causal float mask: 0 on and below the diagonal, -inf above."""
        return generate_square_subsequent_mask(sz, device=device, dtype=dtype)


def _feed_forward_hidden(layer, x):
    """``activation(linear1(x))``, as one fused ``F.linear_relu`` for a plain Linear + ReLU."""
    if layer._relu and F.fused_enabled() and type(layer.linear1).forward is Linear.forward:
        return F.linear_relu(x, layer.linear1.weight, layer.linear1.bias)
    return layer.activation(layer.linear1(x))


def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
    """The (sz, sz) causal float mask: 0 on and below the diagonal, -inf above (PyTorch's
    ``nn.Transformer.generate_square_subsequent_mask``)."""
    mask = zeros(sz, sz, device=device, dtype=dtype)
    mask._data[...] = mask.xp.triu(mask.xp.full((sz, sz), -np.inf, dtype=mask.dtype), k=1)
    return mask

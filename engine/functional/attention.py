"""Scaled-dot-product attention: the fused attention kernels, or the unfused composite."""

from __future__ import annotations

import math

import numpy as np

from engine import kernels
from engine import backends, dtypes, ops
from engine.amp.autocast_mode import autocast_op
from engine.autograd import Function
from engine.backend import array_module, get_float32_matmul_precision
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, ShapeError, describe
from engine.tensor import Tensor
from engine.kernels import ATTENTION_GPU_DTYPES as _ATTENTION_GPU_DTYPES
from engine.kernels import ATTENTION_GPU_MAX_HEAD_DIM as _ATTENTION_GPU_MAX_HEAD_DIM
from engine.kernels import attention_default_scale as _attention_default_scale
from engine.functional._common import _contiguous, _contiguous_tensor, _use_fused
from engine.functional.dropout import dropout
from engine.functional.losses import _as_tensor_like


class ScaledDotProductAttention(Function):
    """``softmax(scale * q @ k^T + mask) @ v`` on (B, L, E) arrays through kernels.attention_*.

    Saves q, k, v, the output and the per-row log-sum-exp (B, L), never the B x L x S
    probabilities: backward recomputes them tile by tile. The additive mask is a parameter, not an
    input, so it gets no gradient (a float mask that requires grad takes the unfused path).

    bfloat16 / float16 on the CPU are widened by ``Function.apply`` (float32 compute, one rounding,
    and backward's D = dO . out from the unrounded float32 out); on a GPU they go to the kernels as
    they are (:class:`ScaledDotProductAttention16`).
    """

    name = "scaled_dot_product_attention"

    def forward(self, q, k, v, mask=None, scale=1.0, causal=False):
        precision = _attention_precision(q.dtype)
        out, lse = kernels.attention_forward(q, k, v, mask, scale=scale, causal=causal, precision=precision)
        self.save(q, k, v, out, lse)
        self.mask, self.scale, self.causal, self.precision = mask, scale, causal, precision
        return out

    def backward(self, g):
        q, k, v, out, lse = self.saved
        return kernels.attention_backward(_contiguous(g), q, k, v, out, lse, self.mask, scale=self.scale,
                                          causal=self.causal, precision=self.precision)


class ScaledDotProductAttention16(ScaledDotProductAttention):
    """bfloat16 / float16 attention on a GPU: the arrays reach the kernels unwidened, whose forward
    runs the 16-bit operands on tensor cores (fp32 accumulation, one rounding) and whose backward
    takes D = dO . out from the rounded out, as FlashAttention-2 does; saved state is half the size."""

    computes_in_float32 = False


class ScaledDotProductAttentionHeads(Function):
    """Attention of (N, H, L, E) heads on the CPU for short sequences (kernels.attention_heads_*).

    The kernel reads strided head views in place (a Transformer's ``reshape(...).transpose(1, 2)``
    of its projections costs no copy) and returns out in q's layout, so the merge of the heads after
    it is a view too. It keeps the attention weights P (L x S per head) for backward instead of
    the log-sum-exp: short sequences only (``kernels.attention_heads_takes``). 16-bit inputs are
    widened by ``Function.apply``, as for :class:`ScaledDotProductAttention`.
    """

    name = "scaled_dot_product_attention"

    def forward(self, q, k, v, mask=None, scale=1.0, causal=False):
        out, p = kernels.attention_heads_forward(q, k, v, mask, scale=scale, causal=causal)
        self.save(q, k, v, out, p)
        self.scale, self.causal = scale, causal
        return out

    def backward(self, g):
        q, k, v, out, p = self.saved
        return kernels.attention_heads_backward(g, q, k, v, out, p, scale=self.scale, causal=self.causal)


def _attention_function(device_type: str, dtype) -> type:
    """The Function class for attention on ``device_type`` with inputs of ``dtype``."""
    if device_type != "cpu" and dtypes.is_low_precision(dtype):
        return ScaledDotProductAttention16
    return ScaledDotProductAttention


# The one place that chooses how the attention kernels multiply float32 inputs, following PyTorch's
# float32 matmul setting (``set_float32_matmul_precision``, or ``backends.cuda.matmul.allow_tf32``,
# its other spelling). "high" / "medium": the user accepts TF32 products, so "3xtf32" (tensor cores,
# three TF32 products: float32-level error, more accurate than the TF32 asked for) is safe before
# any GPU run. "highest" (the default): ``None``, float32 on CUDA cores, exact; making 3xTF32 the
# default there too is owed to the GPU agreement run (tests/kernels/test_attention_tc.py -m gpu;
# docs/kernels/attention.md). Only the cupy impl reads it: the CPU impls compute exactly whatever it says.
def _attention_precision(dtype) -> str | None:
    """The ``precision`` argument of the attention kernels for inputs of ``dtype``: ``"3xtf32"`` for
    float32 when the float32 matmul precision is "high" or "medium", else ``None`` (16-bit inputs
    run on tensor cores anyway; float64 is CPU-only)."""
    if np.dtype(dtype) == np.float32 and get_float32_matmul_precision() != "highest":
        return "3xtf32"
    return None


@autocast_op("scaled_dot_product_attention")
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 fused: bool | None = None) -> Tensor:
    """Attention ``softmax(query @ key^T * scale + mask) @ value``, as PyTorch's function.

    With fused kernels enabled (the default) this runs ``kernels.attention_forward/backward``
    (flash style: no L x S matrix is kept for backward). The unfused composition (matmul, masked
    softmax, dropout, matmul) runs instead under ``F.fused_kernels(False)`` or ``fused=False``,
    when ``dropout_p > 0`` (the kernels have no dropout), when a float ``attn_mask`` requires grad,
    or for what the kernel refuses (dtypes other than float32, bfloat16, float16 and float64; on a
    GPU float64 or head dims over 128). bfloat16 and float16 are computed in float32 and rounded
    once; on a GPU they reach the kernels as they are, with the 16-bit operands on tensor cores.

    A query row that may attend to no key (every mask entry False or -inf) gets an output of
    zeros and no gradient, on both paths, as in PyTorch. NaN and inf in the inputs or in a float
    mask propagate as in PyTorch (a NaN score makes its row NaN; see docs/kernels/attention.md).

    Args:
        query: (..., L, E).
        key: (..., S, E).
        value: (..., S, Ev). The leading dims of the three broadcast together.
        attn_mask: None, a boolean mask (True = may attend) or a float mask added to the scores
            (query's dtype), broadcastable to (..., L, S): e.g. (L, S) shared, or (N, 1, 1, S) key
            padding for (N, H, L, E) queries.
        dropout_p: dropout probability on the attention weights, from the engine's seeded RNG
            (pass 0 in evaluation, as PyTorch's callers do: this function has no training flag).
        is_causal: query i attends to keys j <= i (top-left aligned, ``ones(L, S).tril()``);
            must not be combined with ``attn_mask`` (PyTorch raises too).
        scale: the score scale; None means ``1 / sqrt(E)`` (for E = 0 every score is 0 and the
            output is the mean of value over the keys a row sees, as in PyTorch).
        enable_gqa: grouped-query attention: query has Hq heads in dim -3, key/value H heads with
            Hq a multiple of H; each key/value head serves Hq / H query heads.
        fused: use the attention kernel where it applies (default: ``fused_enabled()``).

    Returns:
        (..., L, Ev) attention output.

    Raises:
        ShapeError: shapes that do not fit (naming all of them), DTypeError: mixed or non-float
            dtypes, DeviceError: tensors on different devices, RuntimeError: ``attn_mask`` with
            ``is_causal=True``.

    Example:
        >>> q = k = v = engine.randn(2, 4, 16, 8)                                   # doctest: +SKIP
        >>> out = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # (2, 4, 16, 8)
    """
    op = "scaled_dot_product_attention"
    q, k, v = query, key, value
    _check_attention_operands(op, q, k, v)
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{op}: an explicit attn_mask must not be set when is_causal=True (as in PyTorch); "
                           "fold the causal mask into attn_mask instead")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a probability in [0, 1], got {dropout_p}")
    if enable_gqa:
        k, v = _repeat_kv_heads(op, q, k, v)
    batch = _attention_batch(op, q, k, v)
    length, keys = q.shape[-2], k.shape[-2]
    bias = _attention_bias(op, attn_mask, q, batch, length, keys)
    scale = _attention_default_scale(q.shape[-1]) if scale is None else float(scale)
    kernel_fits = dropout_p == 0.0 and _attention_kernel_takes(q, v, bias)
    if _use_fused(fused) and kernel_fits and backends.cuda.fused_sdp_allowed():
        return _attention_fused(q, k, v, bias, scale, bool(is_causal), batch)
    if not backends.cuda.math_sdp_enabled():
        raise RuntimeError(f"{op}: no available kernel: the math implementation is switched off "
                           "(backends.cuda.enable_math_sdp(False) or sdp_kernel) and the fused kernel "
                           + ("is switched off too" if kernel_fits else "does not take these inputs (dropout_p > 0, "
                              "or a dtype/head size it refuses)"))
    return attention_unfused(q, k, v, bias, scale, bool(is_causal), dropout_p)[0]


def _check_attention_operands(op: str, q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")

    def shapes() -> str:  # built only for an error: three describe calls cost ~10 us per call
        return f"query {describe(q)}, key {describe(k)}, value {describe(v)}"

    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError(f"{op}: query, key and value need at least 2 dims (..., L or S, E): {shapes()}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"{op}: need query (..., L, E), key (..., S, E), value (..., S, Ev) with one E and one S: "
                         f"{shapes()}")
    if len({q.device, k.device, v.device}) > 1:
        raise DeviceError(f"{op}: operands are on different devices: {shapes()}; move them to one device")
    if not is_floating(q.dtype) or len({q.dtype, k.dtype, v.dtype}) > 1:
        raise DTypeError(f"{op}: query, key and value must share one floating dtype: {shapes()}")


def _repeat_kv_heads(op: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """GQA: repeat each key/value head Hq / H times along dim -3 (``repeat_interleave``)."""
    if q.ndim < 3 or k.ndim < 3 or v.ndim < 3 or k.shape[-3] != v.shape[-3] or q.shape[-3] % k.shape[-3]:
        raise ShapeError(f"{op}: enable_gqa needs heads in dim -3 with query's a multiple of key's and value's: "
                         f"query {describe(q)}, key {describe(k)}, value {describe(v)}")
    groups = q.shape[-3] // k.shape[-3]
    if groups == 1:
        return k, v

    def repeat(t: Tensor) -> Tensor:
        lead, heads = t.shape[:-3], t.shape[-3]
        wide = ops.broadcast_to(ops.unsqueeze(t, -3), lead + (heads, groups) + t.shape[-2:])
        return ops.reshape(wide, lead + (heads * groups,) + t.shape[-2:])

    return repeat(k), repeat(v)


def _attention_batch(op: str, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """The broadcast leading (batch) dims of query, key and value."""
    try:
        return tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    except ValueError:
        raise ShapeError(f"{op}: the leading (batch) dims of query {describe(q)}, key {describe(k)} and value "
                         f"{describe(v)} do not broadcast") from None


def _attention_bias(op: str, attn_mask, q: Tensor, batch: tuple, length: int, keys: int) -> Tensor | None:
    """The mask as an additive float Tensor in its own (broadcastable) shape, or None.

    A boolean mask becomes a constant 0 / -inf bias of the same shape (no expansion); a float
    mask is used as given (it may require grad: the unfused path differentiates through it).
    """
    if attn_mask is None:
        return None
    mask = _as_tensor_like(attn_mask, q)
    target = batch + (length, keys)
    if mask.device != q.device:
        raise DeviceError(f"{op}: attn_mask {describe(mask)} and query {describe(q)} are on different devices")
    try:
        fits = np.broadcast_shapes(mask.shape, target) == target
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{op}: attn_mask {describe(mask)} does not broadcast to (..., L, S) = {target} "
                         f"(query {describe(q)})")
    if mask.dtype == np.bool_:
        return Tensor(q.xp.where(mask._data, q.dtype.type(0), q.dtype.type(-np.inf)))
    if mask.dtype != q.dtype:
        raise DTypeError(f"{op}: attn_mask {describe(mask)} must be boolean or have the query's dtype {q.dtype}")
    return mask


def _kernel_dtype(dtype) -> np.dtype:
    """The dtype a fused kernel sees for ``dtype``: float16 and bfloat16 run the float32 kernel
    (``Function.apply`` upcasts them and rounds the result once), other dtypes themselves."""
    return dtypes.COMPUTE_DTYPE if dtypes.is_low_precision(dtype) else np.dtype(dtype)


def _attention_kernel_takes(q: Tensor, v: Tensor, bias: Tensor | None) -> bool:
    """Whether the attention kernel computes this call (else the unfused composition does): float32,
    bfloat16 and float16 (float64 on the CPU), head dims <= 128 on the GPU, a mask without grad."""
    dtype = np.dtype(q.dtype)
    if _kernel_dtype(dtype) not in (np.float32, np.float64) or (bias is not None and bias.requires_grad):
        return False
    if q.device.type == "cpu":
        return True
    return dtype in _ATTENTION_GPU_DTYPES and max(q.shape[-1], v.shape[-1]) <= _ATTENTION_GPU_MAX_HEAD_DIM


def _attention_fused(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool,
                     batch: tuple) -> Tensor:
    """Flatten the batch dims into B, run the kernel Function, restore the batch dims."""
    rows = math.prod(batch)
    if q.device.type == "cpu" and kernels.attention_heads_takes(q.shape[-2], k.shape[-2], _kernel_dtype(q.dtype)):
        return _attention_heads(q, k, v, bias, scale, causal, batch)

    def as_3d(t: Tensor) -> Tensor:
        if t.shape[:-2] != batch:
            t = ops.broadcast_to(t, batch + t.shape[-2:])
        return _contiguous_tensor(ops.reshape(t, (rows,) + t.shape[-2:]))

    mask = None if bias is None else _kernel_mask(dtypes.upcast(bias._data), batch, rows, k.shape[-2])
    function = _attention_function(q.device.type, q.dtype)
    out = function.apply(as_3d(q), as_3d(k), as_3d(v), mask=mask, scale=scale, causal=causal)
    return ops.reshape(out, batch + out.shape[-2:])


def _attention_heads(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool,
                     batch: tuple) -> Tensor:
    """Short sequences on the CPU: the batch dims as (N, H) views, no copies (ScaledDotProductAttentionHeads)."""
    heads = batch[-1] if batch else 1
    shape4 = (math.prod(batch[:-1]), heads)

    def as_4d(t: Tensor) -> Tensor:
        if t.shape[:-2] != batch:
            t = ops.broadcast_to(t, batch + t.shape[-2:])  # zero strides, read in place by the kernel
        return t if t.shape[:-2] == shape4 else ops.reshape(t, shape4 + t.shape[-2:])

    rows = math.prod(batch)
    mask = None if bias is None else _kernel_mask(dtypes.upcast(bias._data), batch, rows, k.shape[-2])
    out = ScaledDotProductAttentionHeads.apply(as_4d(q), as_4d(k), as_4d(v), mask=mask, scale=scale, causal=causal)
    return out if out.shape[:-2] == batch else ops.reshape(out, batch + out.shape[-2:])


def _kernel_mask(bias, batch: tuple, rows: int, keys: int):
    """The bias as the kernel's contiguous (1 or B, 1 or L, S) array.

    A bias shared by every batch entry stays (1, Lm, S) and a per-row (key padding) bias stays
    (B, 1, S): neither is expanded to B x L x S. Only a bias that varies over some batch dims but
    not others (e.g. per head, shared over N) is broadcast over the batch dims it lacks.
    """
    xp = array_module(bias)
    bias = bias.reshape((1,) * (len(batch) + 2 - bias.ndim) + bias.shape)
    tail = (bias.shape[-2], keys)
    if all(d == 1 for d in bias.shape[:-2]):
        mask = xp.broadcast_to(bias.reshape((1,) + bias.shape[-2:]), (1,) + tail)
    else:
        mask = xp.broadcast_to(bias, batch + tail).reshape((rows,) + tail)
    return xp.ascontiguousarray(mask)


def attention_unfused(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool,
                      dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """The reference composition: ``(out, weights)`` with weights (..., L, S) after dropout.

    ``bias`` is an additive float Tensor broadcastable to (..., L, S) (see ``_attention_bias``).
    Rows that see no key get weights 0 (softmax of an all -inf row would be NaN), so their output
    is 0 and they pass no gradient, as in the kernel. Used by ``scaled_dot_product_attention``
    and by ``nn.MultiheadAttention`` when it must return the weights.
    """
    xp = q.xp
    length, keys = q.shape[-2], k.shape[-2]
    scores = ops.matmul(q, ops.transpose(k, -2, -1)) * scale
    if keys == 0 or length == 0:  # nothing to attend to (or no query): zeros, as the kernel gives;
        weights = scores * 0.0  # from the scores, so that q, k and v get (zero) gradients as in PyTorch
        return ops.matmul(weights, v), weights
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = ops.where(xp.tril(xp.ones((length, keys), dtype=bool)), scores, float("-inf"))
    if bias is None:  # no mask, or only the top-left causal one: every row sees key 0 at least
        weights = ops.softmax(scores, -1)
    else:
        dead = xp.isneginf(scores._data).all(axis=-1, keepdims=True)  # on the device: no host read
        weights = ops.where(dead, 0.0, ops.softmax(ops.where(dead, 0.0, scores), -1))
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, training=True)
    return ops.matmul(weights, v), weights

"""NumPy replay of attention_tc.cu's forward and backward: same tiles, same loops, same roundings;
no GPU needed.

The tensor-core kernels can only run on a GPU, so their algorithm is checked here, on the CPU,
against the float64 definition (tests/kernels/test_attention_tc.py): a tiling, online
softmax or 3xTF32-split mistake shows up as a wrong result of this replay. What it does not
check is the fragment addressing (which lane holds which element, ldmatrix addresses, the permuted
k index of the TF32 P V product): that is the GPU tests' part (``pytest -m gpu``).

What it follows, step for step (names as in attention_tc.cu):

- blocks of TC_ROWS = 64 query rows per batch row; key tiles of ``tc_keys(dtype, HD)`` keys up to
  the block's last causal key (later tiles are never loaded);
- S = Q K^T and O += P V as a sequence of MMAs along the contraction (k-steps of 16 for 16-bit
  operands, 8 for TF32), each MMA's dot products computed exactly and added to float32
  accumulators (hardware rounds within the MMA in its own way; the difference is far below the
  tolerances);
- scores ``fmaf(s, scale, mask)`` where the row reads the key, else -inf;
- per tile: m_new = fmax(m, tile max) (NaN skipped), shift = 0 for a row with nothing visible
  yet, alpha = exp(m - m_new), p = exp(s - shift) (16-bit: exp2 of (x) * log2 e in float32),
  l = l alpha + sum p, O = O alpha + P V;
- 16-bit: P rounded to the input dtype before P V (as the kernel packs it), out rounded once;
- 3xTF32: each operand x split into big = tf32(x), small = tf32(x - big) (x finite; else big = x,
  small = 0), cross = big (x finite; else 0), TF32 rounding as ``cvt.rna.tf32.f32`` (to nearest,
  ties away from zero, 10 mantissa bits kept) and the subtraction flushed to zero as ``-ftz=true``
  builds it; per k-step C += cross_a small_b, then small_a cross_b, then big_a big_b;
- out = O / l (l = 0: O itself), lse = m + log l (l = 0: -inf).

The backward (:func:`tc_backward`; float32 as the 3xTF32 kernel):

- D = rowsum(dO * out) in float32 (attention.cu's attn_bwd_rowdot; its warp-shuffle order is not
  replayed, a difference of float32 rounding only);
- blocks of TC_BWD_KEYS = 64 keys per batch row, walking query tiles of ``tc_bwd_rows(dtype, HD)``
  rows from the tile holding the block's first key when causal (from row 0 otherwise);
- per tile S^T = K Q^T and dP^T = V dO^T (MMAs over k-steps of 16 along the head dim; 8 and the
  3xTF32 split for float32), P = exp((x - lse)) (16-bit: exp2 of (x - lse) log2 e), x = fmaf(s,
  scale, mask) where the row reads the key (else -inf), P = 0 where lse = -inf (a NaN lse makes the
  whole row NaN, -inf scores included), dS = P (dP - D); 16-bit: both rounded to the input dtype
  before dV += P^T dO and dK += dS^T Q (k-steps along the tile's queries), and dQ's partial dS K
  (k-steps along the block's keys) times scale added to a float32 dq (the kernel's atomics, here
  in key-tile order) when not 0;
- float32 at E = 128: the walk is made ``tc_bwd_passes`` = 2 times, each accumulating 64 columns of
  dK and dV (S^T, dP^T, P and dS recomputed, the same values), dq added on the first pass only;
- dK = scale dK, dV, dq rounded once to the input dtype (float32: stored as they are).
"""

from __future__ import annotations

import numpy as np

from ..cpu.attention import LOW_PRECISION, validate_backward, validate_forward
from ..cuda.attention import TC_BWD_KEYS, TC_HEAD_DIMS, TC_ROWS, tc_bwd_passes, tc_bwd_rows, tc_keys

LOG2E = np.float32(1.4426950408889634)
F32 = np.float32
TINY = np.finfo(np.float32).tiny


def round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to TF32 as ``cvt.rna.tf32.f32``: 10 mantissa bits, to nearest, ties away
    from zero (add half of the 13 dropped bits to the magnitude, then clear them); NaN stays NaN."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


def split_tf32(x: np.ndarray, terms: int = 3):
    """(big, small, cross) of float32 ``x`` as attention_tc.cu's split_tf32. ``terms=1`` keeps only big
    (small and cross 0): plain TF32, which the tests use to show that they would catch a lost split."""
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x)
    big = round_tf32(x)
    with np.errstate(invalid="ignore", over="ignore"):
        rest = np.where(finite, x - big, F32(0))
    rest = np.where(np.abs(rest) < TINY, F32(0), rest)  # -ftz=true: a subnormal difference is 0
    small = np.where(finite, round_tf32(rest), F32(0))
    cross = np.where(finite, big, F32(0))
    if terms == 1:
        small = cross = np.zeros_like(x)
    return big, small, cross


def _mma(c, a, b):
    """c (float32) += a @ b with the products and their sum exact (float64), rounded once into c."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


def _product(c, a, b, kstep: int, tf32_terms: int | None):
    """c + a (M, K) @ b (K, N) as the kernel's chain of MMAs over k-steps of ``kstep``, into the
    float32 accumulators c."""
    for k0 in range(0, a.shape[1], kstep):
        ak, bk = a[:, k0:k0 + kstep], b[k0:k0 + kstep]
        if tf32_terms is None:
            c = _mma(c, ak, bk)
            continue
        (a_big, a_small, a_cross), (b_big, b_small, b_cross) = split_tf32(ak, tf32_terms), split_tf32(bk, tf32_terms)
        c = _mma(c, a_cross, b_small)
        c = _mma(c, a_small, b_cross)
        c = _mma(c, a_big, b_big)
    return c


def _exp(x, fast: bool):
    with np.errstate(invalid="ignore", over="ignore"):
        if fast:
            return np.exp2((x * LOG2E).astype(np.float32)).astype(np.float32)
        return np.exp(x).astype(np.float32)


def tc_forward(q, k, v, mask=None, *, scale=None, causal=False, tf32_terms: int = 3):
    """(out, lse) as attention_tc.cu computes them, for numpy q, k, v of bfloat16, float16 (the
    16-bit variant) or float32 (the 3xTF32 variant; ``tf32_terms=1`` for plain TF32), E = Ev in
    {64, 128}. Arguments as ``kernels.attention_forward``; the mask is read as float32."""
    spec = validate_forward(q, k, v, mask, scale=scale, causal=causal)
    if spec.e != spec.ev or spec.e not in TC_HEAD_DIMS or spec.dtype not in (np.float32,) + LOW_PRECISION:
        raise ValueError(f"the tensor-core kernel takes E = Ev in {TC_HEAD_DIMS} and float32 / 16-bit inputs, "
                         f"got E = {spec.e}, Ev = {spec.ev}, {spec.dtype}")
    sixteen = spec.low_precision
    kstep, terms = (16, None) if sixteen else (8, tf32_terms)
    bn = tc_keys(spec.dtype, spec.e)
    qf, kf, vf = (a.astype(np.float32) for a in (q, k, v))
    maskf = None if mask is None else mask.astype(np.float32)
    out = np.empty((spec.b, spec.l, spec.ev), spec.dtype)
    lse = np.empty((spec.b, spec.l), np.float32)
    scale32 = F32(spec.scale)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # non-finite inputs propagate silently
        _blocks(spec, qf, kf, vf, maskf, scale32, bn, kstep, terms, out, lse)
    return out, lse


def _blocks(spec, qf, kf, vf, maskf, scale32, bn, kstep, terms, out, lse):
    """The grid: (batch row, block of TC_ROWS query rows), each running the kernel's tile loop."""
    sixteen = spec.low_precision
    for b in range(spec.b):
        mb = None if maskf is None else maskf[b if spec.mask_b > 1 else 0]
        for i0 in range(0, spec.l, TC_ROWS):
            rows = np.arange(i0, min(i0 + TC_ROWS, spec.l))
            kend = min(spec.s, rows[-1] + 1) if spec.causal else spec.s
            m = np.full(len(rows), -np.inf, np.float32)
            l = np.zeros(len(rows), np.float32)  # noqa: E741
            o = np.zeros((len(rows), spec.ev), np.float32)
            for j0 in range(0, kend, bn):
                keys = np.arange(j0, min(j0 + bn, spec.s))
                s = _product(np.zeros((len(rows), len(keys)), np.float32), qf[b, rows], kf[b, keys].T, kstep, terms)
                reads = np.ones((len(rows), len(keys)), bool)
                if spec.causal:
                    reads &= keys[None, :] <= rows[:, None]
                bias = np.zeros_like(s) if mb is None else mb[rows if spec.mask_l > 1 else np.zeros_like(rows)][:, keys]
                fused = (s.astype(np.float64) * np.float64(scale32) + bias).astype(np.float32)  # fmaf
                s = np.where(reads, fused, F32(-np.inf))
                m_new = np.fmax(m, np.fmax.reduce(s, axis=1))
                empty = m_new == -np.inf
                alpha = np.where(empty, F32(1), _exp(m - np.where(empty, F32(0), m_new), sixteen))
                shift = np.where(empty, F32(0), m_new)
                p = _exp(s - shift[:, None], sixteen)
                l = (l * alpha + p.sum(axis=1, dtype=np.float32)).astype(np.float32)  # noqa: E741
                m = m_new
                p_operand = p.astype(spec.dtype).astype(np.float32) if sixteen else p
                o = _product((o * alpha[:, None]).astype(np.float32), p_operand, vf[b, keys], kstep, terms)
            inv = np.where(l == 0, F32(1), F32(1) / l)
            out[b, rows] = (o * inv[:, None]).astype(spec.dtype)
            lse[b, rows] = np.where(l == 0, F32(-np.inf), m + np.log(l))


def tc_backward(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, tf32_terms: int = 3):
    """(dq, dk, dv) as attention_tc.cu's backward computes them, for numpy bfloat16 / float16 inputs
    or float32 (3xTF32; ``tf32_terms=1`` for plain TF32), E = Ev in {64, 128}.
    Arguments as ``kernels.attention_backward``; the mask is read as float32, out and lse are the
    forward's."""
    spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
    if spec.dtype not in (np.float32,) + LOW_PRECISION or spec.e != spec.ev or spec.e not in TC_HEAD_DIMS:
        raise ValueError(f"the tensor-core backward takes E = Ev in {TC_HEAD_DIMS} and float32 / 16-bit inputs, "
                         f"got E = {spec.e}, Ev = {spec.ev}, {spec.dtype}")
    qf, kf, vf, dof = (a.astype(np.float32) for a in (q, k, v, grad_out))
    maskf = None if mask is None else mask.astype(np.float32)
    rowdot = (dof * out.astype(np.float32)).sum(axis=-1, dtype=np.float32)
    dq = np.zeros((spec.b, spec.l, spec.e), np.float32)
    dk = np.empty((spec.b, spec.s, spec.e), spec.dtype)
    dv = np.empty((spec.b, spec.s, spec.ev), spec.dtype)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for b in range(spec.b):
            mb = None if maskf is None else maskf[b if spec.mask_b > 1 else 0]
            for j0 in range(0, spec.s, TC_BWD_KEYS):
                keys = np.arange(j0, min(j0 + TC_BWD_KEYS, spec.s))
                dk_t, dv_t = _key_block(spec, b, keys, qf, kf, vf, dof, mb, lse, rowdot, dq, tf32_terms)
                dk[b, keys] = (dk_t * F32(spec.scale)).astype(spec.dtype)
                dv[b, keys] = dv_t.astype(spec.dtype)
    return dq.astype(spec.dtype), dk, dv


def _key_block(spec, b, keys, qf, kf, vf, dof, mb, lse, rowdot, dq, tf32_terms):
    """One backward block: its walks over the query tiles for ``keys`` (one per column pass of dK and
    dV); adds to dq on the first, returns dK, dV unscaled."""
    passes = tc_bwd_passes(spec.dtype, spec.e)
    width = spec.e // passes
    dk = np.zeros((len(keys), spec.e), np.float32)
    dv = np.zeros((len(keys), spec.ev), np.float32)
    for c in range(passes):
        cols = slice(c * width, (c + 1) * width)
        dk[:, cols], dv[:, cols] = _key_block_pass(spec, b, keys, qf, kf, vf, dof, mb, lse, rowdot,
                                                   dq if c == 0 else None, cols, tf32_terms)
    return dk, dv


def _key_block_pass(spec, b, keys, qf, kf, vf, dof, mb, lse, rowdot, dq, cols, tf32_terms):
    """One walk over the query tiles: dK, dV's columns ``cols`` (unscaled); dq += the dQ partials
    unless ``dq`` is None (a later column pass)."""
    rows_per_tile = tc_bwd_rows(spec.dtype, spec.e)
    scale32 = F32(spec.scale)
    sixteen = spec.low_precision
    kstep, terms = (16, None) if sixteen else (8, tf32_terms)
    dk = np.zeros((len(keys), cols.stop - cols.start), np.float32)
    dv = np.zeros_like(dk)
    istart = (keys[0] // rows_per_tile) * rows_per_tile if spec.causal else 0
    for i0 in range(istart, spec.l, rows_per_tile):
        rows = np.arange(i0, min(i0 + rows_per_tile, spec.l))
        zeros = np.zeros((len(keys), len(rows)), np.float32)
        s_t = _product(zeros, kf[b, keys], qf[b, rows].T, kstep, terms)
        dp_t = _product(zeros, vf[b, keys], dof[b, rows].T, kstep, terms)
        reads = np.ones(s_t.shape, bool)
        if spec.causal:
            reads &= keys[:, None] <= rows[None, :]
        bias = F32(0) if mb is None else mb[rows if spec.mask_l > 1 else np.zeros_like(rows)][:, keys].T
        x = np.where(reads, (s_t.astype(np.float64) * np.float64(scale32) + bias).astype(np.float32), F32(-np.inf))
        li = lse[b, rows][None, :]
        live = np.broadcast_to(li != -np.inf, x.shape)  # lse NaN: p NaN on every key, as PyTorch
        p = np.where(live, _exp((x - np.where(live, li, F32(0))).astype(np.float32), sixteen), F32(0))
        ds = (p * (dp_t - rowdot[b, rows][None, :])).astype(np.float32)
        if sixteen:  # the kernel packs P and dS to the input dtype as MMA operands
            p, ds = (a.astype(spec.dtype).astype(np.float32) for a in (p, ds))
        dv = _product(dv, p, dof[b, rows][:, cols], kstep, terms)
        dk = _product(dk, ds, qf[b, rows][:, cols], kstep, terms)
        if dq is not None:
            partial = _product(np.zeros((len(rows), spec.e), np.float32), ds.T, kf[b, keys], kstep, terms)
            add = (partial * scale32).astype(np.float32)
            dq[b, rows] = np.where(partial != 0, dq[b, rows] + add, dq[b, rows])
    return dk, dv

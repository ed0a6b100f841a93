"""Attention on the CPU for short sequences: one task per chunk of heads, strided heads in, the weights kept.

The GPT's attention (B·H = 64 heads of L = S = 64, E = 32, causal) is small per head: the flash
loop of kernels/cpu/attention.py spends most of its time around its products there (copies of the
transposed heads into contiguous (B·H, L, E) arrays and back, key tiles, the backward's recomputed
scores and exps). This kernel does a head's whole attention in one task of one parallel region
(a task per thread, each over a chunk of the heads):

- q, k, v (and grad_out) are 4-D ``(N, H, L, E)`` arrays with any non-negative strides whose last
  dim is unit-stride: the transposed views ``x.reshape(N, L, H, E).transpose(1, 2)`` that a
  Transformer makes of its projections are read in place (each task packs its heads into contiguous
  scratch, allocated once), so the head split costs no copy. Zero strides (a broadcast head) are read as they are.
- out, dq, dk, dv are allocated in the layout of the array they match (the order of its strides,
  the head dim innermost): for those transposed views the output is a transposed view of an (N, L, H, Ev)
  array, so that the merge ``out.transpose(1, 2).reshape(N, L, H * Ev)`` is a view, not a copy.
- The forward keeps the attention weights P (N·H, L4, S4) (L4, S4: L, S rounded up to 4, the
  padding 0): the backward then needs no scores and no exps, only dP = dO V^T and the products.
  That is L·S floats per head, so :func:`takes` admits it only up to HEADS_MAX_PAIRS pairs per head;
  longer sequences run kernels/cpu/attention.py (O(L) memory).

The formulas, the mask forms (``(1 or N·H, 1 or L, S)``, additive, heads flattened as ``n * H + h``),
``causal`` and the treatment of fully masked rows (out 0, no gradient) and of NaN and inf are those
of kernels/cpu/attention.py's module docstring; only the backward's D_i = dO_i . out_i is the same
number taken from the saved out. float32 and float64; 16-bit inputs are the caller's to widen (the
engine's ``Function.apply`` does). The products are kernels/cpu/attention.py's ``gemm4`` (float32
fused multiply-adds; the exps its polynomial ``exp_shift``), so results agree with the reference to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np

from . import attention as _attention
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import numba_parallel as _numba_parallel
from ..registry import real_number as _real_number
from ..threads import region_threads

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Query-key pairs (L * S) per head up to which the engine runs this kernel (P is kept: 4 L S bytes
# per head in float32); beyond it the flash kernels of kernels/cpu/attention.py, O(L) memory.
# docs/benchmarks.md ("Attention on strided heads") has the sizes measured.
HEADS_MAX_PAIRS = 128 * 128
# A row's softmax and dS loops run over a multiple of this many keys (masked past the visible ones):
# loops of a varying count spent most of a causal row in their scalar tails (docs/benchmarks.md).
VECTOR_KEYS = 16
# Head dims (E and Ev) compiled into the kernels as constants (_kernels); others are read at run time.
COMPILED_HEAD_DIMS = (16, 32, 64, 128)


def takes(l: int, s: int, dtype) -> bool:  # noqa: E741 - L as in PyTorch's (N, L, E)
    """Whether this kernel computes attention of L queries over S keys per head in ``dtype``
    (float32 or float64, the dtype the kernel sees after 16-bit widening)."""
    return np.dtype(dtype) in DTYPES and l * s <= HEADS_MAX_PAIRS


def forward(q, k, v, mask=None, *, scale=None, causal=False):
    """Attention of 4-D (N, H, L, E) heads -> ``(out, p)``.

    Args:
        q: (N, H, L, E), k: (N, H, S, E), v: (N, H, S, Ev), one dtype (float32 or float64), any
            non-negative strides (a negative or non-unit last stride costs a contiguous copy).
        mask: None or an additive float bias, C-contiguous, (1 or N·H, 1 or L, S) of q's dtype.
        scale: the score scale; None means 1 / sqrt(E).
        causal: query i sees keys j <= i (top-left aligned), on top of the mask.

    Returns:
        out (N, H, L, Ev) in q's layout, and p (N·H, L4, S4), the attention weights, which
        :func:`backward` takes.
    """
    nh, l, s, e, ev, scale = _check("attention_heads_forward", {"q": q, "k": k, "v": v}, mask, scale, causal)
    out = _empty_like_heads(q, ev)
    p = np.zeros((nh, _round4(l), _round4(s)), q.dtype)
    if nh == 0 or l == 0:
        return out, p
    if s == 0:  # every row fully masked
        out[...] = 0
        return out, p
    chunks = _chunks(nh, l, s, max(e, ev))
    kernel, _ = _kernels(chunks > 1, *_compiled_dims(e, ev))
    kernel(*_strided(q), *_strided(k), *_strided(v), _mask_arg(mask, q.dtype), mask is not None,
           int(mask is not None and mask.shape[0] > 1), mask is not None and mask.shape[1] > 1,
           q.dtype.type(scale), bool(causal), q.dtype == np.float32, q.shape[1], chunks, _dims(l, s, e, ev),
           *_strided(out), p)
    return out, p


def backward(grad_out, q, k, v, out, p, *, scale=None, causal=False):
    """Gradients of :func:`forward` -> ``(dq, dk, dv)``, each in the layout of its input.

    ``out`` and ``p`` are the forward's results, ``scale`` and ``causal`` its arguments (the mask is
    in p). grad_out is (N, H, L, Ev) with any non-negative strides.
    """
    arrays = {"grad_out": grad_out, "q": q, "k": k, "v": v, "out": out}
    nh, l, s, e, ev, scale = _check("attention_heads_backward", arrays, None, scale, causal)
    for name in ("grad_out", "out"):
        if arrays[name].shape != q.shape[:3] + (ev,):
            _fail("attention_heads_backward", arrays, f"{name} must have the forward output's shape (N, H, L, Ev)")
    if p.shape != (nh, _round4(l), _round4(s)) or p.dtype != q.dtype or not p.flags.c_contiguous:
        _fail("attention_heads_backward", arrays, f"p {p.shape} {p.dtype} is not the forward's weights "
                                                  f"(N·H, L4, S4) = {(nh, _round4(l), _round4(s))} {q.dtype}")
    dq, dk, dv = _empty_like_heads(q, e), _empty_like_heads(k, e), _empty_like_heads(v, ev)
    if nh == 0 or min(l, s) == 0:
        for a in (dq, dk, dv):
            a[...] = 0
        return dq, dk, dv
    chunks = _chunks(nh, l, s, max(e, ev))
    _, kernel = _kernels(chunks > 1, *_compiled_dims(e, ev))
    kernel(*_strided(grad_out), *_strided(q), *_strided(k), *_strided(v), *_strided(out), p,
           q.dtype.type(scale), bool(causal), q.shape[1], chunks, _dims(l, s, e, ev), *_strided(dq),
           *_strided(dk), *_strided(dv))
    return dq, dk, dv


def _fail(op, arrays, what):
    described = ", ".join(_describe(n, a) for n, a in arrays.items())
    raise KernelError(f"{op}({described}): {what}")


def _check(op, arrays, mask, scale, causal):
    """(N·H, L, S, E, Ev, scale) of a call, or a KernelError naming the arrays."""
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            _fail(op, arrays, f"{name} must be a numpy array (this kernel runs on the CPU)")
        if a.ndim != 4:
            _fail(op, arrays, f"{name} must be 4-D (N, H, L or S, head dim), got {a.ndim}-D")
        if a.dtype != arrays["q"].dtype or a.dtype not in DTYPES:
            _fail(op, arrays, "every array must share one dtype, float32 or float64 (16-bit inputs: widen them)")
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    n, h, l, e = q.shape
    s, ev = k.shape[2], v.shape[3]
    if k.shape != (n, h, s, e) or v.shape != (n, h, s, ev):
        _fail(op, arrays, "shapes do not agree: need q (N, H, L, E), k (N, H, S, E), v (N, H, S, Ev)")
    if mask is not None:
        fits = (isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.dtype == q.dtype and mask.flags.c_contiguous
                and mask.shape[0] in (1, n * h) and mask.shape[1] in (1, l) and mask.shape[2] == s)
        if not fits:
            _fail(op, dict(arrays, mask=mask), f"mask must be a C-contiguous {q.dtype} array of shape "
                                               f"(1 or N·H, 1 or L, S) = (1 or {n * h}, 1 or {l}, {s})")
    scale = _real_number(op, "scale", _attention.default_scale(e) if scale is None else scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise KernelError(f"{op}: causal must be True or False, got {causal!r}")
    return n * h, l, s, e, ev, scale


def _empty_like_heads(ref, d: int):
    """An empty (N, H, rows, d) array, rows as ``ref``'s, whose first three dims are laid out as ref's
    (the largest stride outermost; a broadcast dim innermost) and its last dim contiguous."""
    order = sorted(range(3), key=lambda dim: -abs(ref.strides[dim]))
    a = np.empty([ref.shape[dim] for dim in order] + [d], ref.dtype)
    return a.transpose(*(order.index(dim) for dim in range(3)), 3)


def _strided(a):
    """``(flat, strides)``: a 1-D contiguous view of the memory a 4-D array spans, from its first
    element, and its (N, H, L) strides in elements; the kernels index ``flat[n sN + h sH + i sL + x]``.
    An array whose last dim is not unit-stride, or with a negative stride, is copied first."""
    item = a.itemsize
    if any(st < 0 or st % item for st in a.strides) or (a.shape[3] > 1 and a.strides[3] != item):
        a = np.ascontiguousarray(a)
    span = 1 + sum((d - 1) * st for d, st in zip(a.shape, a.strides)) // item
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,))
    return flat, np.array([st // item for st in a.strides[:3]], np.int64)


def _dims(l, s, e, ev):  # noqa: E741
    return np.array([l, s, e, ev], np.int64)


def _mask_arg(mask, dtype):
    return mask if mask is not None else np.zeros((1, 1, 1), dtype)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def _chunks(nh: int, l: int, s: int, e: int) -> int:  # noqa: E741
    """How many chunks of heads a call splits the heads into, one task each (its scratch allocated once):
    over the heads in parallel, one chunk per thread, from PARALLEL_MIN multiply-adds
    (kernels/cpu/attention.py's rule) when other processes leave the machine a second CPU
    (:func:`kernels.threads.region_threads`); else 1, the serial build."""
    if nh <= 1 or nh * l * s * e < _attention.PARALLEL_MIN:
        return 1
    return min(nh, region_threads())


def _compiled_dims(e: int, ev: int) -> tuple[int, int]:
    """The head dims to compile into the kernels: (E, Ev) when both are in COMPILED_HEAD_DIMS, else
    (0, 0), the kernels that read them at run time."""
    return (e, ev) if e in COMPILED_HEAD_DIMS and ev in COMPILED_HEAD_DIMS else (0, 0)


@functools.cache
def _kernels(parallel: bool, head_dim: int = 0, value_dim: int = 0):
    """(forward, backward), one task per chunk of heads, the chunks in parallel (prange) or in turn.

    ``head_dim`` and ``value_dim`` (E and Ev; 0: read at run time) are compile-time constants of
    the build: the products' loop bounds then are too, and LLVM unrolls them (the GPT's forward
    took 1.4x less time so, docs/benchmarks.md). Each (parallel, E, Ev) is its own build.

    forward, per head: pack Q (L4 x E, zero rows below L), scale K^T (E x S) and V (S x Ev); the
    scores S = Q K^T into the head's slice of p (a causal group of four rows computes the keys up
    to its last row only); per row the mask row, -inf past the diagonal, the max, exps and their
    sum, then P = exps / sum in place (0 where masked, and for a fully masked row); out = P V.

    backward, per head: pack dO (L4 x Ev), Q, K (S x E) and V^T (Ev x S); D_i = dO_i . out_i,
    dP = dO V^T, dS = scale P (dP - D) in place; dV = P^T dO and dK = dS^T Q over the rows that
    see each group of four keys (causal: from the group's first key on), dQ = dS K.
    """
    import numba

    _heads_helpers()
    loop = numba.prange if parallel else range  # closure variables: their own disk-cache key per build
    fixed_e, fixed_ev = head_dim, value_dim
    jit = numba.njit(cache=True, parallel=parallel)

    @jit
    def forward(qf, qst, kf, kst, vf, vst, mask, has_mask, mask_per_batch, mask_per_row, scale, causal,
                fast_exp, nh, chunks, dims, of, ost, p):
        nl, ns = dims[0], dims[1]
        ne = fixed_e if fixed_e else dims[2]
        nev = fixed_ev if fixed_ev else dims[3]
        nt, nl4, ns4 = p.shape
        one = qf.dtype.type(1)
        neg_inf = qf.dtype.type(-np.inf)
        for chunk in loop(chunks):  # scratch allocated once per chunk of heads, not per head
            qp = np.zeros((nl4, ne), qf.dtype)  # rows from L on stay 0
            ktp = np.empty((ne, ns), qf.dtype)
            vp = np.empty((ns, nev), qf.dtype)
            acc = np.empty((nl4, nev), qf.dtype)
            exps = np.empty(ns4, qf.dtype)
            for t in range(nt * chunk // chunks, nt * (chunk + 1) // chunks):
                acc[:] = 0
                _nb_pack(qf, qst, t, nh, nl, ne, qp, one)
                _nb_pack_t(kf, kst, t, nh, ns, ne, ktp, scale)
                _nb_pack(vf, vst, t, nh, ns, nev, vp, one)
                pt = p[t]
                mb = mask[t * mask_per_batch]  # a mask shared by every head: row 0
                for g in range(0, nl4, 4):  # causal: a group of four rows computes the keys up to its last row
                    _nb_gemm4(qp, g, 0, ktp, 0, pt, g, ne, min(ns, g + 4) if causal else ns)
                for i in range(nl):
                    nr = min(ns, i + 1) if causal else ns  # the keys row i sees
                    # the row's loops run over nw >= nr keys, a multiple of 16 (or S4): a loop of a varying
                    # count spends most of a causal row in its scalar tail; keys nr .. nw read as -inf
                    nw = _visible_width(nr, ns4)
                    row = pt[i]
                    _nb_bias_row(row, nr, mb, i, 0, nl, has_mask, mask_per_row, False)
                    for j in range(nw):
                        row[j] = row[j] if j < nr else neg_inf
                    m = _nb_tile_max(row, nw)
                    # the exps into scratch: written over their own scores, they ran ~10x slower (no SIMD)
                    _nb_exp_shift(row, nw, m if m != neg_inf else qf.dtype.type(0), fast_exp, exps)
                    total = _nb_tile_sum(exps, nw)  # NaN for a NaN or +inf score: the row's P and out are NaN
                    inv = one / total if total != 0 else qf.dtype.type(0)  # fully masked: P = 0, out = 0
                    for j in range(nw):  # past the diagonal 0 (not 0 times a NaN inv); from nw on p stays 0
                        row[j] = exps[j] * inv if j < nr else 0
                for g in range(0, nl4, 4):
                    _nb_gemm4(pt, g, 0, vp, 0, acc, g, min(ns, g + 4) if causal else ns, nev)
                _nb_unpack(acc, nl, nev, of, ost, t, nh)

    @jit
    def backward(gf, gst, qf, qst, kf, kst, vf, vst, of, ost, p, scale, causal, nh, chunks, dims,
                 dqf, dqst, dkf, dkst, dvf, dvst):
        nl, ns = dims[0], dims[1]
        ne = fixed_e if fixed_e else dims[2]
        nev = fixed_ev if fixed_ev else dims[3]
        nt, nl4, ns4 = p.shape
        one = qf.dtype.type(1)
        for chunk in loop(chunks):  # scratch allocated once per chunk of heads, not per head
            dop = np.zeros((nl4, nev), qf.dtype)  # rows from L on stay 0
            qp = np.zeros((nl4, ne), qf.dtype)
            kp = np.empty((ns, ne), qf.dtype)
            vtp = np.empty((nev, ns), qf.dtype)
            ds = np.empty((nl4, ns4), qf.dtype)  # dP, then dS; columns from S on stay 0
            dq = np.empty((nl4, ne), qf.dtype)
            dk = np.empty((ns4, ne), qf.dtype)
            dv = np.empty((ns4, nev), qf.dtype)
            for t in range(nt * chunk // chunks, nt * (chunk + 1) // chunks):
                for a in (ds, dq, dk, dv):
                    a[:] = 0
                _nb_pack(gf, gst, t, nh, nl, nev, dop, one)
                _nb_pack(qf, qst, t, nh, nl, ne, qp, one)
                _nb_pack(kf, kst, t, nh, ns, ne, kp, one)
                _nb_pack_t(vf, vst, t, nh, ns, nev, vtp, one)
                pt = p[t]
                obase = (t // nh) * ost[0] + (t % nh) * ost[1]
                for g in range(0, nl4, 4):
                    _nb_gemm4(dop, g, 0, vtp, 0, ds, g, nev, min(ns, g + 4) if causal else ns)
                for i in range(nl):
                    nr = min(ns, i + 1) if causal else ns
                    o = obase + i * ost[2]
                    d = _nb_rowdot(dop[i], of[o:o + nev])  # D_i = dO_i . out_i, out read in place
                    prow, dsrow = pt[i], ds[i]
                    # P = 0 (masked) times a NaN dP - D is NaN, as in the reference; past the diagonal 0
                    for j in range(_visible_width(nr, ns4)):  # from there on ds stays 0
                        dsrow[j] = prow[j] * (dsrow[j] - d) * scale if j < nr else 0
                for jg in range(0, ns4, 4):
                    r0 = jg if causal else 0  # causal: rows before key jg see none of keys jg .. jg + 3
                    if r0 < nl4:
                        _nb_gemm4(pt.T, jg, r0, dop, r0, dv, jg, nl4 - r0, nev)
                        _nb_gemm4(ds.T, jg, r0, qp, r0, dk, jg, nl4 - r0, ne)
                for g in range(0, nl4, 4):
                    _nb_gemm4(ds, g, 0, kp, 0, dq, g, min(ns, g + 4) if causal else ns, ne)
                _nb_unpack(dq, nl, ne, dqf, dqst, t, nh)
                _nb_unpack(dk, ns, ne, dkf, dkst, t, nh)
                _nb_unpack(dv, ns, nev, dvf, dvst, t, nh)

    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return _numba_parallel(forward), _numba_parallel(backward)
    return forward, backward


# Set by _heads_helpers() (module globals the kernels read: closures would miss numba's disk cache).
_nb_gemm4 = _nb_exp_shift = _nb_tile_max = _nb_tile_sum = _nb_rowdot = _nb_bias_row = None
_nb_pack = _nb_pack_t = _nb_unpack = _visible_width = None


@functools.cache
def _heads_helpers() -> None:
    """Compile the packing helpers and publish them, and kernels/cpu/attention.py's tile helpers, as
    module globals for the kernels."""
    import numba

    _attention._numba_helpers()

    @numba.njit(cache=True)
    def pack(flat, st, t, nh, rows, cols, dst, factor):
        """dst[:rows, :cols] = factor * head t (rows of cols contiguous elements)."""
        base = (t // nh) * st[0] + (t % nh) * st[1]
        for i in range(rows):
            o = base + i * st[2]
            for x in range(cols):
                dst[i, x] = flat[o + x] * factor

    @numba.njit(cache=True)
    def pack_t(flat, st, t, nh, rows, cols, dst, factor):
        """dst[:cols, :rows] = factor * head t transposed."""
        base = (t // nh) * st[0] + (t % nh) * st[1]
        for i in range(rows):
            o = base + i * st[2]
            for x in range(cols):
                dst[x, i] = flat[o + x] * factor

    @numba.njit(cache=True)
    def unpack(src, rows, cols, flat, st, t, nh):
        """head t of flat = src[:rows, :cols]."""
        base = (t // nh) * st[0] + (t % nh) * st[1]
        for i in range(rows):
            o = base + i * st[2]
            for x in range(cols):
                flat[o + x] = src[i, x]

    @numba.njit(cache=True)
    def visible_width(nr, ns4):
        """nr keys rounded up to a multiple of VECTOR_KEYS, at most ns4 (the row's width)."""
        return min(-(-nr // VECTOR_KEYS) * VECTOR_KEYS, ns4)

    globals().update(_nb_gemm4=_attention._nb_gemm4, _nb_exp_shift=_attention._nb_exp_shift,
                     _nb_tile_max=_attention._nb_tile_max, _nb_tile_sum=_attention._nb_tile_sum,
                     _nb_rowdot=_attention._nb_rowdot, _nb_bias_row=_attention._nb_bias_row,
                     _nb_pack=pack, _nb_pack_t=pack_t, _nb_unpack=unpack,
                     _visible_width=visible_width)

"""Scaled-dot-product attention, forward and backward, on the CPU (flash-attention style).

Shapes: q (B, L, E), k (B, S, E), v (B, S, Ev), all C-contiguous, one float dtype (float32; the
CPU impls also take float64, for gradient checks). B is batch * heads, flattened by the caller.
Per batch b and query row i, with scores over the keys j::

    s_ij  = scale * (q_i . k_j) + mask_ij      (mask_ij = -inf where causal and j > i)
    lse_i = log sum_j exp(s_ij)
    P_ij  = exp(s_ij - lse_i)
    out_i = sum_j P_ij v_j

``forward`` returns ``(out (B, L, Ev), lse (B, L))``; lse is the only softmax state backward needs.
Backward (flash-attention-2), given dO = grad_out::

    D_i   = dO_i . out_i                (= sum_j P_ij dP_ij)
    dP_ij = dO_i . v_j
    dS_ij = P_ij (dP_ij - D_i)
    dq_i  = scale * sum_j dS_ij k_j,  dk_j = scale * sum_i dS_ij q_i,  dv_j = sum_i P_ij dO_i

**Mask.** ``mask`` is None or an additive float bias of q's dtype, 3-D, C-contiguous, of shape
``(Bm, Lm, S)`` with ``Bm`` in ``{1, B}`` and ``Lm`` in ``{1, L}``: ``(1, L, S)`` one mask shared by
every batch and head, ``(B, 1, S)`` a key-padding mask per batch row, ``(B, L, S)`` a full mask,
``(1, 1, S)`` one key mask for all. The size-1 dims broadcast through zero strides inside the
kernels, so a shared or key-padding mask is never expanded to B x L x S. Boolean masks are the
caller's to turn into 0 / -inf (engine layer); the mask gets no gradient. ``causal=True`` is
PyTorch's ``is_causal``: the top-left aligned lower triangle ``ones(L, S).tril()`` (query i sees
keys j <= i), applied on top of ``mask``.

**Fully masked rows.** A query row that sees no key (every s_ij = -inf: a padding row, or S = 0)
gets ``out_i = 0`` and ``lse_i = -inf``, and contributes nothing to any gradient (dq_i = 0, and
nothing to dk, dv). PyTorch's math path returns NaN there; zeros are what padding needs.

``numpy`` is the plain reference (it materialises the B x L x S scores). ``numba_cpu`` never
does: see :func:`_numba_kernels`. Both call :func:`validate_forward` / :func:`validate_backward`
first, as do the GPU impls (which accept numpy arrays only under the Numba CUDA simulator).
``import kernels.cpu.attention`` does not import numba.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from kernels.registry import KernelError
from kernels.registry import describe_array as _describe
from kernels.registry import different_gpus as _different_gpus
from kernels.registry import module_of as _module_of
from kernels.registry import numba_parallel as _numba_parallel

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
GPU_MAX_HEAD_DIM = 128  # E and Ev: what the GPU kernels keep per thread / in shared memory


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """What one validated call asks for."""

    b: int
    l: int  # noqa: E741 - queries, as in PyTorch's (N, L, E)
    s: int  # keys
    e: int  # q / k head dim
    ev: int  # v head dim
    dtype: np.dtype
    scale: float
    causal: bool
    mask_b: int  # 0: no mask, else the mask's first dim (1 or B)
    mask_l: int  # 0: no mask, else the mask's second dim (1 or L)
    array_module: str  # "numpy" or "cupy"

    @property
    def mask_strides(self) -> tuple[int, int]:
        """(batch stride, row stride) of the mask in elements: 0 along a broadcast dim."""
        if not self.mask_b:
            return 0, 0
        return (0 if self.mask_b == 1 else self.mask_l * self.s), (0 if self.mask_l == 1 else self.s)


def _fail(op, arrays, what):
    described = ", ".join(_describe(n, a) for n, a in arrays.items())
    raise KernelError(f"{op}({described}): {what}")


def _validate(op, arrays, q, k, v, mask, scale, causal) -> AttentionSpec:
    for name, a in arrays.items():
        if a is None and name == "mask":
            continue
        if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "flags")) \
                or _module_of(a) not in ("numpy", "cupy"):
            _fail(op, arrays, f"{name} is not an array; pass numpy arrays (CPU) or cupy arrays (GPU)")
    present = [a for a in arrays.values() if a is not None]
    modules = {_module_of(a) for a in present}
    if len(modules) > 1:
        _fail(op, arrays, "the arrays are on different devices; move them all to the CPU (numpy) or all to "
                          "the GPU (cupy)")
    if "cupy" in modules:
        spread = _different_gpus(present)
        if spread:
            _fail(op, arrays, f"the arrays are on different GPUs ({spread}); move them all to one device")
    for name in ("q", "k", "v"):
        if arrays[name].ndim != 3:
            _fail(op, arrays, f"{name} must be 3-D (B, L or S, head dim) with batch and heads flattened into B, "
                              f"got {arrays[name].ndim}-D")
    dtype = np.dtype(q.dtype)
    if dtype not in FLOAT_DTYPES:
        _fail(op, arrays, f"dtype {dtype} is not supported; use float32 (float64 on the CPU)")
    for name, a in arrays.items():
        if a is not None and np.dtype(a.dtype) != dtype:
            _fail(op, arrays, f"{name} has dtype {a.dtype} but q has {dtype}; every array must share q's dtype "
                              "(cast explicitly: nothing is promoted silently)")
    b, l, e = (int(d) for d in q.shape)
    s, ev = int(k.shape[1]), int(v.shape[2])
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != e or v.shape[1] != s:
        _fail(op, arrays, "shapes do not agree: need q (B, L, E), k (B, S, E), v (B, S, Ev)")
    if e < 1 or ev < 1:
        _fail(op, arrays, "head dims E and Ev must be at least 1")
    mask_b = mask_l = 0
    if mask is not None:
        if mask.ndim != 3:
            _fail(op, arrays, f"mask must be 3-D (1 or B, 1 or L, S), got {mask.ndim}-D; add the leading "
                              "dims (mask[None] for an (L, S) mask)")
        mask_b, mask_l, mask_s = (int(d) for d in mask.shape)
        if mask_b not in (1, b) or mask_l not in (1, l) or mask_s != s:
            _fail(op, arrays, f"mask shape {tuple(mask.shape)} is not one of (1 or B, 1 or L, S) = "
                              f"({'1 or ' if b != 1 else ''}{b}, {'1 or ' if l != 1 else ''}{l}, {s}): "
                              "(1, L, S) shared, (B, 1, S) key padding, (B, L, S) full")
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            hint = (" (for a broadcast mask pass the un-expanded (1, L, S) or (B, 1, S) array: the kernel "
                    "broadcasts it without copying)") if name == "mask" else ""
            _fail(op, arrays, f"{name} is not C-contiguous; pass a contiguous array{hint}")
    if scale is None:
        scale = 1.0 / math.sqrt(e)  # PyTorch's default
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise KernelError(f"{op}: scale must be a real number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise KernelError(f"{op}: scale must be finite, got {scale!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise KernelError(f"{op}: causal must be True or False, got {causal!r}")
    return AttentionSpec(b, l, s, e, ev, dtype, scale, bool(causal), mask_b, mask_l, modules.pop())


def validate_forward(q, k, v, mask=None, *, scale, causal) -> AttentionSpec:
    """Check the arguments of ``attention_forward`` (every impl calls this first)."""
    arrays = {"q": q, "k": k, "v": v, "mask": mask}
    return _validate("attention_forward", arrays, q, k, v, mask, scale, causal)


def validate_backward(grad_out, q, k, v, out, lse, mask=None, *, scale, causal) -> AttentionSpec:
    """Check the arguments of ``attention_backward``: the forward's, plus grad_out, out and lse."""
    op = "attention_backward"
    arrays = {"grad_out": grad_out, "q": q, "k": k, "v": v, "out": out, "lse": lse, "mask": mask}
    for name in ("grad_out", "out", "lse"):  # shapes checked after _validate; ndim first for a clear error
        a = arrays[name]
        if hasattr(a, "ndim") and a.ndim != (2 if name == "lse" else 3):
            _fail(op, arrays, f"{name} must be {2 if name == 'lse' else 3}-D, got {a.ndim}-D")
    spec = _validate(op, arrays, q, k, v, mask, scale, causal)
    want = (spec.b, spec.l, spec.ev)
    for name in ("grad_out", "out"):
        if tuple(arrays[name].shape) != want:
            _fail(op, arrays, f"{name} must have the forward output's shape (B, L, Ev) = {want}")
    if tuple(lse.shape) != (spec.b, spec.l):
        _fail(op, arrays, f"lse must have shape (B, L) = {(spec.b, spec.l)}, as attention_forward returns it")
    return spec


def check_gpu_limits(spec: AttentionSpec, op: str, impl: str) -> None:
    """The GPU impls' extra limits: float32 and head dims <= 128."""
    if spec.dtype != np.float32:
        raise KernelError(f"{op} ({impl}): dtype {spec.dtype} is not supported on the GPU; use float32 "
                          f"(q ({spec.b}, {spec.l}, {spec.e}))")
    if spec.e > GPU_MAX_HEAD_DIM or spec.ev > GPU_MAX_HEAD_DIM:
        raise KernelError(f"{op} ({impl}): head dims E = {spec.e}, Ev = {spec.ev} (q ({spec.b}, {spec.l}, {spec.e}), "
                          f"v ({spec.b}, {spec.s}, {spec.ev}) {spec.dtype}) are over the GPU kernels' limit of "
                          f"{GPU_MAX_HEAD_DIM}; split the heads or use a CPU impl")
    limit = 2**31 - 1  # element offsets are 32-bit in places; rows and batches are not
    if max(spec.l, spec.s) * max(spec.e, spec.ev) > limit:
        raise KernelError(f"{op} ({impl}): one batch row of L = {spec.l} or S = {spec.s} rows is too large")


def empty_forward(spec: AttentionSpec, xp):
    """The forward result when B, L or S is 0: no work; S = 0 means every row is fully masked."""
    return xp.zeros((spec.b, spec.l, spec.ev), spec.dtype), xp.full((spec.b, spec.l), -np.inf, spec.dtype)


def empty_backward(spec: AttentionSpec, xp):
    return (xp.zeros((spec.b, spec.l, spec.e), spec.dtype), xp.zeros((spec.b, spec.s, spec.e), spec.dtype),
            xp.zeros((spec.b, spec.s, spec.ev), spec.dtype))


def is_empty(spec: AttentionSpec) -> bool:
    return spec.b == 0 or spec.l == 0 or spec.s == 0


# --------------------------------------------------------------------------------------------
# numpy: the reference, written as the formulas above (materialises the scores)
# --------------------------------------------------------------------------------------------


def _scores(q, k, mask, spec: AttentionSpec):
    s = np.matmul(q, k.transpose(0, 2, 1)) * spec.dtype.type(spec.scale)
    if mask is not None:
        s = s + mask  # numpy broadcasting: the (1, L, S) / (B, 1, S) mask is never expanded by hand
    if spec.causal:
        above = np.triu(np.ones((spec.l, spec.s), bool), k=1)  # key j > query i
        s = np.where(above, spec.dtype.type(-np.inf), s)
    return s


def attention_forward_numpy(q, k, v, mask=None, *, scale=None, causal=False):
    spec = validate_forward(q, k, v, mask, scale=scale, causal=causal)
    if is_empty(spec):
        return empty_forward(spec, np)
    s = _scores(q, k, mask, spec)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), spec.dtype.type(0), m)  # a fully masked row: exp(-inf) = 0 below
        e = np.exp(s - m)
        total = e.sum(axis=-1, keepdims=True)
        lse = (m + np.log(total))[..., 0]  # log 0 = -inf for a fully masked row
        p = np.where(total > 0, e / total, spec.dtype.type(0))
    out = np.matmul(p, v)
    return out.astype(spec.dtype, copy=False), lse.astype(spec.dtype, copy=False)


def attention_backward_numpy(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False):
    spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
    if is_empty(spec):
        return empty_backward(spec, np)
    dt = spec.dtype.type
    s = _scores(q, k, mask, spec)
    with np.errstate(invalid="ignore"):
        visible = ~np.isneginf(lse)[..., None]  # rows that saw some key; the others get no gradient
        p = np.where(visible, np.exp(s - np.where(visible, lse[..., None], dt(0))), dt(0))
    d = (grad_out * out).sum(axis=-1, keepdims=True)
    dp = np.matmul(grad_out, v.transpose(0, 2, 1))
    ds = p * (dp - d)
    dq = np.matmul(ds, k) * dt(spec.scale)
    dk = np.matmul(ds.transpose(0, 2, 1), q) * dt(spec.scale)
    dv = np.matmul(p.transpose(0, 2, 1), grad_out)
    return tuple(a.astype(spec.dtype, copy=False) for a in (dq, dk, dv))


# --------------------------------------------------------------------------------------------
# numba_cpu: flash-style tiles, never an L x S matrix. See _numba_kernels for the loop structure.
# --------------------------------------------------------------------------------------------

# Query rows per task (forward, dq) and keys per tile. A tile of keys and values (64 x E and
# 64 x Ev floats: 32 KiB at E = Ev = 64) stays in L1/L2 while every row of the task uses it.
QUERY_TILE = 32
KEY_TILE = 64
# The backward splits the keys of each batch row into at most this many chunks, one task each;
# a chunk accumulates its own partial dq (KEY_CHUNKS x B x L x E floats, O(L) memory), summed in
# chunk order afterwards: deterministic, whatever the thread count, with no second pass over the
# scores for dq (which would recompute P and dP: 7 instead of 5 matrix-product equivalents).
KEY_CHUNKS = 4
# B * L * S * E from which the tasks run in parallel: starting a workqueue parallel region costs
# ~50 us, about what one thread needs for 2^20 multiply-adds here.
PARALLEL_MIN = 1 << 20


def attention_forward_numba(q, k, v, mask=None, *, scale=None, causal=False):
    spec = validate_forward(q, k, v, mask, scale=scale, causal=causal)
    if is_empty(spec):
        return empty_forward(spec, np)
    dt = spec.dtype
    out = np.empty((spec.b, spec.l, spec.ev), dt)
    lse = np.empty((spec.b, spec.l), dt)
    forward, _ = _numba_kernels(_parallel(spec))
    forward(q, k, _transposed(v), _mask_arg(mask, dt), mask is not None, spec.mask_b > 1, spec.mask_l > 1,
            dt.type(spec.scale), spec.causal, dt == np.float32, out, lse)
    return out, lse


def attention_backward_numba(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False):
    spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal)
    if is_empty(spec):
        return empty_backward(spec, np)
    dt = spec.dtype
    chunks = min(KEY_CHUNKS, -(-spec.s // KEY_TILE))
    dq_parts = np.zeros((chunks, spec.b, spec.l, spec.e), dt)
    dk = np.zeros((spec.b, spec.s, spec.e), dt)
    dv = np.zeros((spec.b, spec.s, spec.ev), dt)
    _, backward = _numba_kernels(_parallel(spec))
    backward(grad_out, q, k, _transposed(k), v, out, lse, _mask_arg(mask, dt), mask is not None,
             spec.mask_b > 1, spec.mask_l > 1, dt.type(spec.scale), spec.causal, dt == np.float32, dq_parts, dk, dv)
    dq = dq_parts[0]
    for c in range(1, chunks):  # in chunk order: the same bits for any number of threads
        dq += dq_parts[c]
    return dq, dk, dv


def _parallel(spec: AttentionSpec) -> bool:
    return spec.b * spec.l * spec.s * max(spec.e, spec.ev) >= PARALLEL_MIN


def _transposed(a):
    """(B, E, S) from (B, S, E): an O(S E) copy, so that P v and dS k are dot products of unit-stride rows."""
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def _mask_arg(mask, dtype):
    # one compiled signature whether or not a mask is given: a 1 x 1 x 1 placeholder when absent
    return mask if mask is not None else np.zeros((1, 1, 1), dtype)


# float32 exp(x) for x <= 0, branch-free so that LLVM vectorizes it (numba calls scalar expf
# otherwise, which made the exps cost more than the dot products): the Cephes polynomial of
# kernels/cpu/softmax_cross_entropy.py (max error 1.4 ulp; x < -87, -inf included, gives 0).
_F32 = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F32(v) for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                   4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_EXP_LO, _HALF, _ONE = _F32(-87.0), _F32(0.5), _F32(1.0)

# Set by _numba_helpers() (module globals the kernels read: closures would miss numba's disk cache).
_nb_dot4 = _nb_axpy4 = _nb_exp_shift = _nb_tile_max = _nb_tile_sum = None


@functools.cache
def _numba_helpers() -> None:
    """Compile the tile helpers and publish them as module globals for the kernels."""
    import numba

    # Dot products and sums may be reordered (vectorized partial sums): float32 rounding only.
    reassoc = numba.njit(cache=True, fastmath={"reassoc", "contract"})

    @reassoc
    def dot4(a0, a1, a2, a3, b):
        """(a0 . b, a1 . b, a2 . b, a3 . b): four rows against one, each load of b used four times.

        The matrix products of attention are all written with this (4 query rows at a time): it
        ran 3.4x faster than one dot product at a time (a single-row dot is load-bound).
        """
        z = b.dtype.type(0)
        s0 = s1 = s2 = s3 = z
        for x in range(b.shape[0]):
            bx = b[x]
            s0 += a0[x] * bx
            s1 += a1[x] * bx
            s2 += a2[x] * bx
            s3 += a3[x] * bx
        return s0, s1, s2, s3

    @numba.njit(cache=True)
    def axpy4(c0, x0, c1, x1, c2, x2, c3, x3, y):
        """y += c0 x0 + c1 x1 + c2 x2 + c3 x3 (one load and store of y for four rows)."""
        for t in range(y.shape[0]):
            y[t] += c0 * x0[t] + c1 * x1[t] + c2 * x2[t] + c3 * x3[t]

    @numba.njit(cache=True, fastmath={"nnan", "nsz"})
    def tile_max(st, nk):
        m = st[0]
        for jj in range(1, nk):
            if st[jj] > m:
                m = st[jj]
        return m

    @reassoc
    def tile_sum(st, nk):
        total = st.dtype.type(0)
        for jj in range(nk):
            total += st[jj]
        return total

    @numba.njit(cache=True)
    def exp_shift(st, nk, shift, fast_exp, pt):
        """pt[jj] = exp(st[jj] - shift) for jj < nk (shift finite; -inf scores give 0)."""
        if not fast_exp:
            for jj in range(nk):
                pt[jj] = np.exp(st[jj] - shift)
            return
        for jj in range(nk):  # exp(r) and the exponent t, clamped so 2^t stays a normal scale
            x = st[jj] - shift
            if x < _EXP_LO:
                x = _EXP_LO
            t = np.floor(x * _LOG2E + _HALF)
            r = x - t * _LN2_HI
            r = r - t * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            pt[jj] = p * (r * r) + r + _ONE
        bits = pt.view(np.int32)
        for jj in range(nk):  # times 2^t: add t to the exponent field (t recomputed, same rounding)
            x = st[jj] - shift
            xc = _EXP_LO if x < _EXP_LO else x
            t = np.floor(xc * _LOG2E + _HALF)
            ti = np.int32(t) if t >= -126 else np.int32(0)  # NaN: bits untouched
            scaled = bits[jj] + (ti << 23)
            bits[jj] = 0 if x < _EXP_LO else scaled

    globals().update(_nb_dot4=dot4, _nb_axpy4=axpy4, _nb_exp_shift=exp_shift, _nb_tile_max=tile_max,
                     _nb_tile_sum=tile_sum)


@functools.cache
def _numba_kernels(parallel: bool):
    """(forward, backward), over their tasks in parallel (prange) or on the calling thread.

    Query rows go in groups of 4 (the last group of a tile repeats its last row, whose results
    are dropped), so every product below is a :func:`dot4` or ``axpy4``.

    forward: one task per (batch row, tile of QUERY_TILE queries). For each tile of KEY_TILE keys
    (up to the last one a causal tile can see) and each group: scores against the tile (dot4 of
    the 4 query rows with each key row), plus the mask row (broadcast by index: a (1, L, S) or
    (B, 1, S) mask is read in place), -inf above the causal diagonal; per row the tile max, a
    rescale of the running sum and output accumulator when the max grows (online softmax), the
    exps; then the accumulators get P v_tile (dot4 of the 4 P rows with each row of v^T). State
    per query row: max, sum, an Ev accumulator.

    backward: one task per (batch row, chunk of key tiles). Per key tile and group of 4 query
    rows that can see it: scores again, P = exp(s - lse) (0 for a fully masked row, lse = -inf),
    dP = dO v_j^T (dot4), dS = P (dP - D); the tile's dk, dv rows get dS q and P dO (axpy4) and the
    chunk's dq partial gets dS k_tile (dot4 with each row of k^T).
    """
    import numba

    _numba_helpers()
    loop = numba.prange if parallel else range  # a closure variable: its own disk-cache key per build
    jit = numba.njit(cache=True, parallel=parallel)
    tq, tk = QUERY_TILE, KEY_TILE

    @jit
    def forward(q, k, vt, mask, has_mask, mask_per_batch, mask_per_row, scale, causal, fast_exp, out, lse):
        nb, nl, _ = q.shape
        ns = k.shape[1]
        nev = vt.shape[1]
        ntiles = (nl + tq - 1) // tq
        neg_inf = q.dtype.type(-np.inf)
        for task in loop(nb * ntiles):
            b = task // ntiles
            i0 = (task - b * ntiles) * tq
            nq = min(nl - i0, tq)
            acc = np.zeros((nq, nev), q.dtype)
            row_max = np.full(nq, neg_inf, q.dtype)
            row_sum = np.zeros(nq, q.dtype)
            st = np.empty((4, tk), q.dtype)  # scores of a group against the tile
            pt = np.zeros((4, tk), q.dtype)  # their exps (0 where masked)
            kb, vtb = k[b], vt[b]
            mb = mask[b if mask_per_batch else 0]
            kend = min(ns, i0 + nq) if causal else ns
            for j0 in range(0, kend, tk):
                nk_tile = min(tk, ns - j0)
                for g0 in range(0, nq, 4):
                    last = min(g0 + 3, nq - 1)
                    r0, r1, r2, r3 = g0, min(g0 + 1, last), min(g0 + 2, last), last  # rows in the task
                    nk = min(nk_tile, i0 + last + 1 - j0) if causal else nk_tile  # the group's last row sees most
                    if nk <= 0:
                        continue
                    q0, q1, q2, q3 = q[b, i0 + r0], q[b, i0 + r1], q[b, i0 + r2], q[b, i0 + r3]
                    for jj in range(nk):
                        s0, s1, s2, s3 = _nb_dot4(q0, q1, q2, q3, kb[j0 + jj])
                        st[0, jj] = s0 * scale
                        st[1, jj] = s1 * scale
                        st[2, jj] = s2 * scale
                        st[3, jj] = s3 * scale
                    for r in range(4):
                        row = min(g0 + r, last)
                        i = i0 + row
                        srow = st[r]
                        if has_mask:
                            mrow = mb[i if mask_per_row else 0]
                            for jj in range(nk):
                                srow[jj] += mrow[j0 + jj]
                        if causal:
                            for jj in range(max(0, i + 1 - j0), nk):
                                srow[jj] = neg_inf
                        prow = pt[r]
                        m_old = row_max[row]
                        m_new = max(m_old, _nb_tile_max(srow, nk))
                        if m_new == neg_inf or g0 + r > last:  # nothing visible yet, or a repeated row
                            prow[:nk] = 0
                            continue
                        if m_new > m_old:
                            alpha = np.exp(m_old - m_new)  # 0 while the row was empty (m_old = -inf)
                            row_sum[row] *= alpha
                            a = acc[row]
                            for x in range(nev):
                                a[x] *= alpha
                            row_max[row] = m_new
                        _nb_exp_shift(srow, nk, m_new, fast_exp, prow)
                        row_sum[row] += _nb_tile_sum(prow, nk)
                    p0, p1, p2, p3 = pt[0, :nk], pt[1, :nk], pt[2, :nk], pt[3, :nk]
                    for x in range(nev):
                        o0, o1, o2, o3 = _nb_dot4(p0, p1, p2, p3, vtb[x, j0:j0 + nk])
                        acc[r0, x] += o0
                        if r1 != r0:
                            acc[r1, x] += o1
                        if r2 != r1:
                            acc[r2, x] += o2
                        if r3 != r2:
                            acc[r3, x] += o3
            for ii in range(nq):
                total = row_sum[ii]
                if total > 0:
                    inv = 1 / total
                    for x in range(nev):
                        out[b, i0 + ii, x] = acc[ii, x] * inv
                    lse[b, i0 + ii] = row_max[ii] + np.log(total)
                else:  # fully masked row: output 0, lse -inf (no gradient flows through it)
                    for x in range(nev):
                        out[b, i0 + ii, x] = 0
                    lse[b, i0 + ii] = neg_inf

    @jit
    def backward(grad_out, q, k, kt, v, out, lse, mask, has_mask, mask_per_batch, mask_per_row, scale, causal,
                 fast_exp, dq_parts, dk, dv):
        nb, nl, ne = q.shape
        ns = k.shape[1]
        nkt = (ns + tk - 1) // tk
        chunks = dq_parts.shape[0]
        neg_inf = q.dtype.type(-np.inf)
        d = np.empty((nb, nl), q.dtype)  # D_i = dO_i . out_i
        for i in range(nb * nl):
            bi, ii = i // nl, i % nl
            s0, _, _, _ = _nb_dot4(grad_out[bi, ii], grad_out[bi, ii], grad_out[bi, ii], grad_out[bi, ii],
                                   out[bi, ii])
            d[bi, ii] = s0
        for task in loop(nb * chunks):
            b = task // chunks
            c = task - b * chunks
            st = np.empty((4, tk), q.dtype)
            pt = np.zeros((4, tk), q.dtype)  # P
            dst = np.zeros((4, tk), q.dtype)  # dS (scale included)
            kb, ktb, vb = k[b], kt[b], v[b]
            mb = mask[b if mask_per_batch else 0]
            dqb = dq_parts[c, b]
            for t in range(c * nkt // chunks, (c + 1) * nkt // chunks):
                j0 = t * tk
                nk_tile = min(tk, ns - j0)
                for g0 in range(j0 if causal else 0, nl, 4):  # causal: queries before j0 see none of it
                    last = min(g0 + 3, nl - 1)
                    i0, i1, i2, i3 = g0, min(g0 + 1, last), min(g0 + 2, last), last
                    nk = min(nk_tile, last + 1 - j0) if causal else nk_tile
                    q0, q1, q2, q3 = q[b, i0], q[b, i1], q[b, i2], q[b, i3]
                    do0, do1, do2, do3 = grad_out[b, i0], grad_out[b, i1], grad_out[b, i2], grad_out[b, i3]
                    for jj in range(nk):
                        s0, s1, s2, s3 = _nb_dot4(q0, q1, q2, q3, kb[j0 + jj])
                        st[0, jj] = s0 * scale
                        st[1, jj] = s1 * scale
                        st[2, jj] = s2 * scale
                        st[3, jj] = s3 * scale
                    for r in range(4):
                        i = min(g0 + r, last)
                        srow, prow = st[r], pt[r]
                        li = lse[b, i]
                        if li == neg_inf or g0 + r > last:  # fully masked row, or a repeated one: no gradient
                            prow[:nk] = 0
                            continue
                        if has_mask:
                            mrow = mb[i if mask_per_row else 0]
                            for jj in range(nk):
                                srow[jj] += mrow[j0 + jj]
                        if causal:
                            for jj in range(max(0, i + 1 - j0), nk):
                                srow[jj] = neg_inf
                        _nb_exp_shift(srow, nk, li, fast_exp, prow)
                    for jj in range(nk):
                        vj = vb[j0 + jj]
                        dp0, dp1, dp2, dp3 = _nb_dot4(do0, do1, do2, do3, vj)
                        dst[0, jj] = pt[0, jj] * (dp0 - d[b, i0]) * scale
                        dst[1, jj] = pt[1, jj] * (dp1 - d[b, i1]) * scale
                        dst[2, jj] = pt[2, jj] * (dp2 - d[b, i2]) * scale
                        dst[3, jj] = pt[3, jj] * (dp3 - d[b, i3]) * scale
                        _nb_axpy4(pt[0, jj], do0, pt[1, jj], do1, pt[2, jj], do2, pt[3, jj], do3, dv[b, j0 + jj])
                        _nb_axpy4(dst[0, jj], q0, dst[1, jj], q1, dst[2, jj], q2, dst[3, jj], q3, dk[b, j0 + jj])
                    ds0, ds1, ds2, ds3 = dst[0, :nk], dst[1, :nk], dst[2, :nk], dst[3, :nk]
                    for x in range(ne):
                        g_0, g_1, g_2, g_3 = _nb_dot4(ds0, ds1, ds2, ds3, ktb[x, j0:j0 + nk])
                        dqb[i0, x] += g_0
                        if i1 != i0:
                            dqb[i1, x] += g_1
                        if i2 != i1:
                            dqb[i2, x] += g_2
                        if i3 != i2:
                            dqb[i3, x] += g_3

    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return _numba_parallel(forward), _numba_parallel(backward)
    return forward, backward

"""Scaled-dot-product attention, forward and backward, on the CPU (flash-attention style).

Shapes: q (B, L, E), k (B, S, E), v (B, S, Ev), all C-contiguous, one float dtype: float32,
bfloat16 (``ml_dtypes.bfloat16``) or float16 (every impl but numba_cuda, which takes float32), and
float64 on the CPU impls (for gradient checks). B is batch * heads, flattened by the caller.

**16-bit inputs** (bfloat16, float16) are storage: every impl computes in float32 and rounds out,
dq, dk and dv once to the input dtype; lse (and D) stay float32, and a mask may be float32 or the
input dtype (the kernels read a float32 one; a 16-bit mask is widened first).

**precision** (``None``, ``"exact"`` or ``"3xtf32"``) chooses how the cupy impl multiplies (see
kernels/cuda/attention.py): ``None`` runs float32 on CUDA cores and 16-bit inputs on tensor cores,
``"exact"`` every dtype on CUDA cores, ``"3xtf32"`` float32 on tensor cores as three TF32 products.
The CPU impls and numba_cuda compute exactly whatever it says (they validate it only).
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
nothing to dk, dv), as PyTorch (>= 2.5) gives.

**NaN and inf** propagate as in PyTorch: a NaN or +inf score makes its row's out and lse NaN;
P = 0 times a non-finite v (forward) or dP - D (backward) is NaN; with ``causal`` a row never
reads the scores of keys j > i. docs/kernels/attention.md has the rules.

``numpy`` is the plain reference (it materialises the B x L x S scores). ``numba_cpu`` never
does: from BLAS_MIN_PAIRS query-key pairs per batch row (more under causal) it runs the flash
loop on BLAS GEMMs over (query tile, key tile) blocks (:func:`_forward_blas`,
:func:`_backward_blas`), below that its numba tile kernel (:func:`_numba_kernels`), which skips
the keys past each causal row group; :func:`use_blas_tiles` chooses. Both impls call
:func:`validate_forward` / :func:`validate_backward` first, as do the GPU impls (which accept numpy
arrays only under the Numba CUDA simulator).
``import engine.kernels.cpu.attention`` does not import numba.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from dataclasses import dataclass

import numpy as np

import ml_dtypes

from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import module_of as _module_of
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..registry import numba_parallel as _numba_parallel
from ..registry import real_number as _real_number
from ..threads import available_cpus, for_gemm, get_num_threads

LOW_PRECISION = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))  # storage only: computed in float32
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64)) + LOW_PRECISION
GPU_DTYPES = (np.dtype(np.float32),) + LOW_PRECISION
PRECISIONS = (None, "exact", "3xtf32")
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
    precision: str | None = None  # how the cupy impl multiplies (module docstring)

    @property
    def low_precision(self) -> bool:
        """bfloat16 or float16 inputs: computed in float32, results rounded once."""
        return self.dtype in LOW_PRECISION

    @property
    def stats_dtype(self) -> np.dtype:
        """The dtype of lse (and of D): float32 for 16-bit inputs, else the inputs' own."""
        return np.dtype(np.float32) if self.low_precision else self.dtype

    @property
    def mask_strides(self) -> tuple[int, int]:
        """(batch stride, row stride) of the mask in elements: 0 along a broadcast dim."""
        if not self.mask_b:
            return 0, 0
        return (0 if self.mask_b == 1 else self.mask_l * self.s), (0 if self.mask_l == 1 else self.s)


def default_scale(e: int) -> float:
    """PyTorch's default score scale 1 / sqrt(E); 1 for E = 0, where every score is 0 whatever the
    scale (an empty dot product) and the output is the mean of v over the keys a row sees, as in
    PyTorch."""
    return 1.0 / math.sqrt(e) if e else 1.0


def _fail(op, arrays, what):
    described = ", ".join(_describe(n, a) for n, a in arrays.items())
    raise KernelError(f"{op}({described}): {what}")


def _validate(op, arrays, q, k, v, mask, scale, causal, precision) -> AttentionSpec:
    problem = _misplaced_arrays_message({name: a for name, a in arrays.items() if a is not None or name != "mask"})
    if problem:
        _fail(op, arrays, problem)
    module = _module_of(q)
    for name in ("q", "k", "v"):
        if arrays[name].ndim != 3:
            _fail(op, arrays, f"{name} must be 3-D (B, L or S, head dim) with batch and heads flattened into B, "
                              f"got {arrays[name].ndim}-D")
    dtype = np.dtype(q.dtype)
    if dtype not in FLOAT_DTYPES:
        _fail(op, arrays, f"dtype {dtype} is not supported; use float32, bfloat16 or float16 (float64 on the CPU)")
    low = dtype in LOW_PRECISION
    for name, a in arrays.items():
        if a is None:
            continue
        wanted = {"lse": (np.dtype(np.float32),) if low else (dtype,),
                  "mask": (dtype, np.dtype(np.float32)) if low else (dtype,)}.get(name, (dtype,))
        if np.dtype(a.dtype) not in wanted:
            rule = "every array must share q's dtype"
            if low and name in ("lse", "mask"):
                rule = {"lse": "lse is float32 for 16-bit inputs, as attention_forward returns it",
                        "mask": "the mask of 16-bit inputs may be float32 or their dtype"}[name]
            _fail(op, arrays, f"{name} has dtype {a.dtype} but q has {dtype}; {rule} "
                              "(cast explicitly: nothing is promoted silently)")
    b, l, e = (int(d) for d in q.shape)
    s, ev = int(k.shape[1]), int(v.shape[2])
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != e or v.shape[1] != s:
        _fail(op, arrays, "shapes do not agree: need q (B, L, E), k (B, S, E), v (B, S, Ev)")
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
    scale = _real_number(op, "scale", default_scale(e) if scale is None else scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise KernelError(f"{op}: causal must be True or False, got {causal!r}")
    if not (precision is None or (isinstance(precision, str) and precision in PRECISIONS)):
        raise KernelError(f"{op}: precision must be one of {PRECISIONS}, got {precision!r}")
    return AttentionSpec(b, l, s, e, ev, dtype, scale, bool(causal), mask_b, mask_l, module, precision)


def validate_forward(q, k, v, mask=None, *, scale, causal, precision=None) -> AttentionSpec:
    """Check the arguments of ``attention_forward`` (every impl calls this first)."""
    arrays = {"q": q, "k": k, "v": v, "mask": mask}
    return _validate("attention_forward", arrays, q, k, v, mask, scale, causal, precision)


def validate_backward(grad_out, q, k, v, out, lse, mask=None, *, scale, causal, precision=None) -> AttentionSpec:
    """Check the arguments of ``attention_backward``: the forward's, plus grad_out, out and lse."""
    op = "attention_backward"
    arrays = {"grad_out": grad_out, "q": q, "k": k, "v": v, "out": out, "lse": lse, "mask": mask}
    for name in ("grad_out", "out", "lse"):  # shapes checked after _validate; ndim first for a clear error
        a = arrays[name]
        if hasattr(a, "ndim") and a.ndim != (2 if name == "lse" else 3):
            _fail(op, arrays, f"{name} must be {2 if name == 'lse' else 3}-D, got {a.ndim}-D")
    spec = _validate(op, arrays, q, k, v, mask, scale, causal, precision)
    want = (spec.b, spec.l, spec.ev)
    for name in ("grad_out", "out"):
        if tuple(arrays[name].shape) != want:
            _fail(op, arrays, f"{name} must have the forward output's shape (B, L, Ev) = {want}")
    if tuple(lse.shape) != (spec.b, spec.l):
        _fail(op, arrays, f"lse must have shape (B, L) = {(spec.b, spec.l)}, as attention_forward returns it")
    return spec


def check_gpu_limits(spec: AttentionSpec, op: str, impl: str) -> None:
    """The GPU impls' extra limits: float32, bfloat16 or float16, and head dims <= 128."""
    if spec.dtype not in GPU_DTYPES:
        raise KernelError(f"{op} ({impl}): dtype {spec.dtype} is not supported on the GPU; use float32, bfloat16 "
                          f"or float16 (q ({spec.b}, {spec.l}, {spec.e}))")
    if spec.e > GPU_MAX_HEAD_DIM or spec.ev > GPU_MAX_HEAD_DIM:
        raise KernelError(f"{op} ({impl}): head dims E = {spec.e}, Ev = {spec.ev} (q ({spec.b}, {spec.l}, {spec.e}), "
                          f"v ({spec.b}, {spec.s}, {spec.ev}) {spec.dtype}) are over the GPU kernels' limit of "
                          f"{GPU_MAX_HEAD_DIM}; split the heads or use a CPU impl")
    limit = 2**31 - 1  # element offsets are 32-bit in places; rows and batches are not
    if max(spec.l, spec.s) * max(spec.e, spec.ev) > limit:
        raise KernelError(f"{op} ({impl}): one batch row of L = {spec.l} or S = {spec.s} rows is too large")


def empty_forward(spec: AttentionSpec, xp):
    """The forward result when B, L or S is 0: no work; S = 0 means every row is fully masked."""
    return xp.zeros((spec.b, spec.l, spec.ev), spec.dtype), xp.full((spec.b, spec.l), -np.inf, spec.stats_dtype)


def empty_backward(spec: AttentionSpec, xp):
    return (xp.zeros((spec.b, spec.l, spec.e), spec.dtype), xp.zeros((spec.b, spec.s, spec.e), spec.dtype),
            xp.zeros((spec.b, spec.s, spec.ev), spec.dtype))


def is_empty(spec: AttentionSpec) -> bool:
    return spec.b == 0 or spec.l == 0 or spec.s == 0


def in_float32(spec: AttentionSpec, *arrays):
    """(spec, arrays) to compute a 16-bit call in float32: the spec with dtype float32 and the
    16-bit arrays widened (a float32 mask or lse passes as it is); other calls unchanged."""
    if not spec.low_precision:
        return spec, arrays
    widened = tuple(a if a is None or a.dtype == np.float32 else a.astype(np.float32) for a in arrays)
    return dataclasses.replace(spec, dtype=np.dtype(np.float32)), widened


def round_results(spec: AttentionSpec, *results):
    """float32 results of a 16-bit call rounded once to its dtype (lse excluded by the callers)."""
    return tuple(r.astype(spec.dtype) for r in results) if spec.low_precision else results


def _forward_with(inner, q, k, v, mask, *, scale, causal, precision):
    """A CPU forward: validate, answer an empty call, compute a 16-bit call in float32 with
    ``inner(q, k, v, mask, spec) -> (out, lse)`` and round ``out`` once to the call's dtype."""
    spec = validate_forward(q, k, v, mask, scale=scale, causal=causal, precision=precision)
    if is_empty(spec):
        return empty_forward(spec, np)
    wide, (q, k, v, mask) = in_float32(spec, q, k, v, mask)
    out, lse = inner(q, k, v, mask, wide)
    return round_results(spec, out)[0], lse


def _backward_with(inner, grad_out, q, k, v, out, lse, mask, *, scale, causal, precision):
    """A CPU backward, as :func:`_forward_with`: ``inner(grad_out, q, k, v, out, lse, mask, spec)
    -> (dq, dk, dv)``."""
    spec = validate_backward(grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal, precision=precision)
    if is_empty(spec):
        return empty_backward(spec, np)
    wide, arrays = in_float32(spec, grad_out, q, k, v, out, lse, mask)
    return round_results(spec, *inner(*arrays, wide))


def _hide_later_keys(s, spec: AttentionSpec, rows, keys) -> None:
    """Causal masking of the scores ``s`` of query rows ``rows`` x keys ``keys`` ((start, stop)
    pairs), in place: a key j > query i gets -inf whatever its score (a copy, not an addition: a
    NaN or +inf score there must not leak)."""
    (i0, i1), (j0, j1) = rows, keys
    if spec.causal and j1 - 1 > i0:  # the block reaches above the diagonal
        above = np.arange(j0, j1)[None, :] > np.arange(i0, i1)[:, None]
        np.copyto(s, spec.dtype.type(-np.inf), where=above)


# --------------------------------------------------------------------------------------------
# numpy: the reference, written as the formulas above (materialises the scores)
# --------------------------------------------------------------------------------------------


def _scores(q, k, mask, spec: AttentionSpec):
    s = np.matmul(q, k.transpose(0, 2, 1)) * spec.dtype.type(spec.scale)
    if mask is not None:
        s = s + mask  # numpy broadcasting: the (1, L, S) / (B, 1, S) mask is never expanded by hand
    _hide_later_keys(s, spec, (0, spec.l), (0, spec.s))
    return s


def attention_forward_numpy(q, k, v, mask=None, *, scale=None, causal=False, precision=None):
    return _forward_with(_forward_numpy, q, k, v, mask, scale=scale, causal=causal, precision=precision)


def _forward_numpy(q, k, v, mask, spec: AttentionSpec):
    s = _scores(q, k, mask, spec)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = s.max(axis=-1, keepdims=True)  # NaN for a row with a NaN score: the NaN propagates below
        m = np.where(np.isneginf(m), spec.dtype.type(0), m)  # a fully masked row: exp(-inf) = 0 below
        e = np.exp(s - m)  # a +inf score: exp(inf - inf) = NaN, as in PyTorch
        total = e.sum(axis=-1, keepdims=True)
        lse = (m + np.log(total))[..., 0]  # log 0 = -inf for a fully masked row
        p = e / np.where(total == 0, spec.dtype.type(1), total)  # fully masked: P = 0 (NaN total stays NaN)
        out = np.matmul(p, v)  # 0 * inf = NaN: a non-finite v reaches every row, masked or not, as in PyTorch
    return out.astype(spec.dtype, copy=False), lse.astype(spec.dtype, copy=False)


def attention_backward_numpy(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None):
    return _backward_with(_backward_numpy, grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal,
                          precision=precision)


def _backward_numpy(grad_out, q, k, v, out, lse, mask, spec: AttentionSpec):
    dt = spec.dtype.type
    s = _scores(q, k, mask, spec)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs propagate as NaN, not warnings
        visible = ~np.isneginf(lse)[..., None]  # rows that saw some key; the others have P = 0
        p = np.where(visible, np.exp(s - np.where(visible, lse[..., None], dt(0))), dt(0))
        d = (grad_out * out).sum(axis=-1, keepdims=True)
        dp = np.matmul(grad_out, v.transpose(0, 2, 1))
        ds = p * (dp - d)  # P = 0 times a NaN dP - D is NaN, as in PyTorch
        dq = np.matmul(ds, k) * dt(spec.scale)
        dk = np.matmul(ds.transpose(0, 2, 1), q) * dt(spec.scale)
        dv = np.matmul(p.transpose(0, 2, 1), grad_out)
    return tuple(a.astype(spec.dtype, copy=False) for a in (dq, dk, dv))


# --------------------------------------------------------------------------------------------
# BLAS tiles: the flash loop in numpy, its QK^T / PV products batched BLAS GEMMs on key tiles
# --------------------------------------------------------------------------------------------

# Query rows and keys per tile of the BLAS path: BLAS_TILE under causal (a larger tile computes more
# scores above the diagonal), BLAS_WIDE times that without (a quarter of the Python calls per score,
# and GEMMs with a longer contraction for dK and dV; docs/benchmarks.md has the sizes tried). Scores
# of one batch row's tile at a time, never B x L x S (the extra memory is O(B L): the running max,
# sum and output accumulator, the tile buffers).
BLAS_TILE = 256
BLAS_WIDE = 2


def _tiles(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _tile_size(spec: AttentionSpec) -> int:
    return BLAS_TILE if spec.causal else BLAS_TILE * BLAS_WIDE


def _sees_tile(spec: AttentionSpec, rows, keys) -> bool:
    """Whether any query row of ``rows`` sees a key of ``keys`` (causal: key j <= query i)."""
    return not spec.causal or keys[0] <= rows[1] - 1


def _tile_scores(qs, kt, mask, spec: AttentionSpec, rows, keys, buffer):
    """scale * q_rows k_keys^T + mask, causal-masked, for one batch row's (query tile, key tile):
    (rows, keys), written into the front of the flat ``buffer``.

    ``qs`` (L, E) is q already scaled, ``kt`` (E, S) k transposed and contiguous (:func:`_transposed`),
    ``mask`` the batch row's (1 or L, S) mask or None.
    """
    (i0, i1), (j0, j1) = rows, keys
    s = _block(buffer, i1 - i0, j1 - j0)
    np.matmul(qs[i0:i1], kt[:, j0:j1], out=s)
    if mask is not None:
        s += mask[i0:i1, j0:j1] if mask.shape[0] > 1 else mask[:, j0:j1]
    _hide_later_keys(s, spec, rows, keys)
    return s


def _transposed(a):
    """(E, S) copy of one batch row's (S, E) keys or values: the tiles' Q K^T and dO V^T then
    multiply row-major operands (faster in OpenBLAS than on the transposed view; O(S E) memory)."""
    return np.ascontiguousarray(a.T)


def _block(buffer, rows: int, cols: int):
    """A C-contiguous (rows, cols) view of the front of the flat ``buffer``: the tiles reuse one
    allocation (a fresh 512 KiB array per tile is an mmap and its page faults)."""
    return buffer[:rows * cols].reshape(rows, cols)


def _batch_mask(mask, b: int):
    """Batch row b's (1 or L, S) mask of a (1 or B, 1 or L, S) one, or None."""
    return None if mask is None else mask[b if mask.shape[0] > 1 else 0]


def attention_forward_blas(q, k, v, mask=None, *, scale=None, causal=False, precision=None):
    """The forward of the numba_cpu impl for large L x S: flash tiles on BLAS GEMMs (see _forward_blas)."""
    return _forward_with(_forward_blas, q, k, v, mask, scale=scale, causal=causal, precision=precision)


def _forward_blas(q, k, v, mask, spec: AttentionSpec):
    """Online softmax over key tiles (flash-attention 1): per query tile a running max m, sum l and
    unnormalised output acc; each key tile rescales them by exp(m_old - m_new)."""
    out = np.empty((spec.b, spec.l, spec.ev), spec.dtype)
    lse = np.empty((spec.b, spec.l), spec.dtype)
    _numba_helpers()
    scratch = _scratch(2, spec)
    _over_batches(spec, lambda b: _forward_blas_row(
        q[b], k[b], v[b], _batch_mask(mask, b), spec, out[b], lse[b], *scratch()))
    return out, lse


def _forward_blas_row(q, k, v, mask, spec: AttentionSpec, out, lse, scores, exps) -> None:
    """:func:`_forward_blas` for one batch row (2-D views), written into ``out`` and ``lse``.

    Per (query tile, key tile): the scores from one GEMM, then one numba pass per row
    (:func:`_numba_helpers`' softmax_tile: max, rescale, exps and their sum) and acc += P V_tile.
    """
    dt = spec.dtype.type
    fast_exp = spec.dtype == np.float32
    qs, kt = q * dt(spec.scale), _transposed(k)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # non-finite inputs give NaN, as the reference
        for rows in _tiles(spec.l, _tile_size(spec)):
            n = rows[1] - rows[0]
            m = np.full(n, -np.inf, spec.dtype)
            total = np.zeros(n, spec.dtype)
            acc = np.zeros((n, spec.ev), spec.dtype)
            for keys in _tiles(spec.s, _tile_size(spec)):
                if not _sees_tile(spec, rows, keys):
                    continue
                s = _tile_scores(qs, kt, mask, spec, rows, keys, scores)
                p = _block(exps, *s.shape)
                _nb_softmax_tile(s, p, m, total, acc, fast_exp)
                acc += np.matmul(p, v[keys[0]:keys[1]])
            out[rows[0]:rows[1]] = acc / np.where(total == 0, dt(1), total)[:, None]  # fully masked: 0
            lse[rows[0]:rows[1]] = np.where(np.isneginf(m), dt(0), m) + np.log(total)


def attention_backward_blas(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None):
    """The backward of the numba_cpu impl for large L x S (see _backward_blas)."""
    return _backward_with(_backward_blas, grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal,
                          precision=precision)


def _backward_blas(grad_out, q, k, v, out, lse, mask, spec: AttentionSpec):
    """Flash-attention-2's backward on BLAS tiles: P recomputed from lse per (query, key) tile."""
    dq = np.zeros((spec.b, spec.l, spec.e), spec.dtype)
    dk = np.zeros((spec.b, spec.s, spec.e), spec.dtype)
    dv = np.zeros((spec.b, spec.s, spec.ev), spec.dtype)
    _numba_helpers()
    d = np.einsum("ble,ble->bl", grad_out, out)  # D_i = dO_i . out_i
    scratch = _scratch(3, spec)
    _over_batches(spec, lambda b: _backward_blas_row(
        grad_out[b], q[b], k[b], v[b], lse[b], d[b], _batch_mask(mask, b), spec, dq[b], dk[b], dv[b], *scratch()))
    return dq, dk, dv


def _backward_blas_row(grad_out, q, k, v, lse, d, mask, spec: AttentionSpec, dq, dk, dv, scores, exps,
                       grads) -> None:
    """:func:`_backward_blas` for one batch row (2-D views), accumulated into dq, dk, dv (zeros).

    Per (query tile, key tile): S and dP from two GEMMs, P = exp(S - lse) and dS = P (dP - D) in
    one numba pass (:func:`_numba_helpers`' grad_tile), then the three GEMMs.
    """
    dt = spec.dtype.type
    fast_exp = spec.dtype == np.float32
    qs, ks = q * dt(spec.scale), k * dt(spec.scale)  # s from qs; dk = dS^T qs and dq = dS ks carry the scale
    kt, vt = _transposed(k), _transposed(v)
    with np.errstate(invalid="ignore", over="ignore"):
        for rows in _tiles(spec.l, _tile_size(spec)):
            r = slice(*rows)
            go = grad_out[r]
            for keys in _tiles(spec.s, _tile_size(spec)):
                if not _sees_tile(spec, rows, keys):
                    continue
                c = slice(*keys)
                s = _tile_scores(qs, kt, mask, spec, rows, keys, scores)
                p = _block(exps, *s.shape)
                ds = np.matmul(go, vt[:, c], out=_block(grads, *s.shape))  # dP, then dS in place
                _nb_grad_tile(s, p, ds, lse[r], d[r], fast_exp)
                dv[c] += np.matmul(p.T, go)
                dq[r] += np.matmul(ds, ks[c])
                dk[c] += np.matmul(ds.T, qs[r])


def _scratch(count: int, spec: AttentionSpec):
    """A callable giving the calling thread its ``count`` flat buffers of one tile of ``spec``'s scores,
    made on its first call in that thread and reused for every batch row it takes."""
    size = _tile_size(spec)
    elements = min(size, spec.l) * min(size, spec.s)
    local = threading.local()

    def buffers():
        if not hasattr(local, "buffers"):
            local.buffers = tuple(np.empty(elements, spec.dtype) for _ in range(count))
        return local.buffers

    return buffers


def _over_batches(spec: AttentionSpec, work) -> None:
    """``work(b)`` for every batch row b, on up to one engine thread each (kernels/threads.py).

    The BLAS runs single-threaded meanwhile (each tile's GEMM is small: a multithreaded BLAS would
    pay its barrier per GEMM) and the threads split the batch instead: numpy releases the GIL in
    its GEMMs and ufuncs, and the numba tile passes run without it, so the rows run on separate
    cores, and none reads another's output. Each thread takes the next row when it finishes one,
    so a thread that the busy machine deschedules holds back one row, not half the batch; a row's
    result does not depend on which thread computed it.
    """
    for_gemm(1, 1, 1)  # one BLAS thread: the parallelism is over the batch
    count = min(get_num_threads(), spec.b)
    if count == 1:
        for b in range(spec.b):
            work(b)
        return
    rows = iter(range(spec.b))  # shared: next() hands each row to one thread (under the GIL)

    def drain():
        for b in rows:
            work(b)

    futures = [_thread_pool().submit(drain) for _ in range(count - 1)]
    drain()
    for future in futures:
        future.result()


@functools.cache
def _thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, available_cpus() - 1), thread_name_prefix="attention")


# --------------------------------------------------------------------------------------------
# numba_cpu: flash-style tiles, never an L x S matrix. See _numba_kernels for the loop structure.
# --------------------------------------------------------------------------------------------

# Query rows per forward task, keys per tile, query rows per backward block. The products are
# GEMMs on tiles written as register-blocked rank-4 updates (:func:`_numba_helpers`' gemm4): four
# rows of the output, the contraction four at a time, vectorized along the output's rows.
QUERY_TILE = 64
KEY_TILE = 64
QUERY_BLOCK = 64
# The backward splits the keys of each batch row into at most this many chunks, one task each;
# a chunk accumulates its own partial dq (KEY_CHUNKS x B x L x E floats, O(L) memory), summed in
# chunk order afterwards: deterministic, whatever the thread count, with no second pass over the
# scores for dq (which would recompute P and dP: 7 instead of 5 matrix-product equivalents).
KEY_CHUNKS = 4
# L * S per batch row from which attention_forward_numba / attention_backward_numba run on BLAS
# tiles (use_blas_tiles), and the factor on it under causal: there the numba tiles skip the keys
# past each row group (about half the work, as the BLAS tiles do not inside a tile), and win up to
# L = S = 256 on one core. docs/benchmarks.md has the sizes measured against the numba tiles.
BLAS_MIN_PAIRS = 32 * 32
CAUSAL_PAIRS_FACTOR = 256  # causal: BLAS tiles from 512 x 512 pairs
# B * L * S * E from which the tasks run in parallel: below it one thread finishes in about the time
# a parallel region takes to start (docs/benchmarks.md, "Why the thresholds are where they are").
PARALLEL_MIN = 1 << 20


def attention_forward_numba(q, k, v, mask=None, *, scale=None, causal=False, precision=None):
    return _forward_with(_forward_tiles, q, k, v, mask, scale=scale, causal=causal, precision=precision)


def _forward_tiles(q, k, v, mask, spec: AttentionSpec):
    return (_forward_blas if use_blas_tiles(spec) else _forward_numba)(q, k, v, mask, spec)


def _forward_numba(q, k, v, mask, spec: AttentionSpec):
    dt = spec.dtype
    l4 = _round4(spec.l)
    out = np.empty((spec.b, l4, spec.ev), dt)
    lse = np.empty((spec.b, l4), dt)
    forward, _ = _numba_kernels(_parallel(spec))
    forward(_pad_rows(q, l4, 0), _key_tiles(k, spec.scale), v, _mask_arg(mask, dt), mask is not None, spec.mask_b > 1,
            spec.mask_l > 1, dt.type(spec.scale), spec.causal, dt == np.float32, spec.l, out, lse)
    if l4 != spec.l:
        out, lse = np.ascontiguousarray(out[:, :spec.l]), np.ascontiguousarray(lse[:, :spec.l])
    return out, lse


def attention_backward_numba(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None):
    return _backward_with(_backward_tiles, grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal,
                          precision=precision)


def _backward_tiles(grad_out, q, k, v, out, lse, mask, spec: AttentionSpec):
    return (_backward_blas if use_blas_tiles(spec) else _backward_numba)(grad_out, q, k, v, out, lse, mask, spec)


def _backward_numba(grad_out, q, k, v, out, lse, mask, spec: AttentionSpec):
    dt = spec.dtype
    l4 = _round4(spec.l)
    chunks = min(KEY_CHUNKS, -(-spec.s // KEY_TILE))
    dq_parts = np.zeros((chunks, spec.b, l4, spec.e), dt)
    dk = np.empty((spec.b, spec.s, spec.e), dt)
    dv = np.empty((spec.b, spec.s, spec.ev), dt)
    _, backward = _numba_kernels(_parallel(spec))
    backward(_pad_rows(grad_out, l4, 0), _pad_rows(q, l4, 0), k, _key_tiles(k, spec.scale), _key_tiles(v),
             _pad_rows(out, l4, 0), _pad_rows(lse, l4, -np.inf), _mask_arg(mask, dt), mask is not None,
             spec.mask_b > 1, spec.mask_l > 1, dt.type(spec.scale), spec.causal, dt == np.float32, spec.l,
             dq_parts, dk, dv)
    dq = dq_parts[0]
    for c in range(1, chunks):  # in chunk order: the same bits for any number of threads
        dq += dq_parts[c]
    if l4 != spec.l:
        dq = np.ascontiguousarray(dq[:, :spec.l])
    return dq, dk, dv


def use_blas_tiles(spec: AttentionSpec) -> bool:
    """Whether the numba_cpu impl runs this call on BLAS tiles (:func:`_forward_blas`) rather than
    on its numba tile kernel: from BLAS_MIN_PAIRS query-key pairs per batch row on, CAUSAL_PAIRS_FACTOR
    times that under causal. Measured in docs/benchmarks.md ("Attention on the CPU" and "The GPT step
    op by op"); one impl, so that callers and the registry see one CPU attention, whatever its size."""
    return spec.l * spec.s >= BLAS_MIN_PAIRS * (CAUSAL_PAIRS_FACTOR if spec.causal else 1)


def _parallel(spec: AttentionSpec) -> bool:
    return spec.b * spec.l * spec.s * max(spec.e, spec.ev) >= PARALLEL_MIN


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def _pad_rows(a, rows, fill):
    """``a`` with its second dim padded to ``rows`` by ``fill`` (a copy only when L is not a multiple of 4).

    The kernels take query rows four at a time; padded rows are computed and dropped (forward), or
    carry lse = -inf and so no gradient (backward).
    """
    if a.shape[1] == rows:
        return a
    padded = np.full((a.shape[0], rows) + a.shape[2:], fill, a.dtype)
    padded[:, :a.shape[1]] = a
    return padded


def _key_tiles(a, scale=1.0):
    """(B, ceil(S / KEY_TILE), E, KEY_TILE) from scale * a (B, S, E): each tile's transpose, contiguous,
    zero-padded. K^T comes scaled, so that Q K^T_tile is already the scaled scores.

    An O(S E) copy; Q K^T and dO V^T of a tile then read unit-stride rows of KEY_TILE keys, from one
    16 KiB block (rows of the whole K^T, 4 S bytes apart, would collide in the L1 sets).
    """
    b, s, e = a.shape
    full, rest = divmod(s, KEY_TILE)
    tiles = (np.zeros if rest else np.empty)((b, full + (rest > 0), e, KEY_TILE), a.dtype)
    # one pass from a into the tiles (scaled on the way): a zero-padded copy, scaled in place and
    # then transposed into a third array, cost 3 passes, ~2/3 of this call at S = KEY_TILE
    factor = a.dtype.type(scale)
    if full:
        np.multiply(a[:, :full * KEY_TILE].reshape(b, full, KEY_TILE, e).transpose(0, 1, 3, 2), factor,
                    out=tiles[:, :full])
    if rest:
        np.multiply(a[:, full * KEY_TILE:].transpose(0, 2, 1), factor, out=tiles[:, full, :, :rest])
    return tiles


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
_nb_gemm4 = _nb_exp_shift = _nb_tile_max = _nb_tile_sum = _nb_rowdot = _nb_bias_row = _nb_visible_keys = None
_nb_softmax_row = _nb_grad_row = _nb_softmax_tile = _nb_grad_tile = None


@functools.cache
def _numba_helpers() -> None:
    """Compile the tile helpers and publish them as module globals for the kernels."""
    import numba

    # Products and sums: fused multiply-adds (contract), and sums that may be reordered (reassoc):
    # float32 rounding only.
    contract = numba.njit(cache=True, fastmath={"contract"})
    reassoc = numba.njit(cache=True, fastmath={"reassoc", "contract"})

    @contract
    def gemm4(a, ia, ka, b, kb, c, ic, n, w):
        """c[ic:ic+4, :w] += a[ia:ia+4, ka:ka+n] @ b[kb:kb+n, :w] (2-D arrays; b and c C-contiguous, a may be a transposed view).

        Rank-4 updates: per step, 16 scalars of a (4 rows x 4 of the contraction) stay in registers
        while the loop over the w columns (vectorized) loads 4 rows of b and loads and stores each
        of the 4 rows of c once: 16 multiply-adds per 8 loads and 4 stores. 72 GFLOP/s on one core
        against 45 for four rows dotted with one column at a time and ~14 for a 4 x 8 block of
        scalar accumulators (numba's LLVM vectorizes those along the contraction, with 32
        horizontal sums, not along the columns).
        """
        c0, c1, c2, c3 = c[ic], c[ic + 1], c[ic + 2], c[ic + 3]
        x = 0
        while x + 4 <= n:
            k = ka + x
            a00, a01, a02, a03 = a[ia, k], a[ia, k + 1], a[ia, k + 2], a[ia, k + 3]
            a10, a11, a12, a13 = a[ia + 1, k], a[ia + 1, k + 1], a[ia + 1, k + 2], a[ia + 1, k + 3]
            a20, a21, a22, a23 = a[ia + 2, k], a[ia + 2, k + 1], a[ia + 2, k + 2], a[ia + 2, k + 3]
            a30, a31, a32, a33 = a[ia + 3, k], a[ia + 3, k + 1], a[ia + 3, k + 2], a[ia + 3, k + 3]
            k = kb + x
            b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
            for j in range(w):
                v0, v1, v2, v3 = b0[j], b1[j], b2[j], b3[j]
                c0[j] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
                c1[j] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
                c2[j] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
                c3[j] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
            x += 4
        while x < n:
            a0, a1, a2, a3 = a[ia, ka + x], a[ia + 1, ka + x], a[ia + 2, ka + x], a[ia + 3, ka + x]
            bx = b[kb + x]
            for j in range(w):
                v = bx[j]
                c0[j] += a0 * v
                c1[j] += a1 * v
                c2[j] += a2 * v
                c3[j] += a3 * v
            x += 1

    @reassoc
    def rowdot(a, b):
        total = a.dtype.type(0)
        for x in range(a.shape[0]):
            total += a[x] * b[x]
        return total

    @numba.njit(cache=True, fastmath={"nnan", "nsz"})
    def tile_max(st, nk):
        """max(st[:nk]) for nk >= 1, over 8 running maxima (one chain of 64 dependent maxes is slower)."""
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = st[0]
        jj = 0
        while jj + 8 <= nk:
            v0, v1, v2, v3 = st[jj], st[jj + 1], st[jj + 2], st[jj + 3]
            v4, v5, v6, v7 = st[jj + 4], st[jj + 5], st[jj + 6], st[jj + 7]
            m0, m1, m2, m3 = (v0 if v0 > m0 else m0), (v1 if v1 > m1 else m1), (v2 if v2 > m2 else m2), \
                (v3 if v3 > m3 else m3)
            m4, m5, m6, m7 = (v4 if v4 > m4 else m4), (v5 if v5 > m5 else m5), (v6 if v6 > m6 else m6), \
                (v7 if v7 > m7 else m7)
            jj += 8
        while jj < nk:
            v = st[jj]
            m0 = v if v > m0 else m0
            jj += 1
        m0, m2, m4, m6 = (m1 if m1 > m0 else m0), (m3 if m3 > m2 else m2), (m5 if m5 > m4 else m4), \
            (m7 if m7 > m6 else m6)
        m0, m4 = (m2 if m2 > m0 else m0), (m6 if m6 > m4 else m4)
        return m4 if m4 > m0 else m0

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
        bits = pt.view(np.int32)
        for jj in range(nk):  # exp(r), then times 2^t by adding t to the exponent field of the result
            x = st[jj] - shift
            xc = _EXP_LO if x < _EXP_LO else x  # t clamped so that 2^t stays a normal scale
            t = np.floor(xc * _LOG2E + _HALF)
            r = xc - t * _LN2_HI
            r = r - t * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            pt[jj] = p * (r * r) + r + _ONE
            ti = np.int32(t) if t >= -126 else np.int32(0)  # NaN: bits untouched
            scaled = bits[jj] + (ti << 23)
            bits[jj] = 0 if x < _EXP_LO else scaled

    @numba.njit(cache=True)
    def bias_row(srow, nk, mb, i, j0, nl, has_mask, mask_per_row, causal):
        """Query row i's scores against keys j0 .. j0 + nk: plus its mask row (a (1|B, 1, S) mask is
        read in place for every row), and -inf for the keys after i under causal."""
        if has_mask:
            mrow = mb[min(i, nl - 1) if mask_per_row else 0]
            for jj in range(nk):
                srow[jj] += mrow[j0 + jj]
        if causal:
            for jj in range(max(0, i + 1 - j0), nk):
                srow[jj] = -np.inf

    @numba.njit(cache=True)
    def visible_keys(nk, row0, j0, causal):
        """How many of the nk keys from j0 on the four query rows from row0 read: all of them, or
        under causal those up to the group's last row (<= 0: none, the group skips the tile)."""
        return min(nk, row0 + 4 - j0) if causal else nk

    globals().update(_nb_gemm4=gemm4, _nb_exp_shift=exp_shift, _nb_tile_max=tile_max,
                     _nb_tile_sum=tile_sum, _nb_rowdot=rowdot, _nb_bias_row=bias_row,
                     _nb_visible_keys=visible_keys)

    # The helpers below call the ones above as module globals, not closure variables: numba's
    # cache key hashes closure cells, and a pickled dispatcher differs between processes, so a
    # closure would compile again in every process (kernels/cpu/softmax_cross_entropy.py).
    @numba.njit(cache=True)
    def softmax_row(srow, prow, nr, r, row_max, row_sum, acc, fast_exp):
        """The online-softmax step of query row r over its nr scores ``srow`` of one key tile: the
        running max ``row_max[r]`` grows to the tile's, the running sum and the output accumulator row
        ``acc[r]`` are rescaled by exp(m_old - m_new) when it does, prow gets exp(srow - max) (0 where
        a score is -inf) and the running sum their sum (NaN for a NaN or +inf score, which propagates)."""
        m_old = row_max[r]
        m_new = max(m_old, _nb_tile_max(srow, nr))
        if m_new == -np.inf:  # nothing visible yet: exps 0, NaN for a NaN score (it must propagate)
            _nb_exp_shift(srow, nr, srow.dtype.type(0), fast_exp, prow)
            row_sum[r] += _nb_tile_sum(prow, nr)
            return
        if m_new > m_old:
            alpha = np.exp(m_old - m_new)  # 0 while the row was empty (m_old = -inf)
            row_sum[r] *= alpha
            a = acc[r]
            for x in range(a.shape[0]):
                a[x] *= alpha
            row_max[r] = m_new
        _nb_exp_shift(srow, nr, m_new, fast_exp, prow)
        row_sum[r] += _nb_tile_sum(prow, nr)

    @numba.njit(cache=True)
    def grad_row(srow, prow, dsrow, nr, li, di, factor, fast_exp):
        """Backward of one query row over nr keys: P = exp(s - lse) (0 for a row that saw no key,
        lse = -inf) into prow, and dS = factor P (dP - D) over dP in dsrow (P = 0 times a non-finite
        dP - D is NaN, as in PyTorch)."""
        if li == -np.inf:
            prow[:nr] = 0
        else:
            _nb_exp_shift(srow, nr, li, fast_exp, prow)
        for jj in range(nr):
            dsrow[jj] = prow[jj] * (dsrow[jj] - di) * factor

    globals().update(_nb_softmax_row=softmax_row, _nb_grad_row=grad_row)

    # The BLAS tiles' steps between their GEMMs, one pass each over a (query tile, key tile) block;
    # without the GIL, so that the batch slices of _over_batches run side by side.
    @numba.njit(cache=True, nogil=True)
    def softmax_tile(st, pt, row_max, row_sum, acc, fast_exp):
        for r in range(st.shape[0]):
            _nb_softmax_row(st[r], pt[r], st.shape[1], r, row_max, row_sum, acc, fast_exp)

    @numba.njit(cache=True, nogil=True)
    def grad_tile(st, pt, dpt, lse, d, fast_exp):
        one = st.dtype.type(1)
        for r in range(st.shape[0]):
            _nb_grad_row(st[r], pt[r], dpt[r], st.shape[1], lse[r], d[r], one, fast_exp)

    globals().update(_nb_softmax_tile=softmax_tile, _nb_grad_tile=grad_tile)


@functools.cache
def _numba_kernels(parallel: bool):
    """(forward, backward), over their tasks in parallel (prange) or on the calling thread.

    Query rows are padded to a multiple of 4 by the callers (``_pad_rows``), keys come as
    transposed, zero-padded tiles (``_key_tiles``) for the products that need K^T or V^T, and
    every matrix product is a :func:`gemm4` call on four rows (A^T B: gemm4 on A's transposed view).

    forward: one task per (batch row, tile of QUERY_TILE queries). For each tile of KEY_TILE keys
    (up to the last one a causal task can see): the task's scores against the tile (Q K^T_tile),
    plus the mask row (broadcast by index: a (1, L, S) or (B, 1, S) mask is read in place), -inf
    above the causal diagonal; per row the tile max, a rescale of the running sum and output
    accumulator when the max grows (online softmax), the exps; then acc += P V_tile. State per
    query row: max, sum, an Ev accumulator.

    backward: one task per (batch row, chunk of key tiles). Per key tile, dk and dv accumulate in
    tile buffers over blocks of QUERY_BLOCK query rows (from the first that can see the tile when
    causal): S = Q K^T_tile and dP = dO V^T_tile, P = exp(s - lse) (0 for a fully masked or padded
    row, lse = -inf), dS = scale P (dP - D); dv_tile += P^T dO, dk_tile += dS^T Q, and the chunk's
    dq partial gets dS K_tile.
    """
    import numba

    _numba_helpers()
    loop = numba.prange if parallel else range  # a closure variable: its own disk-cache key per build
    jit = numba.njit(cache=True, parallel=parallel)
    tq, tk, qbs = QUERY_TILE, KEY_TILE, QUERY_BLOCK

    @jit
    def forward(q, kt, v, mask, has_mask, mask_per_batch, mask_per_row, scale, causal, fast_exp, nl, out, lse):
        nb, nl4, ne = q.shape
        ns, nev = v.shape[1], v.shape[2]
        ntiles = (nl4 + tq - 1) // tq
        neg_inf = q.dtype.type(-np.inf)
        for task in loop(nb * ntiles):
            b = task // ntiles
            i0 = (task - b * ntiles) * tq
            nq = min(nl4 - i0, tq)  # a multiple of 4
            acc = np.zeros((nq, nev), q.dtype)
            row_max = np.full(nq, neg_inf, q.dtype)
            row_sum = np.zeros(nq, q.dtype)
            st = np.empty((nq, tk), q.dtype)  # scores of the task's rows against the tile
            pt = np.empty((nq, tk), q.dtype)  # their exps (0 where masked)
            qb, vb = q[b], v[b]
            mb = mask[b if mask_per_batch else 0]
            kend = min(ns, i0 + nq) if causal else ns
            for j0 in range(0, kend, tk):
                nk = min(tk, ns - j0)
                ktt = kt[b, j0 // tk]
                st[:, :nk] = 0
                for g in range(0, nq, 4):  # causal: a row group reads the keys up to its last row only
                    ng = _nb_visible_keys(nk, i0 + g, j0, causal)
                    if ng > 0:
                        _nb_gemm4(qb, i0 + g, 0, ktt, 0, st, g, ne, ng)
                for r in range(nq):
                    i = i0 + r
                    nr = _nb_visible_keys(nk, i - r % 4, j0, causal)
                    if nr <= 0:  # the row sees none of the tile: nothing to add
                        continue
                    _nb_bias_row(st[r], nr, mb, i, j0, nl, has_mask, mask_per_row, causal)
                    _nb_softmax_row(st[r], pt[r], nr, r, row_max, row_sum, acc, fast_exp)
                for g in range(0, nq, 4):
                    ng = _nb_visible_keys(nk, i0 + g, j0, causal)
                    if ng > 0:
                        _nb_gemm4(pt, g, 0, vb, j0, acc, g, ng, nev)
            for r in range(nq):
                total = row_sum[r]  # NaN when a score was NaN or +inf: out and lse NaN, as in PyTorch
                if total == 0:  # fully masked row: out = sum 0 * v (0, NaN where v is not finite), lse -inf
                    for x in range(nev):
                        out[b, i0 + r, x] = acc[r, x]
                    lse[b, i0 + r] = neg_inf
                else:
                    inv = 1 / total
                    for x in range(nev):
                        out[b, i0 + r, x] = acc[r, x] * inv
                    lse[b, i0 + r] = row_max[r] + np.log(total)

    @jit
    def backward(grad_out, q, k, kt, vt, out, lse, mask, has_mask, mask_per_batch, mask_per_row, scale, causal,
                 fast_exp, nl, dq_parts, dk, dv):
        nb, nl4, ne = q.shape
        ns, nev = k.shape[1], vt.shape[2]
        nkt = kt.shape[1]
        chunks = dq_parts.shape[0]
        neg_inf = q.dtype.type(-np.inf)
        d = np.empty((nb, nl4), q.dtype)  # D_i = dO_i . out_i
        for i in range(nb * nl4):
            bi, ii = i // nl4, i % nl4
            d[bi, ii] = _nb_rowdot(grad_out[bi, ii], out[bi, ii])
        for task in loop(nb * chunks):
            b = task // chunks
            c = task - b * chunks
            st = np.empty((qbs, tk), q.dtype)  # S
            pt = np.zeros((qbs, tk), q.dtype)  # P
            dpt = np.empty((qbs, tk), q.dtype)  # dP, then dS (scale included)
            dk_t = np.empty((tk, ne), q.dtype)
            dv_t = np.empty((tk, nev), q.dtype)
            qb, dob, kb = q[b], grad_out[b], k[b]
            mb = mask[b if mask_per_batch else 0]
            dqb = dq_parts[c, b]
            for t in range(c * nkt // chunks, (c + 1) * nkt // chunks):
                j0 = t * tk
                nk = min(tk, ns - j0)
                nk4 = (nk + 3) // 4 * 4
                ktt, vtt = kt[b, t], vt[b, t]
                dk_t[:] = 0
                dv_t[:] = 0
                for g0 in range((j0 // 4) * 4 if causal else 0, nl4, qbs):  # causal: rows before j0 see none
                    nqb = min(qbs, nl4 - g0)
                    st[:nqb, :nk] = 0
                    dpt[:nqb, :nk4] = 0  # columns nk..nk4 of dS and P stay 0: the padded keys of gemm4 on their transposes
                    pt[:nqb, nk:nk4] = 0
                    for g in range(0, nqb, 4):  # causal: a row group reads the keys up to its last row only
                        ng = _nb_visible_keys(nk, g0 + g, j0, causal)
                        if ng > 0:
                            _nb_gemm4(qb, g0 + g, 0, ktt, 0, st, g, ne, ng)
                            _nb_gemm4(dob, g0 + g, 0, vtt, 0, dpt, g, nev, ng)
                    for r in range(nqb):
                        i = g0 + r
                        nr = _nb_visible_keys(nk, i - r % 4, j0, causal)
                        if nr <= 0:  # sees none of the tile; the products below start after it
                            continue
                        li = lse[b, i]
                        srow, prow, dsrow = st[r], pt[r], dpt[r]
                        if i >= nl:  # padding row: no gradient
                            prow[:nr] = 0
                            dsrow[:nr] = 0
                            continue
                        if li != neg_inf:  # else a fully masked row: P = 0
                            _nb_bias_row(srow, nr, mb, i, j0, nl, has_mask, mask_per_row, causal)
                        _nb_grad_row(srow, prow, dsrow, nr, li, d[b, i], scale, fast_exp)
                    for jg in range(0, nk4, 4):
                        # causal: the rows before key j0 + jg see none of keys jg..jg+3, and every row
                        # from r0 on (a multiple of 4) has P and dS written for all four
                        r0 = max(0, j0 + jg - g0) if causal else 0
                        if r0 < nqb:
                            _nb_gemm4(pt.T, jg, r0, dob, g0 + r0, dv_t, jg, nqb - r0, nev)
                            _nb_gemm4(dpt.T, jg, r0, qb, g0 + r0, dk_t, jg, nqb - r0, ne)
                    for g in range(0, nqb, 4):
                        ng = _nb_visible_keys(nk, g0 + g, j0, causal)
                        if ng > 0:
                            _nb_gemm4(dpt, g, 0, kb, j0, dqb, g0 + g, ng, ne)
                for jj in range(nk):
                    for x in range(ne):
                        dk[b, j0 + jj, x] = dk_t[jj, x]
                    for x in range(nev):
                        dv[b, j0 + jj, x] = dv_t[jj, x]

    if parallel:  # one parallel region at a time in the process: see registry.numba_parallel
        return _numba_parallel(forward), _numba_parallel(backward)
    return forward, backward

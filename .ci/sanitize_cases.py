#!/usr/bin/env python3
"""Small, odd-sized cases of the Transformer kernels, for ``compute-sanitizer`` to watch.

    compute-sanitizer --tool memcheck python3 .ci/sanitize_cases.py --device cuda
    compute-sanitizer --tool racecheck python3 .ci/sanitize_cases.py --device cuda
    python3 .ci/sanitize_cases.py --device cpu      # the same cases on numba_cpu (the dry run's check)

Every case runs forward and backward through one impl (``cupy`` on cuda by default, ``numba_cpu``
on cpu) and is compared with the ``numpy`` reference on the host, so a run that the sanitizer finds
clean is also a run whose numbers are right:

- attention: B=2 x H=3 batch rows, L=37 queries, S=70 keys, head dims E in {33, 64, 128}; no mask, a
  shared (1, L, S) mask, a key-padding (B, 1, S) mask and a full (B, L, S) mask (with -inf entries
  and one fully masked row), each with and without ``causal``;
- attention on tensor cores (attention_tc.cu, forward and backward): the same B, L, S in bfloat16
  and float16 and float32 with precision="3xtf32" at E in {64, 128}, causal without a
  mask, a key-padding mask, and a full mask with causal; compared with numpy on the same inputs
  (16-bit: within 2 ulps of the dtype);
- layer_norm: 37 rows of D=99 and D=4097 (one block-reduction width apart), with and without weights;
- gelu: a length-1001 vector, exact and tanh.

On cuda the memory pool is switched off (``cupy.cuda.set_allocator(None)``): every array is its
own cudaMalloc, so memcheck sees a read past an array's end instead of into a pooled neighbour.
Prints one line per case and ``sanitize cases: N passed, M failed``; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's packages, nothing installed

import numpy as np  # noqa: E402

from engine import kernels  # noqa: E402

BATCH, HEADS, L, S = 2, 3, 37, 70
HEAD_DIMS = (33, 64, 128)
MASKS = ("none", "shared", "key_padding", "full")
NORM_WIDTHS = (99, 4097)
GELU_LENGTH = 1001
RTOL = 2e-4  # float32 kernels against the float32 numpy reference (different summation orders)


def attention_mask(kind: str, rng: np.random.Generator) -> np.ndarray | None:
    """An additive float32 mask of ``kind``: finite biases, -inf holes, one fully masked row (full)."""
    rows = BATCH * HEADS
    shape = {"none": None, "shared": (1, L, S), "key_padding": (rows, 1, S), "full": (rows, L, S)}[kind]
    if shape is None:
        return None
    mask = rng.standard_normal(shape).astype(np.float32)
    mask[rng.random(shape) < 0.2] = -np.inf
    if kind == "key_padding":
        mask[:, :, S - 9:] = -np.inf  # padded keys at the end, as a tokenizer's batch has them
    if kind == "full":
        mask[1, 5, :] = -np.inf  # a row that sees no key: out 0 and no gradient
    return mask


def attention_cases():
    for e in HEAD_DIMS:
        for mask in MASKS:
            for causal in (False, True):
                yield f"attention E={e} mask={mask} causal={causal}", (e, mask, causal)


def run_attention(xp, impl, params, rng, dtype=np.float32, precision=None):
    e, mask_kind, causal = params
    rows = BATCH * HEADS
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype)
                     for shape in ((rows, L, e), (rows, S, e), (rows, S, e), (rows, L, e)))
    mask = attention_mask(mask_kind, rng)
    scale = e ** -0.5
    host = dict(q=q, k=k, v=v, dout=dout, mask=mask)
    dev = {name: (None if a is None else xp.asarray(a)) for name, a in host.items()}

    def both(args):
        kw = dict(scale=scale, causal=causal, impl=args["impl"],
                  precision=precision if args["impl"] == impl else None)  # the reference: exact
        out, lse = kernels.attention_forward(args["q"], args["k"], args["v"], args["mask"], **kw)
        grads = kernels.attention_backward(args["dout"], args["q"], args["k"], args["v"], out, lse, args["mask"], **kw)
        return (out, lse, *grads)

    got = both(dict(dev, impl=impl))
    want = both(dict(host, impl="numpy"))
    return ("out", "lse", "dq", "dk", "dv"), got, want


TC_VARIANTS = (("bfloat16", 64), ("bfloat16", 128), ("float16", 64), ("float16", 128), ("float32-3xtf32", 64),
               ("float32-3xtf32", 128))
TC_MASKS = (("none", True), ("key_padding", False), ("full", True))
# 2 ulps for 16-bit (P and dS are rounded to the dtype on tensor cores); 3xTF32 is float32-accurate
TC_RTOL = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9, "float32-3xtf32": RTOL}


def attention_tc_cases():
    for dtype, e in TC_VARIANTS:
        for mask, causal in TC_MASKS:
            yield f"attention_tc {dtype} E={e} mask={mask} causal={causal}", (dtype, e, mask, causal)


def run_attention_tc(xp, impl, params, rng):
    """E = Ev in {64, 128}: the cupy impl runs attention_tc.cu's forward and backward (float32 with
    precision="3xtf32"; at E = 128 its backward makes two column passes)."""
    import ml_dtypes

    name, e, mask_kind, causal = params
    dtype = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}.get(name, np.float32)
    precision = "3xtf32" if name == "float32-3xtf32" else None
    names, got, want = run_attention(xp, impl, (e, mask_kind, causal), rng, dtype, precision)
    return names, got, want, TC_RTOL[name]


def norm_cases():
    for d in NORM_WIDTHS:
        for affine in (True, False):
            yield f"layer_norm D={d} affine={affine}", (d, affine)


def run_layer_norm(xp, impl, params, rng):
    d, affine = params
    x = rng.standard_normal((37, d)).astype(np.float32) * 3 + 1
    dy = rng.standard_normal((37, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32) if affine else None
    b = rng.standard_normal(d).astype(np.float32) if affine else None

    def both(x, dy, w, b, impl):
        y, mean, rstd = kernels.layer_norm_forward(x, w, b, eps=1e-5, impl=impl)
        grads = kernels.layer_norm_backward(dy, x, w, mean, rstd, impl=impl)
        return (y, mean, rstd, *grads)

    to_dev = (lambda a: None if a is None else xp.asarray(a))
    got = both(to_dev(x), to_dev(dy), to_dev(w), to_dev(b), impl)
    want = both(x, dy, w, b, "numpy")
    return ("y", "mean", "rstd", "dx", "dw", "db"), got, want


def gelu_cases():
    for approximate in ("none", "tanh"):
        yield f"gelu n={GELU_LENGTH} approximate={approximate}", approximate


def run_gelu(xp, impl, approximate, rng):
    x = (rng.standard_normal(GELU_LENGTH) * 4).astype(np.float32)
    dy = rng.standard_normal(GELU_LENGTH).astype(np.float32)

    def both(x, dy, impl):
        return (kernels.gelu_forward(x, approximate=approximate, impl=impl),
                kernels.gelu_backward(dy, x, approximate=approximate, impl=impl))

    got = both(xp.asarray(x), xp.asarray(dy), impl)
    want = both(x, dy, "numpy")
    return ("y", "dx"), got, want


FAMILIES = ((attention_cases, run_attention), (attention_tc_cases, run_attention_tc), (norm_cases, run_layer_norm),
            (gelu_cases, run_gelu))


def mismatch(names, got, want, to_host, rtol=RTOL) -> str | None:
    """The first output that differs from the reference beyond ``rtol`` (float32's by default), described;
    or None. 16-bit outputs are compared as float32."""
    for name, g, w in zip(names, got, want):
        if (g is None) != (w is None):
            return f"{name}: {'missing' if g is None else 'unexpected'}"
        if g is None:
            continue
        g = to_host(g)
        if 2 in (g.dtype.itemsize, w.dtype.itemsize):
            g, w = g.astype(np.float32), w.astype(np.float32)
        if g.shape != w.shape:
            return f"{name}: shape {g.shape}, reference {w.shape}"
        finite = np.isfinite(w)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(g[~finite], w[~finite]):
            return f"{name}: non-finite entries differ from the reference"
        err = float(np.max(np.abs(g[finite] - w[finite]), initial=0.0))
        bound = rtol * (1.0 + float(np.max(np.abs(w[finite]), initial=0.0)))
        if err > bound:
            return f"{name}: max abs error {err:.3g} > {bound:.3g}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--impl", help="default: cupy on cuda, numba_cpu on cpu (numba_cuda works on cuda too)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import cupy as xp

        xp.cuda.set_allocator(None)  # no pool: memcheck sees each array's own bounds
        to_host = xp.asnumpy
    else:
        xp, to_host = np, np.asarray
    impl = args.impl or ("cupy" if args.device == "cuda" else "numba_cpu")
    rng = np.random.default_rng(0)
    passed = failed = 0
    for cases, run in FAMILIES:
        for label, params in cases():
            try:
                names, got, want, *rtol = run(xp, impl, params, rng)
                problem = mismatch(names, got, want, to_host, *rtol)
            except Exception:  # noqa: BLE001 - a case that raises is reported with its traceback, and the others still run
                problem = "raised:\n" + traceback.format_exc()
            if args.device == "cuda":
                xp.cuda.get_current_stream().synchronize()  # a fault surfaces on its own case's line
            print(f"{label} [{impl}]: {'ok' if problem is None else 'FAILED ' + problem}", flush=True)
            passed += problem is None
            failed += problem is not None
    print(f"sanitize cases: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

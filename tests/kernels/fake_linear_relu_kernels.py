"""NumPy transcriptions of the linear_relu.cu kernels, taking a launch's (grid, block, args).

With these, a fake GPU computes the whole cupy impl of linear_relu (the GEMMs run on the fake
cuBLAS), so its results can be checked against the numpy reference without a GPU. Each computes
in the kernel's accumulation dtype (float32 for 16-bit data) and rounds once per store, as the
.cu kernels do; the partial column sums follow the kernel's block-row split (row r goes to block
row (r // kRowThreads) % gridDim.y). What the kernels' index arithmetic does on a GPU is checked
elsewhere (NVRTC, the emulation in docs/kernels/linear_relu.md); these check the host wiring.
"""

from __future__ import annotations

import numpy as np

ROW_THREADS = 8  # kRowThreads in linear_relu.cu
SUFFIXES = ("f32", "f64", "f16", "bf16")


def _acc(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _relu(v):
    return np.where(v <= 0, np.zeros((), v.dtype), v)  # v <= 0 ? 0 : v: NaN stays NaN


def epilogue(grid, block, args):
    y = args[0]
    bias, total, m = (args[1], int(args[2]), int(args[3])) if len(args) == 4 else (None, int(args[1]), 1)
    flat = y.reshape(-1)
    acc = flat[:total].astype(_acc(y.dtype))
    if bias is not None:
        acc = (acc.reshape(-1, m) + bias.astype(acc.dtype)).reshape(-1)
    flat[:total] = _relu(acc).astype(y.dtype)


def mask_db(grid, block, args):
    dy, y, g, partial, n, m = args[0], args[1], args[2], args[3], int(args[4]), int(args[5])
    acc = _acc(g.dtype)
    v = dy.reshape(n, m).astype(acc) * (y.reshape(n, m).astype(acc) > 0).astype(acc)
    g.reshape(n, m)[...] = v.astype(g.dtype)
    block_row = (np.arange(n) // ROW_THREADS) % grid[1]
    sums = np.stack([v[block_row == r].sum(axis=0) for r in range(grid[1])])
    partial.reshape(grid[1], m)[...] = sums.astype(partial.dtype)


def colsum(grid, block, args):
    """The mask-free pass (``linear_relu_bwd_colsum*``): partial column sums of dy, nothing written to g."""
    dy, partial, n, m = args[0], args[1], int(args[2]), int(args[3])
    v = dy.reshape(n, m).astype(_acc(dy.dtype))
    block_row = (np.arange(n) // ROW_THREADS) % grid[1]
    sums = np.stack([v[block_row == r].sum(axis=0) for r in range(grid[1])])
    partial.reshape(grid[1], m)[...] = sums.astype(partial.dtype)


def db_reduce(grid, block, args):
    partial, db, rows, m = args[0], args[1], int(args[2]), int(args[3])
    db[...] = partial.reshape(rows, m).astype(_acc(db.dtype)).sum(axis=0).astype(db.dtype)


def impls() -> dict:
    """kernel name -> transcription, for every entry point of linear_relu.cu."""
    table = {}
    for s in SUFFIXES:
        for variant in ("", "bias_", "biasvec_"):
            table[f"linear_relu_fwd_epilogue_{variant}{s}"] = epilogue
        table[f"linear_relu_bwd_mask_db_{s}"] = table[f"linear_relu_bwd_mask_db_vec_{s}"] = mask_db
        table[f"linear_relu_bwd_colsum_{s}"] = table[f"linear_relu_bwd_colsum_vec_{s}"] = colsum
        table[f"linear_relu_bwd_db_reduce_{s}"] = db_reduce
    return table

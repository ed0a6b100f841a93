"""Every collective on every dtype: exact results where the dtype is supported, a DTypeError naming
the op and the dtype on every rank where it is not (MAX/MIN of complex, AVG of integers and bools).
Prints "dtypes ok W" on rank 0."""

import numpy as np

import engine
import engine.distributed as dist
from engine.errors import DTypeError

dist.init_process_group("mpi")
r, w = dist.get_rank(), dist.get_world_size()
DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64,
          np.complex64, np.complex128]


def values(k, dtype, n=5):
    """Rank k's values: exactly representable in every dtype (no rounding anywhere)."""
    base = np.arange(n, dtype=np.float64) * (k + 1) + k
    if dtype == np.bool_:
        return (np.arange(n) + k) % 3 == 0
    if np.dtype(dtype).kind == "c":
        return (base + 0.5 + 1j * (2 - base)).astype(dtype)  # 1.5+2j on rank 0, element 1
    if np.dtype(dtype).kind == "f":
        return (base + 0.5).astype(dtype)
    return base.astype(dtype)


def expected(op, dtype):
    everyone = np.stack([values(k, dtype) for k in range(w)])
    if dtype == np.bool_:
        return {"sum": everyone.any(0), "max": everyone.any(0), "min": everyone.all(0)}[op]
    if op == "max":
        return everyone.max(0)
    if op == "min":
        return everyone.min(0)
    total = everyone.astype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64).sum(0)
    return (total / w if op == "avg" else total).astype(dtype)


def refused(op, dtype):
    kind = np.dtype(dtype).kind
    return (kind == "c" and op in ("max", "min")) or (kind in "biu" and op == "avg")


for dtype in DTYPES:
    name = np.dtype(dtype).name
    for op in ("sum", "avg", "max", "min"):
        t = engine.tensor(values(r, dtype))
        before = t.numpy().copy()
        try:
            dist.all_reduce(t, op=op)
        except DTypeError as e:
            assert refused(op, dtype), f"all_reduce {op} {name} refused: {e}"
            assert "all_reduce" in str(e) and name in str(e) and op.upper() in str(e), str(e)
            np.testing.assert_array_equal(t.numpy(), before)  # nothing written
            continue
        assert not refused(op, dtype), f"all_reduce {op} on {name} was accepted"
        assert t.dtype == dtype, (t.dtype, dtype)
        np.testing.assert_array_equal(t.numpy(), expected(op, dtype), err_msg=f"all_reduce {op} {name}")

        out = engine.tensor(np.zeros(5, dtype))
        inputs = [engine.tensor(values(r, dtype)) for _ in range(w)]
        dist.reduce_scatter(out, inputs, op=op)  # every slot holds the same values: the all-reduce's result
        np.testing.assert_array_equal(out.numpy(), expected(op, dtype), err_msg=f"reduce_scatter {op} {name}")

    for src in range(w):
        t = engine.tensor(values(r, dtype))
        dist.broadcast(t, src=src)
        np.testing.assert_array_equal(t.numpy(), values(src, dtype), err_msg=f"broadcast {name}")
    outs = [engine.tensor(np.zeros(5, dtype)) for _ in range(w)]
    dist.all_gather(outs, engine.tensor(values(r, dtype)))
    for k in range(w):
        np.testing.assert_array_equal(outs[k].numpy(), values(k, dtype), err_msg=f"all_gather {name}")

# the case: a complex all_reduce went through int64 (1.5+2j became 1+0j), even on one rank
c = engine.tensor(np.array([1.5 + 2j], np.complex64))
dist.all_reduce(c)
assert c.numpy().tolist() == [(1.5 + 2j) * w], c.numpy()
# a strided complex view is reduced through a contiguous copy and written back in place
base = engine.tensor(np.zeros((3, 2), np.complex128))
view = base[:, 1]
view += 1j * (r + 1)
dist.all_reduce(view)
assert base.numpy()[:, 1].tolist() == [1j * w * (w + 1) / 2] * 3 and not base.numpy()[:, 0].any()

dist.barrier()
if r == 0:
    print("dtypes ok", w)

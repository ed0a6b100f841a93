"""Every collective on every op, checked against the values each rank can compute by itself.

Run: mpiexec -n W python tests/distributed/workers/collectives.py. Prints "collectives ok W" on rank 0.
"""

import numpy as np

import engine
import engine.distributed as dist
from engine.errors import GradError, ShapeError

dist.init_process_group("mpi")
r, w = dist.get_rank(), dist.get_world_size()
assert dist.is_initialized() and dist.get_backend() == "mpi"


def rank_values(k, shape=(2, 3), dtype=np.float32):
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) * (k + 1) + k).astype(dtype)


everyone = np.stack([rank_values(k) for k in range(w)])
for op, expect in [(dist.ReduceOp.SUM, everyone.sum(0)), (dist.ReduceOp.AVG, everyone.mean(0)),
                   (dist.ReduceOp.MAX, everyone.max(0)), (dist.ReduceOp.MIN, everyone.min(0))]:
    for dtype in (np.float32, np.float64):
        t = engine.tensor(rank_values(r, dtype=dtype))
        before = t._version_value
        assert dist.all_reduce(t, op=op) is None
        np.testing.assert_allclose(t.numpy(), expect.astype(dtype), rtol=1e-6, err_msg=str(op))
        assert t.dtype == dtype and t._version_value == before + 1

# integers and float16 (reduced through float32), and a strided view written back in place
ints = engine.tensor(np.array([r, 10 * r], np.int64))
dist.all_reduce(ints)
assert ints.tolist() == [sum(range(w)), 10 * sum(range(w))]
half = engine.tensor(np.full(3, r + 1, np.float16))
dist.all_reduce(half, op=dist.ReduceOp.MAX)
assert half.dtype == np.float16 and half.tolist() == [w] * 3
base = engine.zeros(4, 4)
view = base[:, 1]
view += r + 1
dist.all_reduce(view)
assert base.numpy()[:, 1].tolist() == [w * (w + 1) / 2] * 4 and base.numpy()[:, 0].tolist() == [0] * 4

# broadcast from every source
for src in range(w):
    t = engine.tensor(rank_values(r))
    dist.broadcast(t, src=src)
    np.testing.assert_array_equal(t.numpy(), rank_values(src))

# all_gather
outs = [engine.zeros(2, 3) for _ in range(w)]
dist.all_gather(outs, engine.tensor(rank_values(r)))
for k in range(w):
    np.testing.assert_array_equal(outs[k].numpy(), rank_values(k))

# reduce_scatter: output on rank r = sum over ranks k of input_list[r] on rank k
inputs = [engine.tensor(rank_values(r) + 100 * j) for j in range(w)]
out = engine.zeros(2, 3)
dist.reduce_scatter(out, inputs)
np.testing.assert_allclose(out.numpy(), everyone.sum(0) + 100 * r * w, rtol=1e-6)
dist.reduce_scatter(out, inputs, op=dist.ReduceOp.AVG)
np.testing.assert_allclose(out.numpy(), everyone.mean(0) + 100 * r, rtol=1e-6)
dist.reduce_scatter(out, inputs, op=dist.ReduceOp.MAX)
np.testing.assert_allclose(out.numpy(), everyone.max(0) + 100 * r, rtol=1e-6)

# async all_reduce
t = engine.ones(5) * (r + 1)
work = dist.all_reduce(t, async_op=True)
work.wait()
assert t.tolist() == [w * (w + 1) / 2] * 5

dist.barrier()

# grad mode: refused like an in-place op; fine under no_grad
p = engine.ones(3, requires_grad=True)
try:
    dist.all_reduce(p)
    raise AssertionError("all_reduce of a tensor requiring grad was accepted")
except GradError as e:
    assert "all_reduce" in str(e)
with engine.no_grad():
    dist.all_reduce(p)
assert p.tolist() == [w] * 3

# mismatched shapes: every rank raises, none hangs
for call in () if w == 1 else (lambda: dist.all_reduce(engine.zeros(2 + r)),
             lambda: dist.all_gather([engine.zeros(2 + r) for _ in range(w)], engine.zeros(2 + r)),
             lambda: dist.broadcast(engine.zeros(1, 1 + r), src=0)):
    try:
        call()
        raise AssertionError("mismatched shapes were accepted")
    except ShapeError as e:
        assert "rank 1 has shape (3,)" in str(e) or "rank 1 has shape (1, 2)" in str(e), str(e)

# misuse
try:
    dist.init_process_group()
    raise AssertionError("a second init_process_group was accepted")
except dist.DistributedError:
    pass
try:
    dist.all_gather([engine.zeros(2)] * (w + 1), engine.zeros(2))
    raise AssertionError("a tensor_list longer than the world was accepted")
except dist.DistributedError:
    pass

dist.destroy_process_group()
assert not dist.is_initialized()
dist.init_process_group()  # again after destroy
dist.barrier()
dist.destroy_process_group()
if r == 0:
    print("collectives ok", w)

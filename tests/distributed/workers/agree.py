"""What the ranks must agree on before a collective: the collective itself, its reduce op, its src
rank, the tensors' shapes and dtypes, and whether every rank can take part (its argument checks,
its pending deferred device checks). A difference raises on every rank, naming each rank's value,
and the ranks stay in step (the next collective pairs up). Prints "agree ok W" on rank 0."""

import numpy as np

import engine
import engine.distributed as dist
from engine.errors import DTypeError, GradError, ShapeError
from engine.kernels import deferred
from engine.kernels.registry import KernelError

dist.init_process_group("mpi")
r, w = dist.get_rank(), dist.get_world_size()
assert w > 1


def in_step():
    t = engine.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [float(w)] * 2


def raises(call, error, *fragments):
    try:
        call()
    except error as e:
        for fragment in fragments:
            assert fragment in str(e), f"{fragment!r} not in: {e}"
    else:
        raise AssertionError(f"{call} did not raise {error.__name__}")
    in_step()


# a different reduce op on rank 1
raises(lambda: dist.all_reduce(engine.ones(3), op="max" if r == 1 else "sum"), dist.DistributedError,
       "different reduce ops", "rank 0 has reduce op sum", "rank 1 has reduce op max")
raises(lambda: dist.reduce_scatter(engine.zeros(2), [engine.ones(2)] * w, op="min" if r == 1 else "sum"),
       dist.DistributedError, "reduce_scatter", "rank 1 has reduce op min")
# a different broadcast source on rank 1
raises(lambda: dist.broadcast(engine.ones(3), src=1 if r == 1 else 0), dist.DistributedError,
       "different src ranks", "rank 0 has src 0", "rank 1 has src 1")
# a different dtype on rank 1
raises(lambda: dist.all_reduce(engine.ones(3, dtype=np.float64 if r == 1 else np.float32)), DTypeError,
       "different dtypes", "rank 0 has dtype float32", "rank 1 has dtype float64")
# different collectives
raises(lambda: dist.broadcast(engine.ones(3), src=0) if r == 1 else dist.all_reduce(engine.ones(3)),
       dist.DistributedError, "called different collectives", "rank 0 calls all_reduce", "rank 1 calls broadcast")
raises(lambda: dist.barrier() if r == 1 else dist.all_reduce(engine.ones(3)),
       dist.DistributedError, "rank 1 calls barrier")
# shapes, as before
raises(lambda: dist.all_reduce(engine.ones(2 + r)), ShapeError, "rank 1 has shape (3,)")

# an argument error on rank 1 alone: rank 1 raises its own error, every other rank names rank 1
p = engine.ones(3, requires_grad=(r == 1))
raises(lambda: dist.all_reduce(p), GradError if r == 1 else dist.DistributedError,
       *(("requires grad",) if r == 1 else ("rank 1 could not take part", "GradError", "no rank entered")))
raises(lambda: dist.broadcast(engine.ones(3), src=w if r == 1 else 0),
       dist.DistributedError, "src rank" if r == 1 else "rank 1 could not take part")


# a failed device-side check deferred on rank 1 (kernels.deferred, simulated with a stand-in device
# array): raised before the collective, on every rank, instead of inside rank 1's host staging
class FakeDeviceArray:
    def __init__(self, values):
        self.values = np.asarray(values)

    def get(self):
        return self.values


def target_in_range(values):
    if values.max() >= 10:
        raise KernelError(f"cross_entropy: target {values.max()} is out of range for 10 classes")


deferred._read_all = lambda arrays: [a.get() for a in arrays]
deferred._eager = False
if r == 1:
    deferred.defer(FakeDeviceArray([3, 12]), target_in_range)
raises(lambda: dist.all_reduce(engine.ones(3)), KernelError if r == 1 else dist.DistributedError,
       *(("target 12",) if r == 1 else ("rank 1 could not take part", "KernelError", "target 12")))
assert deferred.pending() == 0

dist.barrier()
if r == 0:
    print("agree ok", w)

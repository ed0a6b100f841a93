"""Megatron's tensor-parallel MLP under mpiexec: the same outputs and gradients as the unsplit MLP.

Run: mpiexec -n W python tests/distributed/workers/tensor_parallel.py. Rank 0 prints
"tensor parallel ok W". A hidden width of 10 splits unevenly over 3 ranks (4, 3, 3).
"""

import numpy as np

import engine
import engine.distributed as dist
import engine.functional as F
from engine import nn, optim
from engine.distributed import core
from engine.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear, split_sizes
from engine.errors import ShapeError

IN, HIDDEN, OUT, N = 6, 10, 4, 5
TOL = dict(rtol=1e-5, atol=1e-6)

dist.init_process_group("mpi")
rank, world = dist.get_rank(), dist.get_world_size()
comm = __import__("mpi4py.MPI", fromlist=["MPI"]).COMM_WORLD
group = core.group()
calls = {"all_reduce": 0, "all_gather": 0}
for name in calls:  # count the collectives the layers issue
    original = getattr(group, name)
    setattr(group, name, (lambda f, n: lambda *a, **k: (calls.__setitem__(n, calls[n] + 1), f(*a, **k))[1])(original,
                                                                                                             name))


def full_mlp():
    engine.manual_seed(0)
    return nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)


def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(N, IN)).astype(np.float32), rng.normal(size=(N, OUT)).astype(np.float32)


def gathered(shard, dim):
    """The ranks' shards joined in rank order along ``dim``."""
    return np.concatenate(comm.allgather(shard.numpy()), axis=dim)


x_np, target_np = data()

# Reference: the unsplit MLP in this process.
lin1, lin2 = full_mlp()
x_ref = engine.tensor(x_np, requires_grad=True)
y_ref = lin2(F.relu(lin1(x_ref)))
((y_ref - engine.tensor(target_np)) ** 2).sum().backward()

# The constructors build the same full layers from the seed and keep their slice.
engine.manual_seed(0)
col, row = ColumnParallelLinear(IN, HIDDEN), RowParallelLinear(HIDDEN, OUT)
sizes = split_sizes(HIDDEN, world)
assert col.weight.shape == (sizes[rank], IN) and row.weight.shape == (OUT, sizes[rank])
np.testing.assert_array_equal(gathered(col.weight, 0), lin1.weight.numpy())
np.testing.assert_array_equal(gathered(col.bias, 0), lin1.bias.numpy())
np.testing.assert_array_equal(gathered(row.weight, 1), lin2.weight.numpy())
np.testing.assert_array_equal(row.bias.numpy(), lin2.bias.numpy())

# Column -> ReLU -> Row: one all-reduce in forward, one in backward.
for gather_output in (False, True):
    a, b = full_mlp()
    col = ColumnParallelLinear.from_linear(a, gather_output=gather_output)
    row = RowParallelLinear.from_linear(b, input_is_parallel=not gather_output)
    x = engine.tensor(x_np, requires_grad=True)
    calls.update(all_reduce=0, all_gather=0)
    y = row(F.relu(col(x)))
    forward_calls = dict(calls)
    ((y - engine.tensor(target_np)) ** 2).sum().backward()
    backward_calls = {k: calls[k] - forward_calls[k] for k in calls}
    # A world of one communicates nothing. The gathered variant adds a gather in forward
    # (Column's output) and one in backward (Row's scatter of its input).
    one = int(world > 1)
    expected = {"all_reduce": one, "all_gather": one if gather_output else 0}
    assert forward_calls == expected and backward_calls == expected, (forward_calls, backward_calls)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), **TOL)
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), **TOL)
    np.testing.assert_allclose(gathered(col.weight.grad, 0), lin1.weight.grad.numpy(), **TOL)
    np.testing.assert_allclose(gathered(col.bias.grad, 0), lin1.bias.grad.numpy(), **TOL)
    np.testing.assert_allclose(gathered(row.weight.grad, 1), lin2.weight.grad.numpy(), **TOL)
    np.testing.assert_allclose(row.bias.grad.numpy(), lin2.bias.grad.numpy(), **TOL)
    everyone = comm.allgather((y.numpy(), x.grad.numpy(), row.bias.grad.numpy()))
    for other in everyone:  # replicated results agree across ranks
        for mine, theirs in zip(everyone[0], other):
            np.testing.assert_array_equal(mine, theirs)

# Training: a few SGD steps keep the split model equal to the unsplit one.
a, b = full_mlp()
col, row = ColumnParallelLinear.from_linear(a), RowParallelLinear.from_linear(b)
tp_model = nn.Sequential(col, nn.ReLU(), row)
ref_model = nn.Sequential(*full_mlp()[:1], nn.ReLU(), full_mlp()[1])
tp_opt = optim.SGD(tp_model.parameters(), lr=0.05, momentum=0.9)
ref_opt = optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
for _step in range(3):
    for model, opt in ((tp_model, tp_opt), (ref_model, ref_opt)):
        opt.zero_grad()
        F.mse_loss(model(engine.tensor(x_np)), engine.tensor(target_np)).backward()
        opt.step()
np.testing.assert_allclose(gathered(col.weight, 0), ref_model[0].weight.numpy(), **TOL)
np.testing.assert_allclose(gathered(row.weight, 1), ref_model[2].weight.numpy(), **TOL)

# Errors name the layer and the shapes.
try:
    col(engine.zeros(2, IN + 1))
    raise AssertionError("a wrong input width was accepted")
except ShapeError as e:
    assert "ColumnParallelLinear" in str(e) and str(IN) in str(e)
try:
    ColumnParallelLinear.from_linear(nn.ReLU())
    raise AssertionError("from_linear took a ReLU")
except TypeError:
    pass
if world > 1:
    try:
        RowParallelLinear(world - 1, 3)
        raise AssertionError("fewer features than ranks accepted")
    except ValueError as e:
        assert "cannot be split" in str(e)

if rank == 0:
    print(f"tensor parallel ok {world}")

"""init_process_group("gloo") under mpiexec: PyTorch's CPU backend name runs on the MPI backend.
get_backend() answers "gloo"; all_reduce and a DDP step work as with "mpi". Prints "gloo ok W" on rank 0."""

import numpy as np

import engine
import engine.distributed as dist
from engine import nn
from engine.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo", world_size=-1, rank=-1, init_method="env://")  # PyTorch's spelling
r, w = dist.get_rank(), dist.get_world_size()
assert dist.get_backend() == "gloo", dist.get_backend()
t = engine.tensor([float(r + 1)] * 3)
dist.all_reduce(t)
assert t.tolist() == [w * (w + 1) / 2] * 3, t.tolist()

engine.manual_seed(0)
model = DistributedDataParallel(nn.Linear(4, 2))
x = engine.tensor(np.random.default_rng(r).standard_normal((3, 4)).astype(np.float32))
model(x).sum().backward()
grads = [engine.zeros(2, 4) for _ in range(w)]
dist.all_gather(grads, model.module.weight.grad.detach())
assert all(np.allclose(g.numpy(), grads[0].numpy()) for g in grads), "DDP gradients differ between ranks"
dist.destroy_process_group()
if r == 0:
    print(f"gloo ok {w}")

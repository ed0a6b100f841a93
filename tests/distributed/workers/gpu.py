"""GPU checks (run by tests/distributed/test_gpu.py where CUDA answers): NCCL collectives and DDP on
CUDA tensors, and the MPI backend with cupy arrays (host staging or CUDA-aware). Arg: nccl or mpi."""

import sys

import numpy as np

import engine
import engine.distributed as dist
from engine import nn
from engine.nn.parallel import DistributedDataParallel

backend = sys.argv[1]
engine.set_default_device("cuda")
dist.init_process_group(backend)
r, w = dist.get_rank(), dist.get_world_size()
assert dist.get_backend() == backend
dev = f"cuda:{dist.get_local_rank() % engine.cuda_device_count()}"
for op, expect in [(dist.ReduceOp.SUM, sum(range(1, w + 1))), (dist.ReduceOp.AVG, (w + 1) / 2),
                   (dist.ReduceOp.MAX, w), (dist.ReduceOp.MIN, 1)]:
    t = engine.full((1000,), float(r + 1), device=dev)
    dist.all_reduce(t, op=op)
    assert t.is_cuda and np.allclose(t.numpy(), expect), (op, t.numpy()[:3])
t = engine.full((7,), float(r), device=dev)
dist.broadcast(t, src=0)
assert t.numpy().tolist() == [0.0] * 7
outs = [engine.zeros(3, device=dev) for _ in range(w)]
dist.all_gather(outs, engine.full((3,), float(r), device=dev))
assert [o.numpy().tolist() for o in outs] == [[float(k)] * 3 for k in range(w)]
out = engine.zeros(4, device=dev)
dist.reduce_scatter(out, [engine.full((4,), float(j + r), device=dev) for j in range(w)])
assert np.allclose(out.numpy(), sum(r + k for k in range(w)))
dist.barrier()

engine.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dev)
ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dev)
ddp = DistributedDataParallel(model)
ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
rng = np.random.default_rng(0)
x = engine.tensor(rng.standard_normal((4 * w, 8)).astype(np.float32), device=dev)
y = engine.tensor(rng.integers(0, 3, 4 * w), device=dev)
nn.CrossEntropyLoss()(ddp(x[r * 4:(r + 1) * 4]), y[r * 4:(r + 1) * 4]).backward()
nn.CrossEntropyLoss()(ref(x), y).backward()
for p, q in zip(model.parameters(), ref.parameters()):
    np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-6)
dist.destroy_process_group()
if r == 0:
    print("gpu ok", backend, w)

"""DDP and parameters that take no part in the loss, and DDP after destroy_process_group.

- find_unused_parameters=True: a parameter no rank uses keeps .grad None on every rank (so weight
  decay leaves it alone, as in PyTorch); one that only rank 0 uses gets the sum of rank 0's
  gradient over the world size (the other ranks contribute zeros), on every rank.
- find_unused_parameters=False: backward raises on every rank, naming the unused parameters, and
  the ranks stay in step (the next collective pairs up).
- after destroy_process_group(): forward raises instead of communicating.
Prints "ddp unused ok W" on rank 0.
"""

import numpy as np

import engine
import engine.distributed as dist
from engine import nn
from engine.nn.parallel import DistributedDataParallel

dist.init_process_group()
r, w = dist.get_rank(), dist.get_world_size()


class Branchy(nn.Module):
    """``a`` used by every rank, ``b`` by none, ``c`` by rank 0 only."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        y = self.a(x)
        return y + self.c(x) if r == 0 else y


x = engine.tensor(np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
engine.manual_seed(0)
model = Branchy()
ddp = DistributedDataParallel(model, find_unused_parameters=True)
opt = engine.optim.SGD(ddp.parameters(), lr=0.1, weight_decay=0.5)
b_before = model.b.weight.detach().numpy().copy()
ddp(x).sum().backward()
assert model.b.weight.grad is None and model.b.bias.grad is None, "an unused parameter got a gradient"
# c's gradient of sum(c(x)) on rank 0: each output row adds x; rank 0's alone, averaged over w ranks
expect_c = np.tile(x.numpy().sum(0), (2, 1)) / w
np.testing.assert_allclose(model.c.weight.grad.numpy(), expect_c, rtol=1e-6)
np.testing.assert_allclose(model.c.bias.grad.numpy(), np.full(2, 4.0 / w), rtol=1e-6)
np.testing.assert_allclose(model.a.bias.grad.numpy(), np.full(2, 4.0), rtol=1e-6)
opt.step()
np.testing.assert_array_equal(model.b.weight.detach().numpy(), b_before)  # weight decay left it alone

# without find_unused_parameters: a clear error on every rank, then the ranks are still in step
engine.manual_seed(0)
strict = DistributedDataParallel(Branchy())
try:
    strict(x).sum().backward()
    raise AssertionError("an unused parameter was accepted without find_unused_parameters")
except dist.DistributedError as e:
    message = str(e)
    assert "b.weight, b.bias" in message and "find_unused_parameters=True" in message, message
    assert f"on this rank {r}: " in message, message
    if w > 1:
        assert "c.weight" in message, message  # unused on ranks other than 0
    assert message.count("c.weight") == (0 if w == 1 else 1 if r == 0 else 2), message
total = engine.ones(1)
dist.all_reduce(total)
assert total.tolist() == [float(w)]

# a DDP model whose process group was destroyed refuses to run
dist.destroy_process_group()
try:
    ddp(x)
    raise AssertionError("DDP communicated after destroy_process_group()")
except dist.DistributedError as e:
    assert "destroyed" in str(e), str(e)
if r == 0:
    print("ddp unused ok", w)

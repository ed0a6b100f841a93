"""DDP checks in one launch: parity with one process on the whole batch, identical parameters on
every rank after every step, no_sync accumulation parity, buckets launched during backward, state_dict
keys, buffer broadcast, mismatched models refused. Prints "ddp ok W" on rank 0."""

import numpy as np

import engine
import engine.distributed as dist
from engine import nn
from engine.errors import ShapeError
from engine.nn.parallel import DistributedDataParallel

dist.init_process_group()
r, w = dist.get_rank(), dist.get_world_size()
B, STEPS = 4, 4


def make_model(seed):
    engine.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def flat(model):
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def same_everywhere(vector):
    everyone = [np.empty_like(vector) for _ in range(w)]
    outs = [engine.zeros(*vector.shape) for _ in range(w)]
    dist.all_gather(outs, engine.tensor(vector))
    everyone = [o.numpy() for o in outs]
    return all(np.array_equal(everyone[0], e) for e in everyone)


data_rng = np.random.default_rng(42)  # same data on every rank
X = data_rng.standard_normal((STEPS, w * B * 2, 8)).astype(np.float32)
Y = data_rng.integers(0, 3, (STEPS, w * B * 2))
loss_fn = nn.CrossEntropyLoss()

# rank-dependent init: DDP must broadcast rank 0's parameters
ddp = DistributedDataParallel(make_model(seed=100 + r), bucket_cap_mb=16 * 16 * 4 / 2 ** 20)
assert same_everywhere(flat(ddp.module)), "construction did not broadcast rank 0's parameters"
reference = make_model(seed=0)
reference.load_state_dict({k: v.clone() for k, v in ddp.module.state_dict().items()})
assert list(ddp.state_dict()) == ["module." + k for k in reference.state_dict()]
assert ddp.stats["buckets"] >= 3

opt = engine.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
ref_opt = engine.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
for step in range(STEPS):
    xs, ys = X[step, :w * B], Y[step, :w * B]
    mine = slice(r * B, (r + 1) * B)
    opt.zero_grad()
    loss_fn(ddp(engine.tensor(xs[mine])), engine.tensor(ys[mine])).backward()
    opt.step()
    ref_opt.zero_grad()
    loss_fn(reference(engine.tensor(xs)), engine.tensor(ys)).backward()
    ref_opt.step()
    assert same_everywhere(flat(ddp.module)), f"ranks differ after step {step}"
    np.testing.assert_allclose(flat(ddp.module), flat(reference), rtol=2e-5, atol=2e-6,
                               err_msg=f"DDP differs from one process on the whole batch at step {step}")
assert ddp.stats["launched_in_backward"] > 0, ddp.stats  # the buckets of the last layers overlap backward

# no_sync: two micro-batches per step, the first without communication
for step in range(2):
    opt.zero_grad()
    for micro in range(2):
        xs, ys = X[step, micro * w * B:(micro + 1) * w * B], Y[step, micro * w * B:(micro + 1) * w * B]
        mine = slice(r * B, (r + 1) * B)
        if micro == 0:
            with ddp.no_sync():
                (loss_fn(ddp(engine.tensor(xs[mine])), engine.tensor(ys[mine])) / 2).backward()
            local = flat_grad = np.concatenate([p.grad.numpy().ravel() for p in ddp.parameters()])
            if w > 1 and step == 0:
                assert not same_everywhere(local), "no_sync communicated"
        else:
            (loss_fn(ddp(engine.tensor(xs[mine])), engine.tensor(ys[mine])) / 2).backward()
    opt.step()
    ref_opt.zero_grad()
    loss_fn(reference(engine.tensor(X[step])), engine.tensor(Y[step])).backward()
    ref_opt.step()
    assert same_everywhere(flat(ddp.module))
    np.testing.assert_allclose(flat(ddp.module), flat(reference), rtol=2e-5, atol=2e-6,
                               err_msg=f"no_sync accumulation differs from one process at step {step}")

# buffers: rank 0's running statistics reach every rank, at construction and at each training forward
engine.manual_seed(0)
bn_model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
with engine.no_grad():
    bn_model[1].running_mean.fill_(float(r))
bn = DistributedDataParallel(bn_model)
assert bn_model[1].running_mean.tolist() == [0.0] * 4
bn(engine.tensor(X[0, r * B:(r + 1) * B]))  # each rank updates its statistics on its own batch
bn(engine.tensor(X[0, :B]))  # ...and the next training forward starts from rank 0's
assert same_everywhere(bn_model[1].running_var.detach().numpy())

# different models on different ranks: refused on every rank, naming the mismatch
if w > 1:
    engine.manual_seed(0)
    odd = nn.Sequential(nn.Linear(8, 16 + r), nn.Linear(16 + r, 3))
    try:
        DistributedDataParallel(odd)
        raise AssertionError("different models were accepted")
    except ShapeError as e:
        assert "rank 0 has 0.weight (16, 8)" in str(e) and "rank 1 has 0.weight (17, 8)" in str(e), str(e)

dist.barrier()
if r == 0:
    print("ddp ok", w)

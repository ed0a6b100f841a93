"""ZeroRedundancyOptimizer.load_state_dict validates the whole state dict on every rank before any
rank loads its part: unknown or repeated parameter indices, and an entry of the wrong shape for a
parameter another rank owns, raise on every rank and leave the optimizer unchanged. A ZeRO whose
process group was destroyed refuses to step. Prints "zero load ok W" on rank 0."""

import copy

import numpy as np

import engine
import engine.distributed as dist
from engine import nn, optim
from engine.distributed.optim import ZeroRedundancyOptimizer
from engine.errors import EngineError

dist.init_process_group()
r, w = dist.get_rank(), dist.get_world_size()
engine.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
opt = ZeroRedundancyOptimizer(model.parameters(), optim.Adam, lr=0.1)


def step():
    opt.zero_grad()
    model(engine.ones(2, 4)).sum().backward()
    opt.step()


step()
for k in range(w):  # the full state dict on every rank, as loading from one file gives
    opt.consolidate_state_dict(to=k)
    if k == r:
        good = opt.state_dict()
owned_elsewhere = next((i for i, p in enumerate(model.parameters()) if opt.owner(p) != r), None)


def local_state():
    return {i: {k: (v.numpy().copy() if hasattr(v, "numpy") else v) for k, v in e.items()}
            for i, e in opt.optim.state_dict()["state"].items()}


before, lr_before = local_state(), opt.param_groups[0]["lr"]


def refused(bad, *fragments):
    try:
        opt.load_state_dict(bad)
    except EngineError as e:
        for fragment in fragments:
            assert fragment in str(e), f"{fragment!r} not in: {e}"
    else:
        raise AssertionError(f"a bad state dict was accepted ({fragments})")
    after = local_state()
    assert after.keys() == before.keys() and opt.param_groups[0]["lr"] == lr_before
    for i in before:
        for k in before[i]:
            np.testing.assert_array_equal(after[i][k], before[i][k])


unknown = copy.deepcopy(good)
unknown["state"][99] = unknown["state"][0]
refused(unknown, "[99]", "no param group lists")
repeated = copy.deepcopy(good)
repeated["param_groups"][0]["params"][1] = repeated["param_groups"][0]["params"][0]
repeated["param_groups"][0]["lr"] = 0.5  # nothing of it may be applied either
refused(repeated, "more than once")
if owned_elsewhere is not None:  # this rank would not load that entry, but refuses the file all the same
    wrong_shape = copy.deepcopy(good)
    entry = wrong_shape["state"][owned_elsewhere]
    entry["exp_avg"] = engine.zeros(*(s + 1 for s in entry["exp_avg"].shape))
    refused(wrong_shape, f"parameter {owned_elsewhere}", "shape")
opt.load_state_dict(good)  # the good one still loads, and training goes on in step
step()

dist.destroy_process_group()
try:
    step()
    raise AssertionError("ZeRO stepped after destroy_process_group()")
except dist.DistributedError as e:
    assert "destroyed" in str(e), str(e)
if r == 0:
    print("zero load ok", w)

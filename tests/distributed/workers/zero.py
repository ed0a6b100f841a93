"""ZeroRedundancyOptimizer under mpiexec: parity with plain Adam, sharded state, consolidated checkpoints.

Run: mpiexec -n W python tests/distributed/workers/zero.py OUTDIR. Rank 0 prints "zero ok W" and
writes OUTDIR/model.ckpt + OUTDIR/optim.ckpt (after STEPS steps) and OUTDIR/final.ckpt (after
MORE further steps), which the test continues in a single process.
"""

import sys
from pathlib import Path

import numpy as np

import engine
from engine import nn, optim

STEPS, MORE = 4, 2
HYPER = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3)


def make_model():
    engine.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def backward_on(model, step: int) -> None:
    """The same full batch on every rank (as after DDP's gradient average), different per step."""
    rng = np.random.default_rng(100 + step)
    x = engine.tensor(rng.normal(size=(12, 7)).astype(np.float32))
    y = engine.tensor(rng.normal(size=(12, 3)).astype(np.float32))
    ((model(x) - y) ** 2).mean().backward()


def lr_at(step: int) -> float:
    return HYPER["lr"] * (0.5 if step >= 3 else 1.0)  # changed through param_groups, as a scheduler does


def greedy_owners(sizes, world):
    """PyTorch's partition, written independently: largest first, to the least-loaded rank."""
    load, owners = [0] * world, {}
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world), key=lambda r: load[r])
        owners[i] = rank
        load[rank] += sizes[i]
    return [owners[i] for i in range(len(sizes))]


def state_elements(state_dict) -> int:
    return sum(v.numel() for entry in state_dict["state"].values() for v in entry.values()
               if isinstance(v, engine.Tensor))


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"], (a["param_groups"], b["param_groups"])
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        assert sorted(a["state"][i]) == sorted(b["state"][i])
        for k, v in a["state"][i].items():
            if isinstance(v, engine.Tensor):
                np.testing.assert_array_equal(v.numpy(), b["state"][i][k].numpy(), err_msg=f"{i}/{k}")
            else:
                assert v == b["state"][i][k]


def main(outdir: Path) -> None:
    import engine.distributed as dist
    from engine.distributed.optim import ZeroRedundancyOptimizer
    from engine.errors import ShapeError

    dist.init_process_group("mpi")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = __import__("mpi4py.MPI", fromlist=["MPI"]).COMM_WORLD

    ref = make_model()
    ref_opt = optim.Adam(ref.parameters(), **HYPER)
    model = make_model()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optim.Adam, **HYPER)
    params = list(model.parameters())
    assert [zero.owner(p) for p in params] == greedy_owners([p.numel() for p in params], world)

    for step in range(STEPS):
        for opt in (ref_opt, zero):
            opt.param_groups[0]["lr"] = lr_at(step)
        ref_opt.zero_grad()
        backward_on(ref, step)
        ref_opt.step()
        zero.zero_grad()
        backward_on(model, step)
        for p in params:  # a rank may use only its own shard's gradients: spoil the others'
            if zero.owner(p) != rank:
                p.grad._data[...] = np.nan
        zero.step()
        for a, b in zip(ref.parameters(), params):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=0, err_msg=f"step {step}")
        flat = np.concatenate([p.numpy().ravel() for p in params])
        everyone = comm.allgather(flat)
        assert all(np.array_equal(everyone[0], f) for f in everyone), "ranks disagree on the parameters"

    # Each rank keeps Adam's two moments for its own shard only.
    local = state_elements(zero.optim.state_dict())
    owned = sum(p.numel() for p in params if zero.owner(p) == rank)
    assert local == 2 * owned, (local, owned)
    assert comm.allreduce(local) == 2 * sum(p.numel() for p in params)
    shares = comm.gather(local, root=0)

    # The consolidated state is the plain optimizer's, on the chosen rank only.
    try:
        zero.state_dict()
        raise AssertionError("state_dict before consolidate_state_dict")
    except dist.DistributedError as e:
        assert "consolidate_state_dict" in str(e)
    last = world - 1
    zero.consolidate_state_dict(to=last)
    if rank == last:
        assert_same_state(zero.state_dict(), ref_opt.state_dict())
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        full = zero.state_dict()
        assert_same_state(full, ref_opt.state_dict())
        engine.save(full, outdir / "optim.ckpt")
        engine.save(model.state_dict(), outdir / "model.ckpt")
    else:
        try:
            zero.state_dict()
            raise AssertionError("state_dict on a rank that did not receive the consolidated state")
        except dist.DistributedError:
            pass
    dist.barrier()

    # Re-shard: every rank loads the one file into a fresh ZeRO and continues as the first one does.
    fresh = make_model()
    fresh.load_state_dict(engine.load(outdir / "model.ckpt"))
    zero2 = ZeroRedundancyOptimizer(fresh.parameters(), optimizer_class=optim.Adam, lr=1.0)
    zero2.load_state_dict(engine.load(outdir / "optim.ckpt"))
    assert zero2.param_groups[0]["lr"] == lr_at(STEPS - 1) and zero2.param_groups[0]["betas"] == (0.8, 0.99)
    for step in range(STEPS, STEPS + MORE):
        for opt, m in ((zero, model), (zero2, fresh)):
            opt.zero_grad()
            backward_on(m, step)
            opt.step()
    for a, b in zip(params, fresh.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if rank == 0:
        engine.save(model.state_dict(), outdir / "final.ckpt")

    # Errors: a rank with other parameters, a bad root, a non-optimizer class.
    extra = [engine.zeros(2, requires_grad=True)] if rank == 0 else []
    try:
        ZeroRedundancyOptimizer([*params, *extra], optim.SGD, lr=0.1)
        raise AssertionError("mismatched parameters across ranks were not detected")
    except ShapeError as e:
        assert "differ across ranks" in str(e)
    for bad in (world, -1):
        try:
            zero.consolidate_state_dict(to=bad)
            raise AssertionError("bad root accepted")
        except dist.DistributedError:
            pass
    try:
        ZeroRedundancyOptimizer(params, optimizer_class="adam")
        raise AssertionError("a string optimizer_class accepted")
    except TypeError:
        pass

    # add_param_group: the new group is partitioned after the old ones, which keep their owners.
    head = nn.Linear(3, 4)
    before = [zero.owner(p) for p in params]
    zero.add_param_group({"params": head.parameters(), "lr": 0.05})
    assert [zero.owner(p) for p in params] == before
    assert [zero.owner(p) for p in params + list(head.parameters())] == \
        greedy_owners([p.numel() for p in params], world) + \
        _continue_greedy([p.numel() for p in params], [p.numel() for p in head.parameters()], world)
    assert zero.param_groups[1]["lr"] == 0.05 and zero.optim.param_groups[1]["lr"] == 0.05

    if rank == 0:
        print(f"state elements per rank {shares} of {2 * sum(p.numel() for p in params)}")
        print(f"zero ok {world}")


def _continue_greedy(first, more, world):
    load = [0] * world
    for i, rank in enumerate(greedy_owners(first, world)):
        load[rank] += first[i]
    owners = {}
    for i in sorted(range(len(more)), key=lambda i: -more[i]):
        rank = min(range(world), key=lambda r: load[r])
        owners[i] = rank
        load[rank] += more[i]
    return [owners[i] for i in range(len(more))]


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""ZeroRedundancyOptimizer: mpiexec runs with 2 and 3 ranks (workers/zero.py), then the gathered
checkpoint continued by a plain single-process Adam in this process."""

import importlib.util

import numpy as np
import pytest

import engine
from engine import optim
from tests.distributed.launch import WORKERS, check, requires_mpi, run_mpi


def _worker_module():
    spec = importlib.util.spec_from_file_location("zero_worker", WORKERS / "zero.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines helpers only; main() runs under mpiexec
    return module


@requires_mpi
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_zero_parity_sharded_state_and_a_checkpoint_that_loads_in_one_process(world, tmp_path):
    out = check(run_mpi("zero.py", world, tmp_path))
    assert f"zero ok {world}" in out
    shares = out.split("state elements per rank ")[1].split(" of ")[0]
    assert len(eval(shares)) == world and max(eval(shares)) < 384  # no rank holds all the state

    # The one file rank 0 wrote loads into a plain Adam here and continues exactly as ZeRO did.
    w = _worker_module()
    model = w.make_model()
    model.load_state_dict(engine.load(tmp_path / "model.ckpt"))
    opt = optim.Adam(model.parameters(), lr=1.0)
    opt.load_state_dict(engine.load(tmp_path / "optim.ckpt"))
    assert opt.param_groups[0]["lr"] == w.lr_at(w.STEPS - 1)
    for step in range(w.STEPS, w.STEPS + w.MORE):
        opt.zero_grad()
        w.backward_on(model, step)
        opt.step()
    final = engine.load(tmp_path / "final.ckpt")
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), final[name].numpy(), rtol=1e-6, atol=0, err_msg=name)


def test_partition_rule_of_the_worker_is_pytorchs_greedy():
    # The independent greedy rule the workers check against: largest first, least-loaded rank
    # (ties: lowest rank; equal sizes keep their order).
    w = _worker_module()
    assert w.greedy_owners([10, 40, 30, 20], 2) == [0, 0, 1, 1]  # 40->0, 30->1, 20->1, 10->0
    assert w.greedy_owners([5, 5, 5], 3) == [0, 1, 2]


def test_without_a_process_group_it_says_to_initialize_one():
    import engine.distributed as dist
    from engine.distributed.optim import ZeroRedundancyOptimizer

    if dist.is_initialized():
        pytest.skip("a process group is up in this process")
    with pytest.raises(dist.DistributedError, match="init_process_group"):
        ZeroRedundancyOptimizer([engine.zeros(2, requires_grad=True)], optim.Adam, lr=0.1)


@requires_mpi
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.slow
def test_load_state_dict_validates_everything_before_applying(world):
    # unknown and repeated indices, a wrong-shaped entry of another rank's parameter: refused on
    # every rank, the optimizer unchanged; stepping after destroy_process_group() refused
    assert f"zero load ok {world}" in check(run_mpi("zero_load.py", world, timeout=90))

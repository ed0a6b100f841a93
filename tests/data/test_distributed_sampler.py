"""DistributedSampler in one process, with explicit num_replicas and rank (PyTorch's index semantics)."""

import pytest

from engine.data import DataLoader, DistributedSampler, TensorDataset
from engine.utils.data import DistributedSampler as UtilsDistributedSampler


def shards(n, replicas, **kw):
    return [list(DistributedSampler(range(n), num_replicas=replicas, rank=r, **kw)) for r in range(replicas)]


@pytest.mark.parametrize("n,replicas", [(10, 2), (10, 3), (7, 4), (3, 5), (12, 4), (1, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_equal_sized_and_cover_everything(n, replicas, shuffle):
    parts = shards(n, replicas, shuffle=shuffle, seed=3)
    size = -(-n // replicas)
    assert all(len(p) == size for p in parts)
    everything = sum(parts, [])
    assert set(everything) == set(range(n))
    assert len(everything) == size * replicas  # padded by repetition: exactly total_size - n repeats
    if n % replicas == 0:
        assert sorted(everything) == list(range(n))


def test_pytorch_order_without_shuffle():
    # PyTorch: indices += indices[:padding]; rank r takes indices[r::replicas]
    assert shards(10, 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert shards(3, 5, shuffle=False) == [[0], [1], [2], [0], [1]]  # padding longer than the data


def test_drop_last_cuts_the_tail_instead_of_padding():
    parts = shards(10, 3, shuffle=False, drop_last=True)
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert len(DistributedSampler(range(10), 3, 0, drop_last=True)) == 3
    parts = shards(11, 4, shuffle=True, drop_last=True)
    everything = sum(parts, [])
    assert len(everything) == len(set(everything)) == 8


def test_epochs_reshuffle_the_same_way_on_every_rank():
    samplers = [DistributedSampler(range(20), num_replicas=2, rank=r, seed=5) for r in range(2)]
    first = [list(s) for s in samplers]
    assert sorted(sum(first, [])) == list(range(20))
    assert [list(s) for s in samplers] == first  # no set_epoch: the same order again
    for s in samplers:
        s.set_epoch(1)
    second = [list(s) for s in samplers]
    assert second != first and sorted(sum(second, [])) == list(range(20))
    other_seed = DistributedSampler(range(20), num_replicas=2, rank=0, seed=6)
    assert list(other_seed) != first[0]
    state = samplers[0].state_dict()
    fresh = DistributedSampler(range(20), num_replicas=2, rank=0, seed=5)
    fresh.load_state_dict(state)
    assert list(fresh) == second[0]


def test_with_a_dataloader_and_exports():
    assert UtilsDistributedSampler is DistributedSampler
    import numpy as np

    ds = TensorDataset(np.arange(10, dtype=np.float32), np.arange(10))
    loader = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))
    assert [yb.tolist() for _, yb in loader] == [[1, 3], [5, 7], [9]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        DistributedSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedSampler(range(4), num_replicas=0, rank=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedSampler(range(4))

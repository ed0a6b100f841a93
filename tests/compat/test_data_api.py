"""torch.utils.data compatibility: the import path, PyTorch's signatures, and num_workers > 0."""

import threading
import time

import numpy as np
import pytest

import engine as torch
from engine.errors import EngineError


# ---- the import path ------------------------------------------------------------------------------

def test_tutorial_imports():
    from engine.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler,  # noqa: F401
                                   Sampler, SequentialSampler, Subset, TensorDataset, default_collate,
                                   random_split)
    import engine.data
    assert DataLoader is engine.data.DataLoader and Subset is engine.data.Subset  # re-exports, not copies


def test_attribute_path_after_import_engine_as_torch():
    import engine.utils.data
    assert torch.utils.data.DataLoader is engine.utils.data.DataLoader
    assert torch.utils.data.TensorDataset is engine.data.TensorDataset


def test_pytorch_positional_order():
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    ds = torch.utils.data.TensorDataset(x, y)
    # DataLoader(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last)
    loader = torch.utils.data.DataLoader(ds, 4, False, None, None, 0, None, False, True)
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_random_split_fractions_and_generator():
    from engine.utils.data import Subset, random_split
    ds = torch.utils.data.TensorDataset(np.arange(10))
    parts = random_split(ds, [0.5, 0.3, 0.2], np.random.default_rng(0))  # generator is the third positional
    assert [len(p) for p in parts] == [5, 3, 2] and all(isinstance(p, Subset) for p in parts)
    assert sorted(np.concatenate([p.indices for p in parts]).tolist()) == list(range(10))
    assert [len(p) for p in random_split(range(5), [0.5, 0.5], generator=0)] == [3, 2]  # leftovers go first


def test_custom_dataset_subset_and_concat():
    from engine.utils.data import ConcatDataset, Dataset, Subset

    class Squares(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.float32(i), i * i

    sub = Subset(Squares(), [4, 0])
    assert [sub[k][1] for k in range(2)] == [16, 0]
    both = Squares() + Squares()
    assert isinstance(both, ConcatDataset) and len(both) == 10 and both[7][1] == 4
    xb, yb = next(iter(torch.utils.data.DataLoader(Squares(), batch_size=5)))
    assert xb.dtype == np.float32 and yb.tolist() == [0, 1, 4, 9, 16]


def test_samplers_and_batch_sampler():
    from engine.utils.data import BatchSampler, RandomSampler, SequentialSampler
    ds = torch.utils.data.TensorDataset(np.arange(10))
    assert list(SequentialSampler(ds)) == list(range(10))
    order = list(RandomSampler(ds, generator=3))
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert len(list(RandomSampler(ds, replacement=True, num_samples=25, generator=0))) == 25
    assert list(BatchSampler(SequentialSampler(range(5)), 2, drop_last=False)) == [[0, 1], [2, 3], [4]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds, generator=1), 4, True))
    batches = [b[0].tolist() for b in loader]
    assert len(loader) == 2 and len(batches) == 2 and all(len(b) == 4 for b in batches)
    with pytest.raises(EngineError, match="exclusive"):
        torch.utils.data.DataLoader(ds, batch_size=4, batch_sampler=[[0, 1]])


def test_random_sampler_resume_is_exact():
    from engine.utils.data import RandomSampler
    ds = torch.utils.data.TensorDataset(np.arange(30))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=2))
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    rest = [b[0].tolist() for b in it]
    fresh = torch.utils.data.DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=99))
    fresh.load_state_dict(state)
    assert [b[0].tolist() for b in fresh] == rest


def test_iterable_dataset():
    from engine.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(np.float32(i) for i in range(7))

    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(Stream(), batch_size=3, num_workers=workers)
        assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(EngineError, match="IterableDataset"):
        torch.utils.data.DataLoader(Stream(), shuffle=True)
    loader = torch.utils.data.DataLoader(Stream(), batch_size=3, drop_last=True)
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5]] and "unknown" in repr(loader)
    with pytest.raises(TypeError, match="IterableDataset"):
        len(loader)

    class SizedStream(Stream):
        def __len__(self):
            return 7

    assert len(torch.utils.data.DataLoader(SizedStream(), batch_size=3)) == 3


# ---- num_workers ----------------------------------------------------------------------------------

def _data(n=37):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)).astype(np.float32), rng.integers(0, 5, n)


class ListDataset(torch.utils.data.Dataset):
    """Item by item (no fast path), so the workers run __getitem__ and the collate."""

    def __init__(self, x, y, delay=0.0):
        self.x, self.y, self.delay = x, y, delay
        self.calls, self.lock = [], threading.Lock()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        start = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls.append((threading.get_ident(), start, time.perf_counter()))
        return self.x[i], int(self.y[i])


def _batches(loader):
    return [tuple(t.numpy().copy() for t in batch) for batch in loader]


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("fast", [True, False])
def test_workers_give_the_same_batches_bitwise(workers, fast):
    x, y = _data()
    make = (lambda: torch.utils.data.TensorDataset(x, y)) if fast else (lambda: ListDataset(x, y))
    serial = torch.utils.data.DataLoader(make(), batch_size=5, shuffle=True, generator=11)
    loader = torch.utils.data.DataLoader(make(), batch_size=5, shuffle=True, generator=11, num_workers=workers)
    for _epoch in range(2):  # the second epoch has a new order, the same in both
        reference, got = _batches(serial), _batches(loader)
        assert len(got) == len(reference) == 8
        for a, b in zip(got, reference):
            for u, v in zip(a, b):
                assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()


def test_workers_overlap_getitem_calls():
    x, y = _data(16)
    ds = ListDataset(x, y, delay=0.05)
    before = threading.active_count()
    for _ in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2):
        pass
    threads = {ident for ident, _, _ in ds.calls}
    assert len(threads) == 2 and threading.get_ident() not in threads
    overlapping = any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in ds.calls for b in ds.calls)
    assert overlapping, "no two __getitem__ calls ran at the same time"
    assert threading.active_count() == before


class Broken(ListDataset):
    def __getitem__(self, i):
        if i == 13:
            raise ValueError("bad sample 13")
        return super().__getitem__(i)


def test_worker_error_names_its_batch_and_worker_and_the_epoch_goes_on():
    x, y = _data(20)
    before = threading.active_count()
    expected = [list(range(k, min(k + 4, 20))) for k in range(0, 20, 4)]
    it = iter(torch.utils.data.DataLoader(Broken(x, y), batch_size=4, num_workers=2))
    seen = []
    with pytest.raises(ValueError, match=r"Caught ValueError in DataLoader worker [01] .*batch 3: bad sample 13") \
            as info:
        for _xb, yb in it:
            seen.append(yb.tolist())
    assert isinstance(info.value.__cause__, ValueError)
    # Raised as soon as it failed: the batches before it may still have been loading. next() goes
    # on as in PyTorch, with every other batch in order and batch 3 (the failed one) left out.
    seen += [yb.tolist() for _, yb in it]
    assert seen == [[int(v) for v in y[i]] for k, i in enumerate(expected) if k != 3]
    del it
    assert threading.active_count() == before


def test_sampler_error_comes_in_order_with_workers():
    x, y = _data(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2,
                                         sampler=[0, 1, 2, 3, 1.5, 5], num_workers=2)
    seen = []
    with pytest.raises(EngineError, match="sampler yielded 1.5"):
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 2


def test_break_early_then_iterate_again_leaves_no_threads():
    x, y = _data(40)
    before = threading.active_count()
    loader = torch.utils.data.DataLoader(ListDataset(x, y, delay=0.005), batch_size=2, num_workers=4)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert threading.active_count() == before
    assert len(_batches(loader)) == 20
    assert threading.active_count() == before


def test_resume_is_exact_with_workers():
    x, y = _data(40)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, generator=4, num_workers=3)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    assert state["batches_done"] == 4  # handed out, not prefetched
    rest = [b[1].tolist() for b in it]
    fresh = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, generator=0, num_workers=2)
    fresh.load_state_dict(state)
    assert [b[1].tolist() for b in fresh] == rest


def test_worker_init_fn_get_worker_info_and_persistent_workers():
    from engine.utils.data import get_worker_info
    x, y = _data(24)
    inits, infos = [], []

    class Recording(ListDataset):
        def __getitem__(self, i):
            infos.append(get_worker_info().id)
            return super().__getitem__(i)

    loader = torch.utils.data.DataLoader(Recording(x, y, delay=0.002), batch_size=2, num_workers=2,
                                         worker_init_fn=inits.append, persistent_workers=True,
                                         prefetch_factor=3, pin_memory=True)
    first, second = _batches(loader), _batches(loader)
    assert len(first) == len(second) == 12 and sorted(inits) == [0, 1]  # initialised once, across epochs
    assert set(infos) == {0, 1} and get_worker_info() is None


def test_worker_arguments_are_checked():
    ds = torch.utils.data.TensorDataset(np.arange(4))
    for kwargs in ({"num_workers": -1}, {"prefetch_factor": 2}, {"persistent_workers": True},
                   {"num_workers": 2, "timeout": -1}):
        with pytest.raises(EngineError):
            torch.utils.data.DataLoader(ds, **kwargs)


def test_workers_see_the_loop_threads_grad_mode():
    modes = []

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            modes.append(torch.is_grad_enabled())
            return np.float32(i)

    with torch.no_grad():
        list(torch.utils.data.DataLoader(Probe(), batch_size=2, num_workers=2))
    assert modes == [False] * 4


def test_torch_utils_data_submodule_paths():
    from engine.utils.data.dataloader import DataLoader
    from engine.utils.data.dataset import Dataset, random_split
    from engine.utils.data.distributed import DistributedSampler
    from engine.utils.data.sampler import RandomSampler

    assert DataLoader is torch.utils.data.DataLoader and Dataset is torch.utils.data.Dataset
    assert DistributedSampler is torch.utils.data.DistributedSampler and RandomSampler is torch.utils.data.RandomSampler
    assert random_split is torch.utils.data.random_split


def test_random_sampler_with_replacement_draws_lazily():
    # minGPT's infinite loader: building 1e10 indices at once would need 80 GB.
    import itertools

    from engine.utils.data import DataLoader, RandomSampler, TensorDataset

    sampler = RandomSampler(range(7), replacement=True, num_samples=int(1e10), generator=0)
    assert len(sampler) == int(1e10)
    first = list(itertools.islice(iter(sampler), 10000))
    assert min(first) == 0 and max(first) == 6 and len(set(first)) == 7
    assert list(itertools.islice(iter(RandomSampler(range(7), replacement=True, num_samples=int(1e10), generator=0)),
                                 10000)) == first
    loader = DataLoader(TensorDataset(torch.arange(7)), sampler=sampler, batch_size=4)
    (batch,) = next(iter(loader))
    assert batch.shape == (4,)


def test_random_split_and_samplers_take_an_engine_generator():
    from engine.utils.data import RandomSampler, random_split

    splits = [random_split(range(10), [7, 3], generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    assert list(splits[0][1]) == list(splits[1][1]) and len(splits[0][0]) == 7
    orders = [list(RandomSampler(range(10), generator=torch.Generator().manual_seed(1))) for _ in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(10))

"""Datasets and DataLoader: batching, seeded shuffling, the TensorDataset fast path, collation, exact resume."""

import json

import numpy as np
import pytest

import engine
from engine import io
from engine.data import (DataLoader, Dataset, Subset, TensorDataset, WeightedRandomSampler, default_collate,
                         random_split)
from engine.errors import EngineError, ShapeError
from tests.conftest import DEVICES


def _arrays(n=23, features=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype(np.float32), np.arange(n, dtype=np.int64)


class ListDataset(Dataset):
    """A plain map-style dataset of (features, label) items, collated item by item."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _labels_of(loader):
    return [yb.numpy().tolist() for _, yb in loader]


# ---- datasets --------------------------------------------------------------------------------------

def test_tensor_dataset_items_and_mismatch_error():
    x, y = _arrays()
    ds = TensorDataset(engine.tensor(x), y)
    assert len(ds) == 23
    xi, yi = ds[4]
    np.testing.assert_array_equal(xi.numpy(), x[4])
    assert yi.item() == 4
    with pytest.raises(ShapeError, match=r"same first dimension.*shape=\(23, 3\).*shape=\(22,\)"):
        TensorDataset(x, y[:-1])
    with pytest.raises(ShapeError, match="at least one"):
        TensorDataset()
    with pytest.raises(EngineError, match="expected Tensors or numpy/cupy arrays, got list"):
        TensorDataset([1, 2, 3])


def test_subset_maps_indices_and_checks_range():
    x, y = _arrays(10)
    sub = Subset(TensorDataset(x, y), [7, 2, 5])
    assert len(sub) == 3 and sub[1][1].item() == 2
    with pytest.raises(EngineError, match=r"indices must lie in \[0, 10\)"):
        Subset(TensorDataset(x, y), [0, 10])


# ---- batching ---------------------------------------------------------------------------------------

def test_sequential_batches_cover_the_data_in_order():
    x, y = _arrays(23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in batches]), x)
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int64


def test_drop_last_drops_only_the_short_batch():
    x, y = _arrays(23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, drop_last=True)
    assert len(loader) == 4
    assert sum(len(yb) for _, yb in loader) == 20
    exact = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=5, drop_last=True)
    assert len(exact) == 4 and len(list(exact)) == 4


def test_shuffle_gives_a_new_permutation_each_epoch():
    x, y = _arrays(50)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=3)
    first, second = sum(_labels_of(loader), []), sum(_labels_of(loader), [])
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != list(range(50))


def test_shuffle_is_reproducible_after_manual_seed_and_with_an_explicit_seed():
    x, y = _arrays(40)

    def epochs(**kw):
        loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, **kw)
        return [_labels_of(loader) for _ in range(3)]

    engine.manual_seed(11)
    a = epochs()
    engine.manual_seed(11)
    b = epochs()
    engine.manual_seed(12)
    c = epochs()
    assert a == b and a != c
    engine.manual_seed(0)
    d = epochs(generator=5)
    engine.manual_seed(99)
    assert epochs(generator=5) == d
    assert epochs(generator=np.random.default_rng(5)) == epochs(generator=np.random.default_rng(5))


def test_non_shuffling_loader_leaves_the_engine_rng_alone():
    engine.manual_seed(3)
    expected = engine.randn(4).numpy()
    engine.manual_seed(3)
    DataLoader(TensorDataset(*_arrays()), batch_size=4)
    np.testing.assert_array_equal(engine.randn(4).numpy(), expected)


def test_fast_path_matches_item_by_item_collation():
    x, y = _arrays(31)
    fast = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=1)
    slow = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=1, collate_fn=default_collate)
    generic = DataLoader(ListDataset(x, y), batch_size=6, shuffle=True, generator=1)
    for (xf, yf), (xs, ys), (xg, yg) in zip(fast, slow, generic):
        np.testing.assert_array_equal(xf.numpy(), xs.numpy())
        np.testing.assert_array_equal(xf.numpy(), xg.numpy())
        np.testing.assert_array_equal(yf.numpy(), ys.numpy())
        np.testing.assert_array_equal(yf.numpy(), yg.numpy())
        assert xg.dtype == np.float32 and yg.dtype == np.int64
        np.testing.assert_array_equal(xf.numpy(), x[yf.numpy()])  # rows stay aligned with their labels


def test_loader_over_a_subset_of_a_tensor_dataset():
    x, y = _arrays(30)
    train, val = random_split(TensorDataset(x, y), [0.8, 0.2], seed=0)
    assert (len(train), len(val)) == (24, 6)
    labels = np.concatenate([yb.numpy() for _, yb in DataLoader(val, batch_size=4)])
    np.testing.assert_array_equal(labels, val.indices)
    nested = Subset(val, [5, 0])
    (xb, yb), = list(DataLoader(nested, batch_size=2))
    np.testing.assert_array_equal(yb.numpy(), val.indices[[5, 0]])
    np.testing.assert_array_equal(xb.numpy(), x[val.indices[[5, 0]]])


# ---- collation --------------------------------------------------------------------------------------

def test_default_collate_types_and_structures():
    items = [{"img": np.full((2, 2), i, np.uint8), "label": i, "w": 0.5 * i, "name": f"s{i}", "ok": i % 2 == 0,
              "pair": (np.float64(i), np.int32(i))} for i in range(3)]
    batch = default_collate(items)
    assert batch["img"].shape == (3, 2, 2) and batch["img"].dtype == np.uint8
    assert batch["label"].dtype == np.int64 and batch["label"].tolist() == [0, 1, 2]
    assert batch["w"].dtype == np.float32 and batch["w"].tolist() == [0.0, 0.5, 1.0]
    assert batch["name"] == ["s0", "s1", "s2"]
    assert batch["ok"].dtype == np.bool_ and batch["ok"].tolist() == [True, False, True]
    assert batch["pair"][0].dtype == np.float64 and batch["pair"][1].dtype == np.int32
    stacked = default_collate([engine.tensor([1.0, 2.0]), engine.tensor([3.0, 4.0])])
    np.testing.assert_array_equal(stacked.numpy(), [[1, 2], [3, 4]])


def test_default_collate_errors_name_the_problem():
    with pytest.raises(ShapeError, match=r"different shapes \[\(2,\), \(3,\)\].*collate_fn"):
        default_collate([np.zeros(2), np.zeros(3)])
    with pytest.raises(TypeError, match="cannot batch items of type object"):
        default_collate([object(), object()])


def test_custom_collate_fn_is_used():
    x, y = _arrays(6)
    loader = DataLoader(ListDataset(x, y), batch_size=3, collate_fn=lambda items: [label for _, label in items])
    assert list(loader) == [[0, 1, 2], [3, 4, 5]]


# ---- samplers ---------------------------------------------------------------------------------------

def test_weighted_sampler_drives_the_loader():
    x, y = _arrays(4)
    sampler = WeightedRandomSampler([0.0, 1.0, 0.0, 3.0], num_samples=4000, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=500, sampler=sampler)
    assert len(loader) == 8
    drawn = np.concatenate([yb.numpy() for _, yb in loader])
    counts = np.bincount(drawn, minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[3] / 4000 - 0.75) < 0.03  # 4000 draws: binomial sd is 0.007


def test_sampler_and_shuffle_are_exclusive():
    with pytest.raises(EngineError, match="sampler and shuffle=True are exclusive"):
        DataLoader(TensorDataset(*_arrays()), sampler=range(3), shuffle=True)


# ---- exact resume -----------------------------------------------------------------------------------

def test_resume_mid_epoch_and_across_epochs_is_exact(tmp_path):
    x, y = _arrays(37)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=8)
    _labels_of(loader)  # one full epoch first: the state is not just the seed
    it = iter(loader)
    seen = [next(it)[1].numpy().tolist() for _ in range(3)]
    state = loader.state_dict()
    json.dumps(state)  # plain ints and strings
    io.save({"loader": state}, tmp_path / "state.ckpt")
    rest = [yb.numpy().tolist() for _, yb in it]
    next_epoch = _labels_of(loader)

    resumed = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=123)
    resumed.load_state_dict(io.load(tmp_path / "state.ckpt")["loader"])
    assert _labels_of(resumed) == rest
    assert _labels_of(resumed) == next_epoch
    assert sorted(sum(seen + rest, [])) == list(range(37))


def test_state_at_an_epoch_boundary_continues_with_the_next_epoch():
    x, y = _arrays(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=2)
    _labels_of(loader)
    state = loader.state_dict()
    assert state["batches_done"] == 0
    expected = [_labels_of(loader), _labels_of(loader)]
    resumed = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=77)
    resumed.load_state_dict(state)
    assert [_labels_of(resumed), _labels_of(resumed)] == expected


def test_sampler_state_is_part_of_the_loader_state():
    x, y = _arrays(10)

    def make(seed):
        return DataLoader(TensorDataset(x, y), batch_size=4, sampler=WeightedRandomSampler(np.ones(10), 12, seed=seed))

    loader = make(1)
    _labels_of(loader)
    state = loader.state_dict()
    expected = _labels_of(loader)
    resumed = make(2)
    resumed.load_state_dict(state)
    assert _labels_of(resumed) == expected


def test_loading_a_state_from_a_different_kind_of_loader_fails_clearly():
    x, y = _arrays(10)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=0)
    plain = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(EngineError, match="shuffling generator"):
        plain.load_state_dict(shuffled.state_dict())
    with pytest.raises(EngineError, match="batches_done"):
        shuffled.load_state_dict({**shuffled.state_dict(), "batches_done": -1})
    shuffled.load_state_dict({**shuffled.state_dict(), "batches_done": 9})
    with pytest.raises(EngineError, match="skips 9 batches but an epoch has 3"):
        iter(shuffled)


# ---- arguments and devices --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_size(bad):
    with pytest.raises(EngineError, match="batch_size must be a positive int"):
        DataLoader(TensorDataset(*_arrays()), batch_size=bad)


def test_dataset_without_len_is_rejected():
    class NoLen:
        def __getitem__(self, i):
            return i

    with pytest.raises(EngineError, match="lacks __len__"):
        DataLoader(NoLen())


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_device_moves_every_batch(device, prefetch):
    x, y = _arrays(13)
    plain = DataLoader(ListDataset(x, y), batch_size=4, shuffle=True, generator=4)
    moved = DataLoader(ListDataset(x, y), batch_size=4, shuffle=True, generator=4, device=device, prefetch=prefetch)
    pairs = list(zip(plain, moved))
    assert len(pairs) == 4
    for (xa, ya), (xb, yb) in pairs:
        assert xb.device == engine.device(device) and yb.device == engine.device(device)
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_device_resident_tensor_dataset_is_sliced_on_its_device(device):
    x, y = _arrays(12)
    ds = TensorDataset(engine.tensor(x, device=device), engine.tensor(y, device=device))
    for xb, yb in DataLoader(ds, batch_size=5, shuffle=True, generator=0):
        assert xb.device == engine.device(device)
        np.testing.assert_array_equal(xb.numpy(), x[yb.numpy()])


def test_prefetch_counts_batches_handed_out_not_prepared():
    x, y = _arrays(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=6, device="cpu", prefetch=True)
    it = iter(loader)
    next(it)  # the look-ahead has already prepared batch 2
    state = loader.state_dict()
    assert state["batches_done"] == 1
    expected = [yb.numpy().tolist() for _, yb in it]
    resumed = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=0, device="cpu")
    resumed.load_state_dict(state)
    assert _labels_of(resumed) == expected and len(expected) == 3


def test_state_dict_right_after_loading_is_the_loaded_state():
    x, y = _arrays(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    fresh = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=9)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # saving again before iterating loses nothing


# ---- lazy, infinite and hostile samplers ------------------------------------------------------------

def _in_thread(fn, seconds=10.0):
    """fn() run in a thread that must finish within ``seconds`` (a hang fails, it does not block)."""
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader did not hand out a batch in time: it is not lazy"
    return result[0]


def _forever(n, log=None):
    i = 0
    while True:
        if log is not None:
            log.append(i % n)
        yield i % n
        i += 1


class CountingSampler:
    """An infinite sampler with a resumable position and no __len__."""

    def __init__(self, n):
        self.n, self.position = n, 0

    def __iter__(self):
        while True:
            yield self.position % self.n
            self.position += 1

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize("make_sampler", [
    lambda n: _forever(n),
    lambda n: __import__("itertools").cycle(range(n)),
    lambda n: CountingSampler(n),
    lambda n: (i % n for i in __import__("itertools").count()),
], ids=["generator", "cycle", "class", "genexpr"])
@pytest.mark.parametrize("fast", [True, False], ids=["tensor-dataset", "item-by-item"])
def test_an_infinite_sampler_gives_batches_one_by_one(make_sampler, fast):
    x, y = _arrays(7)
    dataset = TensorDataset(x, y) if fast else ListDataset(x, y)
    loader = DataLoader(dataset, batch_size=3, sampler=make_sampler(7))
    first = _in_thread(lambda: [yb.numpy().tolist() for _, yb in __import__("itertools").islice(loader, 5)])
    assert first == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4], [5, 6, 0]]
    with pytest.raises(TypeError, match="no __len__"):
        len(loader)
    assert "unknown" in repr(loader)


@pytest.mark.parametrize("device, ahead", [(None, 0), ("cpu", 1)], ids=["no-prefetch", "prefetch"])
def test_the_sampler_is_drawn_one_batch_at_a_time(device, ahead):
    x, y = _arrays(10)
    drawn = []
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=_forever(10, drawn), device=device)
    it = iter(loader)
    assert drawn == []  # nothing drawn before the first batch is asked for
    next(it)
    assert len(drawn) == 4 * (1 + ahead)
    next(it)
    assert len(drawn) == 4 * (2 + ahead)


@pytest.mark.parametrize("drop_last, expected", [(False, [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]),
                                                 (True, [[9, 8, 7, 6], [5, 4, 3, 2]])])
def test_a_finite_lazy_sampler_ends_the_epoch(drop_last, expected):
    x, y = _arrays(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=drop_last,
                        sampler=(i for i in range(9, -1, -1)))
    assert _labels_of(loader) == expected
    assert _labels_of(loader) == []  # a generator is spent after one epoch, as in PyTorch


def test_a_resumed_infinite_sampler_continues_where_it_was():
    x, y = _arrays(7)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, sampler=CountingSampler(7))
    it = iter(loader)
    seen = [next(it)[1].numpy().tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["batches_done"] == 2 and seen == [[0, 1, 2], [3, 4, 5]]
    expected = [next(it)[1].numpy().tolist() for _ in range(2)]
    resumed = DataLoader(TensorDataset(x, y), batch_size=3, sampler=CountingSampler(7))
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert [next(rit)[1].numpy().tolist() for _ in range(2)] == expected


def test_skipping_past_the_end_of_a_lazy_sampler_fails_clearly():
    x, y = _arrays(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=[0, 1, 2, 3, 4])
    loader.load_state_dict({"batches_done": 5})
    with pytest.raises(EngineError, match="skips 5 batches but an epoch has 2"):
        next(iter(loader))


@pytest.mark.parametrize("bad", [1.0, 1.7, -0.5, np.float32(2.0), float("nan"), float("inf"), "1", b"1", True, False,
                                 np.bool_(True), None, np.array(1), np.array([1, 2]), [1], (1,), 1 + 0j, 2**70,
                                 -2**64, engine.tensor(1)], ids=repr)
@pytest.mark.parametrize("fast", [True, False], ids=["tensor-dataset", "item-by-item"])
def test_non_integer_sampler_indices_are_refused_not_truncated(bad, fast):
    x, y = _arrays(10)
    dataset = TensorDataset(x, y) if fast else ListDataset(x, y)
    loader = DataLoader(dataset, batch_size=2, sampler=[0, 1, 2, bad, 4])
    it = iter(loader)
    assert next(it)[1].numpy().tolist() == [0, 1]  # batches before the bad index are fine
    with pytest.raises(EngineError, match=r"sampler yielded .* at position 3"):
        next(it)


@pytest.mark.parametrize("good", [np.int8(3), np.int32(3), np.int64(3), np.uint8(3), np.uint64(3), 3])
def test_integer_sampler_indices_of_any_integer_type_are_accepted(good):
    x, y = _arrays(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=[good, 1])
    assert _labels_of(loader) == [[3, 1]]

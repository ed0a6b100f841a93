"""DataLoader workers under failure: errors raised at once, timeouts, leaving early, going on after an
error, and epochs after a break or an error. Hangs are guarded: a regression fails, it does not hang CI."""

import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from engine.data import DataLoader, Dataset, TensorDataset
from engine.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]


class Items(Dataset):
    """Item i is float(i); ``hang`` items wait on ``release`` (up to 30 s), ``bad`` items raise."""

    def __init__(self, n=12, hang=(), bad=()):
        self.n, self.hang, self.bad = n, set(hang), set(bad)
        self.release = threading.Event()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.hang:
            self.release.wait(30)
        if i in self.bad:
            raise ValueError(f"bad item {i}")
        return np.float32(i)


@pytest.fixture
def items():
    """Make datasets whose hung items are released when the test ends (no thread outlives it)."""
    made = []

    def make(**kwargs):
        made.append(Items(**kwargs))
        return made[-1]

    yield make
    for dataset in made:
        dataset.release.set()


def _within(seconds, fn):
    """fn()'s result (or its exception), which must come within ``seconds``: a hang fails the test."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _values(batches):
    """Each batch as a list (a TensorDataset of one tensor gives 1-tuples)."""
    return [(b[0] if isinstance(b, (tuple, list)) else b).numpy().tolist() for b in batches]


# ---- an error surfaces at once --------------------------------------------------------------------------

def test_worker_error_is_raised_while_an_earlier_batch_still_loads(items):
    dataset = items(hang={0}, bad={1})
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    with pytest.raises(ValueError, match=r"Caught ValueError in DataLoader worker [01] \(a thread\) while loading "
                                         r"batch 1: bad item 1") as info:
        _within(5, lambda: next(iter(loader)))
    assert str(info.value.__cause__) == "bad item 1"


def test_the_epoch_goes_on_after_an_error_without_skipping_or_repeating(items):
    """As in PyTorch: next() after a failed batch gives the batches after it, in the sampler's order."""
    for workers, device in ((0, None), (2, None), (0, "cpu"), (2, "cpu")):
        dataset = items(bad={3, 7})
        it = iter(DataLoader(dataset, batch_size=2, num_workers=workers, device=device))
        got, errors = [], []
        while True:
            try:
                got.append(next(it).numpy().tolist())
            except StopIteration:
                break
            except ValueError as exc:
                errors.append(str(exc))
        assert got == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0], [10.0, 11.0]], (workers, device, got)
        assert sorted(e[-10:] for e in errors) == ["bad item 3", "bad item 7"], (workers, device, errors)


def test_prefetch_to_a_device_hands_out_every_batch_before_a_failed_one(items):
    """The one-batch look-ahead loads batch k + 1 before handing out batch k; batch k + 1 failing
    must not lose batch k (it used to be dropped, the error raised in its place)."""
    for workers in (0, 2):
        seen = []
        with pytest.raises(ValueError, match="bad item 3"):
            for batch in DataLoader(items(bad={3}), batch_size=1, num_workers=workers, device="cpu"):
                seen.append(batch.item())
        if workers == 0:
            assert seen == [0.0, 1.0, 2.0]
        else:  # raised once it failed: the batches before it may still have been loading
            assert seen == [0.0, 1.0, 2.0][:len(seen)]


def test_an_error_leaves_no_cycle_keeping_the_workers_alive(items):
    """The error's traceback must not keep the epoch (and its threads) alive once the caller drops it."""
    before = threading.active_count()
    gc.disable()
    try:
        it = iter(DataLoader(items(bad={5}), batch_size=2, num_workers=2))
        epoch = weakref.ref(it)
        with pytest.raises(ValueError):
            for _ in it:
                pass
        del it
        assert epoch() is None, "the epoch is only freed by the garbage collector"
    finally:
        gc.enable()
    assert threading.active_count() == before


def test_a_sampler_that_raised_ends_the_epoch_loudly():
    """A sampler is finished once it raises: next() says so rather than ending the epoch silently."""
    def indices():
        yield from range(4)
        raise KeyError("sampler broke")

    class Sampler:
        def __iter__(self):
            return indices()

    for workers in (0, 2):
        it = iter(DataLoader(TensorDataset(np.arange(10.0, dtype=np.float32)), batch_size=2, sampler=Sampler(),
                             num_workers=workers))
        assert _values(next(it) for _ in range(2)) == [[0.0, 1.0], [2.0, 3.0]]
        with pytest.raises(KeyError, match="sampler broke"):
            next(it)
        with pytest.raises(EngineError, match="KeyError: 'sampler broke'; the epoch cannot go on"):
            next(it)


def test_a_bad_sampler_index_fails_its_batch_only():
    loader = DataLoader(TensorDataset(np.arange(10.0, dtype=np.float32)), batch_size=2,
                        sampler=[0, 1, 2, 1.5, 4, 5], num_workers=2)
    it = iter(loader)
    assert _values([next(it)]) == [[0.0, 1.0]]
    with pytest.raises(EngineError, match="sampler yielded 1.5"):
        next(it)
    assert _values(it) == [[4.0, 5.0]]


# ---- timeout --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_timeout_fires_for_a_hung_item(items):
    loader = DataLoader(items(hang={2}), batch_size=1, num_workers=2, timeout=1)
    it = iter(loader)
    assert _values(next(it) for _ in range(2)) == [[0.0], [1.0]]
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 1 seconds waiting for batch 2: worker [01] "
                                           "is still loading it"):
        _within(5, lambda: next(it))


def test_timeout_is_checked_as_in_pytorch():
    dataset = TensorDataset(np.arange(4.0, dtype=np.float32))
    with pytest.raises(EngineError, match="timeout=2 needs num_workers > 0"):
        DataLoader(dataset, timeout=2)
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(EngineError, match="timeout must be a non-negative number"):
            DataLoader(dataset, num_workers=1, timeout=bad)
    DataLoader(dataset, timeout=0)  # the default, valid without workers


# ---- leaving early --------------------------------------------------------------------------------------

@pytest.mark.parametrize("persistent", [False, True])
def test_break_returns_at_once_while_a_later_item_hangs(items, persistent):
    loader = DataLoader(items(hang={1}), batch_size=1, num_workers=2, persistent_workers=persistent)

    def first_then_break():
        for batch in loader:
            return batch.item()  # leaves the loop: the iterator is dropped here

    assert _within(2, first_then_break) == 0.0


@pytest.mark.slow
def test_a_hung_worker_does_not_keep_the_process_alive():
    """Worker threads are daemons: a hung item after a break, a timeout or an error (persistent
    pool or not) must not block the interpreter's exit."""
    script = textwrap.dedent("""
        import time
        import numpy as np
        from engine.data import DataLoader

        class Hangs:
            def __len__(self):
                return 8

            def __getitem__(self, i):
                if i in (1, 2, 3):
                    time.sleep(600)
                if i == 4:
                    raise ValueError("bad")
                return np.float32(i)

        for persistent in (False, True):
            for batch in DataLoader(Hangs(), batch_size=1, num_workers=3, persistent_workers=persistent):
                break
            try:
                list(DataLoader(Hangs(), batch_size=1, num_workers=2, timeout=0.5, persistent_workers=persistent))
            except RuntimeError as e:
                assert "timed out" in str(e)
        kept = DataLoader(Hangs(), batch_size=1, num_workers=4, persistent_workers=True)
        it = iter(kept)
        print(next(it).item(), flush=True)
        try:
            next(it)
        except ValueError:
            print("error", flush=True)
    """)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.0", "error"]
    assert time.monotonic() - start < 30, "the process waited for its hung workers"


# ---- epochs after a break or an error --------------------------------------------------------------------

@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("prefetch_factor", [1, 3])
def test_every_epoch_is_whole_after_a_break_or_an_error(persistent, prefetch_factor):
    x = np.arange(30, dtype=np.float32)
    kwargs = dict(batch_size=4, shuffle=True, generator=5)
    reference = DataLoader(TensorDataset(x), **kwargs)
    loader = DataLoader(TensorDataset(x), num_workers=2, persistent_workers=persistent,
                        prefetch_factor=prefetch_factor, **kwargs)
    expected = [_values(reference) for _ in range(4)]
    assert _values(loader) == expected[0]
    for batch in loader:  # epoch 2, left after one batch
        assert _values([batch]) == [expected[1][0]]
        break
    assert _values(loader) == expected[2]  # a new epoch, whole and in order
    assert _values(loader) == expected[3]


def test_epochs_after_an_error_are_whole(items):
    loader = DataLoader(items(bad={5}), batch_size=2, num_workers=2, persistent_workers=True)
    with pytest.raises(ValueError):
        list(loader)
    loader.dataset.bad.clear()
    assert _values(loader) == [[2.0 * k, 2.0 * k + 1] for k in range(6)]


def test_worker_init_fn_error_fails_the_batches_of_that_worker():
    def init(worker_id):
        raise OSError(f"no such file for worker {worker_id}")

    loader = DataLoader(TensorDataset(np.arange(8.0, dtype=np.float32)), batch_size=1, num_workers=2,
                        worker_init_fn=init)
    with pytest.raises(OSError, match=r"Caught OSError in DataLoader worker (\d) .*no such file for worker \1$"):
        _within(5, lambda: list(loader))

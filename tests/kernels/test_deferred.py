"""engine.kernels.deferred: device-side checks queued until the next sync point.

The queue logic runs here with stand-in device arrays (``_read_all`` is replaced by a reader that
records what it was asked to read); the GPU suite checks the real thing with cupy
(tests/kernels/test_softmax_cross_entropy.py, tests/test_host_syncs.py).
"""

import numpy as np
import pytest

from engine.kernels import deferred
from engine.kernels.registry import KernelError


class FakeDeviceArray:
    """Stands for a cupy array: reading it is what a sync would be."""

    def __init__(self, values):
        self.values = np.asarray(values)
        self.reads = 0

    def get(self):
        self.reads += 1
        return self.values


@pytest.fixture
def queue(monkeypatch):
    reads = []

    def read_all(arrays):
        reads.append(len(arrays))
        return [a.get() for a in arrays]

    monkeypatch.setattr(deferred, "_read_all", read_all)
    monkeypatch.setattr(deferred, "_eager", False)
    deferred._pending.clear()
    yield reads
    deferred._pending.clear()


def check_nonnegative(values):
    if values.min() < 0:
        raise KernelError(f"negative value {values.min()}")


def test_a_check_waits_for_the_sync_then_raises_once(queue):
    bad = FakeDeviceArray([3, -1])
    deferred.defer(bad, check_nonnegative)
    assert bad.reads == 0 and deferred.pending() == 1
    with pytest.raises(KernelError, match="negative value -1"):
        deferred.raise_deferred_errors()
    assert bad.reads == 1 and deferred.pending() == 0
    deferred.raise_deferred_errors()  # settled: nothing raised twice
    assert queue == [1]


def test_all_queued_checks_are_read_in_one_batch_and_the_first_failure_wins(queue):
    arrays = [FakeDeviceArray([1]), FakeDeviceArray([-5]), FakeDeviceArray([-7])]
    for a in arrays:
        deferred.defer(a, check_nonnegative)
    with pytest.raises(KernelError, match="-5"):
        deferred.raise_deferred_errors()
    assert queue == [3] and all(a.reads == 1 for a in arrays)


def test_passing_checks_raise_nothing_and_nothing_is_read_when_nothing_is_queued(queue):
    deferred.raise_deferred_errors()
    assert queue == []
    deferred.defer(FakeDeviceArray([0, 4]), check_nonnegative)
    deferred.raise_deferred_errors()
    assert queue == [1] and deferred.pending() == 0


def test_the_queue_is_bounded(queue, monkeypatch):
    monkeypatch.setattr(deferred, "MAX_PENDING", 4)
    for _ in range(3):
        deferred.defer(FakeDeviceArray([1]), check_nonnegative)
    assert queue == [] and deferred.pending() == 3
    deferred.defer(FakeDeviceArray([1]), check_nonnegative)
    assert queue == [4] and deferred.pending() == 0


def test_eager_mode_reads_at_the_call(queue):
    previous = deferred.eager_checks()
    deferred.eager_checks(True)
    try:
        bad = FakeDeviceArray([-2])
        with pytest.raises(KernelError, match="-2"):
            deferred.defer(bad, check_nonnegative)
        assert bad.reads == 1 and deferred.pending() == 0
    finally:
        deferred.eager_checks(previous)
    assert deferred.eager_checks() is previous


def test_host_arrays_are_checked_at_once(queue):
    with pytest.raises(KernelError, match="-3"):
        deferred.defer(np.array([-3, 2]), check_nonnegative)
    assert deferred.pending() == 0 and queue == []


def test_engine_host_reads_settle_the_queue(queue):
    """engine.backend.to_host is a sync point: a queued failure surfaces at the next read."""
    from engine import backend

    class FakeCupyArray(FakeDeviceArray):
        shape = ()

    deferred.defer(FakeDeviceArray([-9]), check_nonnegative)
    with pytest.raises(KernelError, match="-9"):
        backend.to_host(FakeCupyArray(1.5))
    assert deferred.pending() == 0

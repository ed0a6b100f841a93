"""backward() from several threads: gradient accumulation is locked per leaf (as PyTorch's
AccumulateGrad), hooks and version counters stay exact, a graph shared between threads is never
silently half-used, and grad mode is per thread."""

import sys
import threading

import numpy as np
import pytest

import engine
from engine.errors import GradError

# Large enough that numpy releases the GIL inside ``grad += g``: the lost-update race is real.
N = 200_000


@pytest.fixture
def fast_switching():
    """Switch threads as often as possible, so that races show within a few iterations."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _in_threads(count, fn):
    """Run fn(k) in ``count`` threads at once; re-raise the first error."""
    errors, start = [], threading.Barrier(count)

    def run(k):
        start.wait()
        try:
            fn(k)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a backward thread hung"
    if errors:
        raise errors[0]


def test_concurrent_backward_into_one_leaf_loses_no_update(fast_switching):
    for _ in range(3):
        w = engine.tensor(np.zeros(N, np.float32), requires_grad=True)

        def work(_):
            for _ in range(20):
                (w * 1).sum().backward()

        _in_threads(4, work)
        grad = w.grad.numpy()
        assert grad.min() == grad.max() == 80.0
        assert w.grad._version_value == 79  # every accumulation after the first bumps it once


def test_hooks_and_retain_grad_under_threads(fast_switching):
    w = engine.tensor(np.zeros(N, np.float32), requires_grad=True)
    shared = w * 1  # a non-leaf every thread goes through (the graph is retained)
    shared.retain_grad()
    calls = []
    w.register_post_accumulate_grad_hook(lambda t: calls.append(1))

    def work(_):
        for _ in range(10):
            (shared * 1).sum().backward(retain_graph=True)

    _in_threads(4, work)
    assert len(calls) == 40
    assert shared.grad.numpy().min() == shared.grad.numpy().max() == 40.0
    assert w.grad.numpy().min() == w.grad.numpy().max() == 40.0


def test_registering_hooks_from_threads_keeps_every_hook(fast_switching):
    w = engine.tensor(np.zeros(3, np.float32), requires_grad=True)
    calls = []

    def register(k):
        for i in range(200):
            w.register_post_accumulate_grad_hook(lambda t, key=(k, i): calls.append(key))

    _in_threads(4, register)
    w.sum().backward()
    assert len(calls) == 800


def test_one_graph_backward_from_two_threads_raises_or_counts_in_full(fast_switching):
    """Without retain_graph, the second backward through a graph raises GradError (as in PyTorch)
    even when the two run at once: never an AttributeError from a half-freed node, and never a
    "successful" backward that left the leaf without its gradient."""
    for _ in range(30):
        w = engine.tensor(np.ones(20_000, np.float32), requires_grad=True)
        y = w
        for _ in range(5):
            y = (y * 2).exp().log()
        y = y.sum()
        outcomes = []

        def run(_):
            try:
                y.backward()
                outcomes.append("ok")
            except GradError as exc:
                assert "a second time" in str(exc)
                outcomes.append("GradError")

        _in_threads(2, run)
        assert outcomes.count("ok") >= 1
        assert w.grad.numpy().min() == w.grad.numpy().max() == 32.0 * outcomes.count("ok")


def test_grad_mode_is_per_thread():
    """As in PyTorch: no_grad() in one thread does not switch off recording in another."""
    entered, recorded = threading.Event(), threading.Event()
    w = engine.tensor([1.0], requires_grad=True)
    seen = {}

    def quiet():
        with engine.no_grad():
            entered.set()
            recorded.wait(10)
            seen["inside"] = (w * 2).requires_grad

    thread = threading.Thread(target=quiet)
    thread.start()
    entered.wait(10)
    seen["other"] = (w * 2).requires_grad and engine.is_grad_enabled()
    recorded.set()
    thread.join(10)
    assert seen == {"inside": False, "other": True}
    with engine.no_grad():
        worker = threading.Thread(target=lambda: seen.__setitem__("new", engine.is_grad_enabled()))
        worker.start()
        worker.join(10)
    assert seen["new"] is True  # a new thread starts with grad on


def test_a_no_grad_decorated_function_in_two_threads_at_once_restores_each():
    """One decorator instance serves every call: the mode to restore must not live on it (a second
    thread's entry used to overwrite the first's, leaving that thread with grad off for good)."""
    inside = threading.Barrier(2)

    @engine.no_grad()
    def evaluate():
        inside.wait(10)  # both threads inside the decorated function at once
        return engine.is_grad_enabled()

    modes = {}

    def run(k):
        modes[k] = (evaluate(), engine.is_grad_enabled())

    _in_threads(2, run)
    assert modes == {0: (False, True), 1: (False, True)}


def test_one_no_grad_instance_entered_twice_restores_in_order():
    quiet, loud = engine.no_grad(), engine.enable_grad()
    with quiet:
        with loud:
            with quiet:
                assert not engine.is_grad_enabled()
            assert engine.is_grad_enabled()
        assert not engine.is_grad_enabled()  # the inner exit restored the outer block's mode
    assert engine.is_grad_enabled()

"""Shared by the hostile-file tests of the loaders (checkpoints, IDX files)."""

import tracemalloc

import pytest


def refused_in_bounded_memory(load, path, error, limit, match=None, **kwargs):
    """``load(path, **kwargs)`` must raise ``error`` naming ``path`` without ever holding more than
    ``limit`` bytes (a lying header must not make the loader allocate what it claims)."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as info:
            load(path, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{getattr(load, '__name__', load)} allocated {peak} bytes before refusing {path}"
    assert str(path) in str(info.value)
    return info.value

"""The fused-kernel switch: whether ops that have a fused kernel use it (per thread, default on).

``F.fused_kernels(False)`` runs the unfused composition of core ops instead, so fused-vs-reference
parity can be tested end to end. It sits low in the layers, beside backend and dtypes, so that ops
(GELU) and functional (linear_relu, cross_entropy, layer_norm, attention) read one switch.
"""

from __future__ import annotations

import contextlib
import threading


class _Settings(threading.local):
    def __init__(self):
        self.fused = True  # set per thread: a missing attribute read with a default costs an exception


_settings = _Settings()


def fused_enabled() -> bool:
    """Whether ops with a fused kernel use it (default True). Re-exported as ``F.fused_enabled``."""
    return _settings.fused


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Switch the fused kernels on or off inside a ``with`` block (per thread): ``F.fused_kernels``."""
    previous = fused_enabled()
    _settings.fused = bool(enabled)
    try:
        yield
    finally:
        _settings.fused = previous

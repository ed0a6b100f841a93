"""One line, once per process, when numba starts compiling a kernel of this package.

A first run compiles every numba kernel it reaches (the first epoch can take 10-20x the next
ones) and would otherwise look stuck. Numba caches compiled kernels on disk (``cache=True``:
``__pycache__`` beside the sources, or ``NUMBA_CACHE_DIR``), so later runs load them and say
nothing: numba raises its ``numba:compile`` event only when it really compiles, not on a cache hit.

The line goes to the ``engine.kernels`` logger at INFO when logging is configured (a handler on it
or an ancestor, the root included), else straight to stderr, so a user sees it without setting up
logging. ``ENGINE_QUIET_COMPILE=1`` silences it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading

ENV_VAR = "ENGINE_QUIET_COMPILE"
MESSAGE = "engine: compiling CPU kernels with numba (first run only; numba caches them on disk) ..."
_PACKAGE = __package__  # "engine.kernels": only this package's kernels are announced
_said = False
_lock = threading.Lock()


def quiet() -> bool:
    """Whether the environment silences the notice (``ENGINE_QUIET_COMPILE`` set and not "0")."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


@functools.cache
def announce_compiles() -> None:
    """Watch numba's CPU compiles and say once when one of this package's kernels starts compiling.
    Idempotent and cheap after the first call.

    CPU (``numba_cpu``) kernels only: numba-cuda raises no compile event for CUDA kernels, and
    cupy's NVRTC builds are its own.
    """
    if quiet():
        return
    from numba.core import event

    # register: for the whole process (event.install_listener only lasts a with-block)
    event.register("numba:compile", _listener_class(event)())


def _listener_class(event):
    class CompileNotice(event.Listener):
        def on_start(self, ev):
            dispatcher = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if module == _PACKAGE or module.startswith(_PACKAGE + "."):
                _say_once()

        def on_end(self, ev):
            pass

    return CompileNotice


def _say_once() -> None:
    global _said
    with _lock:
        if _said:
            return
        _said = True
    logger = logging.getLogger(_PACKAGE)
    if logger.hasHandlers():
        logger.info(MESSAGE)
    else:
        print(MESSAGE, file=sys.stderr, flush=True)

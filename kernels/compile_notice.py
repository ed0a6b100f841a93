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
MESSAGES = {
    "cpu": "engine: compiling CPU kernels with numba (first run only; numba caches them on disk) ...",
    "cuda": "engine: compiling CUDA kernels with numba (first run only; numba caches them on disk) ...",
}
_PACKAGE = __package__  # "engine.kernels": only this package's kernels are announced
_said = set()  # the targets announced in this process
_lock = threading.Lock()


def quiet() -> bool:
    """Whether the environment silences the notice (``ENGINE_QUIET_COMPILE`` set and not "0")."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


@functools.cache
def announce_compiles(target: str = "cpu") -> None:
    """Watch numba's compiles for ``target`` ("cpu" or "cuda") and say once when one of this
    package's kernels starts compiling. Idempotent and cheap after the first call."""
    if quiet():
        return
    if target == "cuda":
        try:  # numba-cuda keeps its own event registry; the simulator compiles nothing
            from numba.cuda.core import event
        except ImportError:
            return
    else:
        from numba.core import event
    # register: for the whole process (event.install_listener only lasts a with-block)
    event.register("numba:compile", _listener_class(event)(target))


def _listener_class(event):
    class CompileNotice(event.Listener):
        def __init__(self, target: str):
            self.target = target

        def on_start(self, ev):
            dispatcher = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if module == _PACKAGE or module.startswith(_PACKAGE + "."):
                _say_once(self.target)

        def on_end(self, ev):
            pass

    return CompileNotice


def _say_once(target: str) -> None:
    with _lock:
        if target in _said:
            return
        _said.add(target)
    message = MESSAGES[target]
    logger = logging.getLogger(_PACKAGE)
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)

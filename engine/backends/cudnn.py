"""``engine.backends.cudnn``: PyTorch's cuDNN switches, as flags the engine does not read.

The engine does not call cuDNN (its convolutions are GEMMs through cuBLAS, which follow
``backends.cuda.matmul.allow_tf32``), so ``is_available()`` is False and ``enabled``,
``benchmark``, ``deterministic`` and ``allow_tf32`` are kept only for the scripts that set them.
``allow_tf32`` takes a bool and defaults to True, as in PyTorch.
"""

import sys
import types

from engine.errors import EngineError

enabled = True
benchmark = False
deterministic = False


def is_available() -> bool:
    """False: the engine does not use cuDNN."""
    return False


class _CudnnModule(types.ModuleType):
    """The module's class: ``allow_tf32`` is checked when set, as PyTorch's is."""

    _allow_tf32 = True

    @property
    def allow_tf32(self) -> bool:
        return self._allow_tf32

    @allow_tf32.setter
    def allow_tf32(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise EngineError(f"backends.cudnn.allow_tf32 expects a bool, but got {type(value).__name__}")
        type(self)._allow_tf32 = value


sys.modules[__name__].__class__ = _CudnnModule


def version():
    """None: no cuDNN is used (PyTorch answers None when cuDNN is unavailable too)."""
    return None

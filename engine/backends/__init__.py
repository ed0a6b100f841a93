"""``engine.backends``: PyTorch's ``torch.backends`` switches that scripts query or set.

- ``backends.cuda.matmul.allow_tf32``: whether float32 GEMMs on the GPU may use TF32, one view of
  ``engine.set_float32_matmul_precision`` (engine/backend.py holds the setting and applies it).
- ``backends.cudnn``: the engine does not use cuDNN (``is_available()`` is False); ``benchmark``,
  ``deterministic``, ``enabled`` and ``allow_tf32`` are flags that scripts set and the engine does
  not read.
- ``backends.mps``: there is no MPS backend (``is_available()`` is False, so
  ``"mps" if ... else "cpu"`` picks cpu).
"""

from engine.backends import cuda, cudnn, mps  # noqa: F401

__all__ = ["cuda", "cudnn", "mps"]

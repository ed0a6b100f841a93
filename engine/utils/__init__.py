"""PyTorch's import paths (``torch.utils.data``, ``torch.utils.checkpoint``), re-exporting what lives elsewhere in the engine.

Nothing is implemented here: ``engine.utils.data`` is ``engine.data``'s datasets, samplers and
loader under the names tutorials import (``from engine.utils.data import DataLoader``).
"""

from engine.utils import checkpoint, data  # noqa: F401  (engine.utils.data.DataLoader after import engine)

__all__ = ["checkpoint", "data"]

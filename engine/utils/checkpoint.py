"""``torch.utils.checkpoint``'s names: activation checkpointing, from :mod:`engine.nn.checkpoint`.

Example:
    >>> from engine.utils.checkpoint import checkpoint, checkpoint_sequential
    >>> # h = checkpoint(block, x, use_reentrant=False)
"""

from engine.nn.checkpoint import checkpoint, checkpoint_sequential

__all__ = ["checkpoint", "checkpoint_sequential"]

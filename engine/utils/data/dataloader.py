"""``torch.utils.data.dataloader``'s import path: the loader of :mod:`engine.data.loader`."""

from engine.data.loader import DataLoader, default_collate, get_worker_info  # noqa: F401

__all__ = ["DataLoader", "default_collate", "get_worker_info"]

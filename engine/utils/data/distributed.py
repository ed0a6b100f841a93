"""``torch.utils.data.distributed``'s import path: :class:`DistributedSampler`."""

from engine.data.distributed import DistributedSampler  # noqa: F401

__all__ = ["DistributedSampler"]

"""PyTorch's ``torch.utils.tensorboard`` import path: :class:`SummaryWriter` (engine/train/loggers.py)."""

from engine.train.loggers import SummaryWriter

__all__ = ["SummaryWriter"]

"""``engine.cpu``: PyTorch's ``torch.cpu`` namespace; the engine has its ``amp.autocast`` spelling."""

from engine.cpu import amp

__all__ = ["amp"]

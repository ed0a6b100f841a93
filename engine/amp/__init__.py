"""``engine.amp``: automatic mixed precision, PyTorch's ``torch.amp`` (autocast regions, GradScaler)."""

from engine.amp.autocast_mode import autocast, get_autocast_dtype, is_autocast_enabled, policy_for
from engine.amp.grad_scaler import GradScaler

__all__ = ["autocast", "get_autocast_dtype", "is_autocast_enabled", "policy_for", "GradScaler"]

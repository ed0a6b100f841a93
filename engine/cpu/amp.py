"""``engine.cpu.amp``: PyTorch's ``torch.cpu.amp`` spellings. ``autocast`` and ``GradScaler`` are the
deprecated forms of ``engine.autocast("cpu", ...)`` and ``engine.amp.GradScaler("cpu", ...)``, and
warn as PyTorch's do."""

from engine.amp.autocast_mode import cpu_autocast as autocast
from engine.amp.grad_scaler import legacy_grad_scaler

GradScaler = legacy_grad_scaler("cpu")  # torch.cpu.amp.GradScaler: deprecated, warns as PyTorch's

__all__ = ["GradScaler", "autocast"]

"""``engine.cuda.amp``: PyTorch's ``torch.cuda.amp`` spellings. ``autocast`` and ``GradScaler`` are the
deprecated forms of ``engine.autocast("cuda", ...)`` and ``engine.amp.GradScaler("cuda", ...)``, and
warn as PyTorch's do."""

from engine.amp.autocast_mode import cuda_autocast as autocast
from engine.amp.grad_scaler import legacy_grad_scaler

GradScaler = legacy_grad_scaler("cuda")  # torch.cuda.amp.GradScaler: deprecated, warns as PyTorch's

__all__ = ["GradScaler", "autocast"]

"""A dependency-free progress bar: one self-overwriting line on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Shows ``epoch 3/20 [#####.....] 45/90 loss 0.3120 1.2e+04 samples/s`` on a terminal.

    Silent when ``enabled`` is False or the stream is not a terminal (CI logs, pipes), so logs
    hold only the per-epoch line the Trainer prints.
    """

    def __init__(self, total: int, prefix: str = "", enabled: bool | None = None, stream=None, width: int = 24):
        self.stream = stream or sys.stdout
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = is_tty if enabled is None else enabled and is_tty
        self.total, self.prefix, self.width = max(total, 1), prefix, width
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int, samples: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last_draw < 0.1 and done < self.total):
            return
        self._last_draw = now
        filled = int(self.width * done / self.total)
        rate = samples / max(now - self.start, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.prefix} [{bar}] {done}/{self.total} loss {loss:.4f} {rate:.3g} samples/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 80) + "\r")
            self.stream.flush()

"""A one-line progress bar on stderr (no dependency): ``epoch 3/10 [####----] 40/100 loss 0.41 812 img/s ETA 7s``."""

from __future__ import annotations

import sys
import time


class Progress:
    """Redraws one line per update; a plain line per update when stderr is not a terminal."""

    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, done: int, **fields: float) -> None:
        elapsed = time.perf_counter() - self.start
        frac = done / max(self.total, 1)
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        info = " ".join(_fmt(k, v) for k, v in fields.items())
        line = f"{self.label} [{bar}] {done}/{self.total} {info} ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(key: str, value: float) -> str:
    if key in ("img/s",):
        return f"{value:.0f} {key}"
    return f"{key} {value:.4g}"

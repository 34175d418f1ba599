"""A minimal progress bar for large loads: one line on stderr, redrawn at most ten times a second.

On by default only when the stream is a terminal and the load is large; never imports anything heavy.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from ._display import format_bytes

__all__ = ["Progress"]

THRESHOLD = 256 << 20
"""Loads of at least this many bytes show progress when the stream is a terminal."""


class Progress:
    """Counts bytes and tensors done; draws ``jaxweights: 45% 600 MB / 1.3 GB, 83/194 tensors``."""

    def __init__(
        self,
        total_bytes: int,
        total_count: int,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        label: str = "jaxweights",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty()) and total_bytes >= THRESHOLD
        self.enabled = enabled
        self.total_bytes, self.total_count = total_bytes, total_count
        self.done_bytes = self.done_count = 0
        self.label = label
        self._started = time.perf_counter()
        self._drawn = 0.0
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        """Marks one more tensor of ``nbytes`` done."""
        with self._lock:
            self.done_bytes += nbytes
            self.done_count += 1
            now = time.perf_counter()
            if self.enabled and (now - self._drawn >= 0.1 or self.done_count == self.total_count):
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        percent = 100 * self.done_bytes // max(1, self.total_bytes)
        rate = self.done_bytes / max(now - self._started, 1e-9)
        self.stream.write(
            f"\r{self.label}: {percent:3d}% {format_bytes(self.done_bytes)} / {format_bytes(self.total_bytes)}, "
            f"{self.done_count}/{self.total_count} tensors, {format_bytes(int(rate))}/s"
        )
        self.stream.flush()

    def close(self) -> None:
        """Ends the line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

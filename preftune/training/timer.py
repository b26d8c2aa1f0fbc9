"""``RunTimer``: the wall-clock budget of a run (``trainer.max_time``)."""

from __future__ import annotations

import time


class RunTimer:
    """Tracks elapsed time against an optional limit in seconds."""

    def __init__(self, max_time: float | None = None):
        self.max_time = max_time
        self.start_time = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def remaining(self) -> float:
        return float("inf") if self.max_time is None else self.max_time - self.elapsed()

    def is_within_limit(self, needed: float) -> bool:
        """Whether ``needed`` more seconds still fit before the limit."""
        return self.remaining() > needed

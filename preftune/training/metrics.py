"""``MetricsLogger``: one JSON object per logged step in ``output_dir/metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends ``{"step": N, "train/loss": ..., ...}`` lines to ``metrics.jsonl``.

    On resume from step N, records after N (written by the interrupted run after its last checkpoint)
    are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log_metrics(self, metrics: dict[str, float], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            record[f"{prefix}/{key}"] = value if math.isfinite(value) else str(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

"""``MetricsLogger``: one JSON object per logged step in ``output_dir/metrics.jsonl``, fanned out to trackers."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.run_dir import RunDir
from preftune.training.trackers import Tracker, TrackerState


class MetricsLogger:
    """Appends ``{"step": N, "timestamp": T, "train/loss": ..., ...}`` lines to ``metrics.jsonl`` (``T``:
    Unix seconds) and sends the same names and values to the trackers.

    On resume from step N, records after N (written by the interrupted run after its last checkpoint)
    are dropped so the file reads as one uninterrupted run. A tracker that fails mid-run is reported once
    and dropped; ``metrics.jsonl`` goes on.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool = True,
        trackers: Sequence[Tracker] = (),
        tracker_state: TrackerState | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.path = RunDir(self.output_dir).metrics
        self.enabled = enabled
        self.trackers = list(trackers)
        self.tracker_state = tracker_state or TrackerState()

    def attach(self, trackers: Sequence[Tracker], state: TrackerState) -> None:
        self.trackers, self.tracker_state = list(trackers), state

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
        record: dict[str, Any] = {"step": step, "timestamp": round(time.time(), 3)}
        for key, value in metrics.items():
            record[f"{prefix}/{key}"] = value if math.isfinite(value) else str(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.send("log_metrics", {f"{prefix}/{key}": float(value) for key, value in metrics.items()}, step)

    def send(self, method: str, payload: Any, step: int) -> None:
        """Call ``method(payload, step)`` on every tracker that does not hold ``step`` yet."""
        sent = False
        for tracker in list(self.trackers):
            if step <= tracker.skip_through:
                continue
            try:
                getattr(tracker, method)(payload, step)
                sent = True
            except Exception as e:
                self.trackers.remove(tracker)
                message = " ".join(str(e).split())
                print(
                    f"[preftune] warning: {tracker.name} failed at step {step} ({type(e).__name__}: {message}); "
                    f"it gets nothing more, training goes on and {self.path.name} is complete",
                    file=sys.stderr,
                    flush=True,
                )
        if sent and step > self.tracker_state.last_step:
            self.tracker_state.last_step = step
            self.tracker_state.save(self.output_dir)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                print(f"[preftune] warning: {tracker.name} did not close cleanly: {e}", file=sys.stderr)
        self.trackers = []

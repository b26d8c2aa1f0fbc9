"""Checkpoint retention: which checkpoints to delete after a new one is complete (a pure decision).

``trainer.keep_last: N`` keeps the N newest checkpoints (null: all); ``trainer.keep_best`` keeps the n
whose validation metric (validated at that checkpoint's step) is best. A checkpoint is kept if either rule
keeps it; the newest and the one this run resumed from are never deleted, nor any newer than the one just
saved (left by an earlier attempt, replaced when the run gets there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from preftune.config import TrainerConfig
from preftune.errors import ConfigError


@dataclass(frozen=True)
class Retention:
    keep_last: int | None = None  # None: every checkpoint
    best_metric: str | None = None  # e.g. "val/loss"; None: no best-checkpoint rule
    best_mode: str = "min"
    best_n: int = 1

    @classmethod
    def from_config(cls, trainer_cfg: TrainerConfig) -> Retention:
        keep_last, best = trainer_cfg.keep_last, trainer_cfg.keep_best
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
            raise ConfigError(f"trainer.keep_last={keep_last!r}: use a number of checkpoints >= 1, or null")
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"trainer.keep_last={keep_last}: keep at least 1 checkpoint (null keeps all)")
        metric = best.metric
        if metric is not None and not str(metric).startswith("val/"):
            raise ConfigError(
                f"trainer.keep_best.metric={metric}: use a validation metric such as val/loss or val/acc"
            )
        if best.mode not in ("min", "max"):
            raise ConfigError(f"trainer.keep_best.mode={best.mode}: use min or max")
        if not isinstance(best.n, int) or best.n < 1:
            raise ConfigError(f"trainer.keep_best.n={best.n}: keep at least 1 best checkpoint")
        return cls(keep_last, metric, best.mode, best.n)


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    metric: float | None  # the best-metric's value validated at ``step``; None if not validated there


def checkpoints_to_delete(
    saved: Iterable[SavedCheckpoint], newest: int, policy: Retention, protected: Iterable[int] = ()
) -> list[int]:
    """Steps of the checkpoints ``policy`` no longer keeps, once the checkpoint of step ``newest`` is
    complete; ``protected`` steps (the checkpoint resumed from) are kept."""
    candidates = sorted((c for c in saved if c.step <= newest), key=lambda c: c.step)
    if policy.keep_last is None:
        return []
    keep = {newest, *protected}
    keep.update(c.step for c in candidates[-policy.keep_last :])
    if policy.best_metric is not None:
        ranked = [c for c in candidates if c.metric is not None and math.isfinite(c.metric)]
        ranked.sort(key=lambda c: (c.metric if policy.best_mode == "min" else -c.metric, -c.step))
        keep.update(c.step for c in ranked[: policy.best_n])
    return [c.step for c in candidates if c.step not in keep]

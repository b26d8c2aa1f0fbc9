"""Non-finite steps: a step whose loss or gradient norm is NaN or infinite is skipped, not applied.

The trainer asks ``SkipGuard.skip`` before each optimizer step. A skipped step's gradients are dropped, so
the optimizer step leaves the weights and the optimizer state as they were; the scheduler and the data
position still advance, so a resumed run stays exact. After ``trainer.max_skipped_steps`` skips in a row the run stops with ``NonFiniteError``. Nothing is
saved from non-finite weights (``nonfinite_parameters`` is checked before every checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from preftune.errors import NonFiniteError

ADVICE = (
    "try a lower optim.lr, trainer.gradient_clip_val (e.g. 1.0), float32 instead of bfloat16/float16 "
    "(model.dtype, model.autocast) if they overflow, and check the data's rewards"
)


class SkipGuard:
    """Counts skipped steps in a row; warns on each (through ``warn``) and raises after ``max_in_row``."""

    def __init__(self, max_in_row: int, warn: Callable[[str], None]):
        self.max_in_row = max_in_row
        self.warn = warn
        self.in_row: list[int] = []

    def skip(self, step: int, loss: float, grad_norm: float) -> bool:
        """True if step ``step`` (loss and gradient norm over every rank) must not be applied."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = []
            return False
        self.in_row.append(step)
        self.warn(
            f"[preftune] warning: step {step} skipped (loss {loss}, grad norm {grad_norm}): not applied; "
            f"{len(self.in_row)} in a row (trainer.max_skipped_steps={self.max_in_row})"
        )
        if len(self.in_row) >= self.max_in_row:
            raise NonFiniteError(
                f"steps {self.in_row[0]}-{step}: {len(self.in_row)} steps in a row had a non-finite loss or "
                f"gradient norm, stopping (the last checkpoint holds finite weights); {ADVICE}"
            )
        return True


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters holding NaN or infinite values (local shards under FSDP2)."""
    names = []
    for name, param in module.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local.detach()).all():
            names.append(name)
    return names

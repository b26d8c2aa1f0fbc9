"""What the trainer does after each optimizer step (validate, save, stop) and how many steps a run takes:
pure functions of where it is and of ``trainer.max_epochs`` / ``trainer.max_steps``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepActions:
    """The decision after one optimizer step."""

    validate: bool
    save: bool
    stop: bool
    stopping_early: bool
    """Stopping before ``max_steps`` (a stop signal, or ``trainer.max_time`` nearly reached)."""


def after_step(
    step: int, *, max_steps: int, val_check_interval: int, save_interval: int, stop_early: bool
) -> StepActions:
    """Validate every ``val_check_interval`` steps, save every ``save_interval`` steps, and both before any
    stop: at ``max_steps``, or early when ``stop_early`` (every rank must pass the same value)."""
    stop = step >= max_steps or stop_early
    return StepActions(
        validate=step % val_check_interval == 0 or stop,
        save=step % save_interval == 0 or stop,
        stop=stop,
        stopping_early=stop_early and step < max_steps,
    )


def limit(value: int | None) -> int | None:
    """``trainer.max_epochs`` / ``trainer.max_steps`` as a limit: -1 and null both mean no limit (None)."""
    return None if value is None or value == -1 else value


@dataclass(frozen=True)
class RunLength:
    """A run's number of optimizer steps: the first of ``max_epochs`` epochs and ``max_steps`` steps reached
    (None: no limit)."""

    max_epochs: int | None
    max_steps: int | None
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        limits = [n for n in (self.epoch_steps, self.max_steps) if n is not None]
        if not limits:
            raise ValueError("trainer.max_epochs and trainer.max_steps are both off: a run needs an end")
        return min(limits)

    @property
    def epoch_steps(self) -> int | None:
        return None if self.max_epochs is None else self.max_epochs * self.steps_per_epoch

    def sentence(self, pairs: int) -> str:
        """Which limit ends the run, e.g. ``6 steps: max_epochs=1 over 12 pairs ends the run before
        max_steps=40`` (``pairs``: the training pairs of one epoch)."""
        epochs = f"max_epochs={self.max_epochs} over {pairs} pairs"
        if self.max_steps is None:
            return f"{self.steps} steps: {epochs} (max_steps: no limit)"
        if self.epoch_steps is None:
            return f"{self.steps} steps: max_steps={self.max_steps} (max_epochs: no limit)"
        if self.epoch_steps < self.max_steps:
            return f"{self.steps} steps: {epochs} ends the run before max_steps={self.max_steps}"
        if self.max_steps < self.epoch_steps:
            return (
                f"{self.steps} steps: max_steps={self.max_steps} ends the run before {epochs} "
                f"({self.epoch_steps} steps)"
            )
        return f"{self.steps} steps: max_steps={self.max_steps} and {epochs} end the run together"


def run_length(max_epochs: int | None, max_steps: int | None, steps_per_epoch: int) -> RunLength:
    """The run's length from ``trainer.max_epochs`` and ``trainer.max_steps`` (-1 / null: no limit)."""
    return RunLength(limit(max_epochs), limit(max_steps), steps_per_epoch)

"""What the trainer does after each optimizer step: validate, save, stop — a pure function of where it is."""

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

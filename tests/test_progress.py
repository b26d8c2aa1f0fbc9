"""The validate / save / stop decision after each optimizer step, as a pure function."""

from __future__ import annotations

import pytest

from preftune.training.progress import StepActions, after_step


def decide(step: int, stop_early: bool = False) -> StepActions:
    return after_step(step, max_steps=10, val_check_interval=4, save_interval=3, stop_early=stop_early)


@pytest.mark.parametrize(
    ("step", "validate", "save"),
    [
        (1, False, False),
        (3, False, True),
        (4, True, False),
        (8, True, False),
        (9, False, True),
        (12, True, True),
    ],
)
def test_intervals(step, validate, save):
    actions = decide(step)
    assert (actions.validate, actions.save) == (validate, save)
    assert actions.stop == (step >= 10) and not actions.stopping_early


def test_last_step_validates_saves_and_stops():
    assert decide(10) == StepActions(validate=True, save=True, stop=True, stopping_early=False)


def test_stopping_early_validates_and_saves_first():
    assert decide(5, stop_early=True) == StepActions(validate=True, save=True, stop=True, stopping_early=True)
    # a stop signal that arrives with the last step is an ordinary end
    assert not decide(10, stop_early=True).stopping_early

"""The validate / save / stop decision after each optimizer step, as a pure function."""

from __future__ import annotations

import pytest

from preftune.training.progress import StepActions, after_step, limit, run_length


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


# ------------------------------------------------------------------ the run's length


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "steps", "sentence"),
    [
        # 12 pairs, 2 per step: 6 steps an epoch
        (1, 40, 6, "6 steps: max_epochs=1 over 12 pairs ends the run before max_steps=40"),
        (3, 4, 4, "4 steps: max_steps=4 ends the run before max_epochs=3 over 12 pairs (18 steps)"),
        (2, 12, 12, "12 steps: max_steps=12 and max_epochs=2 over 12 pairs end the run together"),
        (2, -1, 12, "12 steps: max_epochs=2 over 12 pairs (max_steps: no limit)"),
        (2, None, 12, "12 steps: max_epochs=2 over 12 pairs (max_steps: no limit)"),
        (-1, 40, 40, "40 steps: max_steps=40 (max_epochs: no limit)"),
        (None, 40, 40, "40 steps: max_steps=40 (max_epochs: no limit)"),
    ],
)
def test_run_length_says_which_limit_ends_the_run(max_epochs, max_steps, steps, sentence):
    length = run_length(max_epochs, max_steps, steps_per_epoch=6)
    assert length.steps == steps
    assert length.sentence(pairs=12) == sentence


@pytest.mark.parametrize("value", [-1, None])
def test_minus_one_and_null_both_mean_no_limit(value):
    assert limit(value) is None
    assert limit(1) == 1 and limit(0) == 0  # 0 and other negatives are refused at load, not read as "none"
    with pytest.raises(ValueError, match="both off"):
        _ = run_length(value, value, steps_per_epoch=6).steps

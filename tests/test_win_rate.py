"""Win rate and length-controlled win rate on hand-made outcomes: closed forms, an independent grid
maximum-likelihood fit, and the property the length control exists for (a policy that wins only by being
longer has a raw win rate far above 0.5 and a length-controlled one near 0.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.training.win_rate import (
    INTERCEPT_PENALTY,
    SLOPE_PENALTY,
    fit_length_model,
    lc_win_rate,
    length_ratio,
    score_outcomes,
    win_rate,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_outcomes_win_rate_and_length_ratio_by_hand():
    outcomes = score_outcomes([3.0, 1.0, 2.0, math.nan, 0.5], [1.0, 2.0, 2.0, 0.0, -1.0])
    assert outcomes[:3] == [1.0, 0.0, 0.5] and math.isnan(outcomes[3]) and outcomes[4] == 1.0
    assert win_rate(outcomes) == (1 + 0 + 0.5 + 1) / 4  # the NaN prompt left out, the tie half
    assert math.isnan(win_rate([math.nan]))
    assert length_ratio([10, 20, 30], [20, 20, 20]) == 1.0
    assert length_ratio([30, 30], [10, 20]) == 2.0
    assert math.isnan(length_ratio([3], [0]))


def test_lc_equals_the_closed_form_of_two_length_groups():
    """Two groups with length differences +k and -k: the feature takes two values +-c, the model is
    saturated, so sigmoid(a + b c) and sigmoid(a - b c) are the two groups' win rates and
    a = (logit(p+) + logit(p-)) / 2."""
    longer = [1.0] * 24 + [0.0] * 6  # 30 prompts 8 tokens longer: wins 0.8
    shorter = [1.0] * 4 + [0.5] * 2 + [0.0] * 4  # 10 prompts 8 tokens shorter: 0.5 (ties half)
    # 50 copies: the penalties (a weak prior on the slope) move the fit by less than 1e-4
    outcomes = (longer + shorter) * 50
    policy = ([40] * 30 + [32] * 10) * 50
    reference = ([32] * 30 + [40] * 10) * 50
    a = (logit(0.8) + logit(0.5)) / 2
    assert win_rate(outcomes) == pytest.approx(0.725)
    assert lc_win_rate(outcomes, policy, reference) == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-4)


def test_lc_equals_an_independent_grid_fit():
    """The same penalised likelihood maximised over a grid (coarse, then fine around its best)."""
    rng = np.random.default_rng(0)
    n = 60
    policy = rng.integers(5, 60, n)
    reference = rng.integers(5, 40, n)
    outcomes = rng.choice([0.0, 0.5, 1.0], n, p=[0.35, 0.15, 0.5]).tolist()
    x = np.tanh((policy - reference) / (policy - reference).std())
    y = np.array(outcomes)

    def best(a_values: np.ndarray, b_values: np.ndarray) -> tuple[float, float]:
        a, b = np.meshgrid(a_values, b_values, indexing="ij")
        z = a[..., None] + b[..., None] * x
        loglik = (y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z)).sum(-1)
        loglik -= INTERCEPT_PENALTY / 2 * a**2 + SLOPE_PENALTY / 2 * b**2  # the fit's documented penalties
        i, j = np.unravel_index(np.argmax(loglik), loglik.shape)
        return float(a_values[i]), float(b_values[j])

    coarse = best(np.arange(-3, 3, 0.05), np.arange(-3, 3, 0.05))  # then a fine grid around its best
    a_best, b_best = best(*(np.arange(c - 0.06, c + 0.06, 0.001) for c in coarse))
    fitted = fit_length_model(outcomes, policy.tolist(), reference.tolist())
    assert fitted == pytest.approx((a_best, b_best), abs=0.002)
    assert lc_win_rate(outcomes, policy.tolist(), reference.tolist()) == pytest.approx(
        1 / (1 + math.exp(-a_best)), abs=0.001
    )


def test_a_policy_that_wins_only_by_length_has_lc_near_one_half():
    """The judge prefers whichever generation is longer (logit 3 tanh(d / std)), nothing else; the policy
    is longer on 80% of prompts."""
    rng = np.random.default_rng(1)
    n = 4000
    reference = rng.integers(20, 60, n)
    longer = rng.random(n) < 0.8
    policy = np.where(longer, reference + rng.integers(1, 30, n), reference - rng.integers(1, 30, n))
    d = policy - reference
    p_win = 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))
    outcomes = (rng.random(n) < p_win).astype(float).tolist()
    raw = win_rate(outcomes)
    lc = lc_win_rate(outcomes, policy.tolist(), reference.tolist())
    assert raw > 0.7
    assert lc == pytest.approx(0.5, abs=0.05)
    assert length_ratio(policy.tolist(), reference.tolist()) > 1.2


def test_degenerate_data_gives_finite_rates():
    # all lengths equal: no length information, the rate is the plain win rate (logit of the mean)
    outcomes = [1.0, 1.0, 0.0, 0.5, 1.0]
    assert lc_win_rate(outcomes, [7] * 5, [7] * 5) == pytest.approx(win_rate(outcomes), abs=1e-4)
    # the same difference everywhere (std 0): likewise
    assert lc_win_rate(outcomes, [9] * 5, [7] * 5) == pytest.approx(win_rate(outcomes), abs=1e-4)
    # all wins / all losses: finite, within the penalty's reach of 1 and 0
    lengths = ([10, 20, 30, 40], [15, 15, 35, 35])
    assert 0.999 < lc_win_rate([1.0] * 4, *lengths) < 1.0
    assert 0.0 < lc_win_rate([0.0] * 4, *lengths) < 0.001
    assert lc_win_rate([0.5] * 4, *lengths) == pytest.approx(0.5, abs=1e-9)
    # every policy generation far shorter (tanh saturated, the length feature nearly constant): the lengths
    # cannot tell length from quality, so the rate stays near the plain win rate, not at 0 or 1
    rng = np.random.default_rng(2)
    reference = [40] * 64
    policy = (14 + rng.integers(-5, 6, 64)).tolist()
    outcomes = [1.0] * 50 + [0.5] * 14
    assert abs(lc_win_rate(outcomes, policy, reference) - win_rate(outcomes)) < 0.05
    # a NaN outcome is left out of the fit like of the win rate; none at all: NaN
    assert lc_win_rate([1.0, math.nan, 0.0], [3, 4, 5], [3, 9, 5]) == pytest.approx(0.5, abs=1e-6)
    assert math.isnan(lc_win_rate([math.nan], [1], [2]))

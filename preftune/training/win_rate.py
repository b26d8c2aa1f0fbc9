"""Win rates of a policy's generations against a reference's, pure functions on per-prompt outcomes.

An outcome is 1.0 (the policy's generation wins), 0.0 (the reference's wins) or 0.5 (a tie), NaN where the
judge could not score one of the two (left out of every rate).

- ``win_rate``: the mean outcome (ties count half).
- ``lc_win_rate``: the length-controlled win rate (AlpacaEval 2's idea, fitted locally): a logistic
  regression of the outcome (a fractional target) on ``x = tanh(d / std(d))``, ``d`` the policy's minus the
  reference's generation length in tokens, with an intercept ``a``; the rate is ``sigmoid(a)``, the
  prediction at zero length difference. A judge that prefers longer answers raises ``win_rate`` but not it.
- ``length_ratio``: the policy's mean generation length over the reference's.

The fit is Newton's method on the log-likelihood plus two L2 penalties, so it has a finite answer where the
maximum-likelihood fit has none: ``INTERCEPT_PENALTY`` (tiny) keeps all wins or all losses within ~1e-4 of 1
or 0; ``SLOPE_PENALTY`` (a Gaussian prior of standard deviation 3 on the length coefficient, weak beside the
data when lengths vary both ways) keeps the slope near 0 when the lengths cannot tell length from quality:
all lengths equal (``std(d) = 0``: ``x = 0``) or every difference far on one side (``tanh`` saturated, ``x``
nearly constant, e.g. a policy that always writes much less), where the rate then stays near the plain
win rate instead of swinging to 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INTERCEPT_PENALTY = 1e-4
SLOPE_PENALTY = 1 / 9
"""Added to the negative log-likelihood (summed over prompts): ``INTERCEPT_PENALTY / 2 * a²`` and
``SLOPE_PENALTY / 2 * b²`` (``b ~ N(0, 3²)``)."""


def score_outcomes(policy: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per prompt: 1.0 where the policy's score is higher, 0.0 where lower, 0.5 when equal, NaN when either
    is NaN (the judge could not score it)."""
    outcomes = []
    for p, r in zip(policy, reference, strict=True):
        if math.isnan(p) or math.isnan(r):
            outcomes.append(math.nan)
        else:
            outcomes.append(1.0 if p > r else 0.0 if p < r else 0.5)
    return outcomes


def win_rate(outcomes: Sequence[float]) -> float:
    """The mean outcome over the prompts with one (NaN: none)."""
    kept = [o for o in outcomes if not math.isnan(o)]
    return sum(kept) / len(kept) if kept else math.nan


def length_ratio(policy_lengths: Sequence[int], reference_lengths: Sequence[int]) -> float:
    """Mean policy generation length / mean reference generation length (NaN if the reference's are all
    empty)."""
    total = sum(reference_lengths)
    return sum(policy_lengths) / total if total else math.nan


def fit_length_model(
    outcomes: Sequence[float], policy_lengths: Sequence[int], reference_lengths: Sequence[int]
) -> tuple[float, float]:
    """The (intercept, slope) of the penalised logistic regression of the outcomes on
    ``tanh(d / std(d))``; prompts whose outcome is NaN are left out."""
    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(policy_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    if len(y) != len(d):
        raise ValueError(f"{len(y)} outcomes but {len(d)} length pairs")
    keep = ~np.isnan(y)
    y, d = y[keep], d[keep]
    std = d.std()
    x = np.tanh(d / std) if std > 0 else np.zeros_like(d)
    features = np.stack([np.ones_like(x), x], axis=1)
    penalty = np.array([INTERCEPT_PENALTY, SLOPE_PENALTY])

    def objective(theta: np.ndarray) -> float:
        z = features @ theta
        # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z, computed stably
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + penalty @ theta**2 / 2)

    theta = np.zeros(2)
    value = objective(theta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(features @ theta)))
        gradient = features.T @ (p - y) + penalty * theta
        hessian = (features * (p * (1 - p))[:, None]).T @ features + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while objective(theta - scale * step) > value and scale > 1e-8:  # never uphill
            scale /= 2
        theta = theta - scale * step
        value = objective(theta)
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def lc_win_rate(
    outcomes: Sequence[float], policy_lengths: Sequence[int], reference_lengths: Sequence[int]
) -> float:
    """The length-controlled win rate: ``sigmoid(intercept)`` of ``fit_length_model`` (NaN: no outcome)."""
    if all(math.isnan(o) for o in outcomes):
        return math.nan
    intercept, _ = fit_length_model(outcomes, policy_lengths, reference_lengths)
    return 1.0 / (1.0 + math.exp(-intercept))

"""Online pairing: which of a prompt's K judged completions become (chosen, rejected) pairs. Pure functions.

``best_vs_worst`` pairs the highest-rewarded completion with the lowest; ``all_pairs`` every two completions
whose rewards differ; ``spin`` (NeMo Aligner's SPIN) pairs the data's own response (chosen, index
``DATA_RESPONSE``) with the policy's lowest-rewarded sample (the first sample when there is no judge).
A pair whose reward gap is at most ``min_reward_gap`` is a tie: dropped and counted. NaN rewards (a judge
that could not score) are never paired. Completions that never ended lose ``missing_eos_penalty`` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PAIRINGS = ("best_vs_worst", "all_pairs", "spin")
DATA_RESPONSE = -1
"""The chosen index of a ``spin`` pair: the data's response, not a sample."""


@dataclass(frozen=True)
class PromptPairs:
    """The pairs one prompt gives."""

    pairs: list[tuple[int, int]]  # (chosen, rejected) completion indices
    candidates: int  # pairs considered (ties included)
    ties: int  # pairs dropped: reward gap <= min_reward_gap


def penalized(rewards: Sequence[float], ended: Sequence[bool], penalty: float | None) -> list[float]:
    """The rewards pairing compares: ``penalty`` subtracted from completions that never ended."""
    if not penalty:
        return list(rewards)
    return [r if done else r - penalty for r, done in zip(rewards, ended, strict=True)]


def pair_completions(rewards: Sequence[float], pairing: str, min_reward_gap: float) -> PromptPairs:
    """The (chosen, rejected) pairs of one prompt's completions, by ``rewards`` (already penalized)."""
    scored = [i for i, r in enumerate(rewards) if not math.isnan(r)]
    if pairing == "spin":
        if not rewards:  # no judge: the first sample
            return PromptPairs([(DATA_RESPONSE, 0)], 1, 0)
        if not scored:
            return PromptPairs([], 0, 0)
        return PromptPairs([(DATA_RESPONSE, min(scored, key=lambda i: rewards[i]))], 1, 0)
    if len(scored) < 2:
        return PromptPairs([], 0, 0)
    if pairing == "best_vs_worst":
        best = max(scored, key=lambda i: rewards[i])  # the first of equal bests
        worst = min(reversed(scored), key=lambda i: rewards[i])  # the last of equal worsts
        if rewards[best] - rewards[worst] <= min_reward_gap:
            return PromptPairs([], 1, 1)
        return PromptPairs([(best, worst)], 1, 0)
    if pairing == "all_pairs":
        pairs, ties = [], 0
        for n, i in enumerate(scored):
            for j in scored[n + 1 :]:
                if abs(rewards[i] - rewards[j]) <= min_reward_gap:
                    ties += 1
                else:
                    pairs.append((i, j) if rewards[i] > rewards[j] else (j, i))
        return PromptPairs(pairs, len(pairs) + ties, ties)
    raise ValueError(f"online.pairing={pairing!r}: use one of {', '.join(PAIRINGS)}")

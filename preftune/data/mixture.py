"""Weighted mixtures: each ``data.train`` source's pairs drawn ``weight`` times per epoch.

A weight of 2.5 repeats every pair of its source twice and adds half of them once more; that half (rounded)
is drawn from ``data.seed`` and the source's position alone, so it is the same on every rank, every epoch
and after a resume, and does not move when another source's weight changes. The weighted pairs are an
index over the tokenized ones (no token is copied); the sampler shuffles them like any dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from preftune.errors import DataError

if TYPE_CHECKING:
    from preftune.data.dataset import DatasetStats, PreferenceDataset


def source_seed(seed: int, source_index: int) -> int:
    """A generator seed for one source's subsample, independent of every other source."""
    digest = hashlib.sha256(f"preftune-mixture:{seed}:{source_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mixture_indices(source_of: Tensor, weights: Sequence[float], seed: int) -> Tensor:
    """The pair indices of one epoch: pairs of source ``s`` (``source_of[i] == s``) ``floor(w)`` times each,
    then ``frac(w) * n`` of them (rounded half up) drawn without replacement; sources in order, pairs in order."""
    parts = []
    for s, weight in enumerate(weights):
        members = (source_of == s).nonzero().squeeze(1)
        whole = math.floor(weight)
        extra = math.floor((weight - whole) * len(members) + 0.5)  # rounded half up
        parts.append(members.repeat(whole))
        if extra:
            generator = torch.Generator().manual_seed(source_seed(seed, s))
            parts.append(members[torch.randperm(len(members), generator=generator)[:extra].sort().values])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class SourceCount:
    """One source of a mixture: its pairs before and after weighting."""

    source: str
    weight: float
    pairs: int
    drawn: int


@dataclass(frozen=True)
class MixtureStats:
    """What ``WeightedPairs.stats`` reports: the tokenized set's stats and the weighting per source."""

    base: DatasetStats  # the unweighted pairs'
    counts: list[SourceCount]

    def summary(self) -> str:
        return f"{self.base.summary()}; {self.weighting()}"

    def weighting(self) -> str:
        drawn = ", ".join(f"{c.source} {c.pairs} x {c.weight:g} = {c.drawn}" for c in self.counts)
        return f"weighted to {sum(c.drawn for c in self.counts)} pairs ({drawn})"


class WeightedPairs(torch.utils.data.Dataset):
    """The pairs of ``dataset`` drawn by its sources' weights; indexes like a ``PreferenceDataset``."""

    def __init__(self, dataset: PreferenceDataset, weights: Sequence[float], seed: int):
        self.dataset, self.weights = dataset, list(weights)
        self.indices = mixture_indices(dataset.origins[:, 0], self.weights, seed)
        if not len(self.indices):
            raise DataError(f"{dataset.stats.summary()}; the data.train weights leave no pairs to train on")
        key = json.dumps([dataset.fingerprint, self.weights, seed])
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.from_cache = dataset.from_cache

    @property
    def counts(self) -> list[SourceCount]:
        before = torch.bincount(self.dataset.origins[:, 0], minlength=len(self.weights)).tolist()
        after = torch.bincount(self.dataset.origins[self.indices, 0], minlength=len(self.weights)).tolist()
        return [
            SourceCount(str(source.path), w, b, a)
            for source, w, b, a in zip(self.dataset.sources, self.weights, before, after, strict=True)
        ]

    @property
    def stats(self) -> MixtureStats:
        return MixtureStats(self.dataset.stats, self.counts)

    def load_summary(self) -> str:
        """The tokenized set's summary (cache or tokenizing speed), then the weighting per source."""
        return f"{self.dataset.load_summary()}; {self.stats.weighting()}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset.examples[int(self.indices[index])], "index": index}


def weighted(dataset: PreferenceDataset, seed: int) -> PreferenceDataset | WeightedPairs:
    """``dataset`` drawn by its sources' weights (itself when every weight is 1)."""
    weights = [source.weight for source in dataset.sources]
    if all(w == 1 for w in weights):
        return dataset
    return WeightedPairs(dataset, weights, seed)

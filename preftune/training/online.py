"""Online DPO (``online.enabled``): each global batch of prompts becomes preference pairs made by the policy.

Per step, each rank samples ``online.num_generations`` completions of each of its prompts (``Generator``),
the judge scores them, and ``preftune.data.pairing`` picks the pairs; the trainer then runs the usual DPO step
on them. Every prompt's line (completions, the judge's rewards unaltered, the chosen / rejected indices) goes
to ``output_dir/generations.jsonl``; a resumed run drops the lines written after its checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.pairing import DATA_RESPONSE, pair_completions, penalized
from preftune.modeling.generation import Completion, Generator, SamplingSettings, prompt_seed
from preftune.modeling.parallel import DistInfo, gather_objects
from preftune.run_dir import RunDir
from preftune.training.samples import append_jsonl


@dataclass(frozen=True)
class OnlineSettings:
    """The ``online.*`` keys the online step reads."""

    num_generations: int
    sampling: SamplingSettings
    pairing: str
    min_reward_gap: float
    missing_eos_penalty: float | None

    @classmethod
    def from_config(cls, online: Mapping[str, Any]) -> OnlineSettings:
        return cls(
            num_generations=online["num_generations"],
            sampling=SamplingSettings(
                max_new_tokens=online["max_new_tokens"],
                temperature=float(online["temperature"]),
                top_p=float(online["top_p"]),
                top_k=online["top_k"],
            ),
            pairing=online["pairing"],
            min_reward_gap=float(online["min_reward_gap"]),
            missing_eos_penalty=online["missing_eos_penalty"],
        )


@dataclass
class OnlineBatch:
    """A rank's pairs for one step and the step's generation metrics (over every rank)."""

    pairs: list[dict[str, Any]]  # tokenized pairs, as a dataset gives them (plus completion keys)
    total_pairs: int  # over every rank
    metrics: dict[str, float]
    records: list[dict[str, Any]]  # every rank's generations.jsonl lines, by prompt index
    counts: StepCounts  # the sums behind ``metrics``, over every rank
    generation_time: float  # seconds, the slowest rank


class OnlineStep:
    """Turns a rank's share of a global batch of prompts into pairs: generate, judge, pair, record."""

    def __init__(
        self,
        settings: OnlineSettings,
        generator: Generator,
        judge: Any,
        tokenizer: Any,
        *,
        data_seed: int,
        dist: DistInfo,
        output_dir: Path | None,
    ):
        """``judge``: a ``preftune.modeling.judges.Judge`` (None only for ``spin``); ``output_dir`` None:
        no generations.jsonl."""
        self.settings = settings
        self.generator = generator
        self.judge = judge
        self.tokenizer = tokenizer
        self.data_seed = data_seed
        self.dist = dist
        self.output_dir = output_dir

    def __call__(self, prompts: Sequence[dict[str, Any]], step: int) -> OnlineBatch:
        k = self.settings.num_generations
        start = time.monotonic()
        seeds = [prompt_seed(self.data_seed, step, p["index"]) for p in prompts]
        completions = self.generator.generate([p["prompt_ids"] for p in prompts], seeds, k)
        generation_time = time.monotonic() - start
        texts = [self.decode(p["prompt_ids"]) for p in prompts]
        flat = [c for group in completions for c in group]
        completion_texts = [self.decode(c.ids) for c in flat]
        if self.judge is not None:
            scores = self.judge.score(
                [t for t in texts for _ in range(k)], completion_texts, [c.ids for c in flat]
            )
            rewards = [float(r) for r in scores.rewards]
        else:
            rewards = []
        pairs, records, counts = [], [], StepCounts()
        for i, (prompt, group) in enumerate(zip(prompts, completions, strict=True)):
            own = rewards[i * k : (i + 1) * k]
            ended = [c.ended for c in group]
            chosen = pair_completions(
                penalized(own, ended, self.settings.missing_eos_penalty) if own else [],
                self.settings.pairing,
                self.settings.min_reward_gap,
            )
            for c, r in chosen.pairs:
                pairs.append(self.make_pair(prompt, group, own, c, r))
            counts.add(own, group, chosen.pairs, chosen.candidates, chosen.ties)
            first = chosen.pairs[0] if chosen.pairs else (None, None)
            records.append(
                {
                    "step": step,
                    "index": prompt["index"],
                    "prompt": texts[i],
                    "completions": completion_texts[i * k : (i + 1) * k],
                    "rewards": [None if math.isnan(r) else r for r in own],
                    "ended": ended,
                    "chosen_index": first[0],
                    "rejected_index": first[1],
                    **({"pairs": [list(p) for p in chosen.pairs]} if len(chosen.pairs) > 1 else {}),
                }
            )
        gathered = gather_objects((records, counts, generation_time), self.dist)
        total = StepCounts.merge([g[1] for g in gathered])
        everyone = sorted((r for g in gathered for r in g[0]), key=lambda r: r["index"])
        if self.output_dir is not None and self.dist.is_main:
            append_jsonl(RunDir(self.output_dir).generations, everyone)
        seconds = max(g[2] for g in gathered)
        return OnlineBatch(pairs, total.pairs, total.metrics(seconds), everyone, total, seconds)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def make_pair(
        prompt: dict[str, Any], group: list[Completion], rewards: list[float], chosen: int, rejected: int
    ) -> dict[str, Any]:
        """A tokenized pair (what a ``PreferenceDataset`` gives): the prompt's ids, each response's ids as
        generated (or the data's chosen response, ``spin``) and their judged rewards (0 where none)."""

        def reward(i: int) -> float:
            return rewards[i] if rewards and i != DATA_RESPONSE else 0.0

        return {
            "prompt_ids": prompt["prompt_ids"],
            "chosen_ids": prompt["chosen_ids"] if chosen == DATA_RESPONSE else group[chosen].ids,
            "rejected_ids": group[rejected].ids,
            "chosen_reward": reward(chosen),
            "rejected_reward": reward(rejected),
            "completion_keys": ((prompt["index"], chosen), (prompt["index"], rejected)),
        }


@dataclass
class StepCounts:
    """Sums over a rank's prompts, merged over ranks into the step's metrics."""

    prompts: int = 0
    completions: int = 0
    scored: int = 0
    reward_sum: float = 0.0
    reward_max: float = -math.inf
    ended: int = 0
    tokens: int = 0
    pairs: int = 0
    gap_sum: float = 0.0
    gaps: int = 0
    candidates: int = 0
    ties: int = 0
    unparsed: int = 0

    def add(
        self,
        rewards: list[float],
        group: list[Completion],
        pairs: list[tuple[int, int]],
        candidates: int,
        ties: int,
    ) -> None:
        self.prompts += 1
        self.completions += len(group)
        self.ended += sum(c.ended for c in group)
        self.tokens += sum(len(c.ids) for c in group)
        finite = [r for r in rewards if not math.isnan(r)]
        self.unparsed += len(rewards) - len(finite)
        self.scored += len(finite)
        self.reward_sum += sum(finite)
        self.reward_max = max([self.reward_max, *finite])
        self.pairs += len(pairs)
        self.candidates += candidates
        self.ties += ties
        for c, r in pairs:
            if rewards and c != DATA_RESPONSE:  # the raw judged gap (spin's chosen has no reward)
                self.gap_sum += rewards[c] - rewards[r]
                self.gaps += 1

    @classmethod
    def merge(cls, parts: list[StepCounts]) -> StepCounts:
        out = cls()
        for part in parts:
            for name, value in vars(part).items():
                merged = (
                    max(getattr(out, name), value) if name == "reward_max" else getattr(out, name) + value
                )
                setattr(out, name, merged)
        return out

    def metrics(self, generation_time: float) -> dict[str, float]:
        """The step's generation metrics (``online/...`` under ``train/`` in metrics.jsonl)."""
        out = {
            "online_pairs": float(self.pairs),
            "online_skipped_batch": float(self.pairs == 0),
            "online_tie_share": self.ties / self.candidates if self.candidates else 0.0,
            "online_eos_share": self.ended / max(1, self.completions),
            "online_completion_length": self.tokens / max(1, self.completions),
            "online_generation_time": generation_time,
            "online_generation_tokens_per_sec": self.tokens / max(generation_time, 1e-9),
        }
        if self.scored:
            out.update(online_reward_mean=self.reward_sum / self.scored, online_reward_max=self.reward_max)
        if self.gaps:
            out["online_reward_gap"] = self.gap_sum / self.gaps
        if self.unparsed:
            out["online_unscored"] = float(self.unparsed)
        return out

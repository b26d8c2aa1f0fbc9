"""Judged validation (``trainer.judge_prompts``): the policy's greedy generations for the first N validation
prompts against the reference's, scored by the judge (``judge.*``).

The reference's generations are made once per run: by the model the reference is (``reference.path``; else
the starting policy, for LoRA with its adapters off; for a reference-free loss too), before any checkpoint
is restored, and cached in ``output_dir/cache/judge_reference/`` under a fingerprint of that model's weights,
the prompts' token ids and the generation length, so a resumed run and ``preftune eval`` load them. Each
validation then logs (``val/`` prefix):

- ``judge_reward`` / ``judge_reward_reference``: the mean judged reward of the policy's / reference's
  generations (prompts the judge could not score left out);
- ``win_rate``: the share of prompts whose policy generation beats the reference's, ties half: pairwise for
  an LLM judge (its ``compare``, asked in both orders), else by comparing the two rewards;
- ``lc_win_rate`` and ``length_ratio``: see ``preftune.training.win_rate``.

Generation is greedy and does not touch the RNG; the judge scores what the samples show. The judge gets the
data's own prompts (text, or messages for conversational data, as TRL passes them) and the generations'
decoded text and token ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from preftune.config import PreftuneConfig
from preftune.data.checked_file import load_checked, save_checked
from preftune.modeling.judges import Judge, Prompt, _prompt_text, build_judge, judge_is_set
from preftune.modeling.logprobs import causal_lm, is_peft
from preftune.modeling.model import DTYPES, DPOModel
from preftune.modeling.reference import FrozenReference
from preftune.modeling.reference_cache import reference_model_fingerprint
from preftune.run_dir import RunDir
from preftune.training.samples import decode_generation, greedy_generate
from preftune.training.win_rate import lc_win_rate, length_ratio, score_outcomes, win_rate

CACHE_VERSION = 1  # bump when the generation changes: every cached file becomes stale


@contextlib.contextmanager
def reference_lm(model: DPOModel) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    """The causal LM the reference's generations come from (call before a checkpoint is restored), with the
    module it runs under (FSDP2's sharded root, see ``greedy_generate``): a separate reference model, else
    the policy (for LoRA with its adapters off)."""
    if isinstance(model.reference, FrozenReference):
        yield causal_lm(model.reference.model), model.reference.runner
    elif is_peft(model.policy):
        with model.policy.disable_adapter():
            yield causal_lm(model.policy), model.policy_logprobs
    else:
        yield causal_lm(model.policy), model.policy_logprobs


def generate_reference(
    model: DPOModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int
) -> list[list[int]]:
    """The reference's greedy generations for ``prompts`` (every rank of a sharded model generates)."""
    with reference_lm(model) as (lm, root):
        return greedy_generate(lm, prompts, max_new_tokens, eos_id, root=root)


def reference_generations(
    cfg: PreftuneConfig,
    model: DPOModel,
    prompts: list[list[int]],
    eos_id: int,
    *,
    write: bool,
    log: Any = print,
) -> list[list[int]]:
    """The reference's generations for ``prompts``: loaded from ``output_dir/cache/judge_reference`` or made
    (and saved there when ``write``, rank 0)."""
    max_new_tokens = cfg.trainer.samples.max_new_tokens
    # reference.path is null with a reference-free loss (the config allows no other): the starting policy's
    fingerprint = reference_model_fingerprint(cfg.model, cfg.reference.path)
    key = json.dumps([CACHE_VERSION, fingerprint, prompts, max_new_tokens, eos_id])
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = RunDir(cfg.output_dir).judge_reference_cache / f"{name}.pt"
    cached = load_checked(path)
    if cached is not None:
        log(f"judged validation: the reference's {len(prompts)} generations loaded from {path}")
        return cached
    generations = generate_reference(model, prompts, max_new_tokens, eos_id)
    if write:
        save_checked(generations, path)
    log(f"judged validation: the reference's {len(prompts)} generations made, cached in {path}")
    return generations


@dataclass(frozen=True)
class Judgement:
    """What the judge said of the policy's and the reference's generations, per prompt."""

    rewards: list[float]
    reference_rewards: list[float]
    outcomes: list[float]  # 1.0 policy wins, 0.0 reference wins, 0.5 tie, NaN unjudged
    lengths: list[int]
    reference_lengths: list[int]

    def metrics(self) -> dict[str, float]:
        return {
            "judge_reward": nan_mean(self.rewards),
            "judge_reward_reference": nan_mean(self.reference_rewards),
            "win_rate": win_rate(self.outcomes),
            "lc_win_rate": lc_win_rate(self.outcomes, self.lengths, self.reference_lengths),
            "length_ratio": length_ratio(self.lengths, self.reference_lengths),
        }


def nan_mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def judge_generations(
    judge: Any, prompts: list[Prompt], policy: list[list[int]], reference: list[list[int]], tokenizer: Any
) -> tuple[Judgement, list[str], list[str]]:
    """Score both sides' generations (token ids); compare them pairwise when the judge can (an LLM judge,
    both orders), else by reward. Returns the judgement and the two sides' texts."""
    texts = [decode_generation(tokenizer, ids) for ids in policy]
    reference_texts = [decode_generation(tokenizer, ids) for ids in reference]
    rewards = judge.score(prompts, texts, policy).rewards
    reference_rewards = judge.score(prompts, reference_texts, reference).rewards
    compare = getattr(judge, "compare", None)
    outcomes = (
        list(compare(prompts, texts, reference_texts).outcomes)
        if compare is not None
        else score_outcomes(rewards, reference_rewards)
    )
    judgement = Judgement(
        rewards, reference_rewards, outcomes, [len(ids) for ids in policy], [len(ids) for ids in reference]
    )
    return judgement, texts, reference_texts


def judged_rows(
    step: int, prompts: list[Prompt], judgement: Judgement, texts: list[str], reference_texts: list[str]
) -> list[dict[str, Any]]:
    """One ``judged.jsonl`` record per prompt: both generations side by side with their rewards."""
    return [
        {
            "step": step,
            "prompt": _prompt_text(prompts[i]),
            "generation": texts[i],
            "reference": reference_texts[i],
            "reward": judgement.rewards[i],
            "reference_reward": judgement.reference_rewards[i],
            "outcome": judgement.outcomes[i],
            "num_tokens": judgement.lengths[i],
            "reference_num_tokens": judgement.reference_lengths[i],
        }
        for i in range(len(prompts))
    ]


@dataclass(frozen=True)
class JudgedValidation:
    """What judging a validation needs: the judge, the first N validation pairs, their prompts as the data
    gives them, and the reference's generations for them."""

    judge: Judge
    examples: list[dict[str, Any]]
    prompts: list[Prompt]
    reference: list[list[int]]

    def __call__(
        self, generations: list[list[int]], tokenizer: Any, step: int
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The ``val/`` metrics of the policy's generations for ``examples`` and their ``judged.jsonl`` rows."""
        judgement, texts, reference_texts = judge_generations(
            self.judge, self.prompts, generations, self.reference, tokenizer
        )
        return judgement.metrics(), judged_rows(step, self.prompts, judgement, texts, reference_texts)


def build_run_judge(cfg: PreftuneConfig, model: DPOModel, tokenizer: Any) -> Judge | None:
    """The judge ``judge.*`` names (None: none), built without drawing from the RNG (a reward model's
    head, say, is not initialised from it), so the training trajectory is the same with or without one."""
    if not judge_is_set(cfg.judge):
        return None
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        return build_judge(
            cfg.judge,
            dtype=DTYPES[cfg.model.dtype],
            device=model.device,
            policy=causal_lm(model.policy),
            policy_tokenizer=tokenizer,
        )


def prepare_judged_validation(
    cfg: PreftuneConfig,
    model: DPOModel,
    tokenizer: Any,
    val_set: Any,
    judge: Judge | None,
    *,
    write: bool,
    log: Any = print,
) -> JudgedValidation | None:
    """With a judge, ``trainer.judge_prompts`` > 0 and validation data: the prompts and the reference's
    generations. Call before a checkpoint is restored into ``model`` (they are the starting model's when
    not cached). None: judging is off."""
    num = min(cfg.trainer.judge_prompts, len(val_set) if val_set is not None else 0)
    if num == 0 or judge is None:
        return None
    log(f"judged validation: {num} prompts, judge: {judge.description}")
    examples = [val_set[i] for i in range(num)]
    prompt_ids = [example["prompt_ids"] for example in examples]
    reference = reference_generations(cfg, model, prompt_ids, tokenizer.eos_token_id, write=write, log=log)
    return JudgedValidation(judge, examples, val_set.prompts(num), reference)

"""Judges: what scores a completion of a prompt (the `judge.*` config section).

Three kinds, one interface (`Judge.score`), used by online training and by judged evaluation:

- `FunctionJudge` (`judge.function`): Python reward functions with TRL's signature
  ``f(prompts, completions, completion_ids, **columns) -> list[float]``, several summed with `judge.weights`.
  A function named by a file path is imported from that file: it runs the user's code, as any config naming
  code does.
- `RewardModelJudge` (`judge.reward_model`): a sequence-classification model with one label, reading prompt
  and completion through its own tokenizer and chat template; the score is its single logit.
- `LLMJudge` (`judge.llm`): a causal LM (or the policy itself) asked to grade with a template; the score is
  parsed from its greedy answer, and an answer with no score is counted, never guessed. It also compares two
  completions (`compare`), asked in both orders to cancel position bias.

Nothing here draws from the global RNG: generation is greedy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from preftune.config import JudgeConfig
from preftune.data.chat import tokenizer_template
from preftune.errors import ConfigError

Prompt = str | list[dict[str, str]]  # the data's prompt: text, or TRL conversational messages
POLICY = "policy"  # judge.llm.path naming the policy being trained (self-rewarding)

GRADING_TEMPLATE = """\
Read the user's request and the reply below, then grade the reply from 0 to 5 by adding up points:
- 1 point if the reply is on topic and gives some of what was asked, even if it is incomplete or partly \
irrelevant.
- 1 more point if it covers a substantial part of the request but leaves parts out or does not settle it.
- 1 more point if it usefully answers the core of the request, as a knowledgeable person would, even if its \
form could be better.
- 1 more point if it speaks directly to this request and is complete, clear and well organised.
- 1 more point if it is outstanding: correct, focused, without filler, and shows real expertise.

Request:
{prompt}

Reply:
{completion}

Justify the grade in at most 60 words. Then finish with one last line of the form "Score: N", where N is \
the total number of points (0 to 5)."""

PAIRWISE_TEMPLATE = """\
Two assistants replied to the same user request. Decide which reply serves the user better, judging \
correctness, helpfulness, relevance and clarity. Neither the order of the replies nor their length should \
sway you.

Request:
{prompt}

Reply A:
{first}

Reply B:
{second}

Give a one-sentence reason. Then finish with one last line, either "Better: A" or "Better: B"."""

SCORE_PATTERN = re.compile(r"Score:\s*(-?\d+(?:\.\d+)?)")  # the last match in the answer counts
BETTER_PATTERN = re.compile(r"Better:\s*\**\s*([AB])\b")


@dataclass(frozen=True)
class Scores:
    """What a judge says of N completions."""

    rewards: list[float]  # one per completion, the judge's numbers unaltered; NaN where it could not score
    unparsed: int  # how many are NaN (an LLM judge's answer with no score, a reward function's None)


@dataclass(frozen=True)
class Comparisons:
    """What a pairwise judge says of N pairs of completions."""

    outcomes: list[
        float
    ]  # per prompt: 1.0 first better, 0.0 second better, 0.5 tie / disagreement / unparsed
    unparsed: int  # answers (two per prompt) with no parseable verdict


class Judge(Protocol):
    description: str  # one line, printed at the start of a run

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        **columns: list,
    ) -> Scores: ...


class PairwiseJudge(Protocol):
    def compare(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Comparisons:
        """Per prompt: 1.0 if `first` is better, 0.0 if `second` is, 0.5 for a tie or when the two orders
        disagree. Asked in both orders (first/second, then second/first) to cancel position bias."""
        ...


def judge_is_set(judge_cfg: JudgeConfig) -> bool:
    """Whether the `judge` section names a judge."""
    return bool(_kinds_set(judge_cfg))


def _kinds_set(judge_cfg: JudgeConfig) -> list[str]:
    kinds = {
        "judge.function": judge_cfg.function,
        "judge.reward_model": judge_cfg.reward_model,
        "judge.llm.path": judge_cfg.llm.path,
    }
    return [key for key, value in kinds.items() if value is not None]


def check_judge_settings(judge_cfg: JudgeConfig) -> None:
    """The `judge` section's rules on its own (no file or model read): at most one kind set, one weight per
    function, sizes >= 1. `ConfigError`, one line."""
    kinds = _kinds_set(judge_cfg)
    if len(kinds) > 1:
        raise ConfigError(f"{' and '.join(kinds)} are both set: a run uses one judge, set only one of them")
    if judge_cfg.batch_size < 1:
        raise ConfigError(f"judge.batch_size={judge_cfg.batch_size}: must be >= 1")
    if judge_cfg.llm.max_new_tokens < 1:
        raise ConfigError(f"judge.llm.max_new_tokens={judge_cfg.llm.max_new_tokens}: must be >= 1")
    if judge_cfg.weights is not None:
        if judge_cfg.function is None:
            raise ConfigError(
                "judge.weights is set without judge.function: weights apply to reward functions"
            )
        specs = _function_specs(judge_cfg)
        if len(judge_cfg.weights) != len(specs):
            raise ConfigError(
                f"judge.weights has {len(judge_cfg.weights)} entries for {len(specs)} judge.function entries: "
                "give one each"
            )
    elif judge_cfg.function is not None:
        _function_specs(judge_cfg)


def check_judge(judge_cfg: JudgeConfig) -> None:
    """Everything that can be checked before any weights load: `check_judge_settings`, then the functions
    resolve (a file is imported), the reward model's config has one label, the LLM judge's model and template
    exist. `ConfigError`, one line."""
    check_judge_settings(judge_cfg)
    if judge_cfg.function is not None:
        _resolve_functions(judge_cfg)
    elif judge_cfg.reward_model is not None:
        _check_reward_model_config(str(judge_cfg.reward_model))
    elif judge_cfg.llm.path is not None:
        if judge_cfg.llm.path != POLICY:
            _check_source(str(judge_cfg.llm.path), "judge.llm.path")
        grading_template(judge_cfg.llm.template)


def build_judge(
    judge_cfg: JudgeConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    policy: Any = None,
    policy_tokenizer: Any = None,
    policy_chat_template: str | None = None,
) -> Judge:
    """The judge the `judge` section names. A judge model is loaded in `dtype` (the run's `model.dtype`;
    None: as saved) on `device`; `policy` (the causal LM itself, not a DDP/DPOModel wrapper) and its tokenizer
    serve `judge.llm.path: policy`, with the run's chat template (`policy_chat_template`, the Jinja text of
    `data.chat_template`; None: the tokenizer's own). Raises `ConfigError` for a section naming no judge or a
    bad one."""
    check_judge(judge_cfg)
    if judge_cfg.function is not None:
        return FunctionJudge(_resolve_functions(judge_cfg), _weights(judge_cfg))
    if judge_cfg.reward_model is not None:
        return RewardModelJudge.load(str(judge_cfg.reward_model), dtype, device, judge_cfg.batch_size)
    if judge_cfg.llm.path is not None:
        template = grading_template(judge_cfg.llm.template)
        if judge_cfg.llm.path == POLICY:
            if policy is None or policy_tokenizer is None:
                raise ValueError(
                    "judge.llm.path=policy needs the policy and its tokenizer passed to build_judge"
                )
            model, tokenizer, name = policy, policy_tokenizer, "the policy (self-rewarding)"
            chat_template = policy_chat_template or tokenizer_template(tokenizer)
        else:
            model, tokenizer = _load_causal_lm(str(judge_cfg.llm.path), dtype, device)
            name, chat_template = str(judge_cfg.llm.path), tokenizer_template(tokenizer)
        settings = (template, judge_cfg.llm.max_new_tokens, judge_cfg.batch_size)
        return LLMJudge(model, tokenizer, chat_template, *settings, name)
    raise ConfigError("no judge is set: set judge.function, judge.reward_model or judge.llm.path")


# --- reward functions -----------------------------------------------------------------------------------------

RewardFunction = Callable[..., Sequence[Any]]
_FILE_MODULES: dict[Path, ModuleType] = {}  # user files imported once per process


def _function_specs(judge_cfg: JudgeConfig) -> list[str]:
    value = judge_cfg.function
    specs = [value] if isinstance(value, str) else list(value)
    if not specs:
        raise ConfigError(
            "judge.function is an empty list: name at least one 'file.py:name' or 'module:name'"
        )
    return [str(spec) for spec in specs]


def _resolve_functions(judge_cfg: JudgeConfig) -> list[tuple[str, RewardFunction]]:
    """Each `judge.function` entry as (its spec, the callable)."""
    return [(spec, resolve_function(spec)) for spec in _function_specs(judge_cfg)]


def _weights(judge_cfg: JudgeConfig) -> list[float]:
    if judge_cfg.weights is None:
        return [1.0] * len(_function_specs(judge_cfg))
    return [float(w) for w in judge_cfg.weights]


def resolve_function(spec: str) -> RewardFunction:
    """`"path/to/file.py:name"` (the file is imported: its code runs) or `"package.module:name"`."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(
            f"judge.function={spec!r}: expected 'path/to/file.py:name' or 'package.module:name'"
        )
    if where.endswith(".py"):
        module = _import_file(Path(where).expanduser(), spec)
        origin = f"file {where}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # the user's module: any error it raises while importing
            raise ConfigError(
                f"judge.function={spec!r}: importing module {where} failed: {_one_line(e)}"
            ) from None
        origin = f"module {where}"
    if not hasattr(module, name):
        raise ConfigError(f"judge.function={spec!r}: {origin} has no {name!r}")
    function = getattr(module, name)
    if not callable(function):
        raise ConfigError(
            f"judge.function={spec!r}: {name} in {origin} is a {type(function).__name__}, not a function"
        )
    return function


def _import_file(path: Path, spec: str) -> ModuleType:
    resolved = path.resolve()
    if resolved in _FILE_MODULES:
        return _FILE_MODULES[resolved]
    if not resolved.is_file():
        raise ConfigError(f"judge.function={spec!r}: file {path} not found")
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"preftune_user_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the user's file look themselves up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error it raises while importing
        del sys.modules[module_name]
        raise ConfigError(f"judge.function={spec!r}: importing {path} failed: {_one_line(e)}") from None
    _FILE_MODULES[resolved] = module
    return module


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _checked_rewards(spec: str, returned: Any, expected: int) -> list[float]:
    """A reward function's output as floats (None: NaN, as in TRL), or a one-line `ConfigError`."""
    what = f"judge.function {spec} returned"
    if hasattr(returned, "tolist"):  # a numpy array or a tensor
        returned = returned.tolist()
    if isinstance(returned, (str, bytes)) or not isinstance(returned, Sequence):
        raise ConfigError(
            f"{what} {_short(returned)} ({type(returned).__name__}): expected a list of {expected} numbers"
        )
    if len(returned) != expected:
        raise ConfigError(
            f"{what} {len(returned)} values for {expected} completions: return one per completion"
        )
    rewards = []
    for i, value in enumerate(returned):
        if value is None:
            rewards.append(math.nan)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            rewards.append(float(value))
        else:
            raise ConfigError(
                f"{what} {_short(value)} ({type(value).__name__}) at position {i}: expected a number (or None)"
            )
    return rewards


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class FunctionJudge:
    """Reward functions called as TRL calls them; with several, the weighted sum of those that gave a number
    (NaN only where every function returned None)."""

    def __init__(self, functions: list[tuple[str, RewardFunction]], weights: list[float]):
        self.functions, self.weights = functions, weights
        parts = [
            spec if w == 1.0 else f"{w:g} x {spec}" for (spec, _), w in zip(functions, weights, strict=True)
        ]
        self.description = f"function {' + '.join(parts)}"

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        **columns: list,
    ) -> Scores:
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        given = (
            [[{"role": "assistant", "content": text}] for text in completions]
            if conversational
            else list(completions)
        )
        totals = [math.nan] * len(completions)
        for (spec, function), weight in zip(self.functions, self.weights, strict=True):
            returned = function(
                prompts=list(prompts),
                completions=given,
                completion_ids=[list(c) for c in completion_ids],
                **columns,
            )
            for i, reward in enumerate(_checked_rewards(spec, returned, len(completions))):
                if not math.isnan(reward):
                    totals[i] = weight * reward + (0.0 if math.isnan(totals[i]) else totals[i])
        return Scores(totals, sum(math.isnan(r) for r in totals))


# --- reward model ---------------------------------------------------------------------------------------------


def _check_source(path: str, key: str) -> None:
    from preftune.modeling.hub import check_model_source

    check_model_source(path, key)


def _check_reward_model_config(path: str) -> None:
    from transformers import AutoConfig

    _check_source(path, "judge.reward_model")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"judge.reward_model={path}: its config.json cannot be read: {_one_line(e)}"
        ) from None
    architectures = config.architectures or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"judge.reward_model={path} is a {architectures[0]}, not a sequence-classification model: "
            "point it at a reward model (AutoModelForSequenceClassification with num_labels=1)"
        )
    if config.num_labels != 1:
        raise ConfigError(
            f"judge.reward_model={path} has {config.num_labels} labels: a reward model gives one score "
            "(num_labels=1); use a reward model, not a classifier"
        )


def _as_messages(prompt: Prompt, completion: str) -> list[dict[str, str]]:
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*head, {"role": "assistant", "content": completion}]


class RewardModelJudge:
    """A sequence-classification model with one label, with its own tokenizer (never the policy's ids),
    batched, in eval mode, without gradients. Prompt and completion go through its chat template when it has
    one, else as the concatenated text."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, name: str):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.description = f"reward model {name}"
        self.chat_template = tokenizer_template(tokenizer)

    @classmethod
    def load(
        cls, path: str, dtype: torch.dtype | None, device: torch.device | str, batch_size: int
    ) -> RewardModelJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        if tokenizer.pad_token_id is None:  # batches are padded; the model finds its last real token by it
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        return cls(model.to(device).eval(), tokenizer, batch_size, path)

    def texts(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[str]:
        """What the reward model reads for each completion (its chat template's rendering, or prompt + text)."""
        if self.chat_template:
            return [
                self.tokenizer.apply_chat_template(_as_messages(p, c), tokenize=False)
                for p, c in zip(prompts, completions, strict=True)
            ]
        if prompts and not isinstance(prompts[0], str):
            raise ConfigError(
                f"judge.reward_model {self.description.removeprefix('reward model ')} has no chat template, so it "
                "cannot read conversational prompts: use a reward model with a chat template"
            )
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        **columns: list,
    ) -> Scores:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                add_special_tokens=not self.chat_template,  # a rendered template holds its special tokens
                padding=True,
                return_tensors="pt",
            ).to(device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            rewards.extend(logits[:, 0].float().tolist())
        return Scores(rewards, sum(math.isnan(r) for r in rewards))


# --- LLM judge ------------------------------------------------------------------------------------------------


def grading_template(setting: str | None) -> str:
    """`judge.llm.template`: null (the shipped one), a template string, or a file holding one; it must hold
    `{prompt}` and `{completion}`."""
    if setting is None:
        return GRADING_TEMPLATE
    text = str(setting)
    if "{completion}" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"judge.llm.template={_short(text)}: neither a template (no {{completion}}) nor an existing file"
            )
        text = path.read_text(encoding="utf-8")
    for placeholder in ("{prompt}", "{completion}"):
        if placeholder not in text:
            raise ConfigError(f"judge.llm.template={_short(str(setting))}: the template has no {placeholder}")
    return text


def _load_causal_lm(path: str, dtype: torch.dtype | None, device: torch.device | str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _fill(template: str, **values: str) -> str:
    """The template with each `{name}` replaced (plain replacement: braces elsewhere stay as they are)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def parse_score(answer: str) -> float:
    """The number of the last `Score: N` in the judge's answer; NaN when there is none."""
    found = SCORE_PATTERN.findall(answer)
    return float(found[-1]) if found else math.nan


def parse_verdict(answer: str) -> str | None:
    """`"A"` or `"B"` from the last `Better: A|B` in the answer; None when there is none."""
    found = BETTER_PATTERN.findall(answer)
    return found[-1] if found else None


class LLMJudge:
    """A causal LM grading each completion with a template; the score parsed from its greedy answer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        chat_template: str | None,
        template: str,
        max_new_tokens: int,
        batch_size: int,
        name: str,
    ):
        self.model, self.tokenizer, self.chat_template, self.template = (
            model,
            tokenizer,
            chat_template,
            template,
        )
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.description = f"LLM judge {name}"
        self.last_answers: list[str] = []  # the judge's raw answers of the last call (for logs and tests)

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        **columns: list,
    ) -> Scores:
        questions = [
            _fill(self.template, prompt=_prompt_text(p), completion=c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        self.last_answers = self.answer(questions)
        rewards = [parse_score(a) for a in self.last_answers]
        return Scores(rewards, sum(math.isnan(r) for r in rewards))

    def compare(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Comparisons:
        texts = [_prompt_text(p) for p in prompts]
        questions = [
            _fill(PAIRWISE_TEMPLATE, prompt=t, first=a, second=b)
            for t, a, b in zip(texts, first, second, strict=True)
        ] + [
            _fill(PAIRWISE_TEMPLATE, prompt=t, first=b, second=a)
            for t, a, b in zip(texts, first, second, strict=True)
        ]
        self.last_answers = self.answer(questions)
        verdicts = [parse_verdict(a) for a in self.last_answers]
        n = len(texts)
        outcomes = []
        for in_order, swapped in zip(verdicts[:n], verdicts[n:], strict=True):
            if in_order == "A" and swapped == "B":
                outcomes.append(1.0)
            elif in_order == "B" and swapped == "A":
                outcomes.append(0.0)
            else:  # the orders disagree (position bias), or an answer gave no verdict
                outcomes.append(0.5)
        return Comparisons(outcomes, sum(v is None for v in verdicts))

    def render(self, question: str) -> list[int]:
        """The judge's input ids for one question: a user turn under its chat template, else the plain text."""
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(question).input_ids

    @torch.no_grad()
    def answer(self, questions: Sequence[str]) -> list[str]:
        """The judge's greedy answers (cut at EOS), in batches of left-padded questions; the model is put in
        eval mode for the call and its train mode restored."""
        from transformers import GenerationConfig

        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        settings = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
        )
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.train(False)
        answers = []
        try:
            for start in range(0, len(questions), self.batch_size):
                encoded = [self.render(q) for q in questions[start : start + self.batch_size]]
                width = max(len(ids) for ids in encoded)
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
                output = self.model.generate(ids, attention_mask=mask, generation_config=settings)
                for row in output[:, width:].tolist():
                    row = row[: row.index(eos)] if eos in row else row
                    answers.append(self.tokenizer.decode(row, skip_special_tokens=True))
        finally:
            self.model.train(was_training)
        return answers

"""Online DPO: sampling, pairing, the online step, generations.jsonl, ranks and resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from preftune import losses
from preftune.cli import main
from preftune.config import load_config
from preftune.data.pairing import DATA_RESPONSE, pair_completions, penalized
from preftune.modeling.generation import HFGenerator, SamplingSettings, prompt_seed, sample_tokens
from preftune.training.recipe import train
from tests.conftest import WORDS, records, sentence, write_jsonl
from tests.test_distributed import torchrun

# The judge: how many times the letter "a" occurs in the completion (hand-checkable, varied, rarely tied).
JUDGE = '''
import os, signal
from pathlib import Path

def count_a(prompts, completions, completion_ids, **kwargs):
    return [float(text.count("a")) for text in completions]

def constant(prompts, completions, **kwargs):
    return [1.0 for _ in completions]

def kill_on_third_call(prompts, completions, **kwargs):
    """count_a, but the process SIGKILLs itself on its 3rd call of a first run (after generating step 3)."""
    calls = Path(os.environ["PREFTUNE_TEST_CALLS"])
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 3 and not Path(str(calls) + ".killed").exists():
        Path(str(calls) + ".killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return count_a(prompts, completions)
'''


def count_a(completions: list[str]) -> list[float]:
    return [float(text.count("a")) for text in completions]


@pytest.fixture(scope="module")
def online_files(tmp_path_factory):
    """Prompt-only train records (text), validation pairs, and the judge file."""
    root = tmp_path_factory.mktemp("online")
    rng = random.Random(3)
    prompts = [{"prompt": sentence(rng, rng.randint(2, 8))} for _ in range(32)]
    validation = [
        {"prompt": sentence(rng, 4), "chosen": sentence(rng, 3), "rejected": sentence(rng, 5)}
        for _ in range(8)
    ]
    judge = root / "judge.py"
    judge.write_text(JUDGE)
    return {
        "train": write_jsonl(root / "prompts.jsonl", prompts),
        "validation": write_jsonl(root / "validation.jsonl", validation),
        "judge": judge,
    }


def online_overrides(model_dir: Path, files: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"data.train={files['train']}",
        f"output_dir={output_dir}",
        "data.max_seq_length=40",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "online.enabled=true",
        "online.num_generations=3",
        "online.max_new_tokens=12",
        f"judge.function={files['judge']}:count_a",
        "optim.lr=5e-3",
        "trainer.max_steps=3",
        "trainer.val_before_training=false",
        "trainer.val_check_interval=100",
        "trainer.save_interval=100",
        *extra,
    ]


def run_online(tmp_path: Path, name: str, model_dir: Path, files: dict, *extra: str) -> Path:
    output_dir = tmp_path / name
    train(load_config(None, online_overrides(model_dir, files, output_dir, *extra)))
    return output_dir


def generations(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]


# -- sampling --------------------------------------------------------------------------------------------
def test_sample_tokens_by_hand():
    # probabilities 0.5 (token 2), 0.3 (token 0), 0.2 (token 1): sorted cumulative 0.5, 0.8, 1.0
    logits = torch.tensor([0.3, 0.2, 0.5]).log().expand(4, 3)
    uniforms = torch.tensor([0.1, 0.6, 0.85, 0.79])
    plain = SamplingSettings(max_new_tokens=1)
    assert sample_tokens(logits, uniforms, plain).tolist() == [2, 0, 1, 0]
    # top_k=2 keeps tokens 2 and 0 (mass 0.8): u x 0.8 against 0.5 -> 0.08 (2), 0.48 (2), 0.68 (0), 0.632 (0)
    assert sample_tokens(logits, uniforms, SamplingSettings(1, top_k=2)).tolist() == [2, 2, 0, 0]
    # top_p=0.5: the mass before token 0 is 0.5, not < 0.5: only token 2 is kept
    assert sample_tokens(logits, uniforms, SamplingSettings(1, top_p=0.5)).tolist() == [2, 2, 2, 2]
    assert sample_tokens(logits, uniforms, SamplingSettings(1, temperature=0)).tolist() == [2, 2, 2, 2]
    assert prompt_seed(1, 2, 3) == prompt_seed(1, 2, 3) != prompt_seed(1, 2, 4)


def test_generator_greedy_equals_hf_generate_and_leaves_state(tiny_model_dir, tokenizer):
    """Greedy: the KV-cache batch (left padded) equals transformers' generate run prompt by prompt; the
    global RNG and the train mode are untouched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    model.train()
    rng = random.Random(0)
    prompts = [tokenizer(sentence(rng, rng.randint(1, 9)))["input_ids"] for _ in range(5)]
    eos = tokenizer.eos_token_id
    state = torch.random.get_rng_state()
    generator = HFGenerator(model, SamplingSettings(10, temperature=0), stop_ids=[eos], pad_id=eos)
    out = generator.generate(prompts, [0] * 5, 2)
    assert model.training and torch.equal(state, torch.random.get_rng_state())
    model.eval()
    for prompt, group in zip(prompts, out, strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(prompt) :].tolist()
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert group[0].ids == group[1].ids == expected
        assert group[0].ended == (expected[-1] == eos)


def test_sampling_depends_only_on_the_prompt_and_its_seed(tiny_model_dir, tokenizer):
    """A prompt's K completions are the same alone or batched with other prompts of other lengths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    rng = random.Random(1)
    prompts = [tokenizer(sentence(rng, rng.randint(1, 12)))["input_ids"] for _ in range(8)]
    seeds = [prompt_seed(5, 1, i) for i in range(8)]
    eos = tokenizer.eos_token_id
    generator = HFGenerator(model, SamplingSettings(16), stop_ids=[eos], pad_id=eos)
    together = generator.generate(prompts, seeds, 3)
    alone = [generator.generate([p], [s], 3)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert together == alone
    assert len({tuple(c.ids) for group in together for c in group}) > 8  # sampled, not all the same


# -- pairing ---------------------------------------------------------------------------------------------
def test_pairing_rules():
    nan = math.nan
    assert pair_completions([1.0, 3.0, 0.0, 3.0], "best_vs_worst", 0.0).pairs == [(1, 2)]
    assert pair_completions([2.0, 2.0, 2.0], "best_vs_worst", 0.0).pairs == []  # a tie: dropped, counted
    assert pair_completions([2.0, 2.0, 2.0], "best_vs_worst", 0.0).ties == 1
    assert pair_completions([1.0, 1.5], "best_vs_worst", 0.5).ties == 1  # gap <= min_reward_gap
    assert pair_completions([nan, 1.0, nan, 0.0], "best_vs_worst", 0.0).pairs == [(1, 3)]  # NaN never paired
    assert pair_completions([nan, 1.0], "best_vs_worst", 0.0).pairs == []
    all_pairs = pair_completions([1.0, 3.0, 1.0, nan], "all_pairs", 0.0)
    assert all_pairs.pairs == [(1, 0), (1, 2)] and all_pairs.ties == 1 and all_pairs.candidates == 3
    assert pair_completions([1.0, 0.0, 2.0], "spin", 0.0).pairs == [(DATA_RESPONSE, 1)]
    assert pair_completions([], "spin", 0.0).pairs == [(DATA_RESPONSE, 0)]  # no judge: the first sample
    # the missing-EOS penalty: 3 - 2.5 = 0.5 < 1, so the unfinished best becomes the worst
    assert penalized([3.0, 1.0], [False, True], 2.5) == [0.5, 1.0]
    assert pair_completions(penalized([3.0, 1.0], [False, True], 2.5), "best_vs_worst", 0.0).pairs == [(1, 0)]
    assert penalized([3.0, 1.0], [False, True], None) == [3.0, 1.0]


# -- the online step -------------------------------------------------------------------------------------
def test_online_run_records_the_judge_and_starts_at_log_2(tmp_path, tiny_model_dir, online_files):
    """generations.jsonl holds the judge's own numbers for what was sampled; each pair is the best against
    the worst of its prompt; step 1's loss is log 2 (the policy is the reference); the step metrics are
    logged."""
    output_dir = run_online(tmp_path, "run", tiny_model_dir("llama"), online_files)
    lines = generations(output_dir)
    assert [line["step"] for line in lines] == [1] * 4 + [2] * 4 + [3] * 4
    for line in lines:
        assert line["rewards"] == count_a(line["completions"])
        rewards = line["rewards"]
        if line["chosen_index"] is None:
            assert max(rewards) == min(rewards)
        else:
            assert (
                rewards[line["chosen_index"]]
                == max(rewards)
                > rewards[line["rejected_index"]]
                == min(rewards)
            )
    train_records = records(output_dir, "train")
    assert train_records[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    first = train_records[1]
    pairs = [line for line in lines if line["step"] == 1 and line["chosen_index"] is not None]
    assert first["train/online_pairs"] == len(pairs)
    step_rewards = [r for line in lines if line["step"] == 1 for r in line["rewards"]]
    assert first["train/online_reward_mean"] == pytest.approx(sum(step_rewards) / len(step_rewards))
    assert first["train/online_reward_max"] == max(step_rewards)
    for key in (
        "online_tie_share",
        "online_eos_share",
        "online_completion_length",
        "online_generation_time",
        "online_generation_tokens_per_sec",
        "online_reward_gap",
    ):
        assert f"train/{key}" in first

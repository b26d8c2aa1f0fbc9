"""Online DPO: sampling, pairing, the online step, generations.jsonl, ranks and resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune import losses
from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.pairing import DATA_RESPONSE, pair_completions, penalized
from preftune.modeling.generation import HFGenerator, SamplingSettings, prompt_seed, sample_tokens
from preftune.recipe import train
from tests.conftest import records, sentence, write_jsonl

# The judge: how many times the letter "a" occurs in the completion (hand-checkable, varied, rarely tied).
JUDGE = '''
import os, signal
from pathlib import Path

def count_a(prompts, completions, completion_ids, **kwargs):
    return [float(text.count("a")) for text in completions]

def token_sum(prompts, completions, completion_ids, **kwargs):
    return [sum(ids) / 100 for ids in completion_ids]

def constant(prompts, completions, **kwargs):
    return [1.0 for _ in completions]

def kill_on_third_call(prompts, completions, completion_ids, **kwargs):
    """count_a, but the process SIGKILLs itself on its 3rd call of a first run (after generating step 3)."""
    calls = Path(os.environ["PREFTUNE_TEST_CALLS"])
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 3 and not Path(str(calls) + ".killed").exists():
        Path(str(calls) + ".killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return token_sum(prompts, completions, completion_ids)
'''


def count_a(completions: list[str]) -> list[float]:
    return [float(text.count("a")) for text in completions]


def write_online_files(root: Path) -> None:
    """conftest's ``online_files``: prompt-only train records (text), validation pairs, and the judge file."""
    rng = random.Random(3)
    prompts = [{"prompt": sentence(rng, rng.randint(2, 8))} for _ in range(32)]
    validation = [
        {"prompt": sentence(rng, 4), "chosen": sentence(rng, 3), "rejected": sentence(rng, 5)}
        for _ in range(8)
    ]
    write_jsonl(root / "prompts.jsonl", prompts)
    write_jsonl(root / "validation.jsonl", validation)
    (root / "judge.py").write_text(JUDGE)


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
        f"judge.function={files['judge']}:token_sum",
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
    output_dir = run_online(
        tmp_path,
        "run",
        tiny_model_dir("llama"),
        online_files,
        f"judge.function={online_files['judge']}:count_a",
        f"data.validation={online_files['validation']}",
        "trainer.val_check_interval=2",
    )
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
    assert sorted(records(output_dir, "val")) == [2, 3]  # validation on the data.validation pairs
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


@pytest.mark.slow
def test_every_loss_runs_online(tmp_path, tiny_model_dir, online_files):
    """One online step of each loss of the family: a finite loss, and log 2 at step 1 where the loss is
    DPO's sigmoid of a zero margin."""
    model_dir = tiny_model_dir("llama")
    for name in losses.LOSS_NAMES:
        output_dir = run_online(
            tmp_path,
            name,
            model_dir,
            online_files,
            f"dpo.preference_loss={name}",
            "trainer.max_steps=1",
            "online.num_generations=2",
            "online.max_new_tokens=6",
        )
        loss = records(output_dir, "train")[1]["train/loss"]
        assert math.isfinite(loss), name
        if name == "dpo":
            assert loss == pytest.approx(math.log(2), abs=1e-5)


def test_all_tied_batches_are_skipped(tmp_path, tiny_model_dir, online_files):
    """A judge that scores everything the same: every prompt ties, every global batch is skipped (counted,
    no NaN, no update) and the run finishes."""
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("llama")
    output_dir = run_online(
        tmp_path, "ties", model_dir, online_files, f"judge.function={online_files['judge']}:constant"
    )
    steps = records(output_dir, "train")
    assert sorted(steps) == [1, 2, 3]
    for rec in steps.values():
        assert rec["train/online_skipped_batch"] == 1.0 and rec["train/online_tie_share"] == 1.0
        assert "train/loss" not in rec
    assert all(line["chosen_index"] is None for line in generations(output_dir))
    before = load_file(model_dir / "model.safetensors")
    after = load_file(output_dir / "checkpoints" / "step_3" / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_all_pairs_and_spin_run(tmp_path, tiny_model_dir, online_files, pair_files):
    """all_pairs trains on every unequal pair of a prompt; spin pairs the data's chosen response (the
    pairs' prompts are the prompt set) with a sample, with or without a judge."""
    model_dir = tiny_model_dir("llama")
    output_dir = run_online(
        tmp_path,
        "all",
        model_dir,
        online_files,
        "online.pairing=all_pairs",
        "online.num_generations=4",
        "trainer.max_steps=1",
    )
    step = records(output_dir, "train")[1]
    expected = sum(
        sum(1 for i, a in enumerate(line["rewards"]) for b in line["rewards"][i + 1 :] if a != b)
        for line in generations(output_dir)
    )
    assert step["train/online_pairs"] == expected and step["train/loss"] == pytest.approx(
        math.log(2), abs=1e-5
    )
    output_dir = run_online(
        tmp_path,
        "spin",
        model_dir,
        {**online_files, "train": pair_files["train"]},
        "online.pairing=spin",
        "trainer.max_steps=1",
        "judge.function=null",
        "online.num_generations=1",
    )
    lines = generations(output_dir)
    assert all(line["chosen_index"] == DATA_RESPONSE and line["rejected_index"] == 0 for line in lines)
    assert records(output_dir, "train")[1]["train/online_pairs"] == 4


def test_lora_online(tmp_path, tiny_model_dir, online_files, forbid_model_copies):
    """LoRA: the reference is the policy with its adapters off (no copy); step 1 is log 2."""
    output_dir = run_online(
        tmp_path, "lora", tiny_model_dir("llama"), online_files, "model.lora.r=4", "trainer.max_steps=1"
    )
    assert records(output_dir, "train")[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_packed_shared_prompt_online_equals_padded(tmp_path, tiny_model_dir, online_files):
    """The pairs laid out packed with a shared prompt: the same generations and losses as padded (1e-5)."""
    model_dir = tiny_model_dir("llama")
    extra = ("trainer.max_steps=2", "online.pairing=all_pairs", "optim.eps=1e-4")
    padded = run_online(tmp_path, "padded", model_dir, online_files, *extra)
    packed = run_online(
        tmp_path,
        "packed",
        model_dir,
        online_files,
        *extra,
        "data.packing=true",
        "data.share_prompt=true",
        "data.pack_length=80",
        "data.micro_batch_size=1",
    )
    assert generations(packed) == generations(padded)
    assert train_losses(packed) == pytest.approx(train_losses(padded), abs=1e-5)
    assert train_losses(padded)[0] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("online.num_generations=1", "online.num_generations=1: a pair needs two completions"),
        ("judge.function=null", "online.enabled needs a judge"),
        ("reference.mode=precompute", "reference.mode=precompute cannot apply online"),
        ("online.pairing=best", "online.pairing='best': use one of"),
        ("online.top_p=0", "online.top_p=0.0: must be in (0, 1]"),
        ("online.max_new_tokens=40", "data.max_seq_length=40 leaves no room"),
        ("online.pairing=spin", "online.pairing=spin trains towards the data's responses"),
    ],
)
def test_online_config_errors(tmp_path, tiny_model_dir, online_files, capsys, override, message):
    args = online_overrides(tiny_model_dir("llama"), online_files, tmp_path / "bad", override)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    capsys.readouterr()  # what building the tiny model printed
    assert main(["train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# -- ranks and resume ------------------------------------------------------------------------------------
# test_distributed's two-process launch trains these online runs under DDP and FSDP2 (two_process_runs)
TWO_RANKS = ("optim.eps=1e-4", "trainer.max_steps=2", "online.num_generations=2", "online.max_new_tokens=8")


def train_losses(output_dir: Path) -> list[float]:
    return [rec["train/loss"] for _, rec in sorted(records(output_dir, "train").items())]


@pytest.mark.slow
def test_two_processes_generate_and_train_as_one(tmp_path, tiny_model_dir, online_files, two_process_runs):
    """torchrun with 2 gloo ranks, DDP and FSDP2 (in test_distributed's launch): the same generations.jsonl and
    losses (1e-5) as one process. Each rank samples its half of the prompts from the prompts' own seeds."""
    single = run_online(tmp_path, "single", tiny_model_dir("llama"), online_files, *TWO_RANKS)
    expected = generations(single)
    assert len(expected) == 8
    for strategy in ("ddp", "fsdp2"):
        multi = two_process_runs / f"online-{strategy}"
        assert generations(multi) == expected, strategy
        assert train_losses(multi) == pytest.approx(train_losses(single), abs=1e-5), strategy


@pytest.mark.slow
def test_resume_after_sigkill_mid_step_equals_a_straight_run(
    tmp_path, tiny_model_dir, online_files, monkeypatch, capsys
):
    """A run SIGKILLed while judging step 3's generations (checkpoint at step 2), then the same command
    again: its generations.jsonl and losses equal a straight run's (the lines of the killed step dropped).
    (The rerun is in this process: the kill is what needs a process of its own.)"""
    model_dir = tiny_model_dir("llama")
    extra = (
        "trainer.max_steps=4",
        "trainer.save_interval=2",
        "online.num_generations=2",
        "online.max_new_tokens=8",
    )
    straight = run_online(tmp_path, "straight", model_dir, online_files, *extra)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    overrides = online_overrides(
        model_dir,
        online_files,
        tmp_path / "killed",
        *extra,
        f"judge.function={online_files['judge']}:kill_on_third_call",
    )
    cmd = [sys.executable, "-m", "preftune", "train", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_TEST_CALLS": str(tmp_path / "calls")}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert [line["step"] for line in generations(tmp_path / "killed")][-1] == 2  # step 3 never recorded
    monkeypatch.setenv("PREFTUNE_TEST_CALLS", str(tmp_path / "calls"))
    capsys.readouterr()
    assert main(["train", "--config", str(config), *overrides]) == 0  # the same command, in this process
    assert "resuming from" in capsys.readouterr().out
    assert generations(tmp_path / "killed") == generations(straight)
    assert train_losses(tmp_path / "killed") == pytest.approx(train_losses(straight), abs=1e-6)


def test_demo_rule_reward_by_hand():
    """The online demo's judge: 1.0 exactly when the rule is obeyed, else five graded checks summed over 6."""
    from preftune.tools.demo import rule_reward

    prompt = "List 3 fruits in lowercase, alphabetically."
    got = rule_reward(
        [prompt] * 4,
        ["apple, fig, plum", "plum, fig, apple", "apple, fig", "APPLE, dog, dog"],
        completion_ids=[[1]] * 4,
    )
    # plum, fig, apple: all of the category, count, distinct, case; the order wrong -> 4 / 6
    # apple, fig: category 1, count 1 - 1/3, distinct 2/3, case 1, order 1 -> (13/3) / 6
    # APPLE, dog, dog: of the category 1/3, count 1, distinct 1/3, case 0 (APPLE), order 0 (one item)
    assert got == pytest.approx([1.0, 4 / 6, 13 / 18, 5 / 18])
    # a repeat earns nothing: apple, fig, fig: distinct of the category 2/3, count 1, distinct 2/3, case 1,
    # order 0 (not strictly sorted) -> (10/3) / 6, below "apple, fig" (online training learned to repeat)
    assert rule_reward([prompt], ["apple, fig, fig"]) == pytest.approx([10 / 18])
    assert rule_reward([prompt, prompt], ["", "dog, cat"]) == [0.0, 0.0]  # no item of the category: 0


def test_prompts_tokenized_as_offline(tmp_path, tokenizer):
    """Prompt-only records, text and conversational, get exactly the prompt ids offline training gives the
    same prompt in a pair (one BOS; the chat template's generation prompt); duplicates are dropped."""
    from preftune.config_checks import load_config
    from preftune.data.chat import load_chat_template
    from preftune.data.formats import parse_record
    from preftune.data.prompts import load_prompts
    from preftune.data.tokenize import PairTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a red fish"}]
    records = [{"prompt": "the cat sits"}, {"prompt": messages}, {"prompt": "the cat sits", "extra": 1}]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    cfg = load_config(None, ["model.path=unused", f"data.train={path}", "data.chat_template=chatml"])
    prompts = load_prompts(cfg.data, tokenizer, None, max_prompt_length=512)
    assert len(prompts) == 2
    pair_tokenizer = PairTokenizer(tokenizer, 512, load_chat_template("chatml"))
    text = pair_tokenizer(
        parse_record({"prompt": "the cat sits", "chosen": "a", "rejected": "b"}, "trl", "t")
    )
    chat = pair_tokenizer(
        parse_record(
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "trl_conversational",
            "t",
        )
    )
    assert prompts[0]["prompt_ids"] == text["prompt_ids"]
    assert prompts[1]["prompt_ids"] == chat["prompt_ids"]
    # chatml's <|im_end|> is no special token of this tokenizer: the template has no end-of-turn token and
    # responses end with EOS, offline and online alike
    assert pair_tokenizer.chat.end_id is None and prompts.stop_ids == [tokenizer.eos_token_id]

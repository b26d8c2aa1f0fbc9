"""Iterative DPO (online.iterations): generate, judge, pair, then the offline recipe trains (packed, shared
prompt, reference precomputed), per iteration; reference: previous; a SIGKILL inside an iteration's generation
resumes to the straight run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.dataset import PreferenceDataset
from preftune.recipe import iteration_config, train
from preftune.training.iteration import iteration_prompts
from tests.conftest import records
from tests.test_online import online_overrides

KILLING_JUDGE = """
import os, signal
from pathlib import Path

def token_sum(prompts, completions, completion_ids, **kwargs):
    return [sum(ids) / 100 for ids in completion_ids]

def kill_on_fourth_call(prompts, completions, completion_ids, **kwargs):
    '''token_sum, but the first run SIGKILLs itself on the 4th call: iteration 2's second chunk.'''
    calls = Path(os.environ["PREFTUNE_TEST_CALLS"])
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 4 and not Path(str(calls) + ".killed").exists():
        Path(str(calls) + ".killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return token_sum(prompts, completions, completion_ids)
"""
ITERATIVE = (
    "online.iterations=2",
    "online.prompts_per_iteration=8",  # 2 chunks of data.global_batch_size=4 prompts
    "online.reference=previous",
    "online.num_generations=2",
    "online.max_new_tokens=8",
    "trainer.max_steps=-1",
    "trainer.max_epochs=1",
    # every offline feature applies to an iteration's training
    "data.packing=true",
    "data.share_prompt=true",
    "reference.mode=precompute",
)


def overrides(model_dir: Path, files: dict, output_dir: Path, *extra: str) -> list[str]:
    validation = f"data.validation={files['validation']}"  # text pairs beside the tokenized pairs file
    return online_overrides(model_dir, files, output_dir, *ITERATIVE, validation, *extra)


def generations(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]


def train_records(output_dir: Path, n: int) -> dict[int, dict]:
    return records(output_dir / "iterations" / f"{n:03d}" / "train", "train")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, online_files):
    output_dir = tmp_path_factory.mktemp("iterative") / "straight"
    train(load_config(None, overrides(tiny_model_dir("llama"), online_files, output_dir)))
    return output_dir


def test_prompts_per_iteration_are_drawn_by_seed_and_iteration():
    first, second = iteration_prompts(32, 8, 1234, 1), iteration_prompts(32, 8, 1234, 2)
    assert first == sorted(set(first)) and len(first) == 8 and first != second
    assert first == iteration_prompts(32, 8, 1234, 1)  # the same draw on resume
    assert iteration_prompts(5, None, 1234, 1) == iteration_prompts(5, 9, 1234, 3) == [0, 1, 2, 3, 4]


def test_two_iterations_with_the_previous_policy_as_reference(straight, tiny_model_dir, online_files):
    """Iteration 2 trains iteration 1's policy against iteration 1's policy: its first step is exactly DPO's
    start (loss log 2, rewards 0), though iteration 1 moved the policy; with reference: initial its reference
    is the starting model instead."""
    lines = generations(straight)
    assert [line["iteration"] for line in lines] == [1] * 8 + [2] * 8
    indices = [[line["index"] for line in lines if line["iteration"] == n] for n in (1, 2)]
    assert indices == [iteration_prompts(32, 8, 1234, 1), iteration_prompts(32, 8, 1234, 2)]
    per_iteration = records(straight, "iteration")  # the generation metrics, one record per iteration
    for n in (1, 2):
        pairs = (straight / "iterations" / f"00{n}" / "pairs.jsonl").read_text().splitlines()
        assert len(pairs) == sum(line["chosen_index"] is not None for line in lines if line["iteration"] == n)
        assert per_iteration[n]["iteration/online_pairs"] == len(pairs)
        rewards = [r for line in lines if line["iteration"] == n for r in line["rewards"]]
        assert per_iteration[n]["iteration/online_reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
        first, last = train_records(straight, n)[1], train_records(straight, n)[2]
        assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5), n
        assert first["train/rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6), n
        assert abs(last["train/reward_margin_mean"]) > 1e-3, n  # the iteration moved its policy
        assert 2 in records(straight / "iterations" / f"00{n}" / "train", "val"), n  # validated at its end
    # the pairs file (format tokenized) gives offline training the sampled token ids themselves
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    written = [
        json.loads(line)
        for line in (straight / "iterations" / "001" / "pairs.jsonl").read_text().splitlines()
    ]
    trained = PreferenceDataset(
        str(straight / "iterations" / "001" / "pairs.jsonl"), tokenizer, 40, format="tokenized"
    )
    assert len(trained) == len(written) > 0
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [[trained[i][k] for k in keys] for i in range(len(trained))] == [
        [p[k] for k in keys] for p in written
    ]
    assert written[0]["chosen"] == tokenizer.decode(written[0]["chosen_ids"], skip_special_tokens=True)
    policy_1 = str(straight / "iterations" / "001" / "policy")
    assert (Path(policy_1) / "config.json").is_file()
    cfg = load_config(None, overrides(tiny_model_dir("llama"), online_files, straight))
    pairs = straight / "iterations" / "002" / "pairs.jsonl"
    previous = iteration_config(cfg, 2, policy_1, pairs)
    assert (previous.model.path, previous.reference.path) == (policy_1, None)  # a frozen copy of the policy
    initial = iteration_config(load_config(None, [*overrides(tiny_model_dir("llama"), online_files, straight),
                                                  "online.reference=initial"]), 2, policy_1, pairs)  # fmt: skip
    assert initial.reference.path == str(tiny_model_dir("llama"))
    assert not initial.online.enabled and initial.data.train == str(pairs)


def test_reference_initial_keeps_the_starting_model(straight, tmp_path, tiny_model_dir, online_files):
    """Iteration 2's training with reference: initial (on the straight run's iteration-2 pairs, from its
    iteration-1 policy) starts away from DPO's log 2: its reference is the starting model, not the policy."""
    args = [*overrides(tiny_model_dir("llama"), online_files, tmp_path), "online.reference=initial"]
    policy_1 = str(straight / "iterations" / "001" / "policy")
    cfg = iteration_config(
        load_config(None, args), 2, policy_1, straight / "iterations" / "002" / "pairs.jsonl"
    )
    train(cfg)
    first = train_records(tmp_path, 2)[1]
    assert abs(first["train/loss"] - math.log(2)) > 1e-3
    assert abs(first["train/rewards_chosen_mean"]) > 1e-3
    assert first["train/rewards_chosen_mean"] != pytest.approx(
        train_records(straight, 2)[1]["train/rewards_chosen_mean"]
    )


@pytest.mark.slow
def test_sigkill_inside_an_iterations_generation_resumes_to_the_straight_run(
    straight,
    tmp_path,
    tiny_model_dir,
    online_files,
    monkeypatch,
    capsys,
):
    """Killed while judging iteration 2's second chunk (its first chunk written), then the same command: the
    generations and every iteration's losses equal the straight run's. (The rerun is in this process: the
    kill is what needs a process of its own.)"""
    judge = tmp_path / "judge.py"
    judge.write_text(KILLING_JUDGE)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    output_dir = tmp_path / "killed"
    args = overrides(
        tiny_model_dir("llama"), online_files, output_dir, f"judge.function={judge}:kill_on_fourth_call"
    )
    cmd = [sys.executable, "-m", "preftune", "train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_TEST_CALLS": str(tmp_path / "calls")}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert sorted(p.name for p in (output_dir / "iterations" / "002" / "chunks").iterdir()) == ["00000.json"]
    monkeypatch.setenv("PREFTUNE_TEST_CALLS", str(tmp_path / "calls"))
    assert main(["train", "--config", str(config), *args]) == 0  # the same command, in this process
    assert "iteration 2: 1 of 2 generation chunks done before, continuing" in capsys.readouterr().out
    assert (tmp_path / "calls").read_text() == "5"  # the killed chunk judged again, nothing else
    assert generations(output_dir) == generations(straight)
    for n in (1, 2):
        losses = [r["train/loss"] for r in train_records(output_dir, n).values()]
        assert losses == pytest.approx(
            [r["train/loss"] for r in train_records(straight, n).values()], abs=1e-6
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("online.iterations=0", "online.iterations=0: must be >= 1"),
        ("online.prompts_per_iteration=0", "online.prompts_per_iteration=0: must be >= 1"),
        ("online.reference=best", "online.reference='best': use initial"),
        # an iteration trains its pairs offline: whole micro-batches, checked before any generation
        ("data.packing=false data.micro_batch_size=3", "data.global_batch_size (4) must be a multiple of 3"),
    ],
)
def test_iterative_config_errors(tmp_path, tiny_model_dir, online_files, capsys, override, message):
    args = overrides(tiny_model_dir("llama"), online_files, tmp_path / "run", *override.split())
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert main(["train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

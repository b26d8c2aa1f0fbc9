"""Training runs end to end: resume equivalence, accumulation, checkpoints, time limit, metrics, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.cli import main
from preftune.training.checkpoint import Checkpointer

from conftest import copy_run, records, run, shared_run

pytestmark = pytest.mark.slow  # end-to-end runs of the real recipe

REQUIRED_METRICS = (
    "loss",
    "sft_loss",
    "preference_loss",
    "acc",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "model.safetensors")


def test_resume_is_identical_to_straight_run(tmp_path, tiny_model_dir, pair_files, straight_run, capsys):
    model_dir, straight = tiny_model_dir("llama"), straight_run  # 6 steps, checkpoints every 2
    common = ("optim.sched.max_steps=6",)
    run(tmp_path, "resumed", model_dir, pair_files, "trainer.max_steps=3", *common)
    assert Checkpointer(tmp_path / "resumed").latest().name == "step_3"
    capsys.readouterr()
    _, resumed = run(tmp_path, "resumed", model_dir, pair_files, "trainer.max_steps=6", *common)
    assert "resuming from" in capsys.readouterr().out
    a, b = records(straight, "train"), records(resumed, "train")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        for key in ("train/loss", "train/acc", "train/grad_norm", "train/lr", "train/consumed_samples"):
            assert a[step][key] == b[step][key], (step, key)
    wa, wb = weights(straight / "checkpoints/step_6"), weights(resumed / "checkpoints/step_6")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    state = json.loads((resumed / "checkpoints/step_6/trainer_state.json").read_text())
    assert state == {
        "step": 6,
        "consumed_samples": 48,
        "epoch": 0,
        "loss_state": {},
    }  # epoch of the last step


@pytest.fixture(scope="session")
def two_steps(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """Tiny llama trained 2 steps (read only: tests resume copies)."""
    settings = ("trainer.max_steps=2",)
    return shared_run(tmp_path_factory, "two-steps", tiny_model_dir("llama"), pair_files, *settings)


def test_rerun_of_finished_run_changes_nothing(tmp_path, tiny_model_dir, pair_files, two_steps):
    model_dir = tiny_model_dir("llama")
    out = copy_run(two_steps, tmp_path, "done")
    before = weights(out / "checkpoints/step_2")
    run(tmp_path, "done", model_dir, pair_files, "trainer.max_steps=2")
    after = weights(out / "checkpoints/step_2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(records(out, "train")) == [1, 2]


def test_max_epochs_minus_one_is_no_limit_and_the_start_line_names_the_limit(
    tmp_path, tiny_model_dir, pair_files, capsys
):
    """README: ``-1``: no limit. ``max_epochs=-1`` used to start "training for -6 steps" and end with no step
    trained and no checkpoint."""
    overrides = ("trainer.max_epochs=-1", "trainer.max_steps=2")
    _, out = run(tmp_path, "no-epoch-limit", tiny_model_dir("llama"), pair_files, *overrides)
    assert (
        "training for 2 steps: max_steps=2 (max_epochs: no limit); 8 pairs a step" in capsys.readouterr().out
    )
    assert sorted(records(out, "train")) == [1, 2] and sorted(records(out, "val")) == [0, 2]
    assert Checkpointer(out).latest().name == "step_2"


def test_gradient_accumulation_matches_full_batch(tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("llama")
    _, full = run(tmp_path, "full", model_dir, pair_files, "trainer.max_steps=3", "data.micro_batch_size=8")
    _, accum = run(tmp_path, "accum", model_dir, pair_files, "trainer.max_steps=3", "data.micro_batch_size=1")
    a, b = records(full, "train"), records(accum, "train")
    for step in a:
        for key in ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-5), (step, key)
        assert 0.0 <= b[step]["train/acc"] <= 1.0
    wa, wb = weights(full / "checkpoints/step_3"), weights(accum / "checkpoints/step_3")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)


def test_metrics_checkpoints_and_validation(tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("qwen2")
    final, out = run(
        tmp_path,
        "run",
        model_dir,
        pair_files,
        "trainer.max_epochs=2",
        "trainer.val_check_interval=0.5",
        "trainer.save_interval=4",
        "trainer.limit_val_batches=1",
    )
    train_recs, val_recs = records(out, "train"), records(out, "val")
    assert sorted(train_recs) == list(range(1, 13))  # 48 pairs / 8 per step = 6 steps per epoch, 2 epochs
    assert sorted(val_recs) == [0, 3, 6, 9, 12]  # the step-0 baseline, then 0.5 of an epoch = every 3 steps
    first = train_recs[1]
    for name in (
        *REQUIRED_METRICS,
        "grad_norm",
        "lr",
        "reward_margin_mean",
        "logps_chosen_mean",
        "logps_rejected_mean",
        "pairs_per_sec",
        "tokens_per_sec",
    ):
        assert f"train/{name}" in first, name
        assert f"val/{name}" in val_recs[3] or name in ("grad_norm", "lr", "pairs_per_sec", "tokens_per_sec")
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert first["train/acc"] == 0.0
    assert train_recs[7]["train/epoch"] == 1
    assert final == {
        k.removeprefix("val/"): v for k, v in val_recs[12].items() if k not in ("step", "timestamp")
    }
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_12", "step_4", "step_8"]
    # the checkpoint is a plain Hugging Face model directory
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_12/model")
    tok = AutoTokenizer.from_pretrained(out / "checkpoints/step_12/model")
    ids = torch.tensor([tok("the cat sits")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.allclose(policy(ids).logits, base(ids).logits), "weights should have changed"


def test_incomplete_checkpoints_are_ignored(tmp_path, tiny_model_dir, pair_files, two_steps, capsys):
    model_dir = tiny_model_dir("llama")
    out = copy_run(two_steps, tmp_path)
    # a crash mid-save leaves a temporary directory; a directory without trainer state is not complete
    (out / "checkpoints/.tmp_step_9_123/model").mkdir(parents=True)
    (out / "checkpoints/step_7/model").mkdir(parents=True)
    assert Checkpointer(out).latest().name == "step_2"
    capsys.readouterr()
    run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=3")
    log = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints/step_2'}" in log
    assert Checkpointer(out).latest().name == "step_3"
    assert sorted(records(out, "train")) == [1, 2, 3]


def test_max_time_validates_saves_and_stops(tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("llama")
    _, out = run(
        tmp_path, "timed", model_dir, pair_files, "trainer.max_steps=50", "trainer.max_time=00:00:00:00"
    )
    assert sorted(records(out, "train")) == [1]
    assert sorted(records(out, "val")) == [0, 1]  # the step-0 baseline, then before stopping
    assert Checkpointer(out).latest().name == "step_1"


def test_cli_train_and_errors(tmp_path, tiny_model_dir, pair_files, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  path: {tiny_model_dir('llama')}\n"
        f"data:\n  train: {pair_files['train']}\n  micro_batch_size: 4\n  global_batch_size: 8\n"
        f"output_dir: {tmp_path / 'cli'}\n"
    )
    cmd = ["train", "--config", str(config)]
    assert main([*cmd, "trainer.max_steps=1"]) == 0, capsys.readouterr().err
    assert (tmp_path / "cli/checkpoints/step_1/model/model.safetensors").is_file()
    capsys.readouterr()
    assert main([*cmd, "trainer.max_step=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.max_step'" in err and "trainer.max_steps" in err
    assert main([*cmd, "data.train=/nonexistent.jsonl"]) == 2
    assert "/nonexistent.jsonl" in capsys.readouterr().err


def test_precomputed_reference_matches_online(tmp_path, tiny_model_dir, pair_files, capsys):
    model_dir = tiny_model_dir("llama")
    online_val, online = run(tmp_path, "online", model_dir, pair_files, "trainer.max_steps=3")
    cached_val, cached = run(
        tmp_path,
        "cached",
        model_dir,
        pair_files,
        "trainer.max_steps=2",
        "reference.mode=precompute",
        "optim.sched.max_steps=3",
    )
    assert "computed into" in capsys.readouterr().out
    cached_val, cached = run(
        tmp_path,
        "cached",
        model_dir,
        pair_files,
        "trainer.max_steps=3",
        "reference.mode=precompute",
        "optim.sched.max_steps=3",
    )
    log = capsys.readouterr().out
    assert "resuming from" in log and "loaded from" in log and "computed into" not in log
    a, b = records(online, "train"), records(cached, "train")
    for step in a:
        for key in ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/rewards_rejected_mean"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    for key in ("loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean"):
        assert cached_val[key] == pytest.approx(online_val[key], abs=1e-5), key


# Adam divides each gradient element by its own magnitude: with eps 1e-8 an element whose gradient is
# ~1e-9 turns summation-order noise into a full-size update, so weights are compared with eps 1e-4.
LAYOUT_COMMON = ("trainer.max_steps=3", "optim.eps=1e-4")


@pytest.fixture(scope="session")
def padded_mistral(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """The padded run every layout below must follow (read only)."""
    return shared_run(
        tmp_path_factory, "padded-mistral", tiny_model_dir("mistral"), pair_files, *LAYOUT_COMMON
    )


@pytest.mark.parametrize(
    "layout",
    [
        ("data.packing=true", "data.micro_batch_size=3"),  # rows per micro-batch: need not divide 8 pairs
        ("data.share_prompt=true",),
        ("data.packing=true", "data.share_prompt=true", "data.pack_length=160"),
        ("data.packing=true", "data.share_prompt=true", "reference.mode=precompute"),
        (
            "data.packing=true",
            "data.share_prompt=true",
            "data.pack_length=160",
            "model.attn_implementation=sdpa",
        ),
        (
            "data.packing=true",
            "data.share_prompt=true",
            "model.activation_checkpointing=true",  # the blocks reach attention through checkpointed layers
        ),
    ],
    ids=[
        "packed",
        "shared",
        "packed+shared",
        "packed+shared+precompute",
        "packed+shared+masks",
        "checkpointed",
    ],
)
def test_packed_layouts_follow_the_padded_trajectory(
    layout, tmp_path, tiny_model_dir, pair_files, padded_mistral
):
    model_dir = tiny_model_dir("mistral")  # sliding window 16: the masks must keep it per sequence
    padded = padded_mistral
    _, packed = run(tmp_path, "packed", model_dir, pair_files, *LAYOUT_COMMON, *layout)
    a, b = records(padded, "train"), records(packed, "train")
    for step in a:
        for key in ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    assert b[1]["train/tokens_per_sec"] > 0
    wa, wb = weights(padded / "checkpoints/step_3"), weights(packed / "checkpoints/step_3")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0, msg=key)
    config = json.loads((packed / "checkpoints/step_3/model/config.json").read_text())
    assert "preftune_varlen" not in json.dumps(config)  # the checkpoint loads without preftune

"""LoRA: the reference is the policy with adapters off (no copy), resume, PEFT checkpoints, export."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.modeling.model import DPOModel
from preftune.modeling.reference import AdaptersOffReference
from preftune.tools.export import export_checkpoint

from conftest import pair_batch, records, run

pytestmark = pytest.mark.slow  # end-to-end runs of the real recipe

LORA = ("model.lora.r=4", "model.lora.alpha=8")


def run_export(checkpoint: Path, output: Path, capsys, *flags: str) -> tuple[int, str]:
    """``preftune export`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = main(["export", "--checkpoint", str(checkpoint), "--output", str(output), *flags])
    return status, capsys.readouterr().err


def test_step_zero_without_a_second_copy(tiny_model_dir, tokenizer, forbid_model_copies):
    cfg = load_config(None, [f"model.path={tiny_model_dir('llama')}", "data.train=x", *LORA])
    model = DPOModel.from_config(cfg)
    assert isinstance(model.reference, AdaptersOffReference)
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = pair_batch(tokenizer, seed=9)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["acc"].item() == 0.0
    # once the adapter has moved, the reference (adapters off) equals the base model
    with torch.no_grad():
        for name, p in model.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    ref_logps = model.reference_logprobs(batch)
    base_logps, _ = model.sequence_logprobs(base, batch)
    torch.testing.assert_close(ref_logps, base_logps, atol=1e-5, rtol=0)
    policy_logps, _ = model.sequence_logprobs(model.policy, batch)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)
    assert model.policy.training, "the reference pass restores the policy's mode"


def test_resume_accumulation_precompute_checkpoint_and_export(tmp_path, tiny_model_dir, pair_files, capsys):
    model_dir = tiny_model_dir("qwen2")
    common = (*LORA, "optim.lr=2e-2", "optim.sched.max_steps=4", "data.micro_batch_size=2")
    _, straight = run(tmp_path, "straight", model_dir, pair_files, "trainer.max_steps=4", *common)
    run(
        tmp_path,
        "resumed",
        model_dir,
        pair_files,
        "trainer.max_steps=2",
        "reference.mode=precompute",
        *common,
    )
    _, resumed = run(
        tmp_path,
        "resumed",
        model_dir,
        pair_files,
        "trainer.max_steps=4",
        "reference.mode=precompute",
        *common,
    )
    a, b = records(straight, "train"), records(resumed, "train")
    assert a[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-5), step
    assert a[4]["train/loss"] < a[1]["train/loss"], "the adapter should learn"

    checkpoint = resumed / "checkpoints/step_4"
    assert json.loads((checkpoint / "model/adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapted = PeftModel.from_pretrained(base, checkpoint / "model").eval()
    ids = torch.tensor([[0, 5, 17, 23, 42, 8, 9]])
    with torch.no_grad():
        expected = adapted(ids).logits
    export = tmp_path / "export"
    status, err = run_export(checkpoint, export, capsys)
    assert status == 2 and "--merge" in err
    status, err = run_export(checkpoint, export, capsys, "--merge")
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)


def test_export_full_finetune_copies_model(tmp_path, tiny_model_dir, pair_files, capsys):
    _, out = run(tmp_path, "full", tiny_model_dir("llama"), pair_files, "trainer.max_steps=1")
    export = tmp_path / "export"
    status, err = run_export(out / "checkpoints/step_1", export, capsys)
    assert status == 0, err
    ids = torch.tensor([[0, 5, 17, 23]])
    a = AutoModelForCausalLM.from_pretrained(export)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_1/model")(ids).logits
    assert torch.equal(a, b)


def test_checkpoint_and_export_files_follow_the_umask(tmp_path, tiny_model_dir, pair_files):
    """A teammate can read what a run writes: under umask 022 every file of a checkpoint and of a merged
    export is 0644 and every directory 0755 (safetensors wrote its files 0600)."""
    previous = os.umask(0o022)
    try:
        _, out = run(tmp_path, "run", tiny_model_dir("llama"), pair_files, "trainer.max_steps=1", *LORA)
        export = export_checkpoint(out / "checkpoints/step_1", tmp_path / "export", merge=True)
    finally:
        os.umask(previous)
    for root in (out / "checkpoints/step_1", export):
        modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
        assert any(name.endswith(".safetensors") for name in modes), modes
        wrong = {
            name: oct(mode)
            for name, mode in modes.items()
            if mode != (0o755 if (root / name).is_dir() else 0o644)
        }
        assert wrong == {}, root

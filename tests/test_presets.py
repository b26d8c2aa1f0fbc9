"""Presets: every packaged preset trains one step on a tiny local model of its architecture."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.recipe import train
from preftune.tools.presets import preset_names, preset_text

from conftest import records

ARCH = {"llama3.1": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma2": "gemma2"}


def test_every_model_has_a_full_and_a_lora_preset_that_cites_its_recipe():
    names = preset_names()
    assert names == sorted(
        f"{m}-{size}-{kind}"
        for m, size in (
            ("gemma2", "9b"),
            ("llama3.1", "8b"),
            ("mistral", "7b"),
            ("qwen2.5", "7b"),
            ("qwen3", "8b"),
        )
        for kind in ("full", "lora")
    )
    for name in names:
        text = preset_text(name)
        assert "arXiv:" in text, f"{name} cites no published recipe"
        cfg = yaml.safe_load(text)
        assert ("lora" in cfg["model"]) == name.endswith("-lora")
        assert cfg["distributed"]["strategy"] == ("fsdp2" if name.endswith("-full") else "ddp")


def test_unknown_preset_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"unknown preset 'llama3-8b-lora'.*preset:llama3.1-8b-lora"):
        load_config("preset:llama3-8b-lora", ["model.path=x", "data.train=x"])


def test_presets_command_lists_them(capsys):
    assert main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [f"preset:{name}" for name in preset_names()]


@pytest.mark.slow
@pytest.mark.parametrize("name", preset_names())
def test_one_step_of_every_preset(tmp_path, name, tiny_model_dir, pair_files):
    output_dir = tmp_path / "run"
    overrides = [
        f"model.path={tiny_model_dir(ARCH[name.split('-')[0]])}",
        f"data.train={pair_files['train']}",
        f"output_dir={output_dir}",
        "data.max_seq_length=48",
        "data.global_batch_size=4",
        "data.micro_batch_size=2",
        "trainer.max_steps=1",
        *(["model.lora.r=4"] if name.endswith("-lora") else []),
    ]
    cfg = load_config(f"preset:{name}", overrides)
    preset = yaml.safe_load(preset_text(name))
    assert cfg.dpo.ref_policy_kl_penalty == preset["dpo"]["ref_policy_kl_penalty"]
    assert cfg.optim.lr == preset["optim"]["lr"]
    train(cfg)
    step = records(output_dir, "train")[1]
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "bfloat16" and saved["dpo"] == dict(cfg.dpo)
    if preset["dpo"]["preference_loss"] == "dpo":  # policy == reference at step 0
        assert step["train/loss"] == pytest.approx(math.log(2), abs=1e-3)
    else:  # simpo: reference-free, any finite value
        assert math.isfinite(step["train/loss"])
    model_dir = output_dir / "checkpoints/step_1/model"
    if name.endswith("-lora"):
        assert json.loads((model_dir / "adapter_config.json").read_text())["r"] == 4
    else:
        assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"

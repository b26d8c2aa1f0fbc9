"""The model card ``preftune export`` writes, and ``--push-to-hub``'s failures: each one line, the local
export kept, nothing reported as pushed."""

from __future__ import annotations

import socket

import pytest
import yaml
from huggingface_hub import constants
from omegaconf import OmegaConf

from preftune.cli import main
from preftune.tools.model_card import ModelCard, _sources

from conftest import records, run


def test_card_front_matter_names_hub_datasets_and_the_base():
    card = ModelCard(
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        losses=["dpo", "rpo_sq"],
        beta=0.05,
        steps=120,
        pairs_seen=15360,
        learning_rate=5e-7,
        datasets=["HuggingFaceH4/ultrafeedback_binarized"],
        data_files=["extra.jsonl"],
    )
    _, front, body = card.render("me/qwen-dpo").split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
        "library_name": "transformers",
        "tags": ["dpo", "preftune", "rpo_sq"],
        "datasets": ["HuggingFaceH4/ultrafeedback_binarized"],
    }
    assert "| loss | dpo + rpo_sq |" in body and "| preference pairs seen | 15360 |" in body
    assert "HuggingFaceH4/ultrafeedback_binarized, extra.jsonl" in body
    assert "The run had no validation set." in body
    assert 'from_pretrained("me/qwen-dpo")' in body


def test_data_sources_split_into_hub_ids_and_local_files():
    entries = OmegaConf.create(
        [
            {"hub": "org/prefs", "split": "train_prefs"},
            {"path": "/data/a.jsonl", "weight": 2.0},
            "/data/b.jsonl",
        ]
    )
    # a local file by its path (not its name alone: train.jsonl in which directory?)
    assert _sources(entries) == [("hub", "org/prefs"), ("local", "/data/a.jsonl"), ("local", "/data/b.jsonl")]
    assert _sources(None) == [] and _sources("/x/y.parquet") == [("local", "/x/y.parquet")]


def closed_port() -> int:
    """A local port with nothing listening on it (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_push_to_hub_failures_are_one_line_and_never_reported_done(
    tmp_path, tiny_model_dir, pair_files, monkeypatch, capsys
):
    _, out = run(tmp_path, "full", tiny_model_dir("llama"), pair_files, "trainer.max_steps=1")
    checkpoint = str(out / "checkpoints/step_1")

    def export(name: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(
            ["export", "--checkpoint", checkpoint, "--output", str(tmp_path / name), "--push-to-hub", "me/x"]
        )
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, stdout, err = export("offline")
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "offline").exists(), "checked before the export starts"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    code, stdout, err = export("no_token")
    assert code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    assert not (tmp_path / "no_token").exists()

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    code, stdout, err = export("unreachable")
    assert code == 1 and err.count("\n") == 1
    assert "upload to me/x failed and the model files were not committed" in err
    assert "exported" in stdout and "pushed" not in stdout
    card = (tmp_path / "unreachable/README.md").read_text()
    assert 'from_pretrained("me/x")' in card and "| optimizer steps | 1 |" in card
    assert f"| training data | {pair_files['train']} |" in card
    assert f"| validation data | {pair_files['validation']} |" in card
    val = records(out, "val")[1]
    assert f"| reward_margin_mean | {val['val/reward_margin_mean']:.4f} |" in card

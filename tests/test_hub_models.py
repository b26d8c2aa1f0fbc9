"""Hub model ids: ``model.path: org/name`` resolves through the normal Hugging Face cache (laid out here,
read with HF_HUB_OFFLINE=1), training, the reference cache and the LoRA merge on export find the model by
its id, and a missing id is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from peft import PeftModel
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.modeling.hub import check_model_source, local_model_dir
from preftune.modeling.reference_cache import model_fingerprint

from conftest import records

REPO = "tiny-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """The Hub cache layout huggingface_hub writes: blobs named by content hash, a snapshot of symlinks to
    them for one commit, and refs/main naming that commit. Returns the snapshot directory."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / SHA
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    return snapshot


def preftune(capsys, *args: str) -> tuple[int, str, str]:
    """``preftune ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_a_local_path_that_is_not_a_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="the directory has no config.json"):
        check_model_source(str(tmp_path))
    with pytest.raises(ConfigError, match="no such directory"):
        check_model_source(str(tmp_path / "missing" / "model"))


def test_precompute_fingerprints_a_hub_id_by_its_cached_files(tmp_path, tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir("llama")
    snapshot = lay_out_hub_cache(tmp_path / "hub", REPO, model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert local_model_dir(REPO) == snapshot and local_model_dir(str(model_dir)) == model_dir
    assert model_fingerprint(local_model_dir(REPO), "float32") == model_fingerprint(model_dir, "float32")


@pytest.mark.slow
def test_hub_id_trains_exports_and_is_named_in_the_card(
    tmp_path, tiny_model_dir, pair_files, monkeypatch, capsys
):
    snapshot = lay_out_hub_cache(tmp_path / "hub", REPO, tiny_model_dir("llama"))
    # HF_HUB_OFFLINE=1 HF_HUB_CACHE=hub HF_HOME=hf_home, as huggingface_hub reads them at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "run"
    sizes = ["data.max_seq_length=48", "data.global_batch_size=4", "data.micro_batch_size=2"]
    status, stdout, stderr = preftune(
        capsys,
        *("train", "--config", "preset:llama3.1-8b-lora", f"model.path={REPO}", f"output_dir={out}"),
        *(f"data.train={pair_files['train']}", f"data.validation={pair_files['validation']}"),
        *(*sizes, "model.lora.r=4", "trainer.max_steps=2", "optim.lr=1e-2", "optim.sched.warmup_steps=0"),
        "reference.mode=precompute",
    )
    assert status == 0, stderr
    assert "reference log-probs computed into" in stdout
    checkpoint = out / "checkpoints/step_2"
    assert (
        json.loads((checkpoint / "model/adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    )

    export = tmp_path / "export"
    status, _, stderr = preftune(
        capsys, "export", "--checkpoint", str(checkpoint), "--output", str(export), "--merge"
    )
    assert status == 0, stderr
    ids = torch.tensor([[0, 5, 17, 23, 42]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), checkpoint / "model")
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(export).eval()(ids).logits,
            adapted.eval()(ids).logits,
            atol=1e-5,
            rtol=0,
        )
    card = (export / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == REPO and meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["dpo", "preftune"] and "datasets" not in meta  # local files only
    val = records(out, "val")
    assert max(val) == 2
    assert "| optimizer steps | 2 |" in body and "| preference pairs seen | 8 |" in body
    assert "| β (dpo.ref_policy_kl_penalty) | 5 |" in body and "| loss | dpo |" in body
    assert f"| acc | {val[2]['val/acc']:.4f} |" in body and f"| loss | {val[2]['val/loss']:.4f} |" in body
    assert f'AutoModelForCausalLM.from_pretrained("{export}")' in body

    status, _, stderr = preftune(
        capsys, "train", "--config", "preset:llama3.1-8b-lora", "model.path=tiny-org/missing", "data.train=x"
    )
    assert status == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "model.path=tiny-org/missing" in stderr and "HF_HUB_OFFLINE=1" in stderr
